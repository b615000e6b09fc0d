// Metrics, health and admin endpoints of a real daemon (`node dist/src/cli.js serve`; run `npm run build`
// first): scrape /metrics over HTTP, parse the exposition text, check series, labels and values; /healthz
// and /readyz; the admin API and `vublk throttle` / `vublk disks`; clean exit on SIGTERM.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LATENCY_BUCKETS_SECONDS } from '../../src/dataplane/counters.js';
import { runCli, startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { parseExposition, select, sampleValue, type Exposition } from '../support/prom-text.js';

const MiB = 1024 * 1024;

interface HttpReply {
  status: number;
  contentType: string;
  body: string;
}

/** One HTTP request to `base` (http://HOST:PORT or unix:PATH), with a deadline. */
function request(base: string, method: string, pathname: string, body?: string, contentType = 'application/json'): Promise<HttpReply> {
  const target: http.RequestOptions = base.startsWith('unix:')
    ? { socketPath: base.slice('unix:'.length) }
    : { host: new URL(base).hostname.replace(/^\[|\]$/g, ''), port: Number(new URL(base).port) };
  return new Promise((resolve, reject) => {
    const req = http.request(
      { ...target, path: pathname, method, timeout: 10_000, headers: body === undefined ? {} : { 'Content-Type': contentType } },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, contentType: String(res.headers['content-type']), body: text }));
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${pathname}: no answer within 10 s`)));
    req.on('error', reject);
    req.end(body);
  });
}

async function scrape(base: string): Promise<Exposition> {
  const reply = await request(base, 'GET', '/metrics');
  expect(reply.status).toBe(200);
  expect(reply.contentType).toMatch(/^text\/plain; version=0\.0\.4/);
  return parseExposition(reply.body);
}

/** The bound address from the "metrics listening" log line (the daemon was given port 0). */
async function metricsBase(daemon: DaemonProcess): Promise<string> {
  const line = await daemon.waitForLog((l) => l.msg === 'metrics listening', 15_000);
  const address = String(line['address']);
  return address.startsWith('unix:') ? address : `http://${address}`;
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Why `promtool` (Debian: prometheus) cannot run, or null when it can. */
function promtoolMissing(): string | null {
  const probe = spawnSync('promtool', ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (probe.error) return `promtool is not installed (${probe.error.message}); Debian: apt-get install prometheus`;
  if (probe.status !== 0) return `promtool --version failed: ${probe.stderr}`;
  return null;
}
const PROMTOOL_MISSING = promtoolMissing();
const PROMTOOL_REQUIRED = process.env['VUBLK_E2E_REQUIRED'] === '1';
if (PROMTOOL_MISSING !== null) console.warn(`promtool lint ${PROMTOOL_REQUIRED ? 'cannot run' : 'skipped'}: ${PROMTOOL_MISSING}`);

describe('metrics over HTTP', () => {
  let daemon: DaemonProcess;
  let base: string;
  /** The admin API: a Unix socket next to the disk's socket (vublk.sock → vublk.admin.sock). */
  let admin: string;
  let adminSocket: string;

  beforeAll(async () => {
    daemon = await startDaemon({
      size: '64M',
      args: ['--num-queues', '2', '--iops', '1000', '--bps', '10M', '--metrics-listen', '127.0.0.1:0'],
    });
    base = await metricsBase(daemon);
    adminSocket = path.join(daemon.dir, 'vublk.admin.sock');
    admin = `unix:${adminSocket}`;
  });
  afterAll(async () => {
    await daemon?.stop();
  });

  it.skipIf(PROMTOOL_MISSING !== null && !PROMTOOL_REQUIRED)('lints clean with the real `promtool check metrics`', async () => {
    if (PROMTOOL_MISSING !== null) expect.fail(`VUBLK_E2E_REQUIRED=1 but ${PROMTOOL_MISSING}`);
    const reply = await request(base, 'GET', '/metrics');
    expect(reply.status).toBe(200);
    expect(reply.body).toMatch(/^# TYPE vublk_nodejs_active_handles gauge$/m); // the default Node metrics are part of the scrape
    const lint = spawnSync('promtool', ['check', 'metrics'], { input: reply.body, encoding: 'utf8', timeout: 20_000 });
    expect(lint.error).toBeUndefined();
    expect(`${lint.stdout}${lint.stderr}`).toBe('');
    expect(lint.status).toBe(0);
  });

  it('answers /healthz and /readyz', async () => {
    expect(await request(base, 'GET', '/healthz')).toMatchObject({ status: 200, body: 'ok\n' });
    expect(await request(base, 'GET', '/readyz')).toMatchObject({ status: 200, body: 'ready\n' });
    expect((await request(base, 'GET', '/nothing')).status).toBe(404);
    expect((await request(base, 'POST', '/metrics', '{}')).status).toBe(405);
  });

  it('exports the vublk_ families with disk and queue labels', async () => {
    const m = await scrape(base);
    for (const name of m.types.keys()) expect(name).toMatch(/^vublk_/);
    expect(m.types.get('vublk_requests_total')).toBe('counter');
    for (const queue of ['0', '1']) {
      for (const op of ['read', 'write', 'flush', 'discard', 'write_zeroes', 'get_id']) {
        expect(sampleValue(m, 'vublk_requests_total', { disk: 'disk0', queue, op })).toBe(0);
      }
      for (const direction of ['read', 'write']) expect(sampleValue(m, 'vublk_bytes_total', { disk: 'disk0', queue, direction })).toBe(0);
      for (const name of [
        'vublk_io_errors_total',
        'vublk_unsupported_requests_total',
        'vublk_throttled_total',
        'vublk_invalid_avail_idx_total',
      ]) {
        expect(m.types.get(name)).toBe('counter');
        expect(sampleValue(m, name, { disk: 'disk0', queue })).toBe(0);
      }
      expect(m.types.get('vublk_throttle_pending')).toBe('gauge');
      expect(sampleValue(m, 'vublk_throttle_pending', { disk: 'disk0', queue })).toBe(0);
      expect(m.types.get('vublk_queue_poisoned')).toBe('gauge');
      expect(sampleValue(m, 'vublk_queue_poisoned', { disk: 'disk0', queue })).toBe(0);
    }
    expect(select(m, 'vublk_requests_total')).toHaveLength(12);
    expect(sampleValue(m, 'vublk_front_end_connected', { disk: 'disk0' })).toBe(0);
    expect(sampleValue(m, 'vublk_disk_capacity_bytes', { disk: 'disk0' })).toBe(64 * MiB);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'iops' })).toBe(1000);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'iops_burst' })).toBe(1000);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'bps' })).toBe(10 * MiB);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'bps_burst' })).toBe(10 * MiB);
    expect(m.types.get('vublk_process_start_time_seconds')).toBe('gauge');
    expect(sampleValue(m, 'vublk_process_start_time_seconds')).toBeGreaterThan(0);
    expect(select(m, 'vublk_nodejs_version_info')).toHaveLength(1);
  });

  it('exports request latency as a Prometheus histogram: cumulative buckets, +Inf equal to _count', async () => {
    const m = await scrape(base);
    expect(m.types.get('vublk_request_duration_seconds')).toBe('histogram');
    for (const op of ['read', 'write', 'flush', 'other']) {
      const buckets = select(m, 'vublk_request_duration_seconds_bucket', { disk: 'disk0', op });
      expect(buckets.map((b) => b.labels['le'])).toEqual([...LATENCY_BUCKETS_SECONDS.map(String), '+Inf']);
      for (let i = 1; i < buckets.length; i++) expect(buckets[i]!.value).toBeGreaterThanOrEqual(buckets[i - 1]!.value);
      const count = sampleValue(m, 'vublk_request_duration_seconds_count', { disk: 'disk0', op });
      expect(buckets.at(-1)!.value).toBe(count);
      expect(sampleValue(m, 'vublk_request_duration_seconds_sum', { disk: 'disk0', op })).toBeGreaterThanOrEqual(0);
    }
  });

  it('shows a connected front-end while one is connected', async () => {
    const socket = net.createConnection({ path: daemon.socketPath });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    try {
      await daemon.waitForLog((l) => l.msg === 'front-end connected');
      const m = await scrape(base);
      expect(sampleValue(m, 'vublk_front_end_connected', { disk: 'disk0' })).toBe(1);
      expect(sampleValue(m, 'vublk_front_end_connections_total', { disk: 'disk0' })).toBe(1);
    } finally {
      socket.destroy();
    }
    await waitFor('front-end disconnected', async () => {
      const m = await scrape(base);
      return sampleValue(m, 'vublk_front_end_connected', { disk: 'disk0' }) === 0 ? true : undefined;
    });
  });

  it('refuses the admin API on TCP without a token', async () => {
    expect((await request(base, 'POST', '/admin/disks/disk0/throttle', '{"iops":1}')).status).toBe(403);
    expect((await request(base, 'GET', '/admin/disks')).status).toBe(403);
  });

  it('changes throttle limits live through POST /admin/disks/NAME/throttle', async () => {
    const post = (body: string, contentType?: string) => request(admin, 'POST', '/admin/disks/disk0/throttle', body, contentType);
    const ok = await post(JSON.stringify({ iops: 2500, bps: '20M' }));
    expect(ok.status).toBe(200);
    expect(JSON.parse(ok.body)).toEqual({
      disk: 'disk0',
      throttle: { iops: 2500, 'iops-burst': 2500, bps: 20 * MiB, 'bps-burst': 20 * MiB },
    });
    let m = await scrape(base);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'iops' })).toBe(2500);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'bps' })).toBe(20 * MiB);
    await daemon.waitForLog((l) => l.msg === 'throttle limits changed' && l['source'] === 'admin');

    // Only what is given changes; a burst can be set on its own.
    expect((await post(JSON.stringify({ 'iops-burst': 5000 }))).status).toBe(200);
    m = await scrape(base);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'iops' })).toBe(2500);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'iops_burst' })).toBe(5000);

    const bad = await post(JSON.stringify({ bps: 'fast' }));
    expect(bad.status).toBe(400);
    expect(JSON.parse(bad.body).error).toMatch(/^bps: invalid rate/);
    expect((await post('{"iops": 1}', 'text/plain')).status).toBe(415);
    expect((await post('{"iops": ')).status).toBe(400);
    expect((await request(admin, 'POST', '/admin/disks/nope/throttle', '{"iops":1}')).status).toBe(404);
    expect((await request(admin, 'GET', '/admin/disks/disk0/throttle')).status).toBe(405);
    // Refused changes left the limits alone.
    m = await scrape(base);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'bps' })).toBe(20 * MiB);
  });

  it('lists disks with GET /admin/disks', async () => {
    const reply = await request(admin, 'GET', '/admin/disks');
    expect(reply.status).toBe(200);
    const { disks } = JSON.parse(reply.body) as { disks: Record<string, unknown>[] };
    expect(disks).toHaveLength(1);
    expect(disks[0]).toMatchObject({
      name: 'disk0',
      socket: daemon.socketPath,
      'capacity-bytes': 64 * MiB,
      'num-queues': 2,
      'read-only': false,
      connected: false,
    });
    expect(disks[0]!['throttle']).toMatchObject({ iops: 2500 });
  });

  it('vublk throttle and vublk disks call the admin API and print the result', async () => {
    const set = await runCli(['throttle', '--disk', 'disk0', '--iops', '7k', '--bps', '0', '--admin-socket', adminSocket]);
    expect(set.stderr).toBe('');
    expect(set.code).toBe(0);
    expect(JSON.parse(set.stdout)).toEqual({ disk: 'disk0', throttle: { iops: 7000, 'iops-burst': 7000, bps: 0, 'bps-burst': 0 } });
    const m = await scrape(base);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'iops' })).toBe(7000);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'disk0', kind: 'bps' })).toBe(0);

    const list = await runCli(['disks', '--admin-socket', adminSocket]);
    expect(list.code).toBe(0);
    expect((JSON.parse(list.stdout) as { disks: { name: string }[] }).disks.map((d) => d.name)).toEqual(['disk0']);

    const missing = await runCli(['throttle', '--disk', 'nope', '--iops', '1', '--admin-socket', adminSocket]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/HTTP 404: no disk named 'nope'/);
    const nothing = await runCli(['throttle', '--disk', 'disk0', '--admin-socket', adminSocket]);
    expect(nothing.code).not.toBe(0);
    expect(nothing.stderr).toMatch(/at least one of --iops/);
  });
});

