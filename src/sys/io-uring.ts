/**
 * A minimal io_uring ring over raw syscalls (no liburing): io_uring_setup / io_uring_enter through libc's
 * `syscall()`, the three ring areas mmapped and driven through typed-array views.
 *
 * `syscall` is variadic in C; it is bound here with a fixed seven-`long` prototype. That is sound on the
 * Linux ABIs Node runs on (x86-64, aarch64): glibc's `syscall` is an assembly shim that takes its arguments
 * from the integer argument registers whether the caller thinks it is variadic or not, and a fixed
 * prototype avoids koffi's per-call type parsing for variadic arguments.
 *
 * The ring is used by one thread (the one that created it) without SQPOLL: the kernel reads the submission
 * queue only inside io_uring_enter, so the SQ tail is published with a release store before each enter and
 * the SQ head need never be read. The CQ tail is read with an acquire load, the CQ head published with a
 * release store once the entries were consumed.
 *
 * User data is 32 bits here (the high word of `user_data` is always 0).
 */
import koffi from 'koffi';
import { libc, sys, addressOf, PROT_READ, PROT_WRITE, MAP_SHARED } from './libc.js';
import { Errno, SyscallError, lastErrno } from './errors.js';

type Syscall7 = (nr: number, a: number, b: number, c: number, d: number, e: number, f: number) => number;
const syscall7 = libc.func('long syscall(long nr, long a, long b, long c, long d, long e, long f)') as Syscall7;

export const SYS_io_uring_setup = 425;
export const SYS_io_uring_enter = 426;
export const SYS_io_uring_register = 427;
export const IORING_REGISTER_EVENTFD = 4;
export const IORING_REGISTER_PROBE = 8;
/** io_uring_probe_op.flags: the kernel implements the opcode. */
const IO_URING_OP_SUPPORTED = 1;
/** Entries of the probe's op table: every opcode up to 255 fits. */
const PROBE_OPS = 256;

export const IORING_OFF_SQ_RING = 0;
export const IORING_OFF_CQ_RING = 0x8000000;
export const IORING_OFF_SQES = 0x10000000;

export const IoUringSetup = {
  CQSIZE: 1 << 3,
  CLAMP: 1 << 4,
  SUBMIT_ALL: 1 << 7,
  COOP_TASKRUN: 1 << 8,
  SINGLE_ISSUER: 1 << 12,
  DEFER_TASKRUN: 1 << 13,
} as const;

export const IoUringFeature = {
  SINGLE_MMAP: 1 << 0,
  NODROP: 1 << 1,
} as const;

export const IORING_ENTER_GETEVENTS = 1 << 0;

export const IoUringOp = {
  NOP: 0,
  READV: 1,
  WRITEV: 2,
  FSYNC: 3,
  /** Linux 5.6: off = offset, addr = length, len = mode. */
  FALLOCATE: 17,
  /** Linux 5.6: one buffer (addr, len) instead of an iovec array: no iovec import per request. */
  READ: 22,
  WRITE: 23,
} as const;

/** IOSQE_* flags of an SQE. */
export const SqeFlag = {
  IO_DRAIN: 1 << 1,
  IO_LINK: 1 << 2,
} as const;

export const IORING_FSYNC_DATASYNC = 1;

export const SQE_BYTES = 64;
export const SQE_WORDS = SQE_BYTES / 4;
export const CQE_BYTES = 16;
export const PARAMS_BYTES = 120;

const MAP_POPULATE = 0x8000;

// ---------------------------------------------------------------- pure helpers (unit-tested)

/** Ring counters are free-running u32s; the slot of a counter is `counter & mask`. */
export function ringSlot(counter: number, mask: number): number {
  return (counter & mask) >>> 0;
}

/** Entries between head and tail (u32 wrap-around). */
export function ringCount(head: number, tail: number): number {
  return (tail - head) >>> 0;
}

