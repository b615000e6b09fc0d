import { describe, expect, it } from 'vitest';
import { TokenBucket, monotonicClock, captureClockOrigin, resolveBucketLimits } from '../../src/throttle/token-bucket.js';
import { fakeClock, MS, S } from '../support/fake-clock.js';

describe('TokenBucket', () => {
  describe('unlimited (rate 0)', () => {
    it('grants everything without ever reading the clock', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 0 }, clock);
      expect(bucket.unlimited).toBe(true);
      for (const amount of [1, 4096, Number.MAX_SAFE_INTEGER]) {
        expect(bucket.tryConsume(amount)).toBe(0);
        expect(bucket.peekWait(amount)).toBe(0);
        bucket.consume(amount);
        bucket.refund(amount);
      }
      expect(clock.calls).toBe(0);
      expect(bucket.limits).toEqual({ rate: 0, burst: 0 });
    });
  });

  describe('capacity', () => {
    it('starts full and grants up to the burst, then refuses', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 10, burst: 5 }, clock);
      for (let i = 0; i < 5; i++) expect(bucket.tryConsume(1)).toBe(0);
      expect(bucket.tryConsume(1)).toBe(S / 10); // one token at 10/s
      expect(bucket.balance).toBe(0);
    });

    it('defaults the burst to one second of the rate', () => {
      expect(TokenBucket.create({ rate: 250 }, fakeClock()).burst).toBe(250);
      expect(TokenBucket.create({ rate: 250, burst: 0 }, fakeClock()).burst).toBe(250);
      expect(resolveBucketLimits({ rate: 7, burst: 3 })).toEqual({ rate: 7, burst: 3 });
    });

    it('never refills beyond the burst, however long it sits idle', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 100, burst: 20 }, clock);
      expect(bucket.tryConsume(20)).toBe(0);
      clock.t += 3600 * S;
      expect(bucket.peekWait(20)).toBe(0);
      expect(bucket.peekWait(21)).toBe(0); // oversized: only needs a non-negative balance
      expect(bucket.balance).toBe(20);
      expect(bucket.lastRefill).toBe(clock.t); // time spent full earns nothing
      expect(bucket.tryConsume(20)).toBe(0);
      expect(bucket.tryConsume(1)).toBe(S / 100);
    });
  });

  describe('refill', () => {
    it('refills at 1 op/s across fractional intervals; the timestamp only moves on whole tokens', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 1, burst: 1 }, clock);
      expect(bucket.tryConsume(1)).toBe(0);
      for (const t of [1, 250 * MS, 500 * MS, 999_999_999]) {
        clock.t = t;
        expect(bucket.tryConsume(1)).toBe(S - t); // exact time to the next whole token
        expect(bucket.lastRefill).toBe(0); // no whole token yet: the accrued fraction is kept
      }
      clock.t = S;
      expect(bucket.tryConsume(1)).toBe(0);
      expect(bucket.lastRefill).toBe(S);
    });

    it('still refills when polled far more often than tokens arrive', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 1, burst: 1 }, clock);
      bucket.consume(1);
      let granted = 0;
      for (let i = 1; i <= 3000; i++) {
        clock.t = i * MS; // every millisecond for 3 s
        if (bucket.tryConsume(1) === 0) granted += 1;
      }
      expect(granted).toBe(3);
    });

    it('keeps the fraction of a token when it credits whole ones', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 2, burst: 2 }, clock); // a token every 500 ms
      expect(bucket.tryConsume(2)).toBe(0);
      clock.t = 750 * MS;
      expect(bucket.tryConsume(1)).toBe(0); // the token of 500 ms
      expect(bucket.lastRefill).toBe(500 * MS); // not 750 ms: the 250 ms towards the next one are kept
      expect(bucket.tryConsume(1)).toBe(250 * MS);
      clock.t = S;
      expect(bucket.tryConsume(1)).toBe(0);
    });

    it('rounds a fractional token period up to the next nanosecond (conservative)', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 3, burst: 3 }, clock); // 333,333,333.3 ns per token
      expect(bucket.tryConsume(3)).toBe(0);
      clock.t = 333_333_333;
      expect(bucket.tryConsume(1)).toBe(1);
      clock.t = 333_333_334;
      expect(bucket.tryConsume(1)).toBe(0);
      expect(bucket.lastRefill).toBe(333_333_334);
      // Each token is booked as 333,333,334 ns (0.67 ns forgone), so at 1 s only one more has been
      // credited and the second arrives 2 ns later.
      clock.t = S;
      expect(bucket.peekWait(2)).toBe(2);
      expect(bucket.balance).toBe(1);
      expect(bucket.lastRefill).toBe(2 * 333_333_334);
      clock.t = S + 2;
      expect(bucket.peekWait(2)).toBe(0);
      expect(bucket.balance).toBe(2);
      expect(bucket.lastRefill).toBe(3 * 333_333_334);
    });

    it('reports the exact wait: refused 1 ns before it, granted at it', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 7_777, burst: 1_000 }, clock);
      expect(bucket.tryConsume(1_000)).toBe(0);
      clock.t = 12_345;
      const wait = bucket.tryConsume(600);
      expect(wait).toBe(Math.ceil((600 * S) / 7_777) - 12_345);
      clock.t += wait - 1;
      expect(bucket.tryConsume(600)).toBe(1);
      clock.t += 1;
      expect(bucket.tryConsume(600)).toBe(0);
    });

    it('is exact at high byte rates', () => {
      const clock = fakeClock();
      const rate = 10 * 2 ** 30; // 10 GiB/s
      const bucket = TokenBucket.create({ rate, burst: rate }, clock);
      expect(bucket.tryConsume(rate)).toBe(0);
      const size = 64 * 1024; // offered faster than the rate: ~10.7 KB are earned per step
      let granted = 0;
      for (let i = 0; i < 10_000; i++) {
        clock.t += 997; // a refill every ~1 µs: the worst case for the < 1 ns rounding per refill
        if (bucket.tryConsume(size) === 0) granted += size;
      }
      const bound = Math.floor((clock.t * rate) / S);
      expect(granted).toBeLessThanOrEqual(bound);
      expect(granted).toBeGreaterThan(bound * 0.998 - size); // <= 0.1% forgone to rounding
    });

    it('works past 2^53 ns (exact int64 timestamps, BigInt fallback)', () => {
      const start = 2 ** 60; // ~36.5 years after the origin; Numbers here step by 256 ns
      const clock = fakeClock(start);
      const bucket = TokenBucket.create({ rate: 1, burst: 1 }, clock);
      expect(bucket.tryConsume(1)).toBe(0);
      clock.t = start + S / 2;
      expect(bucket.tryConsume(1)).toBe(S / 2);
      clock.t = start + S;
      expect(bucket.tryConsume(1)).toBe(0);
      expect(bucket.lastRefill).toBe(start + S);
    });
  });

  describe('debt', () => {
    it('grants an oversized request at a non-negative balance and makes followers repay the debt', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 100, burst: 100 }, clock);
      expect(bucket.tryConsume(250)).toBe(0);
      expect(bucket.balance).toBe(-150);
      expect(bucket.tryConsume(10)).toBe(1.6 * S); // repay 150, then 10 of its own
      expect(bucket.tryConsume(250)).toBe(1.5 * S); // oversized waits for the balance to reach 0
      expect(bucket.balance).toBe(-150); // refusals consume nothing
      clock.t = 1.5 * S;
      expect(bucket.tryConsume(10)).toBe(0.1 * S);
      expect(bucket.peekWait(250)).toBe(0);
      clock.t = 1.6 * S;
      expect(bucket.tryConsume(10)).toBe(0);
    });

    it('grants an oversized request from an empty (zero) balance', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      expect(bucket.tryConsume(10)).toBe(0);
      expect(bucket.tryConsume(11)).toBe(0);
      expect(bucket.balance).toBe(-11);
    });

    it('consume() takes unconditionally', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      bucket.consume(25);
      expect(bucket.balance).toBe(-15);
      expect(bucket.peekWait(1)).toBe(1.6 * S);
    });
  });

  describe('zero cost', () => {
    it('always passes, even in debt, without a clock read', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 1, burst: 1 }, clock);
      bucket.consume(1000);
      const reads = clock.calls;
      expect(bucket.tryConsume(0)).toBe(0);
      expect(bucket.peekWait(0)).toBe(0);
      expect(clock.calls).toBe(reads);
    });
  });

  it('peekWait never consumes', () => {
    const clock = fakeClock();
    const bucket = TokenBucket.create({ rate: 10, burst: 3 }, clock);
    for (let i = 0; i < 5; i++) expect(bucket.peekWait(3)).toBe(0);
    expect(bucket.balance).toBe(3);
    expect(bucket.peekWait(4)).toBe(0); // oversized
    expect(bucket.balance).toBe(3);
  });

  it('refund gives tokens back up to the burst', () => {
    const bucket = TokenBucket.create({ rate: 10, burst: 3 }, fakeClock());
    expect(bucket.tryConsume(2)).toBe(0);
    bucket.refund(1);
    expect(bucket.balance).toBe(2);
    bucket.refund(5);
    expect(bucket.balance).toBe(3);
  });

  describe('live limit changes', () => {
    it('credits the elapsed time at the old rate, then applies the new one', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      expect(bucket.tryConsume(10)).toBe(0);
      clock.t = 0.5 * S; // 5 tokens at the old rate
      bucket.setLimits({ rate: 1000, burst: 2000 });
      expect(bucket.balance).toBe(5);
      expect(bucket.limits).toEqual({ rate: 1000, burst: 2000 });
      expect(bucket.tryConsume(6)).toBe(S / 1000);
    });

    it('keeps the value of a partly accrued token when the rate goes up', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 1, burst: 1 }, clock);
      expect(bucket.tryConsume(1)).toBe(0);
      clock.t = S / 2; // half a token at 1/s
      bucket.setLimits({ rate: 1000 });
      expect(bucket.lastRefill).toBe(S / 2 - MS / 2); // = half a token at 1000/s
      expect(bucket.tryConsume(1)).toBe(MS / 2);
    });

    it('values a partly accrued token at the new rate when the rate goes down', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 1000, burst: 1000 }, clock);
      expect(bucket.tryConsume(1000)).toBe(0);
      clock.t = MS / 2; // half a token at 1000/s
      bucket.setLimits({ rate: 1, burst: 1 });
      expect(bucket.lastRefill).toBe(0);
      expect(bucket.tryConsume(1)).toBe(S - MS / 2);
    });

    it('clips the balance to a lowered burst', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 100, burst: 100 }, clock);
      bucket.setLimits({ rate: 100, burst: 10 });
      expect(bucket.balance).toBe(10);
      expect(bucket.tryConsume(10)).toBe(0);
      expect(bucket.tryConsume(1)).toBe(S / 100);
    });

    it('keeps a debt across a change', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      bucket.consume(30);
      bucket.setLimits({ rate: 20 });
      expect(bucket.balance).toBe(-20);
      expect(bucket.peekWait(1)).toBe(1.05 * S);
    });

    it('switches to unlimited (no clock reads) and back (starting full)', () => {
      const clock = fakeClock();
      const bucket = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      bucket.consume(100);
      bucket.setLimits({ rate: 0 });
      const reads = clock.calls;
      expect(bucket.tryConsume(1_000_000)).toBe(0);
      expect(clock.calls).toBe(reads);
      clock.t = 5 * S;
      bucket.setLimits({ rate: 4 });
      expect(bucket.limits).toEqual({ rate: 4, burst: 4 });
      expect(bucket.balance).toBe(4);
      expect(bucket.lastRefill).toBe(5 * S);
      expect(bucket.tryConsume(4)).toBe(0);
      expect(bucket.tryConsume(1)).toBe(S / 4);
    });

    it('rejects invalid limits without changing anything', () => {
      const bucket = TokenBucket.create({ rate: 10, burst: 10 }, fakeClock());
      expect(() => bucket.setLimits({ rate: -1 })).toThrow(RangeError);
      expect(() => bucket.setLimits({ rate: 1.5 })).toThrow(RangeError);
      expect(() => bucket.setLimits({ rate: 10, burst: -3 })).toThrow(RangeError);
      expect(() => bucket.setLimits({ rate: Number.NaN })).toThrow(RangeError);
      expect(bucket.limits).toEqual({ rate: 10, burst: 10 });
    });
  });

  describe('shared memory', () => {
    it('handles attached to one buffer share balance and limits', () => {
      const clock = fakeClock();
      const a = TokenBucket.create({ rate: 10, burst: 4 }, clock);
      const b = TokenBucket.attach(a.buffer, 0, clock);
      expect(a.tryConsume(3)).toBe(0);
      expect(b.tryConsume(2)).toBe(S / 10);
      expect(b.tryConsume(1)).toBe(0);
      expect(a.tryConsume(1)).toBe(S / 10);
      a.setLimits({ rate: 0 });
      expect(b.unlimited).toBe(true);
    });

    it('lives at an offset inside a larger buffer', () => {
      const buffer = new SharedArrayBuffer(3 * TokenBucket.BYTES);
      const clock = fakeClock();
      const one = TokenBucket.initialize(buffer, TokenBucket.BYTES, { rate: 5 }, clock);
      const two = TokenBucket.initialize(buffer, 2 * TokenBucket.BYTES, { rate: 7 }, clock);
      expect(TokenBucket.attach(buffer, TokenBucket.BYTES, clock).limits).toEqual({ rate: 5, burst: 5 });
      expect(TokenBucket.attach(buffer, 2 * TokenBucket.BYTES, clock).limits).toEqual({ rate: 7, burst: 7 });
      expect(one.tryConsume(5)).toBe(0);
      expect(two.balance).toBe(7);
    });

    it('refuses a buffer that holds no bucket', () => {
      const buffer = new SharedArrayBuffer(TokenBucket.BYTES);
      expect(() => TokenBucket.attach(buffer)).toThrow(/no token bucket/);
      expect(() => TokenBucket.attach(buffer, 8)).toThrow(RangeError);
      expect(() => TokenBucket.attach(buffer, 3)).toThrow(RangeError);
      expect(() => TokenBucket.attach(new ArrayBuffer(64) as unknown as SharedArrayBuffer)).toThrow(TypeError);
    });

    it('an attached handle without a clock uses the recorded origin', () => {
      const origin = captureClockOrigin();
      const bucket = TokenBucket.initialize(new SharedArrayBuffer(TokenBucket.BYTES), 0, { rate: 1 }, undefined, origin);
      const attached = TokenBucket.attach(bucket.buffer);
      expect(attached.origin).toEqual(origin);
      const first = attached.now();
      expect(first).toBeGreaterThanOrEqual(0);
      expect(attached.now()).toBeGreaterThanOrEqual(first);
    });
  });

  describe('admitPair (both or neither)', () => {
    it('passes unlimited buckets and zero amounts without reading the clock', () => {
      const clock = fakeClock();
      const a = TokenBucket.create({ rate: 0 }, clock);
      const b = TokenBucket.create({ rate: 5 }, clock);
      expect(TokenBucket.admitPair(a, 100, b, 0)).toBe(0);
      expect(clock.calls).toBe(1); // b's creation only
      expect(TokenBucket.admitPair(a, 100, b, 5)).toBe(0);
      expect(b.balance).toBe(0);
    });

    it('charges both, or neither with the longer wait', () => {
      const clock = fakeClock();
      const a = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      const b = TokenBucket.create({ rate: 100, burst: 100 }, clock);
      expect(TokenBucket.admitPair(a, 5, b, 80)).toBe(0);
      expect([a.balance, b.balance]).toEqual([5, 20]);
      expect(TokenBucket.admitPair(a, 6, b, 50)).toBe(0.3 * S); // a: 0.1 s, b: 0.3 s
      expect(TokenBucket.admitPair(a, 6, b, 10)).toBe(0.1 * S);
      expect(TokenBucket.admitPair(a, 1, b, 21)).toBe(0.01 * S);
      expect([a.balance, b.balance]).toEqual([5, 20]);
    });

    it('gives the first charge back when the second bucket was drained after the check', () => {
      // Two handles on ONE region: both checks pass (10 >= 6), then the first charge drains what the
      // second had seen — exactly the race with another worker — so the second charge fails.
      const clock = fakeClock();
      const one = TokenBucket.create({ rate: 10, burst: 10 }, clock);
      const alias = TokenBucket.attach(one.buffer, 0, clock);
      expect(TokenBucket.admitPair(one, 6, alias, 6)).toBe(0.2 * S); // 2 tokens short after the first
      expect(one.balance).toBe(10); // the first charge was refunded
    });
  });

  it('the default clock is nanoseconds since its origin, as a Number', () => {
    const clock = monotonicClock(captureClockOrigin());
    const a = clock();
    const b = clock();
    expect(typeof a).toBe('number');
    expect(a).toBeGreaterThanOrEqual(0);
    expect(b).toBeGreaterThanOrEqual(a);
  });

  it('rejects negative, fractional and unsafe amounts', () => {
    const bucket = TokenBucket.create({ rate: 10 }, fakeClock());
    for (const bad of [-1, 0.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53]) {
      expect(() => bucket.tryConsume(bad)).toThrow(RangeError);
      expect(() => bucket.peekWait(bad)).toThrow(RangeError);
    }
  });
});
