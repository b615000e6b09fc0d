/**
 * Data-plane side of an RBD image, for a worker's synchronous epoll loop: submit aio requests, watch `fd`,
 * `reap` completions. Nothing here awaits or blocks except `waitIdle` (bounded).
 *
 * How completions arrive: librbd completes requests on its own threads. With rbd_set_image_notification
 * (EVENT_TYPE_EVENTFD) it queues each finished completion on the image and writes to our eventfd; `reap`
 * reads the eventfd, then drains rbd_poll_io_events. Completions are created with no callback, so no
 * JavaScript ever runs on a librbd thread. Each carries, as its arg, the small id of its entry here (tag,
 * iovec slot): reaping looks the entry up by rbd_aio_get_arg, not by the completion's address, so nothing on
 * the request path allocates (an address is a double beyond the small-integer range: as a Map key it was
 * boxed on every insert).
 *
 * Invariants:
 * - One RbdQueue per image handle, used by one thread: the notification and its completion list are per
 *   image, so a second queue (or thread) would steal completions.
 * - librbd keeps the iovec pointer until completion (it does not copy the array): submitRead / submitWrite
 *   copy the caller's segment list into an iovec array owned here until the tag is reaped; with
 *   submitReadv / submitWritev the caller's own iovec array must stay valid and unchanged until then.
 *   Either way the memory the iovecs point to must stay mapped until the tag is reaped.
 * - Every submit is answered by exactly one reaped completion, also when librbd refuses it at submit time
 *   (then the error is queued here and the eventfd is signalled, so the loop wakes as usual).
 * - A read is answered only once all of its buffer holds image data: librbd reports the bytes it read, and
 *   returns fewer when the read runs past the end of the image as it knows it (shrunk by another client);
 *   the rest of the buffer is zeroed here, as QEMU's rbd driver does, and counted (`shortReads`), never left
 *   holding whatever the guest had there before.
 * - A queue closed with requests still in flight (a ring stopped while the cluster did not answer) is kept
 *   alive for the process's life (ORPHANS): librbd still holds pointers into its iovec arrays. Its completions
 *   then reach whichever queue polls the image next, here or on another thread: the arg carries the queue's
 *   serial beside the id, and a queue releases a completion of another serial without touching its own ids.
 */
import { librbd, type LibRbd } from './librbd.js';
import koffi from 'koffi';
import { addressOf, sys, POLLIN, IOV_MAX, IOVEC_BYTES } from '../../sys/libc.js';
import { zeroMemory } from '../../sys/net-socket.js';
import { threadId } from 'node:worker_threads';
import { drainEventFd, signalEventFd } from '../../sys/eventfd.js';

/** (tag, result): result >= 0 on success (bytes for reads and writes, 0 otherwise), else a negative errno. */
export type RbdCompletionHandler = (tag: number, result: number) => void;

/** Host-memory scatter list (guest buffers translated to host addresses), the shape the NBD client takes too. */
export interface RbdSegments {
  readonly count: number;
  readonly addresses: ArrayLike<number>;
  readonly lengths: ArrayLike<number>;
}

/** librbd refuses more iovecs than IOV_MAX in one request. */
export const RBD_MAX_SEGMENTS = IOV_MAX;
/** Completions taken per rbd_poll_io_events call. */
const POLL_BATCH = 64;
const TWO_32 = 0x1_0000_0000;
/**
 * Queue serials fit the arg's high bits (arg = serial * 2^32 + id stays a safe integer below 2^53): the thread
 * id's low 10 bits and a per-thread count of 11 bits, so queues alive at once on an image never share one.
 */
const SERIALS_PER_THREAD = 2048;
let serialsMade = 0;
function nextSerial(): number {
  return (threadId % 1024) * SERIALS_PER_THREAD + (serialsMade++ % SERIALS_PER_THREAD);
}
/** Closed queues with requests librbd still holds (see the header); never freed. */
const ORPHANS = new Set<RbdQueue>();
/** rbd_aio_write_zeroes zero_flags: 0 (RBD_WRITE_ZEROES_FLAG_THICK_PROVISION would allocate). */
const WRITE_ZEROES_FLAGS = 0;

