// Front-ends coming and going on the real daemon: a front-end closed mid-stream with requests outstanding and
// the next one continuing, 20 quick reconnect cycles without fd or mapping leaks (counted in /proc/PID), a
// live resize announced on the back-end channel (when the admin endpoint can resize), and SIGTERM with a
// front-end connected.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import http from 'node:http';
import { BackendRequest, ProtocolFeature } from '../../protocol/vhost-user.js';
import { BlkRequestType, BlkStatus, SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import { BackendDisconnectedError, VhostUserFrontend, VirtioBlkDriver, type GuestRegionSpec } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import {
  GiB,
  KiB,
  MiB,
  connect,
  disconnects,
  fdCount,
  memfdMappingCount,
  pattern,
  sectorBytes,
  useCleanups,
  waitForDisconnects,
  waitForExit,
  waitUntil,
  stopCleanly,
} from '../support/session-harness.js';

const defer = useCleanups();

describe('disconnect and reconnect', () => {
  let daemon: DaemonProcess;

  beforeAll(async () => {
    daemon = await startDaemon({ size: '64M', args: ['--num-queues', '2', '--metrics-listen', 'off'] });
  });

  afterAll(async () => {
    await stopCleanly(daemon);
  });

  it('a front-end closed with requests outstanding; the next one (connecting at once) continues', { timeout: 180_000 }, async () => {
    for (let round = 0; round < 5; round++) {
      const first = await VhostUserFrontend.connect(daemon.socketPath, {
        numQueues: 2,
        timeoutMs: 10_000,
        memory: [{ gpa: 0, size: 64 * MiB }],
      });
      defer(() => first.close());
      const blk = new VirtioBlkDriver(first);
      // 32 writes of 256 KiB across both queues, kicked, then the connection and guest memory go away.
      for (let i = 0; i < 32; i++) {
        blk.submit(
          { type: BlkRequestType.OUT, sector: 16384 + i * 512, out: pattern(round * 100 + i, 256 * KiB) },
          { queue: i % 2, kick: i >= 30 },
        );
      }
      const seen = disconnects(daemon);
      first.close();
      // Reconnect without waiting for the daemon to notice: it serves the new front-end once the old one is torn down.
      const { frontend, blk: next } = await connect(daemon, defer, { numQueues: 2 });
      await waitForDisconnects(daemon, seen + 1);
      for (let q = 0; q < 2; q++) {
        const data = pattern(500 + round * 2 + q, 64 * KiB);
        const sector = 1024 + round * 256 + q * 128;
        await next.write(sector, data, { queue: q });
        expect((await next.read(sector, data.length, { queue: 1 - q })).equals(data), `round ${round} queue ${q}`).toBe(true);
        expect(sectorBytes(daemon.imagePath, sector, data.length).equals(data)).toBe(true);
      }
      // The new session's rings start from 0 whatever the old ones had reached.
      expect(await frontend.getVringBase(0)).toBe(1 + 1);
      frontend.close();
      await waitForDisconnects(daemon, seen + 2);
    }
    expect(daemon.running()).toBe(true);
    expect(daemon.logs().filter((l) => l.msg === 'refused a second front-end: this disk already has one connected')).toEqual([]);
    expect(daemon.logs().filter((l) => l.level >= 50)).toEqual([]);
  });

  it('20 quick reconnect cycles leak no fds and no guest memory mappings in the daemon', { timeout: 180_000 }, async () => {
    const pid = daemon.child.pid as number;
    const memory: GuestRegionSpec[] = [
      { gpa: 0, size: 32 * MiB, name: 'vublk-cycle-a' },
      { gpa: 4 * GiB, size: 1 * GiB, name: 'vublk-cycle-b' },
    ];
    const cycle = async (i: number): Promise<void> => {
      const frontend = await VhostUserFrontend.connect(daemon.socketPath, {
        numQueues: 2,
        timeoutMs: 10_000,
        memory,
        memoryMessages: i % 2 === 0 ? 'table' : 'add-mem-reg',
        protocol: { status: i % 3 === 0, backendReq: i % 4 === 0 },
      });
      try {
        const blk = new VirtioBlkDriver(frontend);
        const data = pattern(900 + i, 16 * KiB);
        await blk.write(8192 + i * 64, data, { queue: i % 2, placement: { region: 1 } });
        expect((await blk.read(8192 + i * 64, data.length, { queue: 1 - (i % 2) })).equals(data), `cycle ${i}`).toBe(true);
        // Every other cycle leaves with requests outstanding or a ring stopped.
        if (i % 2 === 1) blk.submit({ type: BlkRequestType.IN, sector: 0, inLength: 64 * KiB }, { queue: 0 });
        if (i % 5 === 0) await frontend.getVringBase(1);
      } finally {
        frontend.close();
      }
    };

    // Warm-up: workers are created with the first session and kept, so count after one full cycle.
    await cycle(20);
    await waitUntil(() => memfdMappingCount(pid, 'vublk-cycle-') === 0, 10_000, 'the warm-up session to be torn down');
    const baselineFds = fdCount(pid);

    const before = disconnects(daemon);
    for (let i = 0; i < 20; i++) await cycle(i);
    await waitForDisconnects(daemon, before + 20);
    await waitUntil(() => memfdMappingCount(pid, 'vublk-cycle-') === 0, 10_000, 'every guest memory mapping to be released');
    // Teardown finishes asynchronously after the disconnect log line: allow it a moment, then compare.
    await waitUntil(() => fdCount(pid) <= baselineFds + 2, 10_000, `the daemon's fd count to return to ${baselineFds} (+2)`).catch(
      () => undefined,
    );
    expect(fdCount(pid), `fds before ${baselineFds}; /proc/${pid}/fd now`).toBeLessThanOrEqual(baselineFds + 2);
    expect(memfdMappingCount(pid, 'memfd:')).toBe(0);
    expect(daemon.logs().filter((l) => l.msg === 'refused a second front-end: this disk already has one connected')).toEqual([]);

    // And it still serves.
    const { blk } = await connect(daemon, defer, { numQueues: 2 });
    expect((await blk.getId()).status).toBe(BlkStatus.OK);
  });
});

/** POST with a JSON body; resolves with the status code and parsed body. */
/** POST to `unix:/path` (the admin socket) or an http:// base. */
function postJson(base: string, pathname: string, body: unknown): Promise<{ status: number; body: unknown }> {
  const target: string | URL = base.startsWith('unix:') ? `http://localhost${pathname}` : new URL(pathname, base);
  const socketPath = base.startsWith('unix:') ? base.slice('unix:'.length) : undefined;
  return new Promise((resolve, reject) => {
    const req = http.request(
      target,
      { method: 'POST', socketPath, timeout: 10_000, headers: { 'Content-Type': 'application/json' } },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
        res.on('end', () => {
          let parsed: unknown = text;
          try {
            parsed = JSON.parse(text);
          } catch {
            // keep the text
          }
          resolve({ status: res.statusCode ?? 0, body: parsed });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`POST ${pathname}: no answer within 10 s`)));
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

describe('live resize', () => {
  it('POST /admin/disks/NAME/resize: CONFIG_CHANGE_MSG on the back-end channel, GET_CONFIG shows the new capacity', async () => {
    const daemon = await startDaemon({ size: '64M', args: ['--num-queues', '2', '--metrics-listen', 'off'] });
    defer(() => daemon.stop());
    const line = await daemon.waitForLog((l) => l.msg === 'admin API listening', 15_000);
    const base = `unix:${String(line['socket'])}`;
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2, protocol: { backendReq: true } });
    expect(frontend.hasProtocolFeature(ProtocolFeature.BACKEND_REQ)).toBe(true);
    expect(frontend.backendChannel).not.toBeNull();
    const oldSectors = (64 * MiB) / SECTOR_SIZE;
    expect(frontend.blkConfig?.capacity).toBe(oldSectors);
    const data = pattern(7, 64 * KiB);
    const beyond = await blk.execute({ type: BlkRequestType.OUT, sector: oldSectors + 8, out: data });
    expect(beyond.status, 'past the end before the resize').toBe(BlkStatus.IOERR);

    const reply = await postJson(base, '/admin/disks/disk0/resize', { size: '128M' });
    expect(reply, JSON.stringify(reply.body)).toMatchObject({ status: 200, body: { 'capacity-bytes': 128 * MiB } });
    const message = await frontend.receiveBackendRequest(10_000);
    expect(message.request).toBe(BackendRequest.CONFIG_CHANGE_MSG);
    expect((await frontend.getConfig()).readBigUInt64LE(0)).toBe(BigInt((128 * MiB) / SECTOR_SIZE));
    // The new sectors are usable at once, on both queues.
    await blk.write(oldSectors + 8, data, { queue: 1 });
    expect((await blk.read(oldSectors + 8, data.length, { queue: 0 })).equals(data)).toBe(true);
    expect(sectorBytes(daemon.imagePath, oldSectors + 8, data.length).equals(data)).toBe(true);

    // The next front-end gets the next notification on its own channel, not the old one.
    const seen = disconnects(daemon);
    frontend.close();
    await waitForDisconnects(daemon, seen + 1);
    const { frontend: next } = await connect(daemon, defer, { numQueues: 2, protocol: { backendReq: true } });
    expect(next.blkConfig?.capacity).toBe((128 * MiB) / SECTOR_SIZE);
    expect((await postJson(base, '/admin/disks/disk0/resize', { size: '192M' })).status).toBe(200);
    expect((await next.receiveBackendRequest(10_000)).request).toBe(BackendRequest.CONFIG_CHANGE_MSG);
    expect((await next.getConfig()).readBigUInt64LE(0)).toBe(BigInt((192 * MiB) / SECTOR_SIZE));
  });

  it('a front-end without the back-end channel still sees the new capacity in GET_CONFIG', async () => {
    const daemon = await startDaemon({ size: '64M', args: ['--metrics-listen', 'off'] });
    defer(() => daemon.stop());
    const line = await daemon.waitForLog((l) => l.msg === 'admin API listening', 15_000);
    const { frontend, blk } = await connect(daemon, defer);
    expect(frontend.backendChannel).toBeNull();
    expect((await postJson(`unix:${String(line['socket'])}`, '/admin/disks/disk0/resize', { size: '96M' })).status).toBe(200);
    await daemon.waitForLog((l) => String(l.msg).includes('no back-end channel'));
    expect((await frontend.getConfig()).readBigUInt64LE(0)).toBe(BigInt((96 * MiB) / SECTOR_SIZE));
    expect((await blk.read((96 * MiB) / SECTOR_SIZE - 8, 4096)).length).toBe(4096);
  });
});

describe('SIGTERM', () => {
  it('exits 0 with a front-end connected (one ring paused with a request waiting) and removes its socket file', async () => {
    const daemon = await startDaemon({ size: '64M', args: ['--num-queues', '2', '--metrics-listen', 'off'] });
    defer(() => daemon.stop());
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2 });
    const data = pattern(11, 128 * KiB);
    await blk.write(0, data, { queue: 0 });
    await frontend.setVringEnable(1, false);
    blk.submit({ type: BlkRequestType.IN, sector: 0, inLength: 4096 }, { queue: 1 });
    expect(existsSync(daemon.socketPath)).toBe(true);

    daemon.child.kill('SIGTERM');
    const exit = await waitForExit(daemon.child, 15_000);
    expect(exit, daemon.output().slice(-3000)).toEqual({ code: 0, signal: null });
    expect(existsSync(daemon.socketPath), 'the socket file is removed').toBe(false);
    expect(sectorBytes(daemon.imagePath, 0, data.length).equals(data), 'written data is in the image').toBe(true);
    await expect(frontend.getFeatures()).rejects.toBeInstanceOf(BackendDisconnectedError);
  });
});
