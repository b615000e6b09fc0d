/**
 * A token bucket whose whole state lives in a 64-byte region of a SharedArrayBuffer, so that every
 * worker_thread serving a queue of the same disk draws from the same bucket. DiskThrottle pairs two of
 * them (ops and bytes); `admitPair` is the only admission.
 *
 * Model (per the throttle design):
 * - `rate` tokens are credited per second up to `burst` (the capacity); rate 0 = unlimited, which is a
 *   fast path that never reads the clock.
 * - Credit is computed on demand from a monotonic clock. Only WHOLE tokens are credited, and the refill
 *   timestamp (LAST) only advances when at least one whole token was credited, and then only by the time
 *   those whole tokens took — so the fraction of a token that has accrued is never thrown away and a
 *   1 op/s bucket polled every millisecond still refills. (When the bucket reaches capacity LAST jumps to
 *   "now": time spent full earns nothing.)
 * - A request of at most `burst` tokens is granted when the balance covers it. A request larger than
 *   `burst` could never be covered, so it is granted as soon as the balance is >= 0 and drives the
 *   balance negative (debt); later requests wait until the debt is repaid.
 * - A zero-cost request always passes (no clock read either).
 * - A refusal returns the nanoseconds until the bucket could grant the request (assuming nobody else takes
 *   tokens meanwhile), always >= 1. The bucket never sleeps or blocks.
 *
 * Concurrency: lock-free (a CAS retry only happens because another thread made progress). The state is
 * int64 words updated with Atomics compare-exchange loops; 64-bit atomics exist only on BigInt64Array, so
 * BigInt appears at the Atomics boundary only, all arithmetic is on Numbers.
 *   - Refill claims the time interval [LAST, next) by a CAS on LAST. LAST only ever increases, so each
 *     interval is claimed by exactly one thread (no ABA) and credited exactly once, with at most
 *     floor(rate × (next − LAST) / 1e9) tokens — never more than the time claimed — capped at `burst`.
 *     The claimer holds that credit privately until its own charge, which adds the credit and takes the
 *     request in one CAS on TOKENS (or publishes the credit alone when it refuses), before it returns.
 *   - A charge is a CAS on TOKENS that succeeds only if the balance it decided on is still current.
 *   Hence, whatever the number of threads and however they interleave, the tokens granted over any period
 *   t satisfy  granted <= burst + rate × t + D, where D < the largest oversized request (its debt; 0 if no
 *   request exceeds `burst`). Races only make the bucket conservative (credit held and not yet published,
 *   a credit clipped at `burst` because a concurrent consumer had not yet charged), never generous.
 *   - rate and burst are cached per handle and re-read when an int32 generation, bumped after every
 *     `setLimits`, moves.
 *
 * Time unit: the clock returns nanoseconds as a Number, counted from an origin captured when the bucket is
 * initialised and stored in the region, so every worker shares the same zero. Why Numbers suffice: a
 * timestamp is an exact integer for 2^53 ns ≈ 104 days after the origin; after that, Numbers step by
 * 2 ns (until ~208 days), 4 ns (until ~1.1 years), ... 32 ns at 9 years — the clock stays monotonic and
 * LAST is rounded UP to that step (`bookUntil`), so a refill then forgoes at most one step of credit:
 * conservative, negligible, and no wrap or cliff at any uptime. Token counts × 1e9 beyond 2^53 (a refill
 * of more than ~9 million tokens that does not fill the bucket) are rounded too: `nanosFor` adds 2 ns
 * there, so a refill never books less time than its tokens took.
 * Rounding: LAST advances by the time of k whole tokens rounded up to the next nanosecond, so each refill
 * forgoes < 1 ns of credit (conservative; <= 0.1% even if refilling every microsecond).
 *
 * Limits: `rate` and `burst` live in the shared region and can be changed live (`setLimits`) by one writer
 * (the main thread); concurrent users pick the change up on their next call.
 */

/** Monotonic clock: nanoseconds (Number) since a fixed origin shared by every user of the bucket. */
export type Clock = () => number;

/** A CLOCK_MONOTONIC reading (`process.hrtime()`), used as the zero of a shared clock. */
export interface ClockOrigin {
  readonly sec: number;
  readonly nsec: number;
}

export interface BucketLimits {
  /** Tokens credited per second (whole number); 0 = unlimited. */
  rate: number;
  /** Capacity in tokens (whole number); omitted or 0 = one second's worth of `rate`. */
  burst?: number | undefined;
}

export interface ResolvedBucketLimits {
  /** Tokens per second; 0 = unlimited. */
  readonly rate: number;
  /** Capacity; 0 when unlimited. */
  readonly burst: number;
}