describe('metrics listener lifecycle', () => {
  it('serves on a unix socket, exits 0 on SIGTERM and removes both sockets', async () => {
    const daemon = await startDaemon({ size: '8M', args: ['--metrics-listen', 'unix:metrics.sock'] });
    try {
      const base = await metricsBase(daemon);
      const metricsPath = path.join(daemon.dir, 'metrics.sock');
      expect(base).toBe(`unix:${metricsPath}`);
      expect((await request(base, 'GET', '/readyz')).status).toBe(200);
      const m = await scrape(base);
      expect(sampleValue(m, 'vublk_disk_capacity_bytes', { disk: 'disk0' })).toBe(8 * MiB);
      // A unix metrics socket is owner-only: the admin API is on there too.
      const list = await runCli(['disks', '--metrics-url', base]);
      expect(list.code).toBe(0);

      daemon.child.kill('SIGTERM');
      const code = await daemon.exited();
      expect(code).toBe(0);
      expect(existsSync(daemon.socketPath)).toBe(false);
      expect(existsSync(metricsPath)).toBe(false);
      expect(daemon.logs().map((l) => l.msg)).toEqual(expect.arrayContaining(['shutting down', 'stopped']));
    } finally {
      await daemon.stop();
    }
  });

  it('runs without an HTTP listener with --metrics-listen off', async () => {
    const daemon = await startDaemon({ size: '8M', args: ['--metrics-listen', 'off'] });
    try {
      await daemon.waitForLog((l) => l.msg === 'disk ready');
      expect(daemon.logs().some((l) => l.msg === 'metrics listening')).toBe(false);
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
  });

  it('fails to start when an explicit metrics address is taken', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const { port } = blocker.address() as net.AddressInfo;
    try {
      const daemon = await startDaemon({ size: '8M', args: ['--metrics-listen', `127.0.0.1:${port}`], waitForSocket: false });
      const code = await daemon.exited();
      expect(code).toBe(1);
      expect(daemon.output()).toMatch(new RegExp(`metrics listener 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
      expect(existsSync(daemon.socketPath)).toBe(false);
      await daemon.stop();
    } finally {
      blocker.close();
    }
  });

  it('rejects a malformed --metrics-listen before starting', async () => {
    const result = await runCli([
      'serve',
      '--metrics-listen',
      'nowhere',
      '--image',
      '/nonexistent/x.img',
      '--socket',
      '/nonexistent/x.sock',
    ]);
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/invalid metrics listen address 'nowhere': no port/);
  });
});
