/**
 * The token-bucket rules of the throttle design (§4), through the public API: a DiskThrottle with only an
 * ops limit (1 token per admitted request) or only a bytes limit (the data length per request), driven by
 * an injected clock. Waits in these tests stay below the 1 s cap of `admit`. The balance is observed by
 * admitting with the clock held still until a refusal (`drain`).
 */
import { describe, expect, it } from 'vitest';
import { captureClockOrigin, monotonicClock, resolveBucketLimits } from '../../src/throttle/token-bucket.js';
import { DiskThrottle } from '../../src/throttle/disk-throttle.js';
import { drain, fakeClock, MS, S } from '../support/fake-clock.js';

const opsBucket = (rate: number, burst?: number, start = 0) => {
  const clock = fakeClock(start);
  return { clock, throttle: DiskThrottle.create({ iops: rate, iopsBurst: burst }, clock) };
};
const bytesBucket = (rate: number, burst?: number) => {
  const clock = fakeClock();
  return { clock, throttle: DiskThrottle.create({ bps: rate, bpsBurst: burst }, clock) };
};

describe('token bucket', () => {
  it('unlimited (rate 0) grants everything without ever reading the clock', () => {
    const clock = fakeClock();
    const throttle = DiskThrottle.create({ iops: 0, bps: 0 }, clock);
    for (const amount of [0, 1, 4096, Number.MAX_SAFE_INTEGER]) expect(throttle.admit(amount)).toBe(0);
    expect(clock.calls).toBe(0);
  });

  describe('capacity', () => {
    it('starts full and grants up to the burst, then refuses with the time of one token', () => {
      const { throttle } = opsBucket(10, 5);
      expect(drain(throttle)).toBe(5);
      expect(throttle.admit(0)).toBe(S / 10);
    });

    it('defaults the burst to one second of the rate', () => {
      expect(resolveBucketLimits({ rate: 250 })).toEqual({ rate: 250, burst: 250 });
      expect(resolveBucketLimits({ rate: 250, burst: 0 })).toEqual({ rate: 250, burst: 250 });
      expect(resolveBucketLimits({ rate: 7, burst: 3 })).toEqual({ rate: 7, burst: 3 });
      expect(resolveBucketLimits({ rate: 0, burst: 3 })).toEqual({ rate: 0, burst: 0 });
    });

    it('never refills beyond the burst, however long it sits idle', () => {
      const { clock, throttle } = opsBucket(100, 20);
      expect(drain(throttle)).toBe(20);
      clock.t += 3600 * S;
      expect(drain(throttle)).toBe(20);
      expect(throttle.admit(0)).toBe(S / 100); // time spent full earned nothing
    });
  });

  describe('refill', () => {
    it('refills at 1 op/s across fractional intervals: the timestamp only moves on whole tokens', () => {
      const { clock, throttle } = opsBucket(1, 1);
      expect(throttle.admit(0)).toBe(0);
      for (const t of [1, 250 * MS, 500 * MS, 999_999_999]) {
        clock.t = t;
        expect(throttle.admit(0)).toBe(S - t); // the accrued fraction is kept: exact time to the next token
      }
      clock.t = S;
      expect(throttle.admit(0)).toBe(0);
      expect(throttle.admit(0)).toBe(S);
    });

    it('still refills when polled far more often than tokens arrive', () => {
      const { clock, throttle } = opsBucket(1, 1);
      let granted = 0;
      for (let i = 0; i <= 3000; i++) {
        clock.t = i * MS; // every millisecond for 3 s
        if (throttle.admit(0) === 0) granted += 1;
      }
      expect(granted).toBe(4); // the full bucket, then one a second
    });

    it('keeps the fraction of a token when it credits whole ones', () => {
      const { clock, throttle } = opsBucket(2, 2); // a token every 500 ms
      expect(drain(throttle)).toBe(2);
      clock.t = 750 * MS;
      expect(throttle.admit(0)).toBe(0); // the token of 500 ms
      expect(throttle.admit(0)).toBe(250 * MS); // not 500 ms: the 250 ms towards the next one were kept
      clock.t = S;
      expect(throttle.admit(0)).toBe(0);
    });

    it('rounds a fractional token period up to the next nanosecond (conservative)', () => {
      const { clock, throttle } = opsBucket(3, 3); // 333,333,333.3 ns per token
      expect(drain(throttle)).toBe(3);
      clock.t = 333_333_333;
      expect(throttle.admit(0)).toBe(1);
      clock.t = 333_333_334;
      expect(throttle.admit(0)).toBe(0);
      // Each token is booked as 333,333,334 ns, so at 1 s one more has been credited (booked up to
      // 666,666,668) and the next arrives 2 ns after 1 s.
      clock.t = S;
      expect(throttle.admit(0)).toBe(0);
      expect(throttle.admit(0)).toBe(2);
      clock.t = S + 2;
      expect(throttle.admit(0)).toBe(0);
    });

    it('reports the exact wait: refused 1 ns before it, granted at it', () => {
      const { clock, throttle } = bytesBucket(7_777, 1_000);
      expect(throttle.admit(1_000)).toBe(0);
      clock.t = 12_345;
      const wait = throttle.admit(600);
      expect(wait).toBe(Math.ceil((600 * S) / 7_777) - 12_345);
      clock.t += wait - 1;
      expect(throttle.admit(600)).toBe(1);
      clock.t += 1;
      expect(throttle.admit(600)).toBe(0);
    });

    it('is exact at high byte rates', () => {
      const rate = 10 * 2 ** 30; // 10 GiB/s
      const { clock, throttle } = bytesBucket(rate, rate);
      expect(throttle.admit(rate)).toBe(0);
      const size = 64 * 1024; // offered faster than the rate: ~10.7 KB are earned per step
      let granted = 0;
      for (let i = 0; i < 10_000; i++) {
        clock.t += 997; // a refill every ~1 µs: the worst case for the < 1 ns rounding per refill
        if (throttle.admit(size) === 0) granted += size;
      }
      const bound = Math.floor((clock.t * rate) / S);
      expect(granted).toBeLessThanOrEqual(bound);
      expect(granted).toBeGreaterThan(bound * 0.998 - size); // <= 0.1% forgone to rounding
    });

    it('idle for longer than 2^53 ns × rate / 1e9 tokens still fills exactly to the burst', () => {
      const rate = 10 * 2 ** 30;
      const { clock, throttle } = bytesBucket(rate, 4 * rate);
      expect(throttle.admit(4 * rate)).toBe(0);
      clock.t = 3 * S; // 3/4 of the bucket: a product beyond 2^53, not filling it
      expect(throttle.admit(3 * rate - 8 * 11)).toBe(0); // at most 8 ns of tokens forgone
      clock.t = 100 * S;
      expect(throttle.admit(4 * rate)).toBe(0);
      expect(throttle.admit(1)).toBeGreaterThan(0);
    });

    // Beyond 2^53 ns (104 days after the origin) Numbers step by 2, 4, ... 64 ns (at 2^58, 9 years): the
    // bucket rounds its bookkeeping up to that step, so it stays within rate × time + burst, and close to it.
    for (const start of [2 ** 53 - 5_000, 2 ** 55, 2 ** 58]) {
      it(`stays within rate × time + burst past 2^53 ns (from ${start})`, () => {
        const rate = 300_000; // 3,333.3 ns per token: never a whole number of steps
        const { clock, throttle } = opsBucket(rate, 100, start); // offered 1 per µs: never full after the start
        let granted = 0;
        for (let i = 0; i < 20_000; i++) {
          clock.t += 1_000;
          if (throttle.admit(0) === 0) granted += 1;
        }
        const bound = 100 + Math.floor(((clock.t - start) * rate) / S);
        expect(granted).toBeLessThanOrEqual(bound);
        expect(granted).toBeGreaterThan(bound * 0.97);
      });
    }
  });

  describe('debt', () => {
    it('grants an oversized request at a non-negative balance and makes followers repay the debt', () => {
      const { clock, throttle } = bytesBucket(1000, 100);
      expect(throttle.admit(250)).toBe(0); // balance -150
      expect(throttle.admit(10)).toBe(160 * MS); // repay 150, then 10 of its own
      expect(throttle.admit(250)).toBe(150 * MS); // oversized waits for the balance to reach 0
      clock.t = 150 * MS; // refusals consumed nothing: the balance is 0 now
      expect(throttle.admit(10)).toBe(10 * MS);
      expect(throttle.admit(250)).toBe(0);
      expect(throttle.admit(1)).toBe(251 * MS);
    });

    it('grants an oversized request from an empty (zero) balance', () => {
      const { throttle } = bytesBucket(1000, 10);
      expect(throttle.admit(10)).toBe(0);
      expect(throttle.admit(11)).toBe(0);
      expect(throttle.admit(1)).toBe(12 * MS);
    });
  });

  it('a zero-cost request always passes, even in debt, without a clock read', () => {
    const { clock, throttle } = bytesBucket(1, 1);
    expect(throttle.admit(1000)).toBe(0);
    const reads = clock.calls;
    expect(throttle.admit(0)).toBe(0);
    expect(clock.calls).toBe(reads);
  });

  describe('live limit changes', () => {
    it('credits the elapsed time at the old rate, then applies the new one', () => {
      const { clock, throttle } = opsBucket(10, 10);
      expect(drain(throttle)).toBe(10);
      clock.t = 0.5 * S; // 5 tokens at the old rate
      throttle.setLimits({ iops: 1000, iopsBurst: 2000 });
      expect(throttle.limits).toMatchObject({ iops: 1000, iopsBurst: 2000 });
      expect(drain(throttle)).toBe(5);
      expect(throttle.admit(0)).toBe(S / 1000);
    });

    it('keeps the value of a partly accrued token when the rate goes up', () => {
      const { clock, throttle } = opsBucket(1, 1);
      expect(throttle.admit(0)).toBe(0);
      clock.t = S / 2; // half a token at 1/s
      throttle.setLimits({ iops: 1000 });
      expect(throttle.admit(0)).toBe(MS / 2); // = half a token at 1000/s
    });

    it('values a partly accrued token at the new rate when the rate goes down', () => {
      const { clock, throttle } = opsBucket(1000, 1000);
      expect(drain(throttle)).toBe(1000);
      clock.t = MS / 2; // half a token at 1000/s
      throttle.setLimits({ iops: 1, iopsBurst: 1 });
      expect(throttle.admit(0)).toBe(S - MS / 2);
    });

    it('clips the balance to a lowered burst', () => {
      const { throttle } = opsBucket(100, 100);
      throttle.setLimits({ iops: 100, iopsBurst: 10 });
      expect(drain(throttle)).toBe(10);
      expect(throttle.admit(0)).toBe(S / 100);
    });

    it('keeps a debt across a change', () => {
      const { throttle } = bytesBucket(1000, 100);
      expect(throttle.admit(300)).toBe(0); // balance -200
      throttle.setLimits({ bps: 2000 });
      expect(throttle.admit(1)).toBe(100.5 * MS); // 201 tokens at 2000/s
    });

    it('switches to unlimited (no clock reads) and back (starting full)', () => {
      const { clock, throttle } = bytesBucket(10, 10);
      expect(throttle.admit(100)).toBe(0);
      throttle.setLimits({});
      const reads = clock.calls;
      expect(throttle.admit(1_000_000)).toBe(0);
      expect(clock.calls).toBe(reads);
      clock.t = 5 * S;
      throttle.setLimits({ bps: 4 });
      expect(throttle.limits).toMatchObject({ bps: 4, bpsBurst: 4 });
      expect(drain(throttle, 1)).toBe(4);
      expect(throttle.admit(1)).toBe(S / 4);
    });
  });

  it('handles attached to one buffer share balance and limits', () => {
    const clock = fakeClock();
    const a = DiskThrottle.create({ bps: 10, bpsBurst: 4 }, clock);
    const b = DiskThrottle.attach(a.buffer, clock);
    expect(a.admit(3)).toBe(0);
    expect(b.admit(2)).toBe(S / 10);
    expect(b.admit(1)).toBe(0);
    expect(a.admit(1)).toBe(S / 10);
    a.setLimits({});
    expect(b.limits).toEqual({ iops: 0, iopsBurst: 0, bps: 0, bpsBurst: 0 });
    expect(b.admit(100)).toBe(0);
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
    const { throttle } = bytesBucket(10);
    for (const bad of [-1, 0.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53]) {
      expect(() => throttle.admit(bad)).toThrow(RangeError);
    }
  });
});