export function captureClockOrigin(): ClockOrigin {
  const [sec, nsec] = process.hrtime();
  return { sec, nsec };
}

/**
 * The default clock: CLOCK_MONOTONIC (system-wide, so the same in every worker_thread) minus `origin`, in
 * nanoseconds. `process.hrtime()` gives [seconds, nanoseconds] Numbers and `(sec - origin.sec) * 1e9` is
 * exact for 146 years, so the result is the correctly rounded elapsed time: monotonic always.
 */
export function monotonicClock(origin: ClockOrigin): Clock {
  const { sec, nsec } = origin;
  return () => {
    const t = process.hrtime();
    return (t[0] - sec) * NS_PER_S + (t[1] - nsec);
  };
}

const NS_PER_S = 1e9;

// Layout of a bucket region: 8 int64 words (one 64-byte cache line).
const W_RATE = 0; // tokens per second, 0 = unlimited
const W_BURST = 1; // capacity
const W_TOKENS = 2; // balance; negative = debt
const W_LAST = 3; // clock value up to which time has been turned into credit
const W_ORIGIN_SEC = 4; // clock origin (hrtime seconds) for the default clock
const W_ORIGIN_NSEC = 5; // clock origin (hrtime nanoseconds)
const W_MAGIC = 6; // layout tag, written last on initialisation
// Word 7 is used as two int32s (never as an int64): a limits generation, bumped after every change, lets
// handles cache rate and burst and check one int32 instead of loading two int64s (BigInts) per call.
const I_GEN = 14;
const WORDS = 8;
const MAGIC = 0x7675626c6b544231n; // "vublkTB1"

function checkAmount(amount: number): void {
  if (!Number.isSafeInteger(amount) || amount < 0) {
    throw new RangeError(`token amount must be a non-negative safe integer, got ${amount}`);
  }
}

/** Validates limits and applies the default burst (one second's worth of the rate). */
export function resolveBucketLimits(limits: BucketLimits): ResolvedBucketLimits {
  const { rate, burst } = limits;
  if (!Number.isSafeInteger(rate) || rate < 0) {
    throw new RangeError(`rate must be a non-negative whole number of tokens per second, got ${rate}`);
  }
  if (burst !== undefined && (!Number.isSafeInteger(burst) || burst < 0)) {
    throw new RangeError(`burst must be a non-negative whole number of tokens, got ${burst}`);
  }
  if (rate === 0) return { rate: 0, burst: 0 };
  return { rate, burst: burst === undefined || burst === 0 ? rate : burst };
}

/** ceil(tokens * 1e9 / rate): nanoseconds needed to earn `tokens`; never less than the exact value. */
function nanosFor(tokens: number, rate: number): number {
  const n = tokens * NS_PER_S;
  let t = Math.ceil(n / rate);
  if (n + rate > Number.MAX_SAFE_INTEGER) return t + 2; // n was rounded: stay on the safe side
  // n and every product below (<= n + rate) are exact; fix the rounding of the division.
  if (t * rate < n) t += 1;
  else if ((t - 1) * rate >= n) t -= 1;
  return t;
}

/**
 * Whole tokens earned in `elapsed` ns when they do not fill the bucket: floor(elapsed * rate / 1e9), and
 * never more than `elapsed` buys (nanosFor(result) <= elapsed).
 */
function creditFor(elapsed: number, rate: number): number {
  const p = elapsed * rate;
  if (p > Number.MAX_SAFE_INTEGER) {
    // p was rounded (relative error < 2^-52, i.e. < 2 ns of time below 2^53 ns): forgo 8 ns of tokens,
    // which covers that and nanosFor's margin.
    return Math.max(0, Math.floor(p / NS_PER_S) - Math.ceil((8 * rate) / NS_PER_S) - 1);
  }
  // p is exact; the quotient is correctly rounded, so floor() is off by at most one — fix it exactly
  // (k * 1e9 is exact: k <= 2^53 / 1e9).
  let k = Math.floor(p / NS_PER_S);
  if (k * NS_PER_S > p) k -= 1;
  else if ((k + 1) * NS_PER_S <= p) k += 1;
  return k;
}

/**
 * LAST after booking `ns` more nanoseconds: last + ns, rounded UP to a representable Number beyond 2^53
 * (see Time unit), so a refill never books less time than its tokens took; never beyond `now`.
 */
function bookUntil(last: number, ns: number, now: number): number {
  const next = last + ns;
  if (next - last >= ns) return next;
  return Math.min(now, next + 2 ** (Math.floor(Math.log2(next)) - 52));
}

