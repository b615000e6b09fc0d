// The migration dirty log through the real daemon, driven by the TypeScript front-end the way QEMU 7.2 does
// it (SET_LOG_BASE answered, SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG): reads
// mark their data pages, every request marks its status byte and the used ring; nothing is marked with
// logging off; a replaced log takes over; bad logs are refused with the session kept.
import fs, { mkdtempSync, rmSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  FrontendRequest,
  HeaderFlag,
  LOG_DESCRIPTION_SIZE,
  ProtocolFeature,
  VHOST_F_LOG_ALL,
  VHOST_VRING_F_LOG,
  encodeLogDescription,
} from '../../protocol/vhost-user.js';
import { featureMask } from '../../protocol/virtio.js';
import type { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { KiB, MiB, connect, pattern, stopCleanly, useCleanups } from '../support/session-harness.js';
import { sys } from '../../src/sys/libc.js';
import { directIoDir } from '../support/host-disk.js';
import { METRICS_ARGS, metricsUrl, scrape } from '../support/metrics-scrape.js';
import { select } from '../support/prom-text.js';
import path from 'node:path';
import { closeFd } from '../../src/sys/fd.js';

const MEMORY_BYTES = 64 * MiB;
const PAGE = 4096;
/** One bit per 4 KiB page of guest memory. */
const LOG_BYTES = MEMORY_BYTES / PAGE / 8;
const defer = useCleanups();

/** A log memfd like QEMU's (sealed against shrinking and growing); `readFd` reads it like QEMU would. */
function createLog(size = LOG_BYTES): { fd: number; read(): Uint8Array; clear(): void } {
  const fd = sys.memfdCreate('vublk-test-log', 1 | 2);
  expect(fd).toBeGreaterThanOrEqual(0);
  expect(sys.ftruncate(fd, size)).toBe(0);
  expect(sys.fcntl(fd, 1033, 2 | 4)).toBe(0);
  const access = fs.openSync(`/proc/self/fd/${fd}`, 'r+');
  defer(() => fs.closeSync(access));
  return {
    fd,
    read() {
      const bytes = new Uint8Array(size);
      fs.readSync(access, bytes, 0, size, 0);
      return bytes;
    },
    clear() {
      fs.writeSync(access, new Uint8Array(size), 0, size, 0);
    },
  };
}

function markedPages(bytes: Uint8Array): number[] {
  const pages: number[] = [];
  bytes.forEach((byte, i) => {
    for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) pages.push(i * 8 + bit);
  });
  return pages;
}

/** SET_LOG_BASE: sends the log fd (closed here afterwards, like QEMU keeps its own copy) and returns the reply. */
async function setLogBase(
  frontend: VhostUserFrontend,
  fd: number,
  size: number,
  offset = 0,
): Promise<{ request: number; flags: number; payload: Buffer }> {
  await frontend.sendMessage(FrontendRequest.SET_LOG_BASE, {
    flags: HeaderFlag.VERSION,
    payload: encodeLogDescription({ mmapSize: BigInt(size), mmapOffset: BigInt(offset) }),
    fds: [fd],
  });
  const reply = await frontend.receiveMessage(10_000, 'the reply to SET_LOG_BASE');
  reply.fds.forEach(closeFd);
  return { request: reply.request, flags: reply.flags, payload: reply.payload };
}

async function setLogging(frontend: VhostUserFrontend, on: boolean): Promise<void> {
  const features = on ? frontend.ackedFeatures | featureMask(VHOST_F_LOG_ALL) : frontend.ackedFeatures & ~featureMask(VHOST_F_LOG_ALL);
  await frontend.setFeatures(features);
  // QEMU re-sends each ring's addresses with the log flag and the used ring's guest address.
  for (const queue of frontend.queues) {
    await frontend.setVringAddr(queue.index, {
      desc: frontend.memory.toUserAddr(queue.descGpa),
      avail: frontend.memory.toUserAddr(queue.availGpa),
      used: frontend.memory.toUserAddr(queue.usedGpa),
      flags: on ? 1 << VHOST_VRING_F_LOG : 0,
      log: BigInt(queue.usedGpa),
    });
  }
}

