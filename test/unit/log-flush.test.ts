/**
 * flushLogSync: the log lines of a process about to _exit reach stdout, including the line pino's asynchronous
 * stream already handed to a libuv thread (the thread's write would die with the process). The libuv threads are
 * kept busy here, so that write cannot have happened when the flush runs: without the flush of the in-flight line
 * the file stays empty.
 */
import { pbkdf2 } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { flushLogSync } from '../../src/log.js';

describe('flushLogSync', () => {
  it('writes the line a libuv thread holds, and what is queued behind it, before the process could _exit', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-log-'));
    const file = path.join(dir, 'log');
    const fd = openSync(file, 'w');
    try {
      // The same kind of stream as pino's default (asynchronous sonic-boom), on a file.
      const log = pino({ base: null, timestamp: false }, pino.destination({ dest: fd, sync: false }));
      // Twice as many tasks as threads: a thread that frees itself (another test's file I/O) takes the next
      // task, not the write.
      const threads = Number(process.env['UV_THREADPOOL_SIZE'] ?? 4);
      const busy = Array.from(
        { length: 2 * threads },
        () => new Promise<void>((resolve) => pbkdf2('vublk', 'salt', 200_000, 64, 'sha512', () => resolve())),
      );
      log.warn('second signal: exiting immediately');
      log.error('and one more line');
      // The first line went to a libuv thread, which is busy: nothing is in the file yet.
      expect(readFileSync(file, 'utf8')).toBe('');
      flushLogSync(log);
      const lines = readFileSync(file, 'utf8').trim().split('\n');
      expect(lines.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual(['second signal: exiting immediately', 'and one more line']);
      await Promise.all(busy);
    } finally {
      closeSync(fd);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
