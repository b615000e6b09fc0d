// End to end: a real Linux guest under QEMU does block I/O through the vublk daemon.
// Needs qemu-system-x86_64 and the guest from build-guest.sh; without them these tests
// are skipped (with the reason on the console), or fail if VUBLK_E2E_REQUIRED=1.
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { directIoDir } from '../support/host-disk.js';
import { guestReport, PATTERN_OFFSET, PATTERN_PATH, qemuAvailable, runGuest, type Workload } from './qemu.js';

const CLI = fileURLToPath(new URL('../../dist/src/cli.js', import.meta.url));
const DISK_SECTORS = (64 * 1024 * 1024) / 512;
const TEST_TIMEOUT_MS = 120_000;
const GUEST_TIMEOUT_MS = 100_000;

const unavailable = qemuAvailable();
const required = process.env.VUBLK_E2E_REQUIRED === '1';
if (unavailable !== null) {
  console.warn(`QEMU guest tests ${required ? 'cannot run' : 'skipped'}: ${unavailable}`);
}

if (unavailable !== null && required) {
  it('QEMU and the test guest are available (VUBLK_E2E_REQUIRED=1)', () => {
    expect.fail(unavailable);
  });
}

interface Daemon {
  socketPath: string;
  imagePath: string;
  running(): boolean;
  log(): string;
  stop(): Promise<void>;
}

