/**
 * A fixed-size log-linear latency histogram in nanoseconds (HdrHistogram-style, ~3 % bucket width):
 * values below 64 ns get a bucket each; above, every power of two is split into 32 buckets. Recording is
 * a few integer operations and one array increment, with no allocation, so it can sit on the hot path.
 */

const LINEAR = 64;
const SUB_BITS = 5;
const SUB = 1 << SUB_BITS;
/** Octaves from 2^6 ns up to 2^32 ns (~4.3 s); longer latencies land in the last bucket. */
const OCTAVES = 32 - 6;
export const HISTOGRAM_BUCKETS = LINEAR + OCTAVES * SUB;
const MAX_NANOS = 0xffff_ffff;

/** Bucket of a latency in nanoseconds (integer, clamped to [0, 2^32-1]). */
export function bucketOf(nanos: number): number {
  const v = nanos <= 0 ? 0 : nanos >= MAX_NANOS ? MAX_NANOS : nanos >>> 0;
  if (v < LINEAR) return v;
  const exponent = 31 - Math.clz32(v); // >= 6
  const sub = (v >>> (exponent - SUB_BITS)) & (SUB - 1);
  return LINEAR + (exponent - 6) * SUB + sub;
}

/** Smallest value (ns) that falls into `bucket`. */
export function bucketLow(bucket: number): number {
  if (bucket < LINEAR) return bucket;
  const octave = Math.floor((bucket - LINEAR) / SUB);
  const sub = (bucket - LINEAR) % SUB;
  const exponent = octave + 6;
  return 2 ** exponent + sub * 2 ** (exponent - SUB_BITS);
}

/** One past the largest value (ns) of `bucket`. */
export function bucketHigh(bucket: number): number {
  return bucket < LINEAR ? bucket + 1 : bucketLow(bucket + 1);
}

export class LatencyHistogram {
  readonly counts = new Float64Array(HISTOGRAM_BUCKETS);
  count = 0;
  sumNanos = 0;
  minNanos = Infinity;
  maxNanos = 0;

  record(nanos: number): void {
    this.counts[bucketOf(nanos)]! += 1;
    this.count++;
    this.sumNanos += nanos;
    if (nanos < this.minNanos) this.minNanos = nanos;
    if (nanos > this.maxNanos) this.maxNanos = nanos;
  }

  /** Records `n` requests that all took `nanos` (a batch reaped at one instant, submitted at another). */
  recordMany(nanos: number, n: number): void {
    this.counts[bucketOf(nanos)]! += n;
    this.count += n;
    this.sumNanos += nanos * n;
    if (nanos < this.minNanos) this.minNanos = nanos;
    if (nanos > this.maxNanos) this.maxNanos = nanos;
  }

  reset(): void {
    this.counts.fill(0);
    this.count = 0;
    this.sumNanos = 0;
    this.minNanos = Infinity;
    this.maxNanos = 0;
  }

  add(other: LatencyHistogram): void {
    for (let i = 0; i < HISTOGRAM_BUCKETS; i++) this.counts[i]! += other.counts[i]!;
    this.count += other.count;
    this.sumNanos += other.sumNanos;
    if (other.minNanos < this.minNanos) this.minNanos = other.minNanos;
    if (other.maxNanos > this.maxNanos) this.maxNanos = other.maxNanos;
  }

  /**
   * The value at quantile q (0..1): the midpoint of the bucket holding the ceil(q·count)-th smallest sample,
   * clamped to the observed min/max. NaN when empty.
   */
  quantile(q: number): number {
    if (this.count === 0) return NaN;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let i = 0; i < HISTOGRAM_BUCKETS; i++) {
      seen += this.counts[i]!;
      if (seen >= rank) {
        const mid = (bucketLow(i) + bucketHigh(i)) / 2;
        return Math.min(this.maxNanos, Math.max(this.minNanos, mid));
      }
    }
    return this.maxNanos;
  }

  get meanNanos(): number {
    return this.count === 0 ? NaN : this.sumNanos / this.count;
  }
}
