/**
 * One virtqueue driven at full speed for the load generator. The front-end's handshake set the ring up
 * (VirtqueueDriver: ring areas, kick/call eventfds); from then on this class owns the ring and bypasses the
 * driver's general-purpose bookkeeping: every in-flight slot has a fixed descriptor chain
 * (header → data → status), a fixed header/status area and a fixed data buffer in guest memory, all written
 * once at setup. Submitting a request writes the header fields, the data descriptor's length and direction,
 * the status byte and one avail-ring entry; a batch ends with one avail.idx store and at most one kick.
 * Nothing is allocated per request.
 */
import { DescFlag, USED_F_NO_NOTIFY, needsEvent } from '../../../protocol/split-ring.js';
import { BlkRequestType } from '../../../protocol/virtio-blk.js';
import { sys, addressOf } from '../../../src/sys/libc.js';
import { lastErrno, Errno, SyscallError } from '../../../src/sys/errors.js';
import { memoryFence } from '../frontend/memory-fence.js';
import type { GuestMemory } from '../frontend/guest-memory.js';
import type { VirtqueueDriver } from '../frontend/virtqueue-driver.js';

/** Bytes of the per-slot header + status area: 16-byte header, status at +16, padded to 32. */
const META_STRIDE = 32;
const STATUS_OFFSET = 16;
const DESCRIPTOR_WORDS = 4;
const INDIRECT_TABLE_BYTES = 3 * 16;
export const STATUS_PENDING = 0xff;

const kickValue = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);
const kickAddress = addressOf(kickValue);

export interface LoadQueueOptions {
  /** In-flight requests (slots). */
  depth: number;
  /** Largest data transfer of one request (bytes). */
  maxDataBytes: number;
  /** One INDIRECT descriptor per request instead of a 3-descriptor chain. */
  indirect: boolean;
  /** Bytes the data buffers are filled with at setup (so writes carry non-zero data). */
  fill?: (bytes: Uint8Array, slot: number) => void;
}

/** Descriptors one request needs in the ring's table. */
export function descriptorsPerRequest(indirect: boolean): number {
  return indirect ? 1 : 3;
}

function u32View(bytes: Uint8Array): Uint32Array {
  if (bytes.byteOffset % 4 !== 0) throw new RangeError('guest view is not 4-byte aligned');
  return new Uint32Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.byteLength / 4));
}

function u16View(bytes: Uint8Array): Uint16Array {
  if (bytes.byteOffset % 2 !== 0) throw new RangeError('guest view is not 2-byte aligned');
  return new Uint16Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.byteLength / 2));
}

function splitAddress(words: Uint32Array, at: number, gpa: number): void {
  words[at] = gpa >>> 0;
  words[at + 1] = Math.floor(gpa / 0x1_0000_0000);
}

export class LoadQueue {
  readonly index: number;
  readonly size: number;
  readonly depth: number;
  readonly kickFd: number;
  readonly callFd: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  private readonly mask: number;
  /** Per slot: data buffer (a zero-copy view of guest memory, maxDataBytes long). */
  readonly data: Uint8Array[] = [];
  /** Per slot: what is in flight (valid while the slot is busy). */
  readonly slotOffset: Float64Array;
  readonly slotBytes: Float64Array;
  readonly slotType: Uint8Array;
  readonly slotSubmitMs: Float64Array;
  /** Free slots (stack) and how many there are. */
  private readonly freeSlots: Int32Array;
  private freeCount: number;
  /** Slots of the batch being built (stamped and published together). */
  private readonly batch: Int32Array;
  private batchCount = 0;

  /** Main descriptor table, 4 u32 per descriptor. */
  private readonly desc: Uint32Array;
  /** Where each slot's chain lives: `desc`, or its indirect table (4 u32 per descriptor). */
  private readonly chainWords: Uint32Array[] = [];
  private readonly avail: Uint16Array;
  private readonly usedU16: Uint16Array;
  private readonly usedU32: Uint32Array;
  private readonly usedEventAt: number;
  private readonly availEventAt: number;
  private readonly metaWords: Uint32Array;
  private readonly metaBytes: Uint8Array;

  private availIdx: number;
  private lastKickIdx: number;
  private lastUsedIdx: number;

  /** Counters since construction. */
  kicks = 0;
  suppressedKicks = 0;
  completions = 0;