async function startDaemon(numQueues: number, extraArgs: string[] = [], baseDir = os.tmpdir()): Promise<Daemon> {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  const dir = await mkdtemp(path.join(baseDir, 'vublk-e2e-'));
  const socketPath = path.join(dir, 'vublk.sock');
  const imagePath = path.join(dir, 'disk.img');
  const child: ChildProcess = spawn(
    process.execPath,
    [CLI, 'serve', '--socket', socketPath, '--image', imagePath, '--size', '64M', '--num-queues', String(numQueues), ...extraArgs],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let log = '';
  child.stdout?.setEncoding('utf8').on('data', (text: string) => (log += text));
  child.stderr?.setEncoding('utf8').on('data', (text: string) => (log += text));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));

  const daemon: Daemon = {
    socketPath,
    imagePath,
    running: () => child.exitCode === null && child.signalCode === null,
    log: () => log,
    async stop() {
      if (daemon.running()) {
        child.kill('SIGTERM');
        const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(killer);
      }
      await rm(dir, { recursive: true, force: true });
    },
  };

  // The daemon accepts connections once its socket file exists.
  const deadline = Date.now() + 15_000;
  while (!existsSync(socketPath)) {
    if (!daemon.running() || Date.now() > deadline) {
      await daemon.stop();
      throw new Error(`daemon did not create ${socketPath} (running: ${daemon.running()}); log:\n${log}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return daemon;
}

function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

async function patternMd5(): Promise<string> {
  return md5(await readFile(PATTERN_PATH));
}

/** md5 of the image bytes where the guest put the pattern. */
async function imageMd5(imagePath: string): Promise<string> {
  const length = (await readFile(PATTERN_PATH)).length;
  const image = await open(imagePath, 'r');
  try {
    const data = Buffer.alloc(length);
    const { bytesRead } = await image.read(data, 0, length, PATTERN_OFFSET);
    return md5(data.subarray(0, bytesRead));
  } finally {
    await image.close();
  }
}

/** Boots the guest with the workload and asserts it passes; failure messages carry the console and daemon log. */
async function bootAndPass(
  disk: { socketPath: string } | { imagePath: string },
  numQueues: number,
  workload: Workload,
  daemon?: Daemon,
): Promise<void> {
  const result = await runGuest({ ...disk, numQueues, workload, timeoutMs: GUEST_TIMEOUT_MS });
  const report = guestReport(result.output);
  const context = [
    `guest console (exit ${result.exitCode}${result.timedOut ? ', timed out' : ''}):`,
    result.output,
    ...(daemon ? ['daemon log:', daemon.log().split('\n').slice(-40).join('\n')] : []),
  ].join('\n');
  expect(report.verdict, context).toBe(`PASS ${workload} md5=${await patternMd5()}`);
  expect(report.sizeSectors, context).toBe(DISK_SECTORS);
  expect(report.readOnly, context).toBe(false);
  expect(report.queues, context).toBe(numQueues);
}

describe.skipIf(unavailable !== null)('a QEMU guest', () => {
  // Proves the guest and the host-side checks with QEMU's own virtio-blk, so a failure
  // below points at vublk rather than at this harness.
  it('passes the rw workload on a plain virtio-blk disk (harness control)', { timeout: TEST_TIMEOUT_MS }, async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'vublk-e2e-control-'));
    try {
      const imagePath = path.join(dir, 'disk.img');
      await writeFile(imagePath, '');
      await truncate(imagePath, DISK_SECTORS * 512);
      await bootAndPass({ imagePath }, 1, 'rw');
      expect(await imageMd5(imagePath)).toBe(await patternMd5());
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  for (const numQueues of [1, 2]) {
    describe(`served by vublk with ${numQueues} queue${numQueues > 1 ? 's' : ''}`, () => {
      let daemon: Daemon;
      beforeAll(async () => {
        daemon = await startDaemon(numQueues);
      }, 30_000);
      afterAll(async () => {
        await daemon?.stop();
      }, 30_000);

      it('writes and reads back the pattern, which lands in the image file', { timeout: TEST_TIMEOUT_MS }, async () => {
        await bootAndPass({ socketPath: daemon.socketPath }, numQueues, 'rw', daemon);
        expect(await imageMd5(daemon.imagePath)).toBe(await patternMd5());
      });
    });
  }

  describe('served by vublk with --cache none (O_DIRECT, image on a disk file system), 2 queues', () => {
    let daemon: Daemon | undefined;
    const base = directIoDir();
    afterAll(async () => {
      await daemon?.stop();
    }, 30_000);

    // The guest writes and reads with O_DIRECT buffers 512..3584 bytes past a page boundary (a Linux guest
    // only promises 512-byte alignment); with --buffer-align 4096 vublk must bounce them, and stay exact.
    it('guest buffers off the 4 KiB alignment go through bounce buffers (counted); data exact in guest and image', {
      timeout: TEST_TIMEOUT_MS,
    }, async (ctx) => {
      if (base === null) {
        if (required) throw new Error('VUBLK_E2E_REQUIRED=1 but no file system here accepts O_DIRECT');
        ctx.skip('no file system here accepts O_DIRECT');
        return;
      }
      daemon = await startDaemon(2, ['--cache', 'none', '--buffer-align', '4096', '--metrics-listen', '127.0.0.1:0'], base);
      await bootAndPass({ socketPath: daemon.socketPath }, 2, 'unaligned', daemon);
      expect(await imageMd5(daemon.imagePath)).toBe(await patternMd5());
      const listening = daemon
        .log()
        .split('\n')
        .map((line) => /"msg":"metrics listening".*"address":"([^"]+)"|"address":"([^"]+)".*"msg":"metrics listening"/.exec(line))
        .find((m) => m !== null);
      expect(listening, daemon.log()).toBeDefined();
      const body = await (await fetch(`http://${listening![1] ?? listening![2]}/metrics`)).text();
      const bounced = body
        .split('\n')
        .filter((l) => l.startsWith('vublk_bounce_requests_total{'))
        .reduce((n, l) => n + Number(l.split(' ').pop()), 0);
      // dio-unaligned sends 64 writes and 64 reads of 64 KiB, every one with unaligned buffers.
      expect(bounced).toBeGreaterThanOrEqual(128);
      console.log(`[e2e cache=none] requests through bounce buffers: ${bounced}`);
      expect(daemon.running(), daemon.log()).toBe(true);
    });
  });

  describe('successive guests on one running daemon', () => {
    let daemon: Daemon;
    beforeAll(async () => {
      daemon = await startDaemon(1);
    }, 30_000);
    afterAll(async () => {
      await daemon?.stop();
    }, 30_000);

    it('the second boot reads the data the first one wrote', { timeout: TEST_TIMEOUT_MS }, async () => {
      await bootAndPass({ socketPath: daemon.socketPath }, 1, 'rw', daemon);
      await bootAndPass({ socketPath: daemon.socketPath }, 1, 'verify', daemon);
      expect(daemon.running(), daemon.log()).toBe(true);
    });
  });
});
