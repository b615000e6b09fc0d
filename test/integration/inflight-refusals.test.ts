// SET_INFLIGHT_FD from a hostile or broken front-end, on the real daemon: every bad region is refused (REPLY_ACK
// 1, a warning naming what is wrong) and the session keeps serving; a region whose header passes but whose
// descriptor states are corrupt is refused when the ring starts (error log) and the ring runs untracked-afresh.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FrontendRequest, encodeInflight, type InflightDescription } from '../../protocol/vhost-user.js';
import { BackendNackError, InflightKeeper } from '../../bench/src/frontend/index.js';
import { createEventFd } from '../../src/sys/eventfd.js';
import { createMemfd, mapShared, unmap } from '../../src/sys/memory-map.js';
import { closeFd } from '../../src/sys/fd.js';
import { QUEUE_HEADER_BYTES, inflightRegionBytes } from '../../src/dataplane/inflight-layout.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { connect, pattern, useCleanups } from '../support/session-harness.js';
import koffi from 'koffi';

const defer = useCleanups();
let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ args: ['--num-queues', '2', '--metrics-listen', 'off'] });
});

afterAll(async () => {
  await daemon.stop();
});

const QUEUES = 2;
const QUEUE_SIZE = 128;
const good = (): InflightDescription => ({
  mmapSize: BigInt(inflightRegionBytes(QUEUES, QUEUE_SIZE)),
  mmapOffset: 0n,
  numQueues: QUEUES,
  queueSize: QUEUE_SIZE,
});

function memfd(bytes: number): number {
  return createMemfd('hostile-inflight', bytes);
}

describe('SET_INFLIGHT_FD refusals', () => {
  it('refuses bad regions with a nack and a reason, and keeps serving', { timeout: 60_000 }, async () => {
    const keeper = new InflightKeeper();
    defer(() => keeper.drop());
    const { frontend, blk } = await connect(daemon, defer, { numQueues: QUEUES, queueSize: QUEUE_SIZE, protocol: { inflight: keeper } });
    const bytes = inflightRegionBytes(QUEUES, QUEUE_SIZE);
    const cases: [string, InflightDescription, () => number[], RegExp][] = [
      ['mmap_size too small', { ...good(), mmapSize: 16n }, () => [memfd(bytes)], /mmap_size 16/],
      ['num_queues 0', { ...good(), numQueues: 0 }, () => [memfd(bytes)], /num_queues 0/],
      ['more queues than the disk has', { ...good(), numQueues: 64 }, () => [memfd(bytes * 40)], /num_queues 64/],
      ['queue_size 3', { ...good(), queueSize: 3 }, () => [memfd(bytes)], /queue_size 3/],
      ['a file shorter than the region', good(), () => [memfd(4096)], /the file has 4096/],
      ['an offset past the file', { ...good(), mmapOffset: 1n << 40n }, () => [memfd(bytes)], /mmap_offset/],
      ['an eventfd instead of a file', good(), () => [createEventFd()], /special file/],
      ['no fd at all', good(), () => [], /no fd attached/],
    ];
    for (const [what, description, fds, reason] of cases) {
      const since = daemon.logs().length;
      const sent = fds();
      try {
        await expect(frontend.set(FrontendRequest.SET_INFLIGHT_FD, encodeInflight(description), sent), what).rejects.toThrow(
          BackendNackError,
        );
      } finally {
        sent.forEach(closeFd);
      }
      const line = await daemon.waitForLog((l) => l.msg === 'vhost-user request rejected' && reason.test(String(l['err'])), 5_000, since);
      expect(line.level, what).toBe(40);
    }
    const data = pattern(7, 64 * 1024);
    await blk.write(2048, data, { queue: 1 });
    expect((await blk.read(2048, data.length, { queue: 0 })).equals(data)).toBe(true);
  });

  it('a region with a corrupt descriptor state is refused at ring start; the ring still serves', { timeout: 60_000 }, async () => {
    const bytes = inflightRegionBytes(QUEUES, QUEUE_SIZE);
    const fd = memfd(bytes);
    // Queue 0: version 1, desc_num 128, descriptor 5 with inflight flag 7.
    const address = mapShared(fd, bytes, 0);
    const view = new DataView(koffi.view(address, bytes));
    view.setUint16(8, 1, true);
    view.setUint16(10, QUEUE_SIZE, true);
    view.setUint8(QUEUE_HEADER_BYTES + 16 * 5, 7);
    unmap(address, bytes);
    const keeper = new InflightKeeper();
    keeper.keep(fd, good());
    defer(() => keeper.drop());
    const since = daemon.logs().length;
    const { blk } = await connect(daemon, defer, { numQueues: QUEUES, queueSize: QUEUE_SIZE, protocol: { inflight: keeper } });
    const refused = await daemon.waitForLog(
      (l) => l.msg === 'queue worker error' && /inflight region refused: descriptor 5 has inflight flag 7/.test(String(l['reason'])),
      10_000,
      since,
    );
    expect(refused.queue).toBe(0);
    const data = pattern(9, 32 * 1024);
    await blk.write(4096, data, { queue: 0 });
    expect((await blk.read(4096, data.length, { queue: 0 })).equals(data)).toBe(true);
  });
});
