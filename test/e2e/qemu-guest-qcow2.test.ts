// End to end: a real Linux guest under QEMU boots with its disk on a qcow2 overlay of a raw base image,
// served by vublk (2 queues), and passes the write/read-back workload. Afterwards `qemu-img check` finds the
// overlay clean, the overlay read through `qemu-img convert` holds the pattern where the guest wrote it and
// the base's bytes elsewhere, and the base file is unchanged. Needs qemu-system-x86_64, qemu-img and the
// guest from build-guest.sh; skipped otherwise (fails under VUBLK_E2E_REQUIRED=1).
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { guestReport, PATTERN_OFFSET, PATTERN_PATH, qemuAvailable, runGuest } from './qemu.js';
import { waitForSocketFile } from '../support/daemon-process.js';

const CLI = fileURLToPath(new URL('../../dist/src/cli.js', import.meta.url));
const DISK = 64 * 1024 * 1024;
const MARK_OFFSET = 32 * 1024 * 1024;
const MARK_LENGTH = 1024 * 1024;

function qemuImgMissing(): string | null {
  try {
    execFileSync('qemu-img', ['--version'], { stdio: 'ignore' });
    return null;
  } catch {
    return 'qemu-img is not installed';
  }
}

const unavailable = qemuAvailable() ?? qemuImgMissing();
const required = process.env.VUBLK_E2E_REQUIRED === '1';
if (unavailable !== null) console.warn(`QEMU qcow2 guest test ${required ? 'cannot run' : 'skipped'}: ${unavailable}`);
if (unavailable !== null && required) {
  it('QEMU, qemu-img and the test guest are available (VUBLK_E2E_REQUIRED=1)', () => {
    expect.fail(unavailable);
  });
}

function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

describe.skipIf(unavailable !== null)('a QEMU guest on a qcow2 overlay of a raw base', () => {
  it('boots, writes and reads back the pattern; the overlay is clean and the base untouched', { timeout: 180_000 }, async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'vublk-e2e-qcow2-'));
    let child: ChildProcess | null = null;
    let log = '';
    try {
      const base = path.join(dir, 'base.img');
      const baseBytes = Buffer.alloc(DISK);
      baseBytes.fill(0xab, MARK_OFFSET, MARK_OFFSET + MARK_LENGTH);
      await writeFile(base, baseBytes);
      const overlay = path.join(dir, 'overlay.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.img', '-F', 'raw', overlay]);
      const socketPath = path.join(dir, 'vublk.sock');
      child = spawn(
        process.execPath,
        [CLI, 'serve', '--socket', socketPath, '--image', overlay, '--format', 'qcow2', '--num-queues', '2'],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      child.stdout?.setEncoding('utf8').on('data', (text: string) => (log += text));
      child.stderr?.setEncoding('utf8').on('data', (text: string) => (log += text));
      const exited = new Promise<void>((resolve) => child?.once('exit', () => resolve()));
      await waitForSocketFile({ running: () => child?.exitCode === null, output: () => log }, socketPath);

      const result = await runGuest({ socketPath, numQueues: 2, workload: 'rw', timeoutMs: 150_000 });
      const report = guestReport(result.output);
      const pattern = await readFile(PATTERN_PATH);
      const context = `guest console (exit ${result.exitCode}${result.timedOut ? ', timed out' : ''}):\n${result.output}\ndaemon log:\n${log.split('\n').slice(-40).join('\n')}`;
      expect(report.verdict, context).toBe(`PASS rw md5=${md5(pattern)}`);
      expect(report.sizeSectors, context).toBe(DISK / 512);
      expect(report.queues, context).toBe(2);

      child.kill('SIGTERM');
      await exited;
      expect(child.exitCode, log).toBe(0);
      child = null;

      const check = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', overlay], { encoding: 'utf8' })) as Record<
        string,
        unknown
      >;
      expect(check['corruptions'] ?? 0, JSON.stringify(check)).toBe(0);
      expect(check['leaks'] ?? 0, JSON.stringify(check)).toBe(0);
      const flat = path.join(dir, 'flat.raw');
      execFileSync('qemu-img', ['convert', '-O', 'raw', overlay, flat]);
      const bytes = await readFile(flat);
      expect(md5(bytes.subarray(PATTERN_OFFSET, PATTERN_OFFSET + pattern.length))).toBe(md5(pattern));
      expect(bytes.subarray(MARK_OFFSET, MARK_OFFSET + MARK_LENGTH).every((b) => b === 0xab)).toBe(true);
      expect(md5(await readFile(base))).toBe(md5(baseBytes));
    } finally {
      child?.kill('SIGKILL');
      await rm(dir, { recursive: true, force: true });
    }
  });
});
