/** A hand-driven monotonic clock (nanoseconds) for token-bucket tests; counts how often it is read. */
export const S = 1_000_000_000;
export const MS = 1_000_000;

export function fakeClock(start = 0): (() => number) & { t: number; calls: number } {
  const clock = Object.assign(
    () => {
      clock.calls += 1;
      return clock.t;
    },
    { t: start, calls: 0 },
  );
  return clock;
}
