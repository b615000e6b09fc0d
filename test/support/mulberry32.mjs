// mulberry32 for the plain-JS children and workers, which cannot import test/support/prng.ts (same sequence as Prng.u32).
/** A seeded generator of uniform 32-bit unsigned integers. */
export function mulberry32(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}