function regionView(buffer: SharedArrayBuffer, byteOffset: number): BigInt64Array {
  if (!(buffer instanceof SharedArrayBuffer)) throw new TypeError('token bucket needs a SharedArrayBuffer');
  if (!Number.isSafeInteger(byteOffset) || byteOffset < 0 || byteOffset % 8 !== 0) {
    throw new RangeError(`token bucket byteOffset must be a non-negative multiple of 8, got ${byteOffset}`);
  }
  if (byteOffset + TokenBucket.BYTES > buffer.byteLength) {
    throw new RangeError(`token bucket needs ${TokenBucket.BYTES} bytes at offset ${byteOffset}, buffer has ${buffer.byteLength}`);
  }
  return new BigInt64Array(buffer, byteOffset, WORDS);
}

export class TokenBucket {
  /** Size of a bucket region in a SharedArrayBuffer. */
  static readonly BYTES = WORDS * 8;

  private readonly w: BigInt64Array;
  private readonly i: Int32Array;
  /** Cached limits and the generation they were read at. */
  private gen = -1;
  private cachedRate = 0;
  private cachedBurst = 0;
  /** The latest clock value this handle has already credited time up to (skips redundant refills). */
  private synced = Number.NEGATIVE_INFINITY;
  /** Credit claimed by the running operation and not yet added to TOKENS (0 between operations). */
  private pending = 0;
  /** TOKENS as last loaded by the running operation (saves a reload; a stale value only fails a CAS). */
  private seen: bigint | undefined = undefined;

  private constructor(
    buffer: SharedArrayBuffer,
    byteOffset: number,
    readonly clock: Clock,
  ) {
    this.w = new BigInt64Array(buffer, byteOffset, WORDS);
    this.i = new Int32Array(buffer, byteOffset, WORDS * 2);
  }

  /**
   * Initialises a bucket region (which must not be in use yet; it starts full) and returns a handle on
   * it. The region records `origin` so that `attach` without a clock gets the same clock; pass an
   * explicit `clock` (a fake in tests) to use another time source — then every handle must use it too.
   */
  static initialize(
    buffer: SharedArrayBuffer,
    byteOffset: number,
    limits: BucketLimits,
    clock: Clock | undefined,
    origin: ClockOrigin,
  ): TokenBucket {
    const w = regionView(buffer, byteOffset);
    const resolved = resolveBucketLimits(limits); // validate before touching the region
    Atomics.store(w, W_RATE, 0n);
    Atomics.store(w, W_ORIGIN_SEC, BigInt(origin.sec));
    Atomics.store(w, W_ORIGIN_NSEC, BigInt(origin.nsec));
    Atomics.store(w, W_MAGIC, MAGIC);
    const bucket = new TokenBucket(buffer, byteOffset, clock ?? monotonicClock(origin));
    bucket.setLimits(resolved, resolved.rate === 0 ? 0 : bucket.now());
    return bucket;
  }

  /** Another handle on an initialised bucket region (e.g. in a worker the buffer was posted to). */
  static attach(buffer: SharedArrayBuffer, byteOffset: number, clock?: Clock): TokenBucket {
    const w = regionView(buffer, byteOffset);
    if (Atomics.load(w, W_MAGIC) !== MAGIC) {
      throw new TypeError(`no token bucket at offset ${byteOffset} of this SharedArrayBuffer`);
    }
    const origin = { sec: Number(Atomics.load(w, W_ORIGIN_SEC)), nsec: Number(Atomics.load(w, W_ORIGIN_NSEC)) };
    return new TokenBucket(buffer, byteOffset, clock ?? monotonicClock(origin));
  }

  get limits(): ResolvedBucketLimits {
    return { rate: Number(Atomics.load(this.w, W_RATE)), burst: Number(Atomics.load(this.w, W_BURST)) };
  }

  /** Reads the clock (integer nanoseconds). */
  now(): number {
    return Math.floor(this.clock());
  }