describe('dirty log (live migration) through the daemon', () => {
  let daemon: DaemonProcess;

  /** A fresh session (each test has its own; the previous one is closed after each test). */
  async function open(): Promise<{ frontend: VhostUserFrontend; blk: VirtioBlkDriver }> {
    // QEMU acknowledges LOG_SHMFD whenever the back-end offers it.
    return connect(daemon, defer, {
      memory: [{ gpa: 0, size: MEMORY_BYTES }],
      numQueues: 2,
      protocol: { extra: featureMask(ProtocolFeature.LOG_SHMFD) },
    });
  }

  /** A session with a log mapped and logging on, as QEMU sets it up when a migration starts. */
  async function openLogging(): Promise<{ frontend: VhostUserFrontend; blk: VirtioBlkDriver; log: ReturnType<typeof createLog> }> {
    const { frontend, blk } = await open();
    const log = createLog();
    await setLogBase(frontend, log.fd, LOG_BYTES);
    closeFd(log.fd);
    await setLogging(frontend, true);
    return { frontend, blk, log };
  }

  beforeAll(async () => {
    // Two queues: their rings sit on different pool workers, and each must get the log.
    daemon = await startDaemon({ size: '16M', args: ['--metrics-listen', 'off', '--num-queues', '2', '--threads', '2'] });
  });
  afterAll(async () => {
    await stopCleanly(daemon);
  });

  it('offers VHOST_F_LOG_ALL and LOG_SHMFD; refuses LOG_ALL before a log exists', async () => {
    const { frontend } = await open();
    expect((frontend.offeredFeatures >> BigInt(VHOST_F_LOG_ALL)) & 1n).toBe(1n);
    expect((frontend.offeredProtocolFeatures >> 1n) & 1n).toBe(1n);
    await expect(frontend.setFeatures(frontend.ackedFeatures | featureMask(VHOST_F_LOG_ALL))).rejects.toThrow();
    expect(daemon.running()).toBe(true);
  });

  it('answers SET_LOG_BASE, then marks data, status and used-ring pages of reads; writes mark no data page', async () => {
    const { frontend, blk } = await open();
    const log = createLog();
    const reply = await setLogBase(frontend, log.fd, LOG_BYTES);
    closeFd(log.fd);
    expect(reply.request).toBe(FrontendRequest.SET_LOG_BASE);
    expect(reply.flags & HeaderFlag.REPLY).toBe(HeaderFlag.REPLY);
    expect(reply.payload.length).toBe(8);
    await setLogging(frontend, true);

    const data = pattern(7, 256 * KiB);
    log.clear();
    await blk.write(64, data);
    const afterWrite = markedPages(log.read());
    const usedPage = Math.floor(frontend.queue(0).usedGpa / PAGE);
    expect(afterWrite).toContain(usedPage);
    // A write puts nothing in guest buffers: only its status byte and used-ring pages are marked.
    expect(afterWrite.length).toBeLessThanOrEqual(4);

    log.clear();
    expect((await blk.read(64, data.length)).equals(data)).toBe(true);
    const afterRead = markedPages(log.read());
    expect(afterRead).toContain(usedPage);
    // 256 KiB of data: at least 64 pages, plus status and used ring; nothing outside guest memory.
    expect(afterRead.length).toBeGreaterThanOrEqual(64);
    expect(afterRead.length).toBeLessThanOrEqual(64 + 8);
    expect(Math.max(...afterRead)).toBeLessThan(MEMORY_BYTES / PAGE);
  });

  it('marks reads on every queue (rings on different workers get the log)', async () => {
    const { frontend, blk, log } = await openLogging();
    for (const queue of [0, 1]) {
      log.clear();
      expect((await blk.read(0, 64 * KiB, { queue })).length).toBe(64 * KiB);
      const pages = markedPages(log.read());
      expect(pages, `queue ${queue}`).toContain(Math.floor(frontend.queue(queue).usedGpa / PAGE));
      expect(pages.length, `queue ${queue}`).toBeGreaterThanOrEqual(16);
    }
  });

  it('switches to a replacement log before unmapping the old one', async () => {
    const { frontend, blk, log: old } = await openLogging();
    const replacement = createLog();
    const reply = await setLogBase(frontend, replacement.fd, LOG_BYTES);
    closeFd(replacement.fd);
    expect(reply.payload.length).toBe(8);
    old.clear();
    expect((await blk.read(0, 64 * KiB)).length).toBe(64 * KiB);
    expect(markedPages(replacement.read()).length).toBeGreaterThanOrEqual(16);
    expect(markedPages(old.read())).toEqual([]);
  });

  it('marks nothing once VHOST_F_LOG_ALL is cleared', async () => {
    const { frontend, blk, log } = await openLogging();
    await setLogging(frontend, false);
    log.clear();
    expect((await blk.read(0, 64 * KiB)).length).toBe(64 * KiB);
    expect(markedPages(log.read())).toEqual([]);
  });

  it('refuses a log larger than its fd, an unsealable fd and a missing fd, and keeps serving', async () => {
    const { frontend, blk } = await open();
    const short = createLog(PAGE);
    const tooLong = await setLogBase(frontend, short.fd, 2 * PAGE);
    closeFd(short.fd);
    expect(tooLong.request).toBe(FrontendRequest.SET_LOG_BASE);
    expect(tooLong.payload.length).toBe(0);

    const unsealable = sys.memfdCreate('vublk-test-unsealable', 1);
    sys.ftruncate(unsealable, LOG_BYTES);
    expect((await setLogBase(frontend, unsealable, LOG_BYTES)).payload.length).toBe(0);
    closeFd(unsealable);

    await frontend.sendMessage(FrontendRequest.SET_LOG_BASE, { flags: HeaderFlag.VERSION, payload: new Uint8Array(LOG_DESCRIPTION_SIZE) });
    expect((await frontend.receiveMessage(10_000, 'the reply to SET_LOG_BASE')).payload.length).toBe(0);

    expect((await blk.read(0, 4 * KiB)).length).toBe(4 * KiB);
    await daemon.waitForLog((line) => line.msg === 'vhost-user request rejected' && line['request'] === 'SET_LOG_BASE', 5_000);
  });

  it('stops the rings when a replacement log is unusable while logging, and resumes with a usable one', async () => {
    const { frontend, blk, log } = await openLogging();
    const mark = daemon.logs().length;
    const short = createLog(PAGE);
    expect((await setLogBase(frontend, short.fd, 2 * PAGE)).payload.length).toBe(0);
    closeFd(short.fd);
    await daemon.waitForLog((line) => line.msg === 'ring stopped', 5_000, mark);
    await daemon.waitForLog((line) => line.msg.startsWith('replacement dirty log unusable'), 5_000, mark);
    // A usable log: the ring runs again and marks into it; the first log is no longer written.
    const replacement = createLog();
    expect((await setLogBase(frontend, replacement.fd, LOG_BYTES)).payload.length).toBe(8);
    closeFd(replacement.fd);
    log.clear();
    expect((await blk.read(0, 64 * KiB)).length).toBe(64 * KiB);
    expect(markedPages(replacement.read()).length).toBeGreaterThanOrEqual(16);
    expect(markedPages(log.read())).toEqual([]);
  });
});

