// End to end, beyond plain reads and writes: discard and write-zeroes from the guest's own tools, and a
// read-only disk as the guest sees it. Skipped with the reason when QEMU is missing (failed if required).
import http from 'node:http';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { imageBytes } from '../support/session-harness.js';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { guestReport, PATTERN_OFFSET, qemuAvailable, runGuest } from './qemu.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { METRICS_ARGS, metricsUrl, queueCounts, scrape } from '../support/metrics-scrape.js';

const unavailable = qemuAvailable();
const TEST_TIMEOUT_MS = 120_000;
const GUEST_TIMEOUT_MS = 100_000;

function consoleContext(output: string, daemon: DaemonProcess): string {
  return `guest console:\n${output}\ndaemon log:\n${daemon.output().split('\n').slice(-30).join('\n')}`;
}

const daemons: DaemonProcess[] = [];
afterAll(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
});

describe.skipIf(unavailable !== null)('guest-visible features', () => {
  it('DISCARD and WRITE_ZEROES from blkdiscard leave zeroes in the image', { timeout: TEST_TIMEOUT_MS }, async () => {
    const daemon = await startDaemon({ args: [...METRICS_ARGS] });
    daemons.push(daemon);
    const result = await runGuest({ socketPath: daemon.socketPath, workload: 'discard', timeoutMs: GUEST_TIMEOUT_MS });
    const report = guestReport(result.output);
    expect(report.verdict, consoleContext(result.output, daemon)).toMatch(/^PASS discard /);
    const region = imageBytes(daemon.imagePath, PATTERN_OFFSET, 4 * 1024 * 1024);
    expect(
      region.every((b) => b === 0),
      'the discarded and zeroed range still holds data',
    ).toBe(true);
    // The guest used the commands (not plain writes of zeroes), and none of them failed.
    const counts = queueCounts(await scrape(await metricsUrl(daemon)), 0);
    expect(counts.discards).toBeGreaterThan(0);
    expect(counts.writeZeroes).toBeGreaterThan(0);
    expect(counts.ioErrors).toBe(0);
    // A QEMU with shared guest RAM never draws the "no guest memory table" warning (no false alarm).
    expect(daemon.logs().filter((l) => /no guest memory table/.test(l.msg))).toEqual([]);
    // Firmware and kernel each start the device: one `features negotiated`, then `features renegotiated`.
    expect(daemon.logs().filter((l) => l.msg === 'features negotiated')).toHaveLength(1);
  });

  it('a read-only disk is read-only in the guest, and writes fail', { timeout: TEST_TIMEOUT_MS }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-ro-'));
    const imagePath = path.join(dir, 'ro.img');
    writeFileSync(imagePath, '');
    truncateSync(imagePath, 64 * 1024 * 1024);
    const daemon = await startDaemon({
      rawArgs: ['serve', '--socket', path.join(dir, 'ro.sock'), '--image', imagePath, '--read-only'],
      waitForSocket: false,
    });
    daemons.push(daemon);
    const socketPath = path.join(dir, 'ro.sock');
    await daemon.waitForLog((l) => l.msg === 'listening for a vhost-user front-end');
    const result = await runGuest({ socketPath, workload: 'readonly', timeoutMs: GUEST_TIMEOUT_MS });
    const report = guestReport(result.output);
    expect(report.verdict, consoleContext(result.output, daemon)).toBe('PASS readonly');
    expect(report.readOnly).toBe(true);
    expect(imageBytes(imagePath, 0, 4096).every((b) => b === 0)).toBe(true);
    rmSync(dir, { recursive: true, force: true });
  });

  it('a live resize reaches the running guest through the back-end channel', { timeout: TEST_TIMEOUT_MS }, async () => {
    const daemon = await startDaemon({ args: [...METRICS_ARGS] });
    daemons.push(daemon);
    // The admin API is on the admin socket next to the disk's socket (vublk.sock → vublk.admin.sock).
    const adminSocket = path.join(path.dirname(daemon.socketPath), 'vublk.admin.sock');
    let resize: Promise<{ status: number }> | null = null;
    const result = await runGuest({
      socketPath: daemon.socketPath,
      workload: 'resize',
      timeoutMs: GUEST_TIMEOUT_MS,
      onOutput: (output) => {
        // Grow the disk once the guest has reported its starting size.
        if (resize === null && /VUBLK-E2E: size=\d+/.test(output)) {
          resize = new Promise((resolve, reject) => {
            const req = http.request(
              {
                socketPath: adminSocket,
                path: '/admin/disks/disk0/resize',
                method: 'POST',
                timeout: 10_000,
                headers: { 'content-type': 'application/json' },
              },
              (res) => {
                res.resume();
                res.on('end', () => resolve({ status: res.statusCode ?? 0 }));
              },
            );
            req.on('error', reject);
            req.end(JSON.stringify({ size: '128M' }));
          });
        }
      },
    });
    expect(resize, 'the guest never reported its size').not.toBeNull();
    const reply = await resize!;
    expect(reply.status).toBe(200);
    const report = guestReport(result.output);
    expect(report.sizeSectors).toBe(131072);
    expect(report.verdict, consoleContext(result.output, daemon)).toBe('PASS resize size=262144');
    await daemon.waitForLog((l) => l.msg === 'config change sent to the front-end');
  });
});