export class RbdQueue {
  /** eventfd in the worker's epoll (level: readable while unread; read by `reap`). */
  readonly fd: number;
  private readonly lib: LibRbd;
  /**
   * The caller's tag of each request in flight, by id (the completion's arg); NaN for a free id. Ids are
   * reused through `freeIds`, and `tagOf` grows by doubling.
   */
  private tagOf = new Float64Array(64).fill(Number.NaN);
  /**
   * Per id, for a read in flight: where its iovec array is (0: not a read), how many entries it has and the
   * bytes they cover (NaN: not summed at submit, see `checkRead`).
   */
  private readIov = new Float64Array(64);
  private readIovCount = new Int32Array(64);
  private readAsked = new Float64Array(64);
  private readonly freeIds: number[] = [];
  private nextId = 0;
  private submitted = 0;
  /** Owned iovec arrays (RBD_MAX_SEGMENTS entries each) by id, made on an id's first segment list. */
  private readonly iovecs: ({ buffer: Buffer; words: Uint32Array; address: number } | undefined)[] = [];
  /** Requests librbd refused at submit: delivered by the next reap. */
  private readonly refused: { tag: number; result: number }[] = [];
  private readonly completionOut = Buffer.alloc(8);
  private readonly completionOutWords = new Uint32Array(this.completionOut.buffer, this.completionOut.byteOffset, 2);
  private readonly completionOutAddress = addressOf(this.completionOut);
  private readonly polled = Buffer.alloc(POLL_BATCH * 8);
  private readonly polledWords = new Uint32Array(this.polled.buffer, this.polled.byteOffset, POLL_BATCH * 2);
  private readonly polledAddress = addressOf(this.polled);
  private readonly pollfd = Buffer.alloc(8);
  private closed = false;
  /** Reads librbd answered with fewer bytes than asked (the rest was zeroed here). */
  shortReads = 0;
  /** The latest short read, for the log: bytes asked, bytes librbd read. */
  lastShortRead = { asked: 0, read: 0 };
  /** This queue's serial: the high half of every completion arg it makes. */
  private readonly serial = nextSerial();

  /**
   * `image` and `eventFd`: RbdImage.handle and RbdImage.eventFd (numbers, valid in every thread). The image
   * owns the eventfd: it stays open until rbd_close, so librbd never writes to a reused fd number.
   */
  constructor(
    private readonly image: number,
    eventFd: number,
  ) {
    this.lib = librbd();
    this.fd = eventFd;
  }

  /** Requests submitted and not yet reaped. */
  get inFlight(): number {
    return this.submitted + this.refused.length;
  }

  /**
   * Reads into `segments`; the list is copied (the caller may reuse it at once), the memory it points to
   * must stay mapped until the tag is reaped.
   */
  submitRead(tag: number, offset: number, segments: RbdSegments): void {
    this.submitSegments(tag, offset, segments, false);
  }

  /** Writes `segments` (copied; the memory must stay mapped and unchanged until reaped). */
  submitWrite(tag: number, offset: number, segments: RbdSegments): void {
    this.submitSegments(tag, offset, segments, true);
  }

  /** Reads into the iovec array at `iovAddress` (`iovCount` struct iovec, kept valid until reaped). */
  submitReadv(tag: number, offset: number, iovAddress: number, iovCount: number): void {
    const id = this.takeId(tag);
    this.markRead(id, iovAddress, iovCount, Number.NaN);
    const c = this.completion(id);
    if (c !== 0) this.started(id, c, this.lib.rbdAioReadv(this.image, iovAddress, iovCount, offset, c));
  }

  /** Writes the iovec array at `iovAddress` (kept valid and unchanged until reaped). */
  submitWritev(tag: number, offset: number, iovAddress: number, iovCount: number): void {
    const id = this.takeId(tag);
    const c = this.completion(id);
    if (c !== 0) this.started(id, c, this.lib.rbdAioWritev(this.image, iovAddress, iovCount, offset, c));
  }

  /** Completes once every write completed before it is durable in the cluster (and librbd's cache). */
  submitFlush(tag: number): void {
    const id = this.takeId(tag);
    const c = this.completion(id);
    if (c !== 0) this.started(id, c, this.lib.rbdAioFlush(this.image, c));
  }

  /** Deallocates the range; reads of it return zeroes afterwards (librbd zeroes partial objects). */
  submitDiscard(tag: number, offset: number, length: number): void {
    const id = this.takeId(tag);
    const c = this.completion(id);
    if (c !== 0) this.started(id, c, this.lib.rbdAioDiscard(this.image, offset, length, c));
  }

  /** Writes zeroes without sending a buffer (librbd may deallocate whole objects). */
  submitWriteZeroes(tag: number, offset: number, length: number): void {
    const id = this.takeId(tag);
    const c = this.completion(id);
    if (c !== 0) this.started(id, c, this.lib.rbdAioWriteZeroes(this.image, offset, length, c, WRITE_ZEROES_FLAGS, 0));
  }