  /**
   * Both-or-neither admission against two buckets that share a clock (a disk's ops and bytes buckets):
   * returns 0 when `firstAmount` was taken from `first` AND `secondAmount` from `second`, else the longer
   * of the two waits with nothing taken from either. Unlimited buckets and zero amounts always pass; if
   * both do, the clock is not read.
   *
   * Both buckets are brought up to date and checked before either is charged; then `first` is charged,
   * then `second`, and if `second` has meanwhile been drained by another thread, `first` is refunded. So
   * on return either both were charged or neither — the one-without-the-other state exists only for the
   * few atomic operations between the two charges, during which a concurrent caller may see `first`
   * short (conservative). Nothing is ever over-granted: the refund returns only what was taken.
   */
  static admitPair(first: TokenBucket, firstAmount: number, second: TokenBucket, secondAmount: number): number {
    checkAmount(firstAmount);
    checkAmount(secondAmount);
    const r1 = firstAmount === 0 ? 0 : first.currentRate();
    const r2 = secondAmount === 0 ? 0 : second.currentRate();
    if (r1 === 0 && r2 === 0) return 0;
    const at = first.now();
    const b1 = first.cachedBurst;
    const b2 = second.cachedBurst;
    // Check both (time credited to each is held by this handle, not yet visible to others).
    if (r1 !== 0) first.claim(r1, b1, at);
    if (r2 !== 0) second.claim(r2, b2, at);
    const w1 = r1 === 0 ? 0 : first.decide(firstAmount, r1, b1, at);
    const w2 = r2 === 0 ? 0 : second.decide(secondAmount, r2, b2, at);
    if (w1 > 0 || w2 > 0) {
      first.flush(b1);
      second.flush(b2);
      return Math.max(w1, w2);
    }
    // Charge both (each charge also publishes that bucket's held credit).
    if (r1 !== 0) {
      const lost = first.commit(firstAmount, r1, b1, at);
      if (lost > 0) {
        second.flush(b2);
        return lost;
      }
    }
    if (r2 !== 0) {
      const lost = second.commit(secondAmount, r2, b2, at);
      if (lost > 0) {
        if (r1 !== 0) first.addCapped(firstAmount, b1);
        return lost;
      }
    }
    return 0;
  }

  /**
   * Changes the limits live, as of clock value `now`. Single writer (the main thread); other handles see
   * the change on their next call. Limited → limited: elapsed time is first credited at the old rate
   * (whole tokens; the fraction of a token in progress keeps its value when the rate goes up, and is
   * valued at the new, lower rate when it goes down), then the new rate and capacity apply and the
   * balance is clipped to the new capacity (a debt is kept). Unlimited → limited: the bucket starts full
   * at `now`. Any → unlimited: takes effect at once. A thread that is mid-call during the change may
   * still apply the old rate or capacity to the moment of the change itself — the transitional error is
   * bounded by max(old, new rate) × the duration of this call.
   */
  setLimits(limits: BucketLimits, now: number): void {
    const { rate, burst } = resolveBucketLimits(limits);
    const w = this.w;
    if (rate === 0) {
      Atomics.store(w, W_RATE, 0n);
      Atomics.store(w, W_BURST, 0n);
      Atomics.add(this.i, I_GEN, 1);
      return;
    }
    const at = Math.floor(now);
    const oldRate = Number(Atomics.load(w, W_RATE));
    if (oldRate === 0) {
      // Publish the state first and the rate last: a reader that sees the rate sees a full bucket.
      Atomics.store(w, W_BURST, BigInt(burst));
      Atomics.store(w, W_TOKENS, BigInt(burst));
      Atomics.store(w, W_LAST, BigInt(at));
      Atomics.store(w, W_RATE, BigInt(rate));
      Atomics.add(this.i, I_GEN, 1);
      return;
    }
    // Credit the whole tokens earned so far at the old rate.
    const oldBurst = Number(Atomics.load(w, W_BURST));
    this.synced = Number.NEGATIVE_INFINITY;
    this.claim(oldRate, oldBurst, at);
    this.flush(oldBurst);
    if (rate > oldRate) {
      // The fraction of a token accrued since LAST is time at the old rate; at a higher rate the same
      // fraction takes less time, so move LAST forward to keep its value (rounded down). For a lower rate
      // LAST stays, which values the fraction at the new rate: a little less, never more — and LAST keeps
      // only ever increasing.
      for (;;) {
        const last = Atomics.load(w, W_LAST);
        const accrued = at - Number(last);
        if (accrued <= 0) break;
        const keep = Math.min(accrued, Math.floor((accrued * oldRate) / rate));
        if (keep === accrued) break;
        if (Atomics.compareExchange(w, W_LAST, last, BigInt(bookUntil(Number(last), accrued - keep, at))) === last) break;
      }
    }
    Atomics.store(w, W_BURST, BigInt(burst));
    Atomics.store(w, W_RATE, BigInt(rate));
    Atomics.add(this.i, I_GEN, 1);
    for (;;) {
      const t = Atomics.load(w, W_TOKENS);
      if (Number(t) <= burst) return;
      if (Atomics.compareExchange(w, W_TOKENS, t, BigInt(burst)) === t) return;
    }
  }

