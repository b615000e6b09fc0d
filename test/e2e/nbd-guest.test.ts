// End to end over NBD: a real QEMU guest writes, flushes and reads back the pattern through vublk serving
// an NBD export — qemu-nbd (TCP, a raw file) and nbdkit's file plugin (Unix socket) — and the bytes are in the
// file behind the server. Skips with the reason when QEMU, qemu-nbd or nbdkit is missing (fails under
// VUBLK_E2E_REQUIRED=1).
import { createHash } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { guestReport, PATTERN_OFFSET, PATTERN_PATH, qemuAvailable, runGuest } from './qemu.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { freePort, requireTool, startNbdkit, startQemuNbd, tempDir, type ServerProcess } from '../support/nbd-servers.js';

const unavailable = qemuAvailable();
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';
const DISK_BYTES = 64 * 1024 * 1024;

function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function guestOver(image: string, numQueues: number, file: string): Promise<void> {
  const work = tempDir();
  cleanups.push(() => work.remove());
  const socket = path.join(work.dir, 'vublk.sock');
  const daemon: DaemonProcess = await startDaemon({
    rawArgs: ['serve', '--disk', `image=${image},socket=${socket},num-queues=${numQueues}`],
    waitForSocket: false,
  });
  cleanups.push(() => daemon.stop());
  await daemon.waitForLog((l) => l.msg === 'listening for a vhost-user front-end' || l.level >= 50, 20_000);
  expect(daemon.running(), daemon.output()).toBe(true);
  const result = await runGuest({ socketPath: socket, numQueues, workload: 'rw', timeoutMs: 100_000 });
  const pattern = readFileSync(PATTERN_PATH);
  const report = guestReport(result.output);
  expect(report.verdict, `${result.output}\ndaemon:\n${daemon.output().slice(-3000)}`).toBe(`PASS rw md5=${md5(pattern)}`);
  expect(report.sizeSectors).toBe(DISK_BYTES / 512);
  expect(md5(readFileSync(file).subarray(PATTERN_OFFSET, PATTERN_OFFSET + pattern.length))).toBe(md5(pattern));
}

function rawFile(): string {
  const work = tempDir();
  cleanups.push(() => work.remove());
  const file = path.join(work.dir, 'disk.raw');
  writeFileSync(file, '');
  truncateSync(file, DISK_BYTES);
  return file;
}

async function keep(server: Promise<ServerProcess>): Promise<void> {
  const started = await server;
  cleanups.push(() => started.kill());
}

describe('a QEMU guest over NBD', () => {
  if (unavailable !== null) {
    if (required) it('QEMU and the test guest are available (VUBLK_E2E_REQUIRED=1)', () => expect.fail(unavailable));
    else it.skip(`QEMU not available: ${unavailable}`, () => undefined);
    return;
  }

  it('qemu-nbd over TCP, two queues: the pattern reaches the file', { timeout: 150_000 }, async (context) => {
    requireTool(context, 'qemu-nbd');
    const file = rawFile();
    const port = await freePort();
    await keep(startQemuNbd({ port }, file, ['-x', 'vm']));
    await guestOver(`nbd://127.0.0.1:${port}/vm`, 2, file);
  });

  it('nbdkit file plugin over a Unix socket: the pattern reaches the file', { timeout: 150_000 }, async (context) => {
    requireTool(context, 'nbdkit');
    const file = rawFile();
    const work = tempDir();
    cleanups.push(() => work.remove());
    const socket = path.join(work.dir, 'nbd.sock');
    await keep(startNbdkit({ unix: socket }, ['file', file]));
    await guestOver(`nbd+unix:///?socket=${socket}`, 1, file);
  });
});
