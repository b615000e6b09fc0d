/**
 * Human-readable sizes and rates for CLI flags and config values.
 *
 *   parseSize('4096') → 4096          parseSize('64K') → 65536        parseSize('100MiB') → 104857600
 *   parseSize('1.5G') → 1610612736    parseRate('100M/s') → 104857600 parseCount('10k') → 10000
 *
 * Sizes/rates: a whole number, or a decimal whose value comes out whole, optionally followed by a
 * multiplier K, M, G or T (any case; binary: 1024-based) with an optional `i`, and an optional `B`
 * (`100M`, `100Mi`, `100MiB`, `100MB`, `512B` are all accepted; a lowercase `b` is not — it reads as bits).
 * Counts (`parseCount`, e.g. IOPS): decimal multipliers k, M, G (1000-based), no unit.
 * Everything else — negative numbers, signs, exponents, fractions of a byte, empty text, values beyond
 * Number.MAX_SAFE_INTEGER — throws InvalidSizeError naming the input and showing a valid example.
 * Parsing is exact (BigInt), so '8191.9999999999999999T' is rejected rather than rounded.
 */
import { VublkError } from '../errors.js';

export class InvalidSizeError extends VublkError {
  constructor(
    /** The text that was rejected. */
    readonly input: string,
    /** Why, e.g. 'is negative'. */
    readonly reason: string,
    example: string,
  ) {
    super('VUBLK_ERR_INVALID_SIZE', `invalid ${reason}: ${JSON.stringify(input)}; ${example}`, { peerFault: true });
  }
}

const BINARY: Record<string, bigint> = { '': 1n, K: 1n << 10n, M: 1n << 20n, G: 1n << 30n, T: 1n << 40n };
const DECIMAL: Record<string, bigint> = { '': 1n, K: 1_000n, M: 1_000_000n, G: 1_000_000_000n };

const SIZE_EXAMPLE = 'expected a whole number of bytes with an optional K/M/G/T suffix (1024-based), e.g. "4096", "64K" or "100MiB"';
const RATE_EXAMPLE = 'expected whole bytes per second with an optional K/M/G/T suffix (1024-based) and "/s", e.g. "100M" or "1.5GiB/s"';
const COUNT_EXAMPLE = 'expected a whole number with an optional k/M/G suffix (1000-based), e.g. "5000" or "10k"';

const SIZE_SYNTAX = /^(\d+)(?:\.(\d+))?\s*(?:([KMGT])(I)?)?(B)?$/i;
const COUNT_SYNTAX = /^(\d+)(?:\.(\d+))?\s*([KMG])?$/i;

function exact(input: string, whole: string, fraction: string | undefined, multiplier: bigint, what: string, example: string): number {
  const digits = fraction ?? '';
  const scale = 10n ** BigInt(digits.length);
  const numerator = BigInt(whole + digits) * multiplier;
  if (numerator % scale !== 0n) throw new InvalidSizeError(input, `${what} (not a whole number)`, example);
  const value = numerator / scale;
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new InvalidSizeError(input, `${what} (larger than ${Number.MAX_SAFE_INTEGER})`, example);
  }
  return Number(value);
}

function parseBinary(text: string, what: string, example: string): number {
  const input = String(text);
  const trimmed = input.trim();
  if (/^-\s*\d/.test(trimmed)) throw new InvalidSizeError(input, `${what} (negative)`, example);
  const m = SIZE_SYNTAX.exec(trimmed);
  // A lowercase 'b' means bits; 'i' only belongs after a multiplier (the regex enforces that).
  if (m === null || (m[5] !== undefined && m[5] !== 'B')) throw new InvalidSizeError(input, what, example);
  const multiplier = BINARY[(m[3] ?? '').toUpperCase()] ?? 1n;
  return exact(input, m[1] ?? '', m[2], multiplier, what, example);
}

/** Bytes: `parseSize('100M')` → 104857600. Throws InvalidSizeError. */
export function parseSize(text: string): number {
  return parseBinary(text, 'size', SIZE_EXAMPLE);
}

/** Bytes per second: like parseSize, with an optional trailing `/s`. Throws InvalidSizeError. */
export function parseRate(text: string): number {
  const body = String(text)
    .trim()
    .replace(/\s*\/\s*s$/i, '');
  try {
    return parseBinary(body, 'rate', RATE_EXAMPLE);
  } catch (error) {
    if (error instanceof InvalidSizeError) throw new InvalidSizeError(String(text), error.reason, RATE_EXAMPLE);
    throw error;
  }
}

/** A count such as IOPS: `parseCount('10k')` → 10000 (decimal multipliers). Throws InvalidSizeError. */
export function parseCount(text: string): number {
  const input = String(text);
  const trimmed = input.trim();
  if (/^-\s*\d/.test(trimmed)) throw new InvalidSizeError(input, 'count (negative)', COUNT_EXAMPLE);
  const m = COUNT_SYNTAX.exec(trimmed);
  if (m === null) throw new InvalidSizeError(input, 'count', COUNT_EXAMPLE);
  const multiplier = DECIMAL[(m[3] ?? '').toUpperCase()] ?? 1n;
  return exact(input, m[1] ?? '', m[2], multiplier, 'count', COUNT_EXAMPLE);
}
