// `vublk serve --config FILE` on a real daemon (run `npm run build` first): load errors naming the file and
// key path, several disks from one file, SIGHUP applying throttle limits live without dropping the
// front-end, an invalid reload keeping the old limits, and a clean exit on SIGTERM.
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runCli, startDaemon, type DaemonProcess, type LogLine } from '../support/daemon-process.js';
import { parseExposition, sampleValue, type Exposition } from '../support/prom-text.js';

const MiB = 1024 * 1024;
const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-config-'));
  dirs.push(dir);
  return dir;
}

function get(base: string, pathname: string): Promise<{ status: number; body: string }> {
  const url = new URL(pathname, base);
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (t: string) => (body += t));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${pathname}: no answer within 10 s`)));
    req.on('error', reject);
  });
}

/** POST to `unix:/path` (the admin socket) or an http:// base. */
function post(base: string, pathname: string, body: unknown): Promise<{ status: number; body: string }> {
  const target: http.RequestOptions = base.startsWith('unix:')
    ? { socketPath: base.slice('unix:'.length), path: pathname }
    : { ...urlParts(new URL(pathname, base)) };
  return new Promise((resolve, reject) => {
    const req = http.request({ ...target, method: 'POST', timeout: 10_000, headers: { 'Content-Type': 'application/json' } }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (t: string) => (text += t));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
    });
    req.on('timeout', () => req.destroy(new Error(`POST ${pathname}: no answer within 10 s`)));
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

function urlParts(url: URL): http.RequestOptions {
  return { host: url.hostname, port: Number(url.port), path: url.pathname };
}

async function scrape(base: string): Promise<Exposition> {
  const reply = await get(base, '/metrics');
  expect(reply.status).toBe(200);
  return parseExposition(reply.body);
}

function limit(m: Exposition, disk: string, kind: string): number {
  return sampleValue(m, 'vublk_throttle_limit', { disk, kind });
}

/** Waits for the next log line matching after `after` lines were already seen. */
async function nextLog(daemon: DaemonProcess, after: number, match: (line: LogLine) => boolean, timeoutMs = 10_000): Promise<LogLine> {
  return daemon.waitForLog((line) => daemon.logs().indexOf(line) >= after && match(line), timeoutMs);
}

describe('config file errors', () => {
  it('names the file, the key path and the problem, and exits 2', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'vublk.yaml');
    writeFileSync(
      file,
      [
        'disks:',
        '  - { name: a, image: a.img, socket: a.sock, size: 8M }',
        '  - { name: b, image: b.img, socket: b.sock, throttle: { bps: 10 furlongs } }',
        '',
      ].join('\n'),
    );
    const result = await runCli(['serve', '--config', file, '--metrics-listen', 'off']);
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(
      new RegExp(`^vublk: ${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: disks\\[1\\]\\.throttle\\.bps: invalid rate: "10 furlongs"`),
    );
    expect(existsSync(path.join(dir, 'a.sock'))).toBe(false);
    expect(existsSync(path.join(dir, 'a.img'))).toBe(false);
  });

  it.each([
    ['unknown disk key', 'disks:\n  - { image: a.img, socket: a.sock, colour: red }\n', /disks\[0\]\.colour: unknown key/],
    ['unknown top-level key', 'colour: red\ndisks: []\n', /: colour: unknown key/],
    [
      'wrong type',
      'disks:\n  - { image: a.img, socket: a.sock, num-queues: "two" }\n',
      /disks\[0\]\.num-queues: must be a non-negative whole number/,
    ],
    [
      'out of range',
      'disks:\n  - { image: a.img, socket: a.sock, num-queues: 65 }\n',
      /disks\[0\]\.num-queues: must be between 1 and 64, got 65/,
    ],
    ['YAML syntax', 'disks:\n  - image: a.img\n   socket: [\n', /invalid YAML at line \d+, column \d+/],
    [
      'bad metrics-listen',
      'metrics-listen: here\ndisks:\n  - { image: a.img, socket: a.sock }\n',
      /metrics-listen: invalid metrics listen address 'here'/,
    ],
  ])('%s', async (_what, text, message) => {
    const file = path.join(tempDir(), 'vublk.yaml');
    writeFileSync(file, text);
    const result = await runCli(['serve', '--config', file]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(file);
    expect(result.stderr).toMatch(message);
  });

  it('reads JSON by extension and reports JSON errors', async () => {
    const file = path.join(tempDir(), 'vublk.json');
    writeFileSync(file, '{ "disks": [ { "image": "a.img", "socket": "a.sock", "throttle": { "iops": -1 } } ] }');
    const result = await runCli(['serve', '--config', file]);
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/vublk\.json: disks\[0\]\.throttle\.iops: must be a non-negative whole number, got -1/);
    writeFileSync(file, '{ "disks": [');
    expect((await runCli(['serve', '--config', file])).stderr).toMatch(/vublk\.json: invalid JSON/);
  });

  it('refuses --config together with disk flags, and a missing file', async () => {
    const file = path.join(tempDir(), 'vublk.yaml');
    writeFileSync(file, 'disks:\n  - { image: a.img, socket: a.sock, size: 8M }\n');
    const both = await runCli(['serve', '--config', file, '--image', 'x.img']);
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/--config describes the disks: drop --image/);
    const withDisk = await runCli(['serve', '--config', file, '--disk', 'image=x.img,socket=x.sock']);
    expect(withDisk.code).toBe(2);
    expect(withDisk.stderr).toMatch(/drop --disk/);
    const missing = await runCli(['serve', '--config', path.join(path.dirname(file), 'nope.yaml')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/nope\.yaml: no such file/);
  });
});

describe('serving from a config file', () => {
  const yaml = (aThrottle: string, bQueues: number): string =>
    [
      'metrics-listen: 127.0.0.1:0',
      'log-level: info',
      'disks:',
      `  - name: alpha`,
      `    image: alpha.img`,
      `    socket: alpha.sock`,
      `    size: 16M`,
      `    num-queues: 2`,
      `    throttle: ${aThrottle}`,
      `  - name: beta`,
      `    image: beta.img`,
      `    socket: beta.sock`,
      `    size: 8M`,
      `    num-queues: ${bQueues}`,
      `    read-only: false`,
      '',
    ].join('\n');

  it('serves every disk, reloads throttle limits on SIGHUP without dropping the front-end, and exits cleanly', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'vublk.yaml');
    writeFileSync(file, yaml('{ iops: 1000, bps: 100M }', 1));
    const daemon = await startDaemon({ rawArgs: ['serve', '--config', file], waitForSocket: false });
    try {
      const listening = await daemon.waitForLog((l) => l.msg === 'metrics listening', 15_000);
      const base = `http://${String(listening['address'])}`;
      await daemon.waitForLog((l) => l.msg === 'disk ready' && l['disk'] === 'beta', 15_000);
      expect(existsSync(path.join(dir, 'alpha.sock'))).toBe(true);
      expect(existsSync(path.join(dir, 'beta.sock'))).toBe(true);
      expect((await get(base, '/readyz')).status).toBe(200);

      let m = await scrape(base);
      expect(sampleValue(m, 'vublk_disk_capacity_bytes', { disk: 'alpha' })).toBe(16 * MiB);
      expect(sampleValue(m, 'vublk_disk_capacity_bytes', { disk: 'beta' })).toBe(8 * MiB);
      expect(limit(m, 'alpha', 'iops')).toBe(1000);
      expect(limit(m, 'alpha', 'bps')).toBe(100 * MiB);
      expect(limit(m, 'beta', 'iops')).toBe(0);
      expect(sampleValue(m, 'vublk_io_errors_total', { disk: 'alpha', queue: '1' })).toBe(0);

      // A front-end stays connected to alpha across the reloads.
      const frontEnd = net.createConnection({ path: path.join(dir, 'alpha.sock') });
      await new Promise<void>((resolve, reject) => frontEnd.once('connect', resolve).once('error', reject));
      try {
        await daemon.waitForLog((l) => l.msg === 'front-end connected' && l['disk'] === 'alpha');

        // 1. New limits for alpha, a queue count change for beta (needs a restart: reported, not applied).
        writeFileSync(file, yaml('{ iops: 2k, iops-burst: 4k, bps: 50M }', 2));
        let seen = daemon.logs().length;
        daemon.child.kill('SIGHUP');
        const reloaded = await nextLog(daemon, seen, (l) => l.msg === 'config reloaded');
        expect(reloaded).toMatchObject({ level: 30, file, throttleChanged: 1, restartRequired: 1 });
        const restart = daemon.logs().find((l) => l.msg === 'config change requires restart: not applied');
        expect(restart).toMatchObject({ level: 40, disk: 'beta', change: 'changed', keys: ['num-queues'] });
        expect(daemon.logs().find((l) => l.msg === 'throttle limits changed' && l['source'] === 'config')).toMatchObject({
          disk: 'alpha',
          to: { iops: 2000, 'iops-burst': 4000, bps: 50 * MiB, 'bps-burst': 50 * MiB },
        });
        m = await scrape(base);
        expect(limit(m, 'alpha', 'iops')).toBe(2000);
        expect(limit(m, 'alpha', 'iops_burst')).toBe(4000);
        expect(limit(m, 'alpha', 'bps')).toBe(50 * MiB);
        expect(limit(m, 'alpha', 'bps_burst')).toBe(50 * MiB);
        expect(sampleValue(m, 'vublk_queue_poisoned', { disk: 'beta', queue: '0' })).toBe(0);
        expect(() => sampleValue(m, 'vublk_queue_poisoned', { disk: 'beta', queue: '1' })).toThrow(/found 0/);
        expect(sampleValue(m, 'vublk_front_end_connected', { disk: 'alpha' })).toBe(1);
        expect(sampleValue(m, 'vublk_front_end_connections_total', { disk: 'alpha' })).toBe(1);

        // 2. An invalid file: logged, the running limits stay.
        writeFileSync(file, yaml('{ iops: 2k, bps: lots }', 2));
        seen = daemon.logs().length;
        daemon.child.kill('SIGHUP');
        const failed = await nextLog(daemon, seen, (l) => l.msg === 'config reload failed: keeping the running configuration');
        expect(failed.level).toBe(50);
        expect(String(failed['err'])).toMatch(/disks\[0\]\.throttle\.bps: invalid rate: "lots"/);
        m = await scrape(base);
        expect(limit(m, 'alpha', 'iops')).toBe(2000);
        expect(limit(m, 'alpha', 'bps')).toBe(50 * MiB);
        expect((await get(base, '/readyz')).status).toBe(200);

        // 3. The file is authoritative: a limit changed through the admin API is set back by a reload.
        // The admin API is on the admin socket next to the first disk's socket, not on TCP.
        expect((await post(base, '/admin/disks/alpha/throttle', { iops: 123 })).status).toBe(403);
        expect((await post(`unix:${path.join(dir, 'alpha.admin.sock')}`, '/admin/disks/alpha/throttle', { iops: 123 })).status).toBe(200);
        expect(limit(await scrape(base), 'alpha', 'iops')).toBe(123);
        writeFileSync(file, yaml('{ iops: 2k, iops-burst: 4k, bps: 50M }', 1));
        seen = daemon.logs().length;
        daemon.child.kill('SIGHUP');
        expect(await nextLog(daemon, seen, (l) => l.msg === 'config reloaded')).toMatchObject({ throttleChanged: 1, restartRequired: 0 });
        m = await scrape(base);
        expect(limit(m, 'alpha', 'iops')).toBe(2000);
        expect(limit(m, 'alpha', 'iops_burst')).toBe(4000);

        // Nothing above dropped the front-end.
        expect(daemon.logs().some((l) => l.msg === 'front-end disconnected')).toBe(false);
        expect(sampleValue(m, 'vublk_front_end_connected', { disk: 'alpha' })).toBe(1);
      } finally {
        frontEnd.destroy();
      }

      daemon.child.kill('SIGTERM');
      expect(await daemon.exited(15_000)).toBe(0);
      expect(existsSync(path.join(dir, 'alpha.sock'))).toBe(false);
      expect(existsSync(path.join(dir, 'beta.sock'))).toBe(false);
      expect(daemon.logs().map((l) => l.msg)).toEqual(expect.arrayContaining(['shutting down', 'stopped']));
    } finally {
      await daemon.stop();
    }
  });

  it('lets command-line flags override the file (JSON)', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'vublk.json');
    writeFileSync(
      file,
      JSON.stringify({ 'metrics-listen': 'off', 'log-level': 'error', disks: [{ image: 'd.img', socket: 'd.sock', size: '4M' }] }),
    );
    const daemon = await startDaemon({
      rawArgs: ['serve', '--config', file, '--metrics-listen', '127.0.0.1:0', '--log-level', 'info'],
      waitForSocket: false,
    });
    try {
      const listening = await daemon.waitForLog((l) => l.msg === 'metrics listening', 15_000);
      const m = await scrape(`http://${String(listening['address'])}`);
      expect(sampleValue(m, 'vublk_disk_capacity_bytes', { disk: 'disk0' })).toBe(4 * MiB);
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
  });
});
