/**
 * Shared helpers of the session / data-path integration tests (test/integration/session-*.test.ts): the
 * real daemon driven by the TypeScript front-end. Everything that waits has a deadline.
 */
export { pattern } from './pattern.js';
export { Prng } from './prng.js';
import { afterEach, expect } from 'vitest';
import { closeSync, openSync, readdirSync, readFileSync, readSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { VhostUserFrontend, VirtioBlkDriver, type FrontendOptions } from '../../bench/src/frontend/index.js';
import { SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import type { DaemonProcess } from './daemon-process.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** The seed of a randomized test: VUBLK_TEST_SEED if set, else time-based (printed with every failure). */
export function testSeed(): number {
  const fixed = process.env['VUBLK_TEST_SEED'];
  return fixed !== undefined ? Number(fixed) >>> 0 : (Date.now() ^ (process.pid << 8)) >>> 0;
}

/** Reads the backing image on the host, bypassing the daemon. */
export function imageBytes(imagePath: string, offset: number, length: number): Buffer {
  const fd = openSync(imagePath, 'r');
  try {
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, out, done, length - done, offset + done);
      if (n === 0) break; // past end of file: zeroes, like the disk
      done += n;
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

export function sectorBytes(imagePath: string, sector: number, length: number): Buffer {
  return imageBytes(imagePath, sector * SECTOR_SIZE, length);
}

/** Polls `probe` until it returns true; throws naming `what` after `timeoutMs`. */
export async function waitUntil(probe: () => boolean, timeoutMs: number, what: string, intervalMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (probe()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Open fds of a process (entries of /proc/PID/fd). */
export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** Mappings of a process whose path names a memfd containing `name` (guest memory shows as /memfd:NAME (deleted)). */
export function memfdMappingCount(pid: number, name = 'memfd:'): number {
  return readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((line) => line.includes('/memfd:') && line.includes(name)).length;
}

/** Waits for the process to exit; resolves with its exit code and signal, rejects after `timeoutMs`. */
export function waitForExit(child: ChildProcess, timeoutMs: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  // 'close', not 'exit': it comes once the child's stdout and stderr have ended too, so every line the child
  // wrote before it exited has been read. After 'exit' alone, a log line written just before _exit could still
  // be in the pipe, missing from the output the test looks at next (seen in CI: the second-signal warning).
  const exited = child.exitCode !== null || child.signalCode !== null;
  const streamsOpen = [child.stdout, child.stderr].some((s) => s !== null && !s.destroyed && !s.readableEnded);
  if (exited && !streamsOpen) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`process ${child.pid} did not exit within ${timeoutMs} ms`)), timeoutMs);
    child.once('close', () => {
      clearTimeout(timer);
      resolve({ code: child.exitCode, signal: child.signalCode });
    });
  });
}

/** Cleanups registered during a test run after it, in reverse order, even when the test failed. */
export function useCleanups(): (cleanup: () => unknown) => void {
  const cleanups: (() => unknown)[] = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) {
      try {
        await cleanup();
      } catch {
        // a cleanup failing must not hide the test's own failure, nor skip the other cleanups
      }
    }
  });
  return (cleanup) => void cleanups.push(cleanup);
}

export interface Connected {
  frontend: VhostUserFrontend;
  blk: VirtioBlkDriver;
}

/**
 * Connects a front-end (QEMU 7.2 handshake unless options.handshake is false). `defer` closes it and waits
 * until the daemon noticed, so the next test's front-end is not refused as a second one.
 */
export async function connect(
  daemon: DaemonProcess,
  defer: (cleanup: () => unknown) => void,
  options: FrontendOptions = {},
): Promise<Connected> {
  const before = disconnects(daemon);
  let frontend: VhostUserFrontend;
  try {
    frontend = await VhostUserFrontend.connect(daemon.socketPath, { timeoutMs: 10_000, ...options });
  } catch (error) {
    throw new Error(`${(error as Error).message}\ndaemon output (tail):\n${daemon.output().slice(-4000)}`, { cause: error });
  }
  defer(async () => {
    frontend.close();
    if (daemon.running()) await waitForDisconnects(daemon, before + 1);
  });
  return { frontend, blk: new VirtioBlkDriver(frontend) };
}

/**
 * Waits until the daemon has logged `count` "front-end disconnected" lines in total, i.e. the previous session's
 * teardown has begun; the next connection is then served (not refused as a second front-end).
 */
export async function waitForDisconnects(daemon: DaemonProcess, count: number, timeoutMs = 10_000): Promise<void> {
  await waitUntil(() => disconnects(daemon) >= count, timeoutMs, `${count} "front-end disconnected" log lines`);
}

export function disconnects(daemon: DaemonProcess): number {
  return daemon.logs().filter((line) => line.msg === 'front-end disconnected').length;
}

/** Log lines at error level or above (pino: error = 50, fatal = 60): a healthy run has none. */
export function errorLogs(daemon: DaemonProcess): string[] {
  return daemon
    .logs()
    .filter((line) => line.level >= 50)
    .map((line) => JSON.stringify(line));
}

/** Stops the daemon (always), then fails if it logged errors or did not exit 0 on SIGTERM. */
export async function stopCleanly(daemon: DaemonProcess | undefined): Promise<void> {
  if (daemon === undefined) return;
  const errors = errorLogs(daemon);
  const code = await daemon.stop();
  expect(errors, 'the daemon logged errors').toEqual([]);
  expect(code, `exit code on SIGTERM; output:\n${daemon.output().slice(-3000)}`).toBe(0);
}
