import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Registry } from 'prom-client';
import { pino } from 'pino';
import { MetricsServer, type Readiness } from '../../src/metrics/http-server.js';
import { Daemon } from '../../src/daemon/daemon.js';
import { listenUnix } from '../../src/sys/unix-socket.js';
import { closeFd } from '../../src/sys/fd.js';

const log = pino({ level: 'silent' });
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-http-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function call(
  target: { port: number } | { socketPath: string },
  method: string,
  pathname: string,
  body?: string,
): Promise<{ status: number; body: string; allow?: string }> {
  const where = 'port' in target ? { host: '127.0.0.1', port: target.port } : { socketPath: target.socketPath };
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        ...where,
        agent: false,
        method,
        path: pathname,
        timeout: 5_000,
        headers: body === undefined ? {} : { 'Content-Type': 'application/json' },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (t: string) => (text += t));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, allow: res.headers['allow'] }));
      },
    );
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end(body);
  });
}

describe('MetricsServer', () => {
  it('reports readiness, refuses admin when disabled, and answers methods it does not take with 405', async () => {
    let readiness: Readiness = { ready: false, reason: 'starting' };
    const server = await MetricsServer.start(
      { kind: 'tcp', host: '127.0.0.1', port: 0 },
      { registry: new Registry(), readiness: () => readiness, admin: null, adminRefusal: 'admin is off here' },
      log,
    );
    try {
      const target = { port: (server.address as { port: number }).port };
      expect(target.port).toBeGreaterThan(0);
      expect(server.displayAddress).toBe(`127.0.0.1:${target.port}`);
      expect(await call(target, 'GET', '/readyz')).toMatchObject({ status: 503, body: 'not ready: starting\n' });
      readiness = { ready: true };
      expect(await call(target, 'GET', '/readyz')).toMatchObject({ status: 200 });
      readiness = { ready: false, reason: 'shutting down' };
      expect(await call(target, 'GET', '/readyz')).toMatchObject({ status: 503, body: 'not ready: shutting down\n' });
      expect(await call(target, 'GET', '/healthz')).toMatchObject({ status: 200, body: 'ok\n' });
      expect(await call(target, 'HEAD', '/healthz')).toMatchObject({ status: 200, body: '' });
      expect(await call(target, 'DELETE', '/metrics')).toMatchObject({ status: 405, allow: 'GET, HEAD' });
      const admin = await call(target, 'POST', '/admin/disks/x/throttle', '{"iops":1}');
      expect(admin.status).toBe(403);
      expect(JSON.parse(admin.body)).toEqual({ error: 'admin is off here' });
    } finally {
      await server.close();
    }
  });

  it('listens on a unix socket (mode 0600), replaces a stale one, refuses a live one, removes it on close', async () => {
    const socketPath = path.join(dir, 'm.sock');
    // A stale socket file, as a killed daemon leaves it: bound, closed, not unlinked.
    closeFd(listenUnix(socketPath));
    expect(fs.lstatSync(socketPath).isSocket()).toBe(true);
    const options = { registry: new Registry(), readiness: () => ({ ready: true }), admin: null };
    const server = await MetricsServer.start({ kind: 'unix', path: socketPath }, options, log);
    try {
      expect(fs.statSync(socketPath).mode & 0o777).toBe(0o600);
      expect(await call({ socketPath }, 'GET', '/healthz')).toMatchObject({ status: 200 });
      await expect(MetricsServer.start({ kind: 'unix', path: socketPath }, options, log)).rejects.toThrow(/in use/);
    } finally {
      await server.close();
    }
    expect(fs.existsSync(socketPath)).toBe(false);
    fs.writeFileSync(socketPath, 'not a socket');
    await expect(MetricsServer.start({ kind: 'unix', path: socketPath }, options, log)).rejects.toThrow(/not a socket/);
  });
});

describe('Daemon readiness', () => {
  it('is not ready while starting, ready once started, not ready from the start of shutdown', async () => {
    const daemon = new Daemon(log, { metrics: { address: { kind: 'tcp', host: '127.0.0.1', port: 0 } } });
    expect(daemon.readiness()).toEqual({ ready: false, reason: 'starting' });
    await daemon.start([]);
    expect(daemon.readiness()).toEqual({ ready: true });
    const port = (daemon.metricsAddress as { port: number }).port;
    expect(await call({ port }, 'GET', '/readyz')).toMatchObject({ status: 200 });
    // No admin API on TCP without a token (it is on the admin socket).
    expect(await call({ port }, 'GET', '/admin/disks')).toMatchObject({ status: 403 });
    const stopping = daemon.stop();
    expect(daemon.readiness()).toEqual({ ready: false, reason: 'shutting down' });
    await stopping;
    await expect(call({ port }, 'GET', '/healthz')).rejects.toThrow(/ECONNREFUSED/);
  });

  it('runs without metrics when the default address is taken, but fails on an explicit one', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const { port } = blocker.address() as net.AddressInfo;
    try {
      const lenient = new Daemon(log, { metrics: { address: { kind: 'tcp', host: '127.0.0.1', port }, optional: true } });
      await lenient.start([]);
      expect(lenient.metricsAddress).toBeNull();
      await lenient.stop();
      const strict = new Daemon(log, { metrics: { address: { kind: 'tcp', host: '127.0.0.1', port } } });
      await expect(strict.start([])).rejects.toThrow(new RegExp(`metrics listener 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
    } finally {
      blocker.close();
    }
  });
});
