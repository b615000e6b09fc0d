// Image locking compatible with QEMU's: vublk and qemu-storage-daemon / qemu-img refuse each other's
// conflicting opens, in both directions; a read-only vublk lets readers in; locking=off lets two daemons
// share one image (the migration case). Real daemon processes, real qemu-storage-daemon and qemu-img.
// Note: QEMU 7.2's `qemu-img info` on a raw image takes no permission that conflicts with a writer (it opens
// without I/O), so the conflicting qemu-img commands tested here are `convert` (reads the source without
// sharing write) and `resize`.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';

const required = process.env['VUBLK_E2E_REQUIRED'] === '1';
const haveQemuImg = spawnSync('qemu-img', ['--version']).status === 0;
const haveQsd = spawnSync('qemu-storage-daemon', ['--version']).status === 0;
if (required && (!haveQemuImg || !haveQsd)) throw new Error('VUBLK_E2E_REQUIRED=1 but qemu-img or qemu-storage-daemon is missing');

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function tempImage(): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-lock-'));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  const image = path.join(dir, 'shared.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, 16 * 1024 * 1024);
  return image;
}

async function vublk(image: string, extra = ''): Promise<DaemonProcess> {
  const socketDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-lock-s-'));
  cleanups.push(() => fs.rmSync(socketDir, { recursive: true, force: true }));
  const daemon = await startDaemon({
    rawArgs: ['serve', '--disk', `image=${image},socket=${path.join(socketDir, 'v.sock')}${extra}`, '--metrics-listen', 'off'],
    waitForSocket: false,
  });
  cleanups.push(async () => void (await daemon.stop()));
  return daemon;
}

/** Waits until the daemon is listening (true) or has exited (false). */
async function listening(daemon: DaemonProcess): Promise<boolean> {
  const line = await daemon.waitForLog((l) => l.msg === 'listening for a vhost-user front-end' || l.level >= 50, 15_000).catch(() => null);
  if (line?.msg === 'listening for a vhost-user front-end') return true;
  const deadline = Date.now() + 10_000;
  while (daemon.running() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  return false;
}

/** Starts qemu-storage-daemon exporting the image; resolves when it holds the image or has exited. */
async function qsd(image: string, writable: boolean): Promise<{ running: () => boolean; output: () => string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qsd-'));
  const ro = writable ? '' : ',read-only=on';
  const child = spawn(
    'qemu-storage-daemon',
    [
      '--blockdev',
      `driver=file,filename=${image},node-name=file0${ro}`,
      '--export',
      `type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path=${path.join(dir, 'q.sock')},writable=${writable ? 'on' : 'off'}`,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr.on('data', (d: Buffer) => (output += d.toString()));
  const running = (): boolean => child.exitCode === null && child.signalCode === null;
  cleanups.push(async () => {
    if (running()) {
      child.kill('SIGTERM');
      await new Promise((resolve) => child.once('exit', resolve));
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const deadline = Date.now() + 10_000;
  while (running() && !fs.existsSync(path.join(dir, 'q.sock')) && Date.now() < deadline)
    await new Promise((resolve) => setTimeout(resolve, 50));
  if (running() && !fs.existsSync(path.join(dir, 'q.sock'))) throw new Error('qemu-storage-daemon did not start in time');
  if (!running()) await new Promise((resolve) => setTimeout(resolve, 50)); // let stderr drain
  return { running, output: () => output };
}

function qemuImg(...args: string[]): { status: number | null; output: string } {
  const result = spawnSync('qemu-img', args, { encoding: 'utf8', timeout: 30_000 });
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

function lockError(daemon: DaemonProcess): string {
  return (
    daemon
      .logs()
      .map((l) => `${l.msg} ${String(l['err'] ?? '')}`)
      .join('\n') + daemon.output()
  );
}

describe.skipIf(!haveQemuImg || !haveQsd)('image locks compatible with QEMU', () => {
  it('a writing vublk refuses qemu-storage-daemon, qemu-img convert and resize, and a second vublk', async () => {
    const image = await tempImage();
    const writer = await vublk(image);
    expect(await listening(writer)).toBe(true);

    const storage = await qsd(image, true);
    expect(storage.running()).toBe(false);
    expect(storage.output()).toMatch(/Failed to get "write" lock/);

    const convert = qemuImg('convert', '-f', 'raw', '-O', 'raw', image, `${image}.copy`);
    expect(convert.status).not.toBe(0);
    expect(convert.output).toMatch(/Failed to get shared "write" lock/);
    expect(qemuImg('resize', '-f', 'raw', image, '32M').output).toMatch(/Failed to get "write" lock/);
    // With -U (force share) qemu-img reads anyway, as documented.
    expect(qemuImg('convert', '-U', '-f', 'raw', '-O', 'raw', image, `${image}.copy`).status).toBe(0);

    const second = await vublk(image);
    expect(await listening(second)).toBe(false);
    expect(lockError(second)).toMatch(/is locked: failed to get/);
  });

  it('a read-only vublk lets qemu-img read but refuses a writer; two read-only vublks coexist', async () => {
    const image = await tempImage();
    const reader = await vublk(image, ',read-only=on');
    expect(await listening(reader)).toBe(true);
    expect(qemuImg('info', image).status).toBe(0);
    expect(qemuImg('convert', '-f', 'raw', '-O', 'raw', image, `${image}.copy`).status).toBe(0);
    const storage = await qsd(image, true);
    expect(storage.running()).toBe(false);
    expect(storage.output()).toMatch(/Failed to get "write" lock/);
    const secondReader = await vublk(image, ',read-only=on');
    expect(await listening(secondReader)).toBe(true);
  });

  it('vublk refuses an image qemu-storage-daemon exports writable, read-only or not', async () => {
    const image = await tempImage();
    const storage = await qsd(image, true);
    expect(storage.running()).toBe(true);
    const writer = await vublk(image);
    expect(await listening(writer)).toBe(false);
    expect(lockError(writer)).toMatch(/failed to get shared "write" lock/);
    const reader = await vublk(image, ',read-only=on');
    expect(await listening(reader)).toBe(false);
    expect(lockError(reader)).toMatch(/failed to get shared "write" lock/);
  });

  it('a start waits briefly for a lock that its holder is about to drop (a restart right after a crash)', async () => {
    const image = await tempImage();
    const first = await vublk(image);
    expect(await listening(first)).toBe(true);
    const second = await vublk(image);
    // The second daemon is still waiting for the lock when the first one goes away.
    await new Promise((resolve) => setTimeout(resolve, 500));
    expect(second.running()).toBe(true);
    await first.stop();
    expect(await listening(second)).toBe(true);
  });

  it('locking=off lets two daemons share one image by design (migration)', async () => {
    const image = await tempImage();
    const first = await vublk(image, ',locking=off');
    expect(await listening(first)).toBe(true);
    const second = await vublk(image, ',locking=off');
    expect(await listening(second)).toBe(true);
    // Without locks, QEMU tools see no conflict either.
    expect(qemuImg('convert', '-f', 'raw', '-O', 'raw', image, `${image}.copy`).status).toBe(0);
  });
});
