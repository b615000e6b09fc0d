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

/** Admits requests of `bytes` until one is refused (the caller holds the clock still); returns how many passed. */
export function drain(throttle: { admit(bytes: number): number }, bytes = 0, max = 10_000_000): number {
  let granted = 0;
  while (granted < max && throttle.admit(bytes) === 0) granted += 1;
  return granted;
}