export function ringAdvance(counter: number, by: number): number {
  return (counter + by) >>> 0;
}

export interface SqeFields {
  opcode: number;
  flags: number;
  fd: number;
  /** File offset (up to 2^53). */
  offset: number;
  /** Host address (iovec array, buffer). */
  address: number;
  /** iovec count or byte length. */
  length: number;
  /** rw_flags / fsync_flags. */
  opFlags: number;
  /** 32-bit user data; returned in the CQE. */
  userData: number;
}

/**
 * Writes one 64-byte SQE as 16 little-endian u32 words starting at `words[base]`:
 *   0 opcode|flags<<8|ioprio<<16, 1 fd, 2-3 off, 4-5 addr, 6 len, 7 op flags, 8-9 user_data, 10-15 zero.
 */
export function encodeSqe(
  words: Uint32Array,
  base: number,
  opcode: number,
  flags: number,
  fd: number,
  offset: number,
  address: number,
  length: number,
  opFlags: number,
  userData: number,
): void {
  words[base] = (opcode & 0xff) | ((flags & 0xff) << 8);
  words[base + 1] = fd;
  words[base + 2] = offset % 0x1_0000_0000;
  words[base + 3] = Math.floor(offset / 0x1_0000_0000);
  words[base + 4] = address % 0x1_0000_0000;
  words[base + 5] = Math.floor(address / 0x1_0000_0000);
  words[base + 6] = length;
  words[base + 7] = opFlags;
  words[base + 8] = userData;
  words[base + 9] = 0;
  words[base + 10] = 0;
  words[base + 11] = 0;
  words[base + 12] = 0;
  words[base + 13] = 0;
  words[base + 14] = 0;
  words[base + 15] = 0;
}

export function decodeSqe(words: Uint32Array, base: number): SqeFields {
  const w = (i: number): number => words[base + i] ?? 0;
  return {
    opcode: w(0) & 0xff,
    flags: (w(0) >>> 8) & 0xff,
    fd: w(1) | 0,
    offset: w(2) + w(3) * 0x1_0000_0000,
    address: w(4) + w(5) * 0x1_0000_0000,
    length: w(6),
    opFlags: w(7),
    userData: w(8),
  };
}

export interface SqRingOffsets {
  head: number;
  tail: number;
  ringMask: number;
  ringEntries: number;
  flags: number;
  dropped: number;
  array: number;
}

export interface CqRingOffsets {
  head: number;
  tail: number;
  ringMask: number;
  ringEntries: number;
  overflow: number;
  cqes: number;
  flags: number;
}

/** What io_uring_setup wrote back into struct io_uring_params. */
export interface RingParams {
  sqEntries: number;
  cqEntries: number;
  flags: number;
  features: number;
  sqOff: SqRingOffsets;
  cqOff: CqRingOffsets;
}

export function encodeSetupParams(flags: number, cqEntries = 0): Uint8Array {
  const bytes = new Uint8Array(PARAMS_BYTES);
  const view = new DataView(bytes.buffer);
  view.setUint32(4, cqEntries, true);
  view.setUint32(8, flags, true);
  return bytes;
}

export function decodeSetupParams(bytes: Uint8Array): RingParams {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u32 = (at: number): number => view.getUint32(at, true);
  return {
    sqEntries: u32(0),
    cqEntries: u32(4),
    flags: u32(8),
    features: u32(20),
    sqOff: { head: u32(40), tail: u32(44), ringMask: u32(48), ringEntries: u32(52), flags: u32(56), dropped: u32(60), array: u32(64) },
    cqOff: { head: u32(80), tail: u32(84), ringMask: u32(88), ringEntries: u32(92), overflow: u32(96), cqes: u32(100), flags: u32(104) },
  };
}

export interface RingMapSizes {
  sqRingBytes: number;
  cqRingBytes: number;
  sqesBytes: number;
  /** SQ and CQ rings share one mapping (IORING_FEAT_SINGLE_MMAP): map max(sq, cq) bytes once. */
  single: boolean;
}

