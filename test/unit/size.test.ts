import { describe, expect, it } from 'vitest';
import { InvalidSizeError, parseCount, parseRate, parseSize } from '../../src/throttle/size.js';

const K = 1024;

function rejection(parse: (text: string) => number, text: string): InvalidSizeError {
  try {
    parse(text);
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidSizeError);
    return error as InvalidSizeError;
  }
  throw new Error(`${JSON.stringify(text)} was accepted`);
}

describe('parseSize', () => {
  it.each([
    ['0', 0],
    ['1', 1],
    ['4096', 4096],
    ['100M', 100 * K * K],
    ['100m', 100 * K * K],
    ['64K', 64 * K],
    ['64k', 64 * K],
    ['64KB', 64 * K],
    ['64Ki', 64 * K],
    ['64KiB', 64 * K],
    ['1G', K ** 3],
    ['1GiB', K ** 3],
    ['2T', 2 * K ** 4],
    ['512B', 512],
    ['1.5G', 1.5 * K ** 3],
    ['0.5K', 512],
    ['1.0', 1],
    ['  8M  ', 8 * K * K],
    ['8 M', 8 * K * K],
    ['007', 7],
    ['8191T', 8191 * K ** 4],
    [String(Number.MAX_SAFE_INTEGER), Number.MAX_SAFE_INTEGER],
  ])('%j → %d', (text, value) => {
    expect(parseSize(text)).toBe(value);
  });

  it('is 1024-based', () => {
    expect(parseSize('100M')).toBe(104_857_600);
  });

  it.each([
    ['', 'size'],
    ['   ', 'size'],
    ['abc', 'size'],
    ['M', 'size'],
    ['1X', 'size'],
    ['1P', 'size'],
    ['1iB', 'size'],
    ['1Mb', 'size'], // bits, not bytes
    ['1e6', 'size'],
    ['0x10', 'size'],
    ['+5', 'size'],
    ['.5K', 'size'],
    ['5.K', 'size'],
    ['1,024', 'size'],
    ['1_024', 'size'],
    ['10MM', 'size'],
    ['Infinity', 'size'],
    ['NaN', 'size'],
    ['-1', 'size (negative)'],
    ['-4K', 'size (negative)'],
    ['0.5', 'size (not a whole number)'],
    ['1.3K', 'size (not a whole number)'],
    ['8191.9999999999999999T', 'size (not a whole number)'],
    ['8192T', `size (larger than ${Number.MAX_SAFE_INTEGER})`],
    ['9007199254740992', `size (larger than ${Number.MAX_SAFE_INTEGER})`],
    ['99999999999999999999999', `size (larger than ${Number.MAX_SAFE_INTEGER})`],
  ])('rejects %j', (text, reason) => {
    const error = rejection(parseSize, text);
    expect(error.input).toBe(text);
    expect(error.reason).toBe(reason);
    expect(error.code).toBe('VUBLK_ERR_INVALID_SIZE');
    expect(error.name).toBe('InvalidSizeError');
    expect(error.message).toContain(JSON.stringify(text)); // names the bad input
    expect(error.message).toContain('e.g. "4096", "64K" or "100MiB"'); // shows valid examples
  });

  it('rejects a non-string (e.g. a missing config value) with the same error', () => {
    expect(rejection(parseSize, undefined as unknown as string).input).toBe('undefined');
    expect(rejection(parseRate, null as unknown as string).input).toBe('null');
    expect(rejection(parseCount, undefined as unknown as string).input).toBe('undefined');
  });
});

describe('parseRate', () => {
  it.each([
    ['100M', 100 * K * K],
    ['100M/s', 100 * K * K],
    ['100MiB/s', 100 * K * K],
    ['1.5GiB/s', 1.5 * K ** 3],
    ['4096 / s', 4096],
    ['0', 0],
  ])('%j → %d', (text, value) => {
    expect(parseRate(text)).toBe(value);
  });

  it.each(['/s', '-1M/s', '1M/m', 'fast', '1.1/s'])('rejects %j with a rate example', (text) => {
    const error = rejection(parseRate, text);
    expect(error.input).toBe(text);
    expect(error.message).toContain(JSON.stringify(text));
    expect(error.message).toContain('"1.5GiB/s"');
    expect(error.reason.startsWith('rate')).toBe(true);
  });
});

describe('parseCount', () => {
  it.each([
    ['0', 0],
    ['500', 500],
    ['10k', 10_000],
    ['10K', 10_000],
    ['1.5k', 1_500],
    ['2M', 2_000_000],
    ['1G', 1_000_000_000],
  ])('%j → %d', (text, value) => {
    expect(parseCount(text)).toBe(value);
  });

  it.each([
    ['', 'count'],
    ['10KB', 'count'],
    ['10Ki', 'count'],
    ['1T', 'count'],
    ['-5', 'count (negative)'],
    ['1.0001k', 'count (not a whole number)'],
    ['9007199254740992', `count (larger than ${Number.MAX_SAFE_INTEGER})`],
  ])('rejects %j', (text, reason) => {
    const error = rejection(parseCount, text);
    expect(error.reason).toBe(reason);
    expect(error.message).toContain(JSON.stringify(text));
    expect(error.message).toContain('e.g. "5000" or "10k"');
  });
});