  /**
   * Delivers every completion available now; returns how many. Never blocks. `drainSignal` false: the
   * caller knows the eventfd was read since its epoll last reported it, so the read is skipped (a
   * completion queued meanwhile is still taken here, and the eventfd it signalled stays readable).
   */
  reap(onComplete: RbdCompletionHandler, drainSignal = true): number {
    // Read before polling: a completion queued after the poll then still leaves the eventfd readable.
    if (drainSignal) drainEventFd(this.fd);
    let delivered = 0;
    // Bounded: each round takes up to POLL_BATCH; the completions in flight bound the rounds.
    for (let round = 0; round <= this.submitted / POLL_BATCH + 1; round++) {
      const n = this.lib.rbdPollIoEvents(this.image, this.polledAddress, POLL_BATCH);
      if (n <= 0) break;
      for (let i = 0; i < n; i++) {
        const c = (this.polledWords[i * 2] ?? 0) + (this.polledWords[i * 2 + 1] ?? 0) * TWO_32;
        const arg = this.lib.rbdAioGetArg(c);
        const result = this.lib.rbdAioGetReturnValue(c);
        this.lib.rbdAioRelease(c);
        // A closed queue's request, finished late: librbd is done with its memory, nobody waits for it.
        if (Math.floor(arg / TWO_32) !== this.serial) continue;
        const id = arg % TWO_32;
        // A completion we did not submit cannot happen; skip it rather than crash.
        if (!(id < this.nextId) || Number.isNaN(this.tagOf[id]!)) continue;
        const tag = this.tagOf[id]!;
        if (result >= 0 && this.readIov[id] !== 0) this.checkRead(id, result);
        this.freeId(id);
        this.submitted--;
        delivered++;
        onComplete(tag, result);
      }
      if (n < POLL_BATCH) break;
    }
    while (this.refused.length > 0) {
      const failed = this.refused.shift()!;
      delivered++;
      onComplete(failed.tag, failed.result);
    }
    return delivered;
  }

  /** Blocks up to `timeoutMs` until nothing is in flight, delivering completions; true when idle. */
  waitIdle(timeoutMs: number, onComplete: RbdCompletionHandler): boolean {
    const deadline = Date.now() + timeoutMs;
    this.pollfd.writeInt32LE(this.fd, 0);
    this.pollfd.writeInt16LE(POLLIN, 4);
    const pollfdAddress = addressOf(this.pollfd);
    for (;;) {
      this.reap(onComplete);
      if (this.inFlight === 0) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      this.pollfd.writeInt16LE(0, 6);
      sys.poll(pollfdAddress, 1, Math.min(left, 1000));
    }
  }

  /** Refuses further submits (EBADF through reap). Call when idle (`waitIdle`), before RbdImage.close. */
  close(): void {
    this.closed = true;
    // librbd may still write through this queue's iovec arrays (see the header).
    if (this.submitted > 0) ORPHANS.add(this);
  }

  private submitSegments(tag: number, offset: number, segments: RbdSegments, write: boolean): void {
    const count = segments.count;
    if (count <= 0 || count > RBD_MAX_SEGMENTS) {
      this.refuse(tag, -22 /* EINVAL */);
      return;
    }
    const id = this.takeId(tag);
    const { words, address } = this.iovecs[id] ?? this.newIovec(id);
    let bytes = 0;
    for (let i = 0; i < count; i++) {
      const a = segments.addresses[i] ?? 0;
      const len = segments.lengths[i] ?? 0;
      bytes += len;
      const w = i * 4;
      words[w] = a % TWO_32;
      words[w + 1] = Math.floor(a / TWO_32);
      words[w + 2] = len % TWO_32;
      words[w + 3] = Math.floor(len / TWO_32);
    }
    if (!write) this.markRead(id, address, count, bytes);
    const c = this.completion(id);
    if (c === 0) return;
    const r = write
      ? this.lib.rbdAioWritev(this.image, address, count, offset, c)
      : this.lib.rbdAioReadv(this.image, address, count, offset, c);
    this.started(id, c, r);
  }

  private newIovec(id: number): { buffer: Buffer; words: Uint32Array; address: number } {
    const buffer = Buffer.alloc(RBD_MAX_SEGMENTS * IOVEC_BYTES);
    const iovec = { buffer, words: new Uint32Array(buffer.buffer, buffer.byteOffset, RBD_MAX_SEGMENTS * 4), address: addressOf(buffer) };
    this.iovecs[id] = iovec;
    return iovec;
  }