  constructor(memory: GuestMemory, driver: VirtqueueDriver, options: LoadQueueOptions) {
    const { depth, indirect } = options;
    this.index = driver.index;
    this.size = driver.size;
    this.mask = driver.size - 1;
    this.depth = depth;
    this.kickFd = driver.kickFd;
    this.callFd = driver.callFd;
    this.eventIdx = driver.eventIdx;
    this.indirect = indirect;
    if (this.callFd < 0) throw new RangeError('the load generator needs call eventfds');
    if (depth < 1 || depth * descriptorsPerRequest(indirect) > driver.size) {
      throw new RangeError(
        `queue depth ${depth} needs ${depth * descriptorsPerRequest(indirect)} descriptors; the ring has ${driver.size}`,
      );
    }
    if (driver.inflight !== 0) throw new RangeError(`queue ${driver.index} has requests in flight`);

    const ring = driver.ring;
    this.desc = u32View(memory.view(ring.descGpa, 16 * this.size));
    this.avail = u16View(memory.view(ring.availGpa, 6 + 2 * this.size));
    const usedBytes = memory.view(ring.usedGpa, 6 + 8 * this.size);
    this.usedU16 = u16View(usedBytes);
    this.usedU32 = u32View(usedBytes);
    this.usedEventAt = 2 + this.size;
    this.availEventAt = 2 + 4 * this.size;
    // Continue from wherever the driver's indices stand (0 after a fresh handshake).
    this.availIdx = this.lastKickIdx = this.lastUsedIdx = driver.indices.availIdx;

    const metaGpa = memory.alloc(depth * META_STRIDE, { align: 64 });
    this.metaBytes = memory.view(metaGpa, depth * META_STRIDE);
    this.metaWords = u32View(this.metaBytes);
    const stride = Math.ceil(options.maxDataBytes / 4096) * 4096;
    const dataGpa = memory.alloc(depth * stride, { align: 4096 });
    const tablesGpa = indirect ? memory.alloc(depth * INDIRECT_TABLE_BYTES, { align: 16 }) : -1;

    for (let s = 0; s < depth; s++) {
      const headerGpa = metaGpa + s * META_STRIDE;
      const bufferGpa = dataGpa + s * stride;
      const data = memory.view(bufferGpa, options.maxDataBytes);
      if (options.fill) options.fill(data, s);
      else data.fill(0);
      this.data.push(data);
      let words: Uint32Array;
      let base: number;
      if (indirect) {
        const tableGpa = tablesGpa + s * INDIRECT_TABLE_BYTES;
        words = u32View(memory.view(tableGpa, INDIRECT_TABLE_BYTES));
        base = 0;
        const d = s * DESCRIPTOR_WORDS;
        splitAddress(this.desc, d, tableGpa);
        this.desc[d + 2] = INDIRECT_TABLE_BYTES;
        this.desc[d + 3] = DescFlag.INDIRECT;
      } else {
        words = this.desc;
        base = 3 * s;
      }
      // header → data → status; `next` indices are relative to the table the chain lives in.
      const h = (base + 0) * DESCRIPTOR_WORDS;
      splitAddress(words, h, headerGpa);
      words[h + 2] = 16;
      words[h + 3] = DescFlag.NEXT | ((base + 1) << 16);
      const dd = (base + 1) * DESCRIPTOR_WORDS;
      splitAddress(words, dd, bufferGpa);
      words[dd + 2] = options.maxDataBytes;
      words[dd + 3] = DescFlag.NEXT | ((base + 2) << 16);
      const st = (base + 2) * DESCRIPTOR_WORDS;
      splitAddress(words, st, headerGpa + STATUS_OFFSET);
      words[st + 2] = 1;
      words[st + 3] = DescFlag.WRITE;
      this.chainWords.push(words);
    }
    this.slotOffset = new Float64Array(depth);
    this.slotBytes = new Float64Array(depth);
    this.slotType = new Uint8Array(depth);
    this.slotSubmitMs = new Float64Array(depth);
    this.freeSlots = new Int32Array(depth);
    for (let s = 0; s < depth; s++) this.freeSlots[s] = depth - 1 - s;
    this.freeCount = depth;
    this.batch = new Int32Array(depth);
    memoryFence();
  }

  get inflight(): number {
    return this.depth - this.freeCount;
  }

  get free(): number {
    return this.freeCount;
  }

  /** Takes a free slot (or -1). The caller fills it with prepare() and then submits it with enqueue(). */
  takeSlot(): number {
    if (this.freeCount === 0) return -1;
    return this.freeSlots[--this.freeCount] as number;
  }

  /** Gives back a slot that was taken but not enqueued. */
  returnSlot(slot: number): void {
    this.freeSlots[this.freeCount++] = slot;
  }

