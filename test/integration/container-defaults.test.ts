// The container image's defaults, run for real without Docker: the image's CMD serves its shipped default
// config (paths moved from the volumes to a scratch directory), and its HEALTHCHECK command, given
// VUBLK_HEALTH_URL, answers 0 against the daemon's listener (TCP or Unix socket) and 1 when nothing answers.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { ROOT, readDockerfile } from '../support/dockerfile.js';

const image = readDockerfile();
const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-container-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The shipped default config with the image's directories moved under `root` and another metrics address. */
function defaultConfigUnder(root: string, metricsListen: string): string {
  for (const sub of ['run/vublk', 'var/lib/vublk']) mkdirSync(path.join(root, sub), { recursive: true });
  const text = readFileSync(path.join(ROOT, image.defaultConfigSource), 'utf8')
    .replaceAll('/run/vublk/', `${root}/run/vublk/`)
    .replaceAll('/var/lib/vublk/', `${root}/var/lib/vublk/`)
    .replace(/^metrics-listen: \S+/m, `metrics-listen: ${metricsListen}`);
  const file = path.join(root, 'vublk.yaml');
  writeFileSync(file, text);
  return file;
}

/** Runs the image's HEALTHCHECK command with VUBLK_HEALTH_URL set; its exit code. */
function healthcheck(url: string): number | null {
  const [command, ...args] = image.healthcheck;
  const result = spawnSync(command === 'node' ? process.execPath : command!, args, {
    env: { ...process.env, VUBLK_HEALTH_URL: url },
    encoding: 'utf8',
    timeout: 15_000,
  });
  return result.status;
}

async function serveDefault(root: string, metricsListen: string): Promise<DaemonProcess> {
  const config = defaultConfigUnder(root, metricsListen);
  const cmd = image.cmd.map((word) => (word === '/etc/vublk/vublk.yaml' ? config : word));
  return startDaemon({ rawArgs: [...cmd, '--log-format', 'json'], waitForSocket: false });
}

describe('the container image defaults', () => {
  it('CMD serves the default config: the disk is created and its socket listens; the health check passes', async () => {
    const root = path.join(dir, 'tcp');
    const daemon = await serveDefault(root, '127.0.0.1:0');
    try {
      const listening = await daemon.waitForLog((line) => line.msg === 'metrics listening', 15_000);
      await daemon.waitForLog((line) => line.msg === 'listening for a vhost-user front-end', 15_000);
      expect(existsSync(path.join(root, 'run/vublk/disk0.sock'))).toBe(true);
      expect(existsSync(path.join(root, 'var/lib/vublk/disk0.img'))).toBe(true);
      expect(healthcheck(`http://${String(listening['address'])}/healthz`)).toBe(0);
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
    // Nothing listens there any more: unhealthy, not a hang.
    expect(healthcheck('http://127.0.0.1:1/healthz')).toBe(1);
  });

  it('the health check reaches a metrics listener on a Unix socket', async () => {
    const root = path.join(dir, 'unix');
    const metricsSocket = path.join(root, 'metrics.sock');
    mkdirSync(root, { recursive: true });
    const daemon = await serveDefault(root, `unix:${metricsSocket}`);
    try {
      await daemon.waitForLog((line) => line.msg === 'metrics listening', 15_000);
      expect(healthcheck(`unix:${metricsSocket}`)).toBe(0);
      expect(healthcheck(`unix:${path.join(root, 'absent.sock')}`)).toBe(1);
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
  });
});
