/**
 * The dirty log of a live migration, as the data plane marks it (vhost-user "Migration"): while the
 * front-end has VHOST_F_LOG_ALL set, every guest page the device writes is marked in a bitmap shared with
 * the front-end, which re-sends marked pages to the destination.
 *
 * Invariants:
 * - One bit per VHOST_LOG_PAGE (4 KiB) of guest-physical memory: page p is bit p % 8 of byte p / 8.
 * - Bits are only ever set, with an atomic OR: the front-end reads and clears the same bytes concurrently
 *   (QEMU swaps whole 64-bit words out), so a plain read-modify-write could undo its clear or lose our bit.
 * - A page is marked after the device's write to it is complete and before that write is published to the
 *   driver (used.idx) or a ring stop is acknowledged, so a page synced between the write and the mark is
 *   marked again, and the final sync after the rings stopped sees every mark.
 * - A page beyond the log's size is never touched: it is counted (dirtyLogOutOfRange), never a crash.
 * - The mapping belongs to the control plane and is unmapped only after every worker using it has
 *   acknowledged a newer log (or logging off), like guest memory.
 */
import koffi from 'koffi';
import { VHOST_LOG_PAGE } from '../../protocol/vhost-user.js';
import { Counter, type QueueCounters } from './counters.js';

/** Per-ring sink for what a mark did (QueueCounters in the worker; anything with `add` in tests). */
export type DirtyLogCounters = Pick<QueueCounters, 'add'>;

export class DirtyLog {
  /** Logging off: every mark is a no-op. */
  static readonly off = new DirtyLog(null);

  private readonly bits: Uint8Array;
  /** Pages the log covers (8 per byte). */
  readonly pages: number;

  constructor(bits: Uint8Array | null) {
    this.bits = bits ?? new Uint8Array(0);
    this.pages = this.bits.length * 8;
  }

  /** A log over `size` bytes mapped at `hostAddr` (shared with the front-end). */
  static mapped(hostAddr: number, size: number): DirtyLog {
    return new DirtyLog(new Uint8Array(koffi.view(hostAddr, size)));
  }

  get active(): boolean {
    return this.pages > 0;
  }

  /** Marks every page [gpa, gpa + length) touches. Pages past the log are counted once per call and skipped. */
  markRange(gpa: number, length: number, counters: DirtyLogCounters): void {
    if (this.pages === 0 || length <= 0) return;
    const first = Math.floor(gpa / VHOST_LOG_PAGE);
    let last = Math.floor((gpa + length - 1) / VHOST_LOG_PAGE);
    if (!(first >= 0) || last >= this.pages) {
      counters.add(Counter.dirtyLogOutOfRange);
      if (!(first >= 0) || first >= this.pages) return;
      last = this.pages - 1;
    }
    const bits = this.bits;
    for (let page = first; page <= last; page++) Atomics.or(bits, Math.floor(page / 8), 1 << (page % 8));
    counters.add(Counter.dirtyPagesLogged, last - first + 1);
  }

  /** Whether `page` is marked (tests and diagnostics). */
  isMarked(page: number): boolean {
    if (page < 0 || page >= this.pages) return false;
    return (Atomics.load(this.bits, Math.floor(page / 8)) & (1 << (page % 8))) !== 0;
  }
}

/** What RingDirtyLog needs of a request about to be submitted (BlkRequest). */
export interface DataSegments {
  segCount: number;
  readonly segGpa: Float64Array;
  readonly segLen: Uint32Array;
}

/**
 * One ring's marking: the session's current log (swapped by the worker while the ring runs), where its used
 * ring is logged, and the guest ranges each request in flight will write, by descriptor head (a head is
 * unique among a ring's requests in flight). Ranges are recorded at submission whether logging is on or not:
 * logging may start while a request is in flight, and its completion must still be marked.
 */
export class RingDirtyLog {
  log: DirtyLog = DirtyLog.off;
  /** Guest address the used ring is logged at (log_guest_addr), or -1 when VHOST_VRING_F_LOG is clear. */
  usedLogGpa = -1;
  private readonly counts: Int32Array;
  private readonly gpas: (Float64Array | undefined)[];
  private readonly lengths: (Uint32Array | undefined)[];

  constructor(
    readonly queueSize: number,
    private readonly counters: DirtyLogCounters,
  ) {
    this.counts = new Int32Array(queueSize);
    this.gpas = new Array<Float64Array | undefined>(queueSize).fill(undefined);
    this.lengths = new Array<Uint32Array | undefined>(queueSize).fill(undefined);
  }

  /** Remembers the device-writable data segments of the request at `head` (IN, GET_ID). */
  recordWrites(head: number, request: DataSegments): void {
    if (head < 0 || head >= this.queueSize) return;
    const n = request.segCount;
    let gpa = this.gpas[head];
    let len = this.lengths[head];
    if (gpa === undefined || len === undefined || gpa.length < n) {
      gpa = new Float64Array(Math.max(n, 4));
      len = new Uint32Array(gpa.length);
      this.gpas[head] = gpa;
      this.lengths[head] = len;
    }
    for (let s = 0; s < n; s++) {
      gpa[s] = request.segGpa[s] ?? 0;
      len[s] = request.segLen[s] ?? 0;
    }
    this.counts[head] = n;
  }

  /** Marks what the request at `head` wrote into guest buffers (all its data segments: a conservative superset). */
  markWrites(head: number): void {
    if (head < 0 || head >= this.queueSize) return;
    const n = this.counts[head] ?? 0;
    this.counts[head] = 0;
    if (!this.log.active) return;
    const gpa = this.gpas[head];
    const len = this.lengths[head];
    if (gpa === undefined || len === undefined) return;
    for (let s = 0; s < n; s++) this.log.markRange(gpa[s] ?? 0, len[s] ?? 0, this.counters);
  }

  /** Marks a byte the device wrote outside the rings (the status byte). */
  markByte(gpa: number): void {
    if (this.log.active) this.log.markRange(gpa, 1, this.counters);
  }

  /** Marks `length` bytes at `offset` in the used ring, when the front-end asked for used-ring logging. */
  markUsed(offset: number, length: number): void {
    if (this.usedLogGpa >= 0 && this.log.active) this.log.markRange(this.usedLogGpa + offset, length, this.counters);
  }
}