// cache=none: the image is O_DIRECT and guest buffers that miss its alignment go through bounce buffers; the
// data reaches guest memory when the bounce is copied back, which must still be marked.
const directDir = directIoDir();
describe.skipIf(directDir === null)('dirty log with cache=none (bounced reads)', () => {
  let daemon: DaemonProcess;
  let dir: string;
  beforeAll(async () => {
    dir = mkdtempSync(path.join(directDir!, 'vublk-dirty-'));
    daemon = await startDaemon({
      rawArgs: [
        'serve',
        '--disk',
        `image=${path.join(dir, 'disk.img')},socket=${path.join(dir, 'vublk.sock')},cache=none,size=16M`,
        ...METRICS_ARGS,
      ],
      waitForSocket: false,
    });
    const deadline = Date.now() + 15_000;
    while (!fs.existsSync(path.join(dir, 'vublk.sock'))) {
      if (Date.now() > deadline) throw new Error(`no socket:\n${daemon.output()}`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  });
  afterAll(async () => {
    await daemon?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('marks the guest pages a bounced read is copied into', async () => {
    const { frontend, blk } = await connect({ ...daemon, socketPath: path.join(dir, 'vublk.sock') }, defer, {
      memory: [{ gpa: 0, size: MEMORY_BYTES }],
      protocol: { extra: featureMask(ProtocolFeature.LOG_SHMFD) },
    });
    const log = createLog();
    await setLogBase(frontend, log.fd, LOG_BYTES);
    closeFd(log.fd);
    await setLogging(frontend, true);
    const data = pattern(3, 128 * KiB);
    await blk.write(8, data, { dataSegments: 3 });
    log.clear();
    // Three data segments at 16-byte alignment: not O_DIRECT-aligned, so the read bounces.
    expect((await blk.read(8, data.length, { dataSegments: 3 })).equals(data)).toBe(true);
    expect(markedPages(log.read()).length).toBeGreaterThanOrEqual(32);
    const metrics = await scrape(await metricsUrl(daemon));
    const sum = (name: string): number => select(metrics, name, { disk: 'disk0' }).reduce((total, sample) => total + sample.value, 0);
    expect(sum('vublk_bounce_requests_total')).toBeGreaterThanOrEqual(2);
    expect(sum('vublk_dirty_log_pages_total')).toBeGreaterThanOrEqual(32);
    expect(sum('vublk_dirty_log_out_of_range_total')).toBe(0);
  });
});
