/**
 * The seeded data pattern of `vublk-bench run --verify`: every 4-byte word of the disk has a value computed from
 * the seed and the word's absolute position, so a block read back from the wrong place, a stale block from
 * an earlier run (another seed), a torn or partially written block all show up as a mismatch, whatever
 * block sizes were used to write and to read. Words are little-endian u32 (the host order on x86/arm64).
 */

const TWO_POW_32 = 0x1_0000_0000;

/** murmur3's 32-bit finalizer: a cheap bijective mix. */
export function mix32(value: number): number {
  let h = value >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The per-run key derived from the user's seed. */
export function patternKey(seed: number): number {
  return mix32((seed >>> 0) ^ 0x5bd1e995);
}

/** Expected value of the u32 word at byte offset `4·wordIndex` of the disk. */
export function patternWord(key: number, wordIndex: number): number {
  const lo = wordIndex >>> 0;
  const hi = Math.floor(wordIndex / TWO_POW_32);
  return mix32(lo ^ key ^ Math.imul(hi, 0x9e3779b1));
}

function wordsOf(bytes: Uint8Array): Uint32Array | null {
  if (bytes.byteOffset % 4 !== 0 || bytes.byteLength % 4 !== 0) return null;
  return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

function checkOffset(diskOffset: number): void {
  if (!Number.isSafeInteger(diskOffset) || diskOffset < 0 || diskOffset % 4 !== 0) {
    throw new RangeError(`pattern offsets must be non-negative multiples of 4, got ${diskOffset}`);
  }
}

/** Fills `bytes` with the pattern the disk should hold at [diskOffset, diskOffset + bytes.length). */
export function fillPattern(bytes: Uint8Array, diskOffset: number, key: number): void {
  checkOffset(diskOffset);
  const first = diskOffset / 4;
  const words = wordsOf(bytes);
  if (words !== null) {
    for (let i = 0; i < words.length; i++) words[i] = patternWord(key, first + i);
    return;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const whole = Math.floor(bytes.byteLength / 4);
  for (let i = 0; i < whole; i++) view.setUint32(i * 4, patternWord(key, first + i), true);
  const tail = patternWord(key, first + whole);
  for (let b = whole * 4; b < bytes.byteLength; b++) bytes[b] = (tail >>> ((b - whole * 4) * 8)) & 0xff;
}

export interface PatternMismatch {
  /** Absolute byte offset on the disk of the first byte that differs. */
  offset: number;
  expected: number;
  actual: number;
}

/** The first byte of `bytes` (read from diskOffset) that differs from the pattern, or null if all match. */
export function findMismatch(bytes: Uint8Array, diskOffset: number, key: number): PatternMismatch | null {
  checkOffset(diskOffset);
  const first = diskOffset / 4;
  const words = wordsOf(bytes);
  const whole = Math.floor(bytes.byteLength / 4);
  let bad = -1;
  if (words !== null) {
    for (let i = 0; i < whole; i++) {
      if (words[i] !== patternWord(key, first + i)) {
        bad = i;
        break;
      }
    }
  } else {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < whole; i++) {
      if (view.getUint32(i * 4, true) !== patternWord(key, first + i)) {
        bad = i;
        break;
      }
    }
  }
  const from = bad >= 0 ? bad : whole;
  const to = bad >= 0 ? bad + 1 : Math.ceil(bytes.byteLength / 4);
  for (let w = from; w < to; w++) {
    const expectedWord = patternWord(key, first + w);
    for (let b = 0; b < 4 && w * 4 + b < bytes.byteLength; b++) {
      const expected = (expectedWord >>> (b * 8)) & 0xff;
      const actual = bytes[w * 4 + b] as number;
      if (actual !== expected) return { offset: diskOffset + w * 4 + b, expected, actual };
    }
  }
  return null;
}
