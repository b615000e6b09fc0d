/**
 * The NBD client where the data plane will run it: on a worker thread, its fd in the worker's own EpollSet
 * (level-triggered EPOLLIN), pump() on every wake-up. Two workers, one after the other,
 * each own a connection to one multi-conn export: what one writes and flushes, the other reads back.
 * Runs the compiled code in dist/ (npm run build first), like the other integration tests.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { requireTool, startNbdkit, tempDir } from '../support/nbd-servers.js';

const DIST = resolve('dist');

const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
(async () => {
  const { NbdClient } = await import(workerData.dist + '/src/backend/nbd/nbd-client.js');
  const { EpollSet } = await import(workerData.dist + '/src/dataplane/epoll.js');
  const { addressOf } = await import(workerData.dist + '/src/sys/libc.js');
  const { socket, role, base, blocks } = workerData;
  const results = new Map();
  const client = NbdClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }, (cookie, errno) => results.set(cookie, errno));
  const epoll = new EpollSet(4);
  epoll.add(client.fd);
  const ready = new Int32Array(4);
  const buffer = Buffer.alloc(blocks * 4096);
  const address = addressOf(buffer);
  const byte = (i) => (i * 31 + 7) & 0xff;
  const deadline = Date.now() + 20000;
  const run = (cookies) => {
    client.flush();
    while (!cookies.every((c) => results.has(c))) {
      if (Date.now() > deadline) throw new Error('worker timed out: ' + client.state + ' ' + client.lastError);
      if (epoll.wait(ready, 100) > 0) client.pump();
    }
    return cookies.map((c) => results.get(c));
  };
  let cookie = 1;
  const cookies = [];
  if (role === 'writer') {
    for (let i = 0; i < buffer.length; i++) buffer[i] = byte(i);
    for (let b = 0; b < blocks; b++) {
      client.submitWrite(cookie, base + b * 4096, { count: 1, addresses: [address + b * 4096], lengths: [4096] });
      cookies.push(cookie++);
    }
    const written = run(cookies);
    const flushed = run([(client.submitFlush(cookie), cookie++)]);
    // The buffer stands in for guest memory: it must stay alive until every request using it has completed.
    parentPort.postMessage({ ok: written.every((e) => e === 0) && flushed[0] === 0, multiConn: client.info.canMultiConn, bytes: buffer.length });
  } else {
    buffer.fill(0xee);
    for (let b = 0; b < blocks; b++) {
      client.submitRead(cookie, base + b * 4096, { count: 2, addresses: [address + b * 4096, address + b * 4096 + 1024], lengths: [1024, 3072] });
      cookies.push(cookie++);
    }
    const read = run(cookies);
    let mismatches = 0;
    for (let i = 0; i < buffer.length; i++) if (buffer[i] !== byte(i)) mismatches++;
    parentPort.postMessage({ ok: read.every((e) => e === 0) && mismatches === 0, mismatches });
  }
  client.close();
  epoll.close();
})().catch((error) => parentPort.postMessage({ ok: false, error: String(error && error.stack || error) }));
`;

function runWorker(data: Record<string, unknown>): Promise<Record<string, unknown>> {
  const worker = new Worker(WORKER, { eval: true, workerData: { dist: DIST, ...data } });
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      void worker.terminate();
      reject(new Error('worker did not report within 30 s'));
    }, 30_000);
    worker.once('message', (message: Record<string, unknown>) => {
      clearTimeout(timer);
      resolvePromise(message);
    });
    worker.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

describe('NBD client on worker threads', () => {
  it('a worker with its own EpollSet writes and flushes; a second worker on its own connection reads it back', async (context) => {
    requireTool(context, 'nbdkit');
    if (!existsSync(join(DIST, 'src/backend/nbd/nbd-client.js'))) throw new Error('dist/ is missing: run npm run build first');
    const dir = tempDir();
    cleanups.push(dir.remove);
    const socket = join(dir.dir, 'nbd.sock');
    const server = await startNbdkit({ unix: socket }, ['memory', '16M']);
    cleanups.push(() => server.kill());
    const writer = await runWorker({ socket, role: 'writer', base: 1 << 20, blocks: 256 });
    expect(writer, String(writer['error'] ?? '')).toMatchObject({ ok: true, multiConn: true });
    const reader = await runWorker({ socket, role: 'reader', base: 1 << 20, blocks: 256 });
    expect(reader, String(reader['error'] ?? '')).toMatchObject({ ok: true, mismatches: 0 });
  });
});