  /*
   * Internals. An admission runs claim → decide/commit → (flush): `claim` turns elapsed time into credit
   * that this handle holds in `pending` (so the decision and the charge of the same call can be one CAS on
   * TOKENS); every public operation publishes or discards it before returning, so `pending` is 0 between
   * calls. Held credit is invisible to other threads for a moment: conservative only.
   */

  /** Current rate (0 = unlimited), from the cache unless the limits generation moved. */
  private currentRate(): number {
    const gen = Atomics.load(this.i, I_GEN);
    if (gen !== this.gen) {
      // Read after the generation: if the limits change meanwhile, the generation moves again and the
      // next call re-reads them.
      this.cachedRate = Number(Atomics.load(this.w, W_RATE));
      this.cachedBurst = Number(Atomics.load(this.w, W_BURST));
      this.gen = gen;
      this.synced = Number.NEGATIVE_INFINITY;
    }
    return this.cachedRate;
  }

  /**
   * Credits whole tokens for the time since LAST, into `pending`. The CAS on LAST claims the interval
   * (LAST only grows, so no ABA): exactly one thread credits each interval, never more than it earned.
   */
  private claim(rate: number, burst: number, now: number): void {
    this.seen = undefined;
    if (now <= this.synced) return; // already credited up to here (by this handle or another)
    this.synced = now;
    const w = this.w;
    for (;;) {
      const last = Atomics.load(w, W_LAST);
      const elapsed = now - Number(last);
      if (elapsed <= 0) return;
      if (elapsed * rate < NS_PER_S) return; // keep LAST: the fraction of a token accrued so far is not lost
      const tokens = Atomics.load(w, W_TOKENS);
      this.seen = tokens;
      const room = burst - Number(tokens) - this.pending;
      let credit: number;
      let next: number;
      if (room <= 0 || elapsed >= nanosFor(room, rate)) {
        // Fills up: the rest of the interval was spent full and earns nothing.
        credit = room;
        next = now;
      } else {
        // Advance only by the time the whole tokens took (rounded up: conservative by < 1 ns).
        credit = creditFor(elapsed, rate);
        if (credit < 1) return;
        next = bookUntil(Number(last), nanosFor(credit, rate), now);
      }
      if (Atomics.compareExchange(w, W_LAST, last, BigInt(next)) !== last) continue; // someone else refilled
      if (credit > 0) this.pending += credit;
      return;
    }
  }

  /** The grant decision (no charge): 0, or the wait for `amount`, counting the credit held. */
  private decide(amount: number, rate: number, burst: number, now: number): number {
    const t = this.seen ?? (this.seen = Atomics.load(this.w, W_TOKENS));
    const balance = Math.min(Number(t) + this.pending, burst);
    // Oversized requests (amount > burst) need only a non-negative balance, and go into debt.
    const needed = amount <= burst ? amount : 0;
    return balance >= needed ? 0 : this.waitFor(needed - balance, rate, now);
  }

  /** Decides and charges in one CAS (publishing the credit held); on refusal publishes it alone. */
  private commit(amount: number, rate: number, burst: number, now: number): number {
    const w = this.w;
    const needed = amount <= burst ? amount : 0;
    let t = this.seen ?? Atomics.load(w, W_TOKENS);
    for (;;) {
      const balance = Math.min(Number(t) + this.pending, burst);
      if (balance < needed) {
        this.flush(burst);
        return this.waitFor(needed - balance, rate, now);
      }
      const found = Atomics.compareExchange(w, W_TOKENS, t, BigInt(balance - amount));
      if (found === t) {
        this.pending = 0;
        return 0;
      }
      t = found; // the balance changed in between (or `seen` was stale): decide again on the fresh one
    }
  }

  /** Publishes the credit held by this handle. */
  private flush(burst: number): void {
    if (this.pending === 0) return;
    this.addCapped(this.pending, burst);
    this.pending = 0;
  }

  /** Adds tokens, never beyond `burst` (anything beyond is dropped: conservative). */
  private addCapped(amount: number, burst: number): void {
    const w = this.w;
    for (;;) {
      const t = Atomics.load(w, W_TOKENS);
      const balance = Number(t);
      if (balance >= burst) return;
      const next = Math.min(balance + amount, burst);
      if (Atomics.compareExchange(w, W_TOKENS, t, BigInt(next)) === t) return;
    }
  }

  /** Time until `deficit` more tokens will have been credited (>= 1 ns). */
  private waitFor(deficit: number, rate: number, now: number): number {
    return Math.max(1, nanosFor(deficit, rate) - (now - Number(Atomics.load(this.w, W_LAST))));
  }
}