  /** Writes the request into the slot's header and chain: IN / OUT with `bytes` of data, or FLUSH (no data). */
  prepare(slot: number, type: number, offset: number, bytes: number): void {
    const m = slot * (META_STRIDE / 4);
    const sector = offset / 512;
    this.metaWords[m] = type;
    this.metaWords[m + 1] = 0;
    this.metaWords[m + 2] = sector >>> 0;
    this.metaWords[m + 3] = Math.floor(sector / 0x1_0000_0000);
    this.metaBytes[slot * META_STRIDE + STATUS_OFFSET] = STATUS_PENDING;
    const words = this.chainWords[slot] as Uint32Array;
    const base = this.indirect ? 0 : 3 * slot;
    const h = base * DESCRIPTOR_WORDS;
    if (type === BlkRequestType.FLUSH) {
      // header → status directly.
      words[h + 3] = DescFlag.NEXT | ((base + 2) << 16);
    } else {
      words[h + 3] = DescFlag.NEXT | ((base + 1) << 16);
      const dd = h + DESCRIPTOR_WORDS;
      words[dd + 2] = bytes;
      words[dd + 3] = DescFlag.NEXT | (type === BlkRequestType.IN ? DescFlag.WRITE : 0) | ((base + 2) << 16);
    }
    this.slotOffset[slot] = offset;
    this.slotBytes[slot] = bytes;
    this.slotType[slot] = type;
  }

  /** Puts a prepared slot on the avail ring (not yet visible: publish() makes the batch visible). */
  enqueue(slot: number): void {
    this.avail[2 + (this.availIdx & this.mask)] = this.indirect ? slot : 3 * slot;
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.batch[this.batchCount++] = slot;
  }

  /** Makes the enqueued batch visible (one avail.idx store), stamps it `nowMs`, kicks unless suppressed. */
  publish(nowMs: number): number {
    const n = this.batchCount;
    if (n === 0) return 0;
    for (let i = 0; i < n; i++) this.slotSubmitMs[this.batch[i] as number] = nowMs;
    this.batchCount = 0;
    memoryFence();
    this.avail[1] = this.availIdx;
    memoryFence();
    const old = this.lastKickIdx;
    this.lastKickIdx = this.availIdx;
    const wanted = this.eventIdx
      ? needsEvent(this.usedU16[this.availEventAt] as number, this.availIdx, old)
      : ((this.usedU16[0] as number) & USED_F_NO_NOTIFY) === 0;
    if (wanted) {
      if (sys.write(this.kickFd, kickAddress, 8) < 0) {
        const errno = lastErrno();
        if (errno !== Errno.EAGAIN) throw new SyscallError('write(kick eventfd)', errno);
      }
      this.kicks++;
    } else {
      this.suppressedKicks++;
    }
    return n;
  }

  /** used.idx as the device last published it. */
  private usedIdx(): number {
    const idx = this.usedU16[1] as number;
    memoryFence();
    return idx;
  }

  /**
   * Reaps every visible completion: for each, calls `done(slot, status)` and frees the slot.
   * Returns how many were reaped. Does not re-arm interrupts (see rearm()).
   */
  reap(done: (queue: LoadQueue, slot: number, status: number) => void): number {
    const usedIdx = this.usedIdx();
    let n = 0;
    while (this.lastUsedIdx !== usedIdx) {
      const at = 1 + 2 * (this.lastUsedIdx & this.mask);
      const id = this.usedU32[at] as number;
      this.lastUsedIdx = (this.lastUsedIdx + 1) & 0xffff;
      let slot: number;
      if (this.indirect) slot = id;
      else {
        if (id % 3 !== 0) throw new RangeError(`queue ${this.index}: used id ${id} is not the head of a request chain`);
        slot = id / 3;
      }
      if (slot >= this.depth) throw new RangeError(`queue ${this.index}: used id ${id} names no request slot`);
      const status = this.metaBytes[slot * META_STRIDE + STATUS_OFFSET] as number;
      this.freeSlots[this.freeCount++] = slot;
      if (this.freeCount > this.depth) throw new RangeError(`queue ${this.index}: used id ${id} completed twice`);
      n++;
      done(this, slot, status);
    }
    this.completions += n;
    return n;
  }

  /** Asks for an interrupt at the next completion; true if completions arrived meanwhile (reap again). */
  rearm(): boolean {
    if (this.eventIdx) {
      this.avail[this.usedEventAt] = this.lastUsedIdx;
      memoryFence();
    }
    return this.usedIdx() !== this.lastUsedIdx;
  }

  describe(): string {
    return (
      `queue ${this.index}: avail.idx ${this.avail[1]}, used.idx ${this.usedU16[1]}, reaped up to ${this.lastUsedIdx}, ` +
      `${this.inflight} in flight, used.flags 0x${(this.usedU16[0] as number).toString(16)}` +
      (this.eventIdx ? `, avail_event ${this.usedU16[this.availEventAt]}, used_event ${this.avail[this.usedEventAt]}` : '')
    );
  }
}
