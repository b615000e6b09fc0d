import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { formatPrettyLine, prettyDestination } from '../../src/log-pretty.js';

describe('formatPrettyLine', () => {
  it('puts time, level, disk/queue and message first, then the other fields', () => {
    const line = JSON.stringify({
      level: 30,
      time: '2026-01-02T03:04:05.678Z',
      service: 'vublk',
      disk: 'disk0',
      queue: 1,
      size: 256,
      eventIdx: true,
      msg: 'ring started',
    });
    const text = formatPrettyLine(line, false);
    expect(text).toMatch(/^\d\d:\d\d:\d\d\.678 INFO {2}disk0\/q1 ring started size=256 eventIdx=true\n$/);
  });

  it('quotes strings with spaces, JSON-encodes objects, and colours only when asked', () => {
    const line = JSON.stringify({
      level: 40,
      time: 0,
      msg: 'config change requires restart: not applied',
      keys: ['num-queues'],
      reason: 'two words',
    });
    const plain = formatPrettyLine(line, false);
    expect(plain).toContain('WARN  config change requires restart: not applied keys=["num-queues"] reason="two words"');
    expect(plain).not.toContain('\x1b[');
    expect(formatPrettyLine(line, true)).toContain('\x1b[33mWARN');
  });

  it('passes through lines that are not JSON objects', () => {
    expect(formatPrettyLine('hello', false)).toBe('hello\n');
    expect(formatPrettyLine('[1,2]\n', false)).toBe('[1,2]\n');
  });

  it('works as a pino destination', () => {
    const written: string[] = [];
    const out = { write: (chunk: string) => written.push(chunk) } as unknown as NodeJS.WritableStream;
    const log = pino({ base: { service: 'vublk' } }, prettyDestination(out, false));
    log.child({ disk: 'd' }).error({ errno: 'EIO' }, 'accept failed');
    expect(written).toHaveLength(1);
    expect(written[0]).toMatch(/ERROR d accept failed errno=EIO\n$/);
  });
});