export function ringMapSizes(params: RingParams): RingMapSizes {
  let sqRingBytes = params.sqOff.array + params.sqEntries * 4;
  let cqRingBytes = params.cqOff.cqes + params.cqEntries * CQE_BYTES;
  const single = (params.features & IoUringFeature.SINGLE_MMAP) !== 0;
  if (single) sqRingBytes = cqRingBytes = Math.max(sqRingBytes, cqRingBytes);
  return { sqRingBytes, cqRingBytes, sqesBytes: params.sqEntries * SQE_BYTES, single };
}

// ---------------------------------------------------------------- the ring

export interface IoUringOptions {
  /** Submission queue entries (rounded up to a power of two by the kernel, clamped to its maximum). */
  entries: number;
}

/** Setup flag sets tried in order: the first one the kernel accepts wins. */
const SETUP_ATTEMPTS: readonly number[] = [
  // Not DEFER_TASKRUN: there completions run only inside io_uring_enter(GETEVENTS), newer kernels run a
  // bounded number of them per call (the rest wait on a retry list), and the registered eventfd is only
  // signalled when the first work item is queued. Requests held behind a draining FLUSH are released as a
  // burst of such items, so a worker that sleeps on the eventfd after one reap could wait for ever
  // (test/unit/uring-executor.test.ts, "a burst behind a FLUSH"). COOP_TASKRUN posts completions whenever
  // this thread enters the kernel or is woken, and every posted completion signals the eventfd.
  IoUringSetup.CLAMP | IoUringSetup.SUBMIT_ALL | IoUringSetup.SINGLE_ISSUER | IoUringSetup.COOP_TASKRUN,
  IoUringSetup.CLAMP | IoUringSetup.SUBMIT_ALL | IoUringSetup.COOP_TASKRUN,
  IoUringSetup.CLAMP,
];

interface Mapping {
  address: number;
  length: number;
}

export class IoUring {
  readonly fd: number;
  readonly params: RingParams;
  readonly sqEntries: number;
  readonly cqEntries: number;
  private readonly mappings: Mapping[] = [];
  private readonly sqRing: Uint32Array;
  private readonly cqRing: Uint32Array;
  private readonly cqInts: Int32Array;
  /** The SQE array as u32 words. */
  private readonly sqes: Uint32Array;
  private readonly sqTailWord: number;
  private readonly cqHeadWord: number;
  private readonly cqTailWord: number;
  private readonly cqesWord: number;
  private readonly sqMask: number;
  private readonly cqMask: number;
  private sqTail = 0;
  private cqHead = 0;
  /** Prepared SQEs the kernel has not consumed yet. */
  private unsubmitted = 0;
  private closed = false;
  /** Opcodes the kernel implements (IORING_REGISTER_PROBE), read on first use. */
  private probedOps: Uint8Array | null = null;

  /** Creates a ring; throws SyscallError (io_uring_setup: ENOSYS / EPERM / ...) when io_uring is unavailable. */
  static create(options: IoUringOptions): IoUring {
    let lastError = 0;
    for (const flags of SETUP_ATTEMPTS) {
      const params = encodeSetupParams(flags);
      const fd = syscall7(SYS_io_uring_setup, options.entries, addressOf(params), 0, 0, 0, 0);
      if (fd >= 0) {
        try {
          return new IoUring(fd, decodeSetupParams(params));
        } catch (error) {
          sys.close(fd);
          throw error;
        }
      }
      lastError = lastErrno();
      // EINVAL: a flag this kernel does not know; anything else (ENOSYS, EPERM, ENOMEM) will not get better.
      if (lastError !== Errno.EINVAL) break;
    }
    throw new SyscallError('io_uring_setup', lastError, `${options.entries} entries`);
  }