  /** An id for a request of `tag` (reused; ids stay below the most requests ever in flight at once). */
  private takeId(tag: number): number {
    let id = this.freeIds.pop();
    if (id === undefined) {
      id = this.nextId++;
      if (id >= this.tagOf.length) {
        const length = this.tagOf.length * 2;
        this.tagOf = doubled(this.tagOf, new Float64Array(length).fill(Number.NaN));
        this.readIov = doubled(this.readIov, new Float64Array(length));
        this.readIovCount = doubled(this.readIovCount, new Int32Array(length));
        this.readAsked = doubled(this.readAsked, new Float64Array(length));
      }
    }
    this.tagOf[id] = tag;
    return id;
  }

  private freeId(id: number): void {
    this.tagOf[id] = Number.NaN;
    this.readIov[id] = 0;
    this.freeIds.push(id);
  }

  /** The request of `id` is a read of `bytes` into the `count` iovecs at `iovAddress` (checked when it completes). */
  private markRead(id: number, iovAddress: number, count: number, bytes: number): void {
    this.readIov[id] = count > 0 ? iovAddress : 0;
    this.readIovCount[id] = count;
    this.readAsked[id] = bytes;
  }

  /**
   * A read of `id` completed with `read` bytes: zeroes what librbd left unwritten past them. Safe: the
   * iovecs are the ones librbd was given, still valid until this completion is reaped (the header).
   */
  private checkRead(id: number, read: number): void {
    let asked = this.readAsked[id]!;
    // The usual case, without touching the iovecs: a read whose size was summed at submit came back whole.
    if (read >= asked) return;
    const count = this.readIovCount[id]!;
    const iov = new BigUint64Array(koffi.view(this.readIov[id]!, count * IOVEC_BYTES) as ArrayBuffer);
    if (Number.isNaN(asked)) {
      asked = 0;
      for (let i = 0; i < count; i++) asked += Number(iov[i * 2 + 1]);
      if (read >= asked) return;
    }
    let skip = read;
    for (let i = 0; i < count; i++) {
      const base = Number(iov[i * 2]);
      const length = Number(iov[i * 2 + 1]);
      if (skip >= length) {
        skip -= length;
        continue;
      }
      zeroMemory(base + skip, length - skip);
      skip = 0;
    }
    this.shortReads++;
    this.lastShortRead = { asked, read };
  }

  /** A completion whose arg is `id`; 0 (the request refused, its id freed) when none could be made. */
  private completion(id: number): number {
    if (this.closed) {
      this.refuseId(id, -9 /* EBADF */);
      return 0;
    }
    const r = this.lib.rbdAioCreateCompletion(this.serial * TWO_32 + id, 0, this.completionOutAddress);
    if (r < 0) {
      this.refuseId(id, r);
      return 0;
    }
    return (this.completionOutWords[0] ?? 0) + (this.completionOutWords[1] ?? 0) * TWO_32;
  }

  private started(id: number, c: number, r: number): void {
    if (r < 0) {
      this.lib.rbdAioRelease(c);
      this.refuseId(id, r);
      return;
    }
    this.submitted++;
  }

  /** A request librbd never took: its id is free again, its tag answered by the next reap. */
  private refuseId(id: number, result: number): void {
    const tag = this.tagOf[id]!;
    this.freeId(id);
    this.refuse(tag, result);
  }

  private refuse(tag: number, result: number): void {
    this.refused.push({ tag, result });
    signalEventFd(this.fd);
  }
}

/** `grown` (a larger array of the same kind) with `current`'s entries copied to its start. */
function doubled<T extends Float64Array | Int32Array>(current: T, grown: T): T {
  grown.set(current);
  return grown;
}

/** A struct iovec array in one Buffer, for callers without their own (tests, tools). */
export class IovecArray {
  readonly buffer: Buffer;
  readonly address: number;
  private readonly words: Uint32Array;

  constructor(readonly capacity: number) {
    this.buffer = Buffer.alloc(capacity * 16);
    this.words = new Uint32Array(this.buffer.buffer, this.buffer.byteOffset, capacity * 4);
    this.address = addressOf(this.buffer);
  }

  set(index: number, address: number, length: number): void {
    if (index >= this.capacity) throw new RangeError(`iovec ${index} past capacity ${this.capacity}`);
    const w = index * 4;
    this.words[w] = address % TWO_32;
    this.words[w + 1] = Math.floor(address / TWO_32);
    this.words[w + 2] = length % TWO_32;
    this.words[w + 3] = Math.floor(length / TWO_32);
  }
}
