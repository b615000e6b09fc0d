/**
 * The per-disk throttle: an ops/s bucket (1 token per request) and a bytes/s bucket (data length per
 * request) in one SharedArrayBuffer, shared by all queue workers of the disk.
 *
 * `admit(bytes)` checks BOTH buckets before charging EITHER (TokenBucket.admitPair):
 *   1. bring both up to date and check both (nothing charged); if either refuses, return the longer
 *      wait, capped at 1 s;
 *   2. charge the op; if that fails (another worker got there first), return its wait;
 *   3. charge the bytes; if that fails (another worker drained them since step 1), give the op back
 *      and return the bytes wait.
 * Invariant: when `admit` returns, either both buckets were charged (result 0) or neither was (result
 * > 0) — never one without the other. The only window in which one is charged without the other is
 * between steps 2 and 3 (a few atomic operations); a concurrent caller may see one op token fewer then
 * and be told to wait (conservative). There is no over-grant: the refund only returns the token this
 * call took (capped at the capacity, so at worst the token is lost, again conservatively). Combined with
 * the bucket's own guarantee, the requests admitted across ALL workers over any period of length t
 * satisfy  ops <= iopsBurst + iops·t  and  bytes <= bpsBurst + bps·t (+ the debt of one oversized
 * request, i.e. one larger than bpsBurst, which is admitted once the byte balance is >= 0).
 *
 * Limits of 0 mean unlimited; when both are 0, `admit` never reads the clock. Otherwise it reads the
 * clock once per call. Default bursts (unspecified or 0): one second's worth of the rate
 * (`iopsBurst = iops`, `bpsBurst = bps`).
 */

import { type BucketLimits, type Clock, captureClockOrigin, monotonicClock, resolveBucketLimits, TokenBucket } from './token-bucket.js';

/** The longest wait `admit` returns: the caller re-checks at least once per second. */
export const MAX_THROTTLE_WAIT_NS = 1_000_000_000;

export interface DiskLimits {
  /** Requests per second; 0 or omitted = unlimited. */
  iops?: number | undefined;
  /** Request burst; 0 or omitted = `iops` (one second's worth). */
  iopsBurst?: number | undefined;
  /** Bytes per second; 0 or omitted = unlimited. */
  bps?: number | undefined;
  /** Byte burst; 0 or omitted = `bps` (one second's worth). */
  bpsBurst?: number | undefined;
}

/** Limits as in effect: bursts resolved; all 0 for an unlimited bucket. */
export interface ResolvedDiskLimits {
  readonly iops: number;
  readonly iopsBurst: number;
  readonly bps: number;
  readonly bpsBurst: number;
}

const OPS_OFFSET = 0;
const BYTES_OFFSET = TokenBucket.BYTES;

function bucketLimits(rate: number | undefined, burst: number | undefined): BucketLimits {
  return { rate: rate ?? 0, burst };
}

export class DiskThrottle {
  /** Size of the SharedArrayBuffer holding a disk's throttle state. */
  static readonly BYTES = 2 * TokenBucket.BYTES;

  private constructor(
    /** Post this to the disk's queue workers; they `attach` to it. */
    readonly buffer: SharedArrayBuffer,
    /** Requests per second (1 token per admitted request). */
    private readonly ops: TokenBucket,
    /** Bytes per second (data length of each admitted request). */
    private readonly bytes: TokenBucket,
  ) {}

  /**
   * New throttle state for a disk (both buckets start full). The clock origin is recorded in the
   * buffer so workers that `attach` without a clock share it; pass `clock` to use another time source
   * (then pass the same one to every `attach`).
   */
  static create(limits: DiskLimits = {}, clock?: Clock): DiskThrottle {
    const ops = bucketLimits(limits.iops, limits.iopsBurst);
    const bytes = bucketLimits(limits.bps, limits.bpsBurst);
    const buffer = new SharedArrayBuffer(DiskThrottle.BYTES);
    const origin = captureClockOrigin();
    const time = clock ?? monotonicClock(origin);
    return new DiskThrottle(
      buffer,
      TokenBucket.initialize(buffer, OPS_OFFSET, ops, time, origin),
      TokenBucket.initialize(buffer, BYTES_OFFSET, bytes, time, origin),
    );
  }

  /** A handle on throttle state created elsewhere (typically in a worker_thread). */
  static attach(buffer: SharedArrayBuffer, clock?: Clock): DiskThrottle {
    if (!(buffer instanceof SharedArrayBuffer) || buffer.byteLength < DiskThrottle.BYTES) {
      throw new TypeError(`a DiskThrottle needs a SharedArrayBuffer of ${DiskThrottle.BYTES} bytes`);
    }
    const ops = TokenBucket.attach(buffer, OPS_OFFSET, clock);
    return new DiskThrottle(buffer, ops, TokenBucket.attach(buffer, BYTES_OFFSET, ops.clock)); // one clock for both
  }

  /**
   * Admission of one request carrying `bytes` of data (0 for requests without data, which still
   * count as an op). Returns 0 when admitted — one op and `bytes` were consumed — or the nanoseconds to
   * wait before retrying (the longer of the two buckets' waits, at most 1 s), with nothing consumed.
   */
  admit(bytes: number): number {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new RangeError(`request length must be a non-negative safe integer, got ${bytes}`);
    }
    return capWait(TokenBucket.admitPair(this.ops, 1, this.bytes, bytes));
  }

  /**
   * Replaces all four limits live (omitted = unlimited / default burst), e.g. from SIGHUP or an admin
   * endpoint; every worker attached to the buffer sees the change on its next `admit`. To change one
   * value, start from `limits` — and drop the matching burst if it should follow the new rate.
   * Single writer: call from one thread only.
   */
  setLimits(limits: DiskLimits): void {
    // Validate both before changing either (resolveBucketLimits throws on bad input).
    const ops = resolveBucketLimits(bucketLimits(limits.iops, limits.iopsBurst));
    const bytes = resolveBucketLimits(bucketLimits(limits.bps, limits.bpsBurst));
    const now = ops.rate > 0 || bytes.rate > 0 ? this.ops.now() : 0;
    this.ops.setLimits(ops, now);
    this.bytes.setLimits(bytes, now);
  }

  get limits(): ResolvedDiskLimits {
    const ops = this.ops.limits;
    const bytes = this.bytes.limits;
    return { iops: ops.rate, iopsBurst: ops.burst, bps: bytes.rate, bpsBurst: bytes.burst };
  }
}

function capWait(ns: number): number {
  return Math.min(ns, MAX_THROTTLE_WAIT_NS);
}