  private constructor(fd: number, params: RingParams) {
    this.fd = fd;
    this.params = params;
    this.sqEntries = params.sqEntries;
    this.cqEntries = params.cqEntries;
    const sizes = ringMapSizes(params);
    try {
      const sqAddress = this.map(sizes.sqRingBytes, IORING_OFF_SQ_RING);
      const cqAddress = sizes.single ? sqAddress : this.map(sizes.cqRingBytes, IORING_OFF_CQ_RING);
      const sqesAddress = this.map(sizes.sqesBytes, IORING_OFF_SQES);
      this.sqRing = new Uint32Array(koffi.view(sqAddress, sizes.sqRingBytes));
      this.cqRing = new Uint32Array(koffi.view(cqAddress, sizes.cqRingBytes));
      this.cqInts = new Int32Array(this.cqRing.buffer);
      this.sqes = new Uint32Array(koffi.view(sqesAddress, sizes.sqesBytes));
    } catch (error) {
      this.unmapAll();
      throw error;
    }
    const { sqOff, cqOff } = params;
    this.sqTailWord = sqOff.tail / 4;
    this.cqHeadWord = cqOff.head / 4;
    this.cqTailWord = cqOff.tail / 4;
    this.cqesWord = cqOff.cqes / 4;
    this.sqMask = this.sqRing[sqOff.ringMask / 4] ?? 0;
    this.cqMask = this.cqRing[cqOff.ringMask / 4] ?? 0;
    this.sqTail = Atomics.load(this.sqRing, this.sqTailWord);
    this.cqHead = Atomics.load(this.cqRing, cqOff.head / 4);
    // The SQ index array maps ring slot i to SQE i once and for all, so submitting never touches it.
    const arrayWord = sqOff.array / 4;
    for (let i = 0; i < this.sqEntries; i++) this.sqRing[arrayWord + i] = i;
  }

  private map(length: number, offset: number): number {
    const address = sys.mmap(0, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, this.fd, offset);
    if (typeof address !== 'number') throw new SyscallError('mmap', lastErrno(), `io_uring ring at offset 0x${offset.toString(16)}`);
    this.mappings.push({ address, length });
    return address;
  }

  /** SQEs that can still be prepared before the next submission. */
  get sqSpace(): number {
    return this.sqEntries - this.unsubmitted;
  }

  get pendingSubmissions(): number {
    return this.unsubmitted;
  }

  /** Queues one SQE (not yet visible to the kernel); false when the submission queue is full. */
  prepare(
    opcode: number,
    flags: number,
    fd: number,
    offset: number,
    address: number,
    length: number,
    opFlags: number,
    userData: number,
  ): boolean {
    if (this.unsubmitted >= this.sqEntries) return false;
    const slot = this.sqTail & this.sqMask;
    encodeSqe(this.sqes, slot * SQE_WORDS, opcode, flags, fd, offset, address, length, opFlags, userData);
    this.sqTail = (this.sqTail + 1) >>> 0;
    this.unsubmitted++;
    return true;
  }

  /**
   * Publishes the prepared SQEs and calls io_uring_enter once: submits them all and, when `minComplete` > 0,
   * waits until that many completions are available. Returns false if the kernel asked to reap first
   * (EBUSY / EAGAIN: completions or resources are short): the caller reaps and calls again.
   */
  submitAndWait(minComplete: number): boolean {
    Atomics.store(this.sqRing, this.sqTailWord, this.sqTail);
    const flags = minComplete > 0 ? IORING_ENTER_GETEVENTS : 0;
    for (;;) {
      const n = syscall7(SYS_io_uring_enter, this.fd, this.unsubmitted, minComplete, flags, 0, 0);
      if (n >= 0) {
        this.unsubmitted -= n;
        return true;
      }
      const errno = lastErrno();
      if (errno === Errno.EINTR) continue;
      if (errno === Errno.EAGAIN || errno === Errno.EBUSY) return false;
      throw new SyscallError('io_uring_enter', errno);
    }
  }

  /** Waits (without submitting) until `minComplete` completions are available; false on EBUSY / EAGAIN. */
  wait(minComplete: number): boolean {
    for (;;) {
      const n = syscall7(SYS_io_uring_enter, this.fd, 0, minComplete, IORING_ENTER_GETEVENTS, 0, 0);
      if (n >= 0) return true;
      const errno = lastErrno();
      if (errno === Errno.EINTR) continue;
      if (errno === Errno.EAGAIN || errno === Errno.EBUSY) return false;
      throw new SyscallError('io_uring_enter', errno);
    }
  }

  /**
   * Registers an eventfd the kernel signals when completions are posted: lets an epoll loop sleep on the ring.
   */
  registerEventFd(eventFd: number): void {
    const word = new Int32Array([eventFd]);
    const n = syscall7(SYS_io_uring_register, this.fd, IORING_REGISTER_EVENTFD, addressOf(new Uint8Array(word.buffer)), 1, 0, 0);
    if (n < 0) throw new SyscallError('io_uring_register(EVENTFD)', lastErrno());
  }

  /** Whether the kernel implements `opcode` (IORING_REGISTER_PROBE, Linux 5.6; false where probing fails). */
  supportsOp(opcode: number): boolean {
    if (this.probedOps === null) {
      // struct io_uring_probe: last_op, ops_len, resv (u16), resv2[3] (u32), then 8-byte io_uring_probe_op.
      const probe = new Uint8Array(16 + PROBE_OPS * 8);
      const n = syscall7(SYS_io_uring_register, this.fd, IORING_REGISTER_PROBE, addressOf(probe), PROBE_OPS, 0, 0);
      this.probedOps = new Uint8Array(PROBE_OPS);
      if (n >= 0) {
        const count = Math.min(probe[1] ?? 0, PROBE_OPS);
        for (let i = 0; i < count; i++) {
          const at = 16 + i * 8;
          const flags = (probe[at + 2] ?? 0) | ((probe[at + 3] ?? 0) << 8);
          if ((flags & IO_URING_OP_SUPPORTED) !== 0) this.probedOps[probe[at] ?? 0] = 1;
        }
      }
    }
    return this.probedOps[opcode] === 1;
  }

  /** Completions ready to reap. */
  get cqReady(): number {
    return ringCount(this.cqHead, Atomics.load(this.cqRing, this.cqTailWord));
  }

  /**
   * Calls `onCqe(userData, res)` for every completion available, then releases them to the kernel.
   * `onCqe` may prepare SQEs but must not submit (that would re-enter the kernel mid-iteration).
   */
  reap(onCqe: (userData: number, res: number) => void): number {
    const tail = Atomics.load(this.cqRing, this.cqTailWord);
    let head = this.cqHead;
    let count = 0;
    while (head !== tail) {
      const word = this.cqesWord + (head & this.cqMask) * (CQE_BYTES / 4);
      const userData = this.cqRing[word] ?? 0;
      const res = this.cqInts[word + 2] ?? 0;
      head = (head + 1) >>> 0;
      count++;
      onCqe(userData, res);
    }
    this.cqHead = head;
    Atomics.store(this.cqRing, this.cqHeadWord, head);
    return count;
  }

  /** Unmaps the rings and closes the ring fd (the kernel cancels anything still in flight). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.unmapAll();
    sys.close(this.fd);
  }

  private unmapAll(): void {
    for (const { address, length } of this.mappings.splice(0)) sys.munmap(address, length);
  }
}

/** Whether io_uring can be set up here: null if it can, else why not (e.g. "io_uring_setup failed: ENOSYS"). */
export function probeIoUring(): string | null {
  try {
    IoUring.create({ entries: 4 }).close();
    return null;
  } catch (error) {
    return error instanceof Error ? error.message : String(error);
  }
}
