// The request engine's rules (design.md §3, docs/architecture.md "The drain bracket"), one test per rule,
// through the TypeScript front-end against the real daemon (`npm run build` first). Each test crafts the
// chain, checks the status byte, whether a used element was published, the counters on /metrics, and that
// the next valid request on the same queue is served. The daemon's request engine follows
// $VUBLK_IO_ENGINE (sync | io_uring), as in .ci/run.
import { readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DescFlag } from '../../protocol/split-ring.js';
import { BlkFeature, BlkRequestType, BlkStatus, DISCARD_FLAG_UNMAP, type DiscardSegment } from '../../protocol/virtio-blk.js';
import { DeviceStatus, VirtioFeature } from '../../protocol/virtio.js';
import { VhostUserFrontend, VirtioBlkDriver, writeDescriptorTable, type FrontendOptions } from '../../bench/src/frontend/index.js';
import { ChainBuilder, STATUS_UNSET, restartQueue, type RawChain, type RawDescriptor } from '../support/chain-builder.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { METRICS_ARGS, QueueMetrics, ZERO_COUNTS, countsDelta, metricsUrl, type QueueCounts } from '../support/metrics-scrape.js';

const QUEUE_SIZE = 256;
/** Outside the front-end's default guest memory (one 64 MiB region at 0). */
const HOLE = 1024 * 1024 * 1024;
const DROP_WAIT_MS = 300;

interface Harness {
  daemon: DaemonProcess;
  metrics: QueueMetrics;
}

async function startHarness(extra: string[] = []): Promise<Harness> {
  const daemon = await startDaemon({ size: '16M', args: ['--serial', 'vublk-rules', ...METRICS_ARGS, ...extra] });
  return { daemon, metrics: new QueueMetrics(await metricsUrl(daemon)) };
}

/** A read-only daemon over an existing image (a read-only disk is never created). */
async function startReadOnlyHarness(image: string): Promise<Harness> {
  const args = ['serve', '--socket', 'vublk.sock', '--image', image, '--read-only', '--serial', 'vublk-rules', ...METRICS_ARGS];
  const daemon = await startDaemon({ rawArgs: args });
  return { daemon, metrics: new QueueMetrics(await metricsUrl(daemon)) };
}

interface Session {
  fe: VhostUserFrontend;
  blk: VirtioBlkDriver;
  chains: ChainBuilder;
}

async function withSession(h: Harness, body: (s: Session) => Promise<void>, options: FrontendOptions = {}): Promise<void> {
  const fe = await VhostUserFrontend.connect(h.daemon.socketPath, { queueSize: QUEUE_SIZE, protocol: { status: true }, ...options });
  const chains = new ChainBuilder(fe, 0);
  try {
    await body({ fe, blk: new VirtioBlkDriver(fe), chains });
  } finally {
    chains.release();
    fe.close();
  }
}

/** Polls /metrics until queue 0 moved by exactly `expected` since `before` (bounded), then asserts it. */
async function expectDelta(h: Harness, before: QueueCounts, expected: Partial<QueueCounts>): Promise<void> {
  const want = { ...ZERO_COUNTS, ...expected };
  const same = (c: QueueCounts): boolean => JSON.stringify(countsDelta(before, c)) === JSON.stringify(want);
  const after = await h.metrics.waitFor(0, same, 3_000);
  expect(countsDelta(before, after)).toEqual(want);
}

/** The next valid request on queue 0 is served. */
async function expectServing(s: Session): Promise<void> {
  const data = await s.blk.read(0, 512, { timeoutMs: 3_000 });
  expect(data.length).toBe(512);
}

function pattern(length: number, seed: number): Buffer {
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i++) data[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return data;
}

/** Header, `dataLen` bytes of device-writable data, 1-byte status: a well-formed IN chain. */
function readChain(c: ChainBuilder, dataLen = 512): { descriptors: RawDescriptor[]; status: number } {
  const status = c.status();
  return {
    descriptors: [
      { addr: c.header(BlkRequestType.IN, 0), len: 16 },
      { addr: c.alloc(dataLen), len: dataLen, write: true },
      { addr: status, len: 1, write: true },
    ],
    status,
  };
}

describe('request rules (read-write disk)', () => {
  let h: Harness;

  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await h?.daemon.stop();
  });

  /** A chain the daemon must drop: no used element, status byte untouched, io_errors + 1, queue still serving. */
  async function expectDropped(s: Session, submit: () => { chain: RawChain; status?: number }): Promise<void> {
    const before = await h.metrics.settledCounts(0);
    const { chain, status } = submit();
    await s.chains.expectNoCompletion(chain, DROP_WAIT_MS);
    if (status !== undefined) expect(s.chains.readByte(status)).toBe(STATUS_UNSET);
    await expectDelta(h, before, { ioErrors: 1 });
    await expectServing(s);
  }

  /** A raw chain that must complete with `status` (used length 1 unless given), moving the counters by `delta`. */
  async function expectStatus(
    s: Session,
    descriptors: RawDescriptor[],
    statusGpa: number,
    status: number,
    delta: Partial<QueueCounts>,
    usedLen = 1,
  ): Promise<void> {
    const before = await h.metrics.settledCounts(0);
    const chain = s.chains.submit(descriptors);
    const used = await s.chains.completion(chain);
    expect(s.chains.readByte(statusGpa)).toBe(status);
    expect(used.len).toBe(usedLen);
    await expectDelta(h, before, delta);
    await expectServing(s);
  }

  it('a chain longer than seg_max + 2 is dropped (direct and indirect); exactly seg_max + 2 is served', async () => {
    await withSession(h, async (s) => {
      const segMax = s.fe.blkConfig?.segMax ?? 0;
      expect(segMax).toBeGreaterThan(0);
      const build = (dataSegments: number): { descriptors: RawDescriptor[]; status: number } => {
        const status = s.chains.status();
        const descriptors: RawDescriptor[] = [{ addr: s.chains.header(BlkRequestType.IN, 0), len: 16 }];
        for (let i = 0; i < dataSegments; i++) descriptors.push({ addr: s.chains.alloc(512), len: 512, write: true });
        descriptors.push({ addr: status, len: 1, write: true });
        return { descriptors, status };
      };
      for (const indirect of [false, true]) {
        const tooLong = build(segMax + 1); // seg_max + 3 descriptors
        await expectDropped(s, () => ({ chain: s.chains.submit(tooLong.descriptors, { indirect }), status: tooLong.status }));
        const longest = build(segMax); // seg_max + 2 descriptors
        await expectStatus(s, longest.descriptors, longest.status, BlkStatus.OK, { reads: 1, bytesRead: 512 * segMax }, 512 * segMax + 1);
      }
    });
  });

  it('a chain whose last descriptor is not device-writable is dropped', async () => {
    await withSession(h, async (s) => {
      const status = s.chains.status();
      await expectDropped(s, () => ({
        chain: s.chains.submit([
          { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
          { addr: s.chains.alloc(512), len: 512, write: true },
          { addr: status, len: 1, write: false },
        ]),
        status,
      }));
    });
  });

  it('a status descriptor of length 0 is dropped', async () => {
    await withSession(h, async (s) => {
      const status = s.chains.status();
      await expectDropped(s, () => ({
        chain: s.chains.submit([
          { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
          { addr: s.chains.alloc(512), len: 512, write: true },
          { addr: status, len: 0, write: true },
        ]),
        status,
      }));
    });
  });

  it('a status byte outside guest memory (hole, above 2^53, wrapping past 2^64) is dropped', async () => {
    await withSession(h, async (s) => {
      const cases: { addr: number | bigint; len: number }[] = [
        { addr: HOLE, len: 1 },
        { addr: 64 * 1024 * 1024, len: 1 }, // first byte after the only region
        { addr: 1n << 60n, len: 1 },
        { addr: (1n << 64n) - 1n, len: 2 }, // addr + len - 1 wraps to 0, which is mapped
      ];
      for (const status of cases) {
        await expectDropped(s, () => ({
          chain: s.chains.submit([
            { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
            { addr: s.chains.alloc(512), len: 512, write: true },
            { ...status, write: true },
          ]),
        }));
      }
    });
  });

  it('fewer than 16 readable header bytes is IOERR', async () => {
    await withSession(h, async (s) => {
      const status = s.chains.status();
      await expectStatus(
        s,
        [
          { addr: s.chains.header(BlkRequestType.GET_ID, 0), len: 15 },
          { addr: s.chains.alloc(20), len: 20, write: true },
          { addr: status, len: 1, write: true },
        ],
        status,
        BlkStatus.IOERR,
        { ioErrors: 1 },
      );
    });
  });

  it('header split across descriptors, header+data in one descriptor, data+status in one descriptor: OK with correct data', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      const data = pattern(8192, 1);
      await s.blk.write(64, data, { headerWithData: true, dataSegments: 3 });
      const back = await s.blk.read(64, data.length, { statusWithData: true, dataSegments: 2 });
      expect(Buffer.compare(back, data)).toBe(0);
      const back2 = await s.blk.execute({ type: BlkRequestType.IN, sector: 64, inLength: 4096 }, { statusWithData: true, dataSegments: 1 });
      expect(back2.status).toBe(BlkStatus.OK);
      expect(back2.usedLen).toBe(4096 + 1);
      expect(Buffer.compare(back2.data, data.subarray(0, 4096))).toBe(0);
      // Byte-stream view: a status descriptor longer than one byte contributes its other bytes to the data,
      // so 4096 + 7 bytes of IN data is not a whole number of sectors.
      const padded = await s.blk.execute({ type: BlkRequestType.IN, sector: 64, inLength: 4096 }, { statusBytes: 8 });
      expect(padded.status).toBe(BlkStatus.IOERR);
      // The header in three descriptors (5 + 7 + 4 bytes), then the data.
      const header = s.chains.header(BlkRequestType.IN, 64);
      const status = s.chains.status();
      const buffer = s.chains.alloc(1024);
      const chain = s.chains.submit([
        { addr: header, len: 5 },
        { addr: header + 5, len: 7 },
        { addr: header + 12, len: 4 },
        { addr: buffer, len: 1024, write: true },
        { addr: status, len: 1, write: true },
      ]);
      const used = await s.chains.completion(chain);
      expect(used.len).toBe(1025);
      expect(s.chains.readByte(status)).toBe(BlkStatus.OK);
      expect(Buffer.compare(s.chains.read(buffer, 1024), data.subarray(0, 1024))).toBe(0);
      const image = readFileSync(h.daemon.imagePath);
      expect(Buffer.compare(image.subarray(64 * 512, 64 * 512 + data.length), data)).toBe(0);
      await expectDelta(h, before, { writes: 1, bytesWritten: 8192, reads: 3, bytesRead: 8192 + 4096 + 1024, ioErrors: 1 });
      await expectServing(s);
    });
  });

  it('a device-readable descriptor after a device-writable one is IOERR', async () => {
    await withSession(h, async (s) => {
      const status = s.chains.status();
      await expectStatus(
        s,
        [
          { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
          { addr: s.chains.alloc(512), len: 512, write: true },
          { addr: s.chains.alloc(512), len: 512, write: false },
          { addr: status, len: 1, write: true },
        ],
        status,
        BlkStatus.IOERR,
        { ioErrors: 1 },
      );
    });
  });

  it('a data descriptor longer than size_max is IOERR; exactly size_max is served', async () => {
    await withSession(h, async (s) => {
      const sizeMax = s.fe.blkConfig?.sizeMax ?? 0;
      expect(sizeMax).toBeGreaterThanOrEqual(4096);
      const before = await h.metrics.settledCounts(0);
      const tooBigWrite = await s.blk.execute({ type: BlkRequestType.OUT, sector: 0, out: Buffer.alloc(sizeMax + 512, 0x5a) });
      expect(tooBigWrite.status).toBe(BlkStatus.IOERR);
      expect(tooBigWrite.usedLen).toBe(1);
      const tooBigRead = await s.blk.execute({ type: BlkRequestType.IN, sector: 0, inLength: sizeMax + 512 });
      expect(tooBigRead.status).toBe(BlkStatus.IOERR);
      // The same bytes in two descriptors are fine.
      const split = await s.blk.execute({ type: BlkRequestType.IN, sector: 0, inLength: sizeMax + 512 }, { dataSegments: 2 });
      expect(split.status).toBe(BlkStatus.OK);
      const exact = await s.blk.execute({ type: BlkRequestType.IN, sector: 0, inLength: sizeMax });
      expect(exact.status).toBe(BlkStatus.OK);
      await expectDelta(h, before, { ioErrors: 2, reads: 2, bytesRead: 2 * sizeMax + 512 });
      const image = readFileSync(h.daemon.imagePath);
      expect(image.subarray(0, 512).includes(0x5a)).toBe(false);
      await expectServing(s);
    });
  });

  it('IN, OUT and GET_ID without data are IOERR', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      for (const type of [BlkRequestType.IN, BlkRequestType.OUT, BlkRequestType.GET_ID]) {
        const c = await s.blk.execute({ type, sector: 0 });
        expect(c.status, `type ${type}`).toBe(BlkStatus.IOERR);
        expect(c.usedLen).toBe(1);
      }
      await expectDelta(h, before, { ioErrors: 3 });
      await expectServing(s);
    });
  });

  it('FLUSH with data (either direction) is IOERR; FLUSH without data is OK', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      expect((await s.blk.execute({ type: BlkRequestType.FLUSH, out: Buffer.alloc(512) })).status).toBe(BlkStatus.IOERR);
      expect((await s.blk.execute({ type: BlkRequestType.FLUSH, inLength: 512 })).status).toBe(BlkStatus.IOERR);
      expect(await s.blk.flush()).toBe(BlkStatus.OK);
      await expectDelta(h, before, { ioErrors: 2, flushes: 1 });
      await expectServing(s);
    });
  });

  it('IN and OUT of a length that is not a multiple of 512 are IOERR', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      expect((await s.blk.execute({ type: BlkRequestType.IN, sector: 0, inLength: 100 })).status).toBe(BlkStatus.IOERR);
      expect((await s.blk.execute({ type: BlkRequestType.IN, sector: 0, inLength: 1000 }, { dataSegments: 2 })).status).toBe(
        BlkStatus.IOERR,
      );
      expect((await s.blk.execute({ type: BlkRequestType.OUT, sector: 0, out: Buffer.alloc(700, 0x77) })).status).toBe(BlkStatus.IOERR);
      await expectDelta(h, before, { ioErrors: 3 });
      expect(readFileSync(h.daemon.imagePath).subarray(0, 1024).includes(0x77)).toBe(false);
      await expectServing(s);
    });
  });

  it('data in the wrong direction is IOERR (IN/GET_ID with readable data, OUT with writable data)', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      expect((await s.blk.execute({ type: BlkRequestType.IN, sector: 0, out: Buffer.alloc(512) })).status).toBe(BlkStatus.IOERR);
      expect((await s.blk.execute({ type: BlkRequestType.GET_ID, out: Buffer.alloc(20) })).status).toBe(BlkStatus.IOERR);
      expect((await s.blk.execute({ type: BlkRequestType.OUT, sector: 0, inLength: 512 })).status).toBe(BlkStatus.IOERR);
      // Both directions at once.
      expect((await s.blk.execute({ type: BlkRequestType.OUT, sector: 0, out: Buffer.alloc(512), inLength: 512 })).status).toBe(
        BlkStatus.IOERR,
      );
      await expectDelta(h, before, { ioErrors: 4 });
      await expectServing(s);
    });
  });

  it('a range past the capacity is IOERR; the last sector is served', async () => {
    await withSession(h, async (s) => {
      const capacity = s.blk.capacitySectors;
      const before = await h.metrics.settledCounts(0);
      expect((await s.blk.execute({ type: BlkRequestType.IN, sector: capacity - 1, inLength: 1024 })).status).toBe(BlkStatus.IOERR);
      expect((await s.blk.execute({ type: BlkRequestType.OUT, sector: capacity, out: Buffer.alloc(512, 1) })).status).toBe(BlkStatus.IOERR);
      const huge = Buffer.alloc(16);
      huge.writeUInt32LE(BlkRequestType.IN, 0);
      huge.writeBigUInt64LE((1n << 64n) - 1n, 8);
      expect((await s.blk.execute({ type: BlkRequestType.IN, inLength: 512, rawHeader: huge })).status).toBe(BlkStatus.IOERR);
      const last = await s.blk.execute({ type: BlkRequestType.IN, sector: capacity - 1, inLength: 512 });
      expect(last.status).toBe(BlkStatus.OK);
      await expectDelta(h, before, { ioErrors: 3, reads: 1, bytesRead: 512 });
      await expectServing(s);
    });
  });

  it('a data buffer outside the memory table is IOERR (in a hole, straddling the end of a region)', async () => {
    await withSession(h, async (s) => {
      const end = 64 * 1024 * 1024;
      for (const data of [{ addr: HOLE }, { addr: end - 256 }, { addr: 1n << 62n }]) {
        const status = s.chains.status();
        await expectStatus(
          s,
          [
            { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
            { addr: data.addr, len: 512, write: true },
            { addr: status, len: 1, write: true },
          ],
          status,
          BlkStatus.IOERR,
          { ioErrors: 1 },
        );
      }
      // An OUT whose payload lies in the hole.
      const status = s.chains.status();
      await expectStatus(
        s,
        [
          { addr: s.chains.header(BlkRequestType.OUT, 0), len: 16 },
          { addr: HOLE, len: 512 },
          { addr: status, len: 1, write: true },
        ],
        status,
        BlkStatus.IOERR,
        { ioErrors: 1 },
      );
    });
  });

  it('indirect tables: valid is served, a length not a multiple of 16 / nested / with NEXT is dropped', async () => {
    await withSession(h, async (s) => {
      const data = pattern(4096, 9);
      await s.blk.write(200, data, { indirect: true });
      expect(Buffer.compare(await s.blk.read(200, 4096, { indirect: true, dataSegments: 4 }), data)).toBe(0);

      const bad = readChain(s.chains);
      await expectDropped(s, () => ({
        chain: s.chains.submit(bad.descriptors, { indirect: true, indirectLen: 3 * 16 + 8 }),
        status: bad.status,
      }));
      const empty = readChain(s.chains);
      await expectDropped(s, () => ({
        chain: s.chains.submit(empty.descriptors, { indirect: true, indirectLen: 0 }),
        status: empty.status,
      }));
      const withNext = readChain(s.chains);
      await expectDropped(s, () => ({
        chain: s.chains.submit(withNext.descriptors, { indirect: true, indirectFlags: DescFlag.NEXT }),
        status: withNext.status,
      }));

      // Nested: the table's second entry is itself an INDIRECT descriptor pointing at a table of data + status.
      const status = s.chains.status();
      const innerTable = s.chains.alloc(2 * 16);
      writeDescriptorTable(s.fe.memory, innerTable, [
        { addr: s.chains.alloc(512), len: 512, flags: DescFlag.WRITE | DescFlag.NEXT, next: 1 },
        { addr: status, len: 1, flags: DescFlag.WRITE, next: 0 },
      ]);
      await expectDropped(s, () => ({
        chain: s.chains.submit(
          [
            { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
            { addr: innerTable, len: 2 * 16, rawFlags: DescFlag.INDIRECT },
          ],
          { indirect: true },
        ),
        status,
      }));
    });
  });

  it('a loop in the descriptor table, or a next / head index out of range, poisons the queue until a ring restart', async () => {
    const poisons: { name: string; submit: (s: Session) => void }[] = [
      {
        name: 'loop',
        submit: (s) => {
          s.chains.submit([
            { addr: s.chains.header(BlkRequestType.IN, 0), len: 16 },
            { addr: s.chains.alloc(512), len: 512, write: true, rawFlags: DescFlag.WRITE | DescFlag.NEXT, next: 0 },
          ]);
        },
      },
      {
        name: 'next out of range',
        submit: (s) => {
          s.chains.submit([
            { addr: s.chains.header(BlkRequestType.IN, 0), len: 16, next: { index: QUEUE_SIZE + 5 } },
            { addr: s.chains.alloc(1), len: 1, write: true },
          ]);
        },
      },
      {
        name: 'head out of range',
        submit: (s) => {
          s.chains.queue.publish(QUEUE_SIZE + 1);
          s.chains.queue.kick({ force: true });
        },
      },
    ];
    for (const poison of poisons) {
      await withSession(h, async (s) => {
        expect(s.chains.queue.errorSignals()).toBe(0);
        const before = await h.metrics.settledCounts(0);
        const usedBefore = s.chains.queue.ring.usedIdx;
        poison.submit(s);
        await expectDelta(h, before, { ioErrors: 1, poisoned: 1 });
        expect(s.chains.queue.ring.usedIdx, poison.name).toBe(usedBefore);
        expect(s.chains.queue.errorSignals(), poison.name).toBe(1);
        expect((await s.fe.getStatus()) & DeviceStatus.NEEDS_RESET, poison.name).toBe(DeviceStatus.NEEDS_RESET);
        // Further requests are not served while poisoned.
        const stuck = readChain(s.chains);
        s.chains.submit(stuck.descriptors);
        await expect(s.chains.queue.waitUsed({ timeoutMs: DROP_WAIT_MS })).rejects.toThrow(/used entr/);
        expect(s.chains.queue.ring.usedIdx, poison.name).toBe(usedBefore);
        await restartQueue(s.fe, 0);
        expect((await s.fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(0);
        await expectDelta(h, before, { ioErrors: 1 });
        await expectServing(s);
        s.chains.release();
      });
    }
  });

  it('an avail index more than the queue size ahead poisons the queue (invalid_avail_idx) until a ring restart', async () => {
    await withSession(h, async (s) => {
      const q = s.chains.queue;
      const before = await h.metrics.settledCounts(0);
      q.ring.availIdx = q.indices.availIdx + QUEUE_SIZE + 1;
      q.kick({ force: true });
      await expectDelta(h, before, { invalidAvailIdx: 1, poisoned: 1 });
      expect(q.errorSignals()).toBe(1);
      expect((await s.fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(DeviceStatus.NEEDS_RESET);
      await restartQueue(s.fe, 0);
      expect((await s.fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(0);
      await expectDelta(h, before, { invalidAvailIdx: 1 });
      await expectServing(s);
    });
  });

  it('unknown request types are UNSUPP', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      const types = [2, 3, 10 /* GET_LIFETIME */, 14 /* SECURE_ERASE */, 0xffff_ffff];
      for (const type of types) {
        const header = Buffer.alloc(16);
        header.writeUInt32LE(type, 0);
        const c = await s.blk.execute({ type, rawHeader: header, inLength: 64 });
        expect(c.status, `type ${type}`).toBe(BlkStatus.UNSUPP);
        expect(c.usedLen).toBe(1);
      }
      await expectDelta(h, before, { unsupported: types.length });
      await expectServing(s);
    });
  });

  it('DISCARD and WRITE_ZEROES: segment count, reserved flags, segment size and range rules', async () => {
    await withSession(h, async (s) => {
      const config = s.fe.blkConfig;
      if (config === null) throw new Error('no config');
      const capacity = config.capacity;
      const before = await h.metrics.settledCounts(0);
      const one = (over: Partial<DiscardSegment> = {}): DiscardSegment => ({ sector: 8, numSectors: 8, flags: 0, ...over });
      const many = (n: number): DiscardSegment[] => Array.from({ length: n }, (_, i) => one({ sector: 8 + i * 8 }));
      expect(await s.blk.discard(many(config.maxDiscardSeg + 1))).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.writeZeroes(many(config.maxWriteZeroesSeg + 1))).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.discard([one({ flags: 2 })])).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.writeZeroes([one({ sector: 100, flags: 0x8000_0001 })])).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.discard([one({ numSectors: config.maxDiscardSectors + 1 })])).toBe(BlkStatus.IOERR);
      expect(await s.blk.writeZeroes([one({ numSectors: config.maxWriteZeroesSectors + 1 })])).toBe(BlkStatus.IOERR);
      expect(await s.blk.discard([one({ sector: capacity - 1, numSectors: 2 })])).toBe(BlkStatus.IOERR);
      expect(await s.blk.writeZeroes([one({ sector: capacity, numSectors: 1 })])).toBe(BlkStatus.IOERR);
      // A payload that is not a whole number of segments.
      expect((await s.blk.execute({ type: BlkRequestType.DISCARD, out: Buffer.alloc(24) })).status).toBe(BlkStatus.IOERR);
      // Exactly max segments is fine.
      expect(await s.blk.discard(many(config.maxDiscardSeg))).toBe(BlkStatus.OK);
      await expectDelta(h, before, { unsupported: 4, ioErrors: 5, discards: 1 });
      await expectServing(s);
    });
  });

  it('advertises one range per DISCARD and WRITE_ZEROES like QEMU, so a 2-range WRITE_ZEROES is UNSUPP', async () => {
    await withSession(h, async (s) => {
      const config = s.fe.blkConfig;
      expect(config).toMatchObject({ maxDiscardSeg: 1, maxWriteZeroesSeg: 1 });
      const before = await h.metrics.settledCounts(0);
      // The request QEMU's tests/qtest/vhost-user-blk-test.c sends and expects to fail with UNSUPP.
      const two = [
        { sector: 0, numSectors: 1, flags: 0 },
        { sector: 1, numSectors: 1, flags: 0 },
      ];
      expect(await s.blk.writeZeroes(two)).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.discard(two)).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.writeZeroes(two.slice(0, 1))).toBe(BlkStatus.OK);
      await expectDelta(h, before, { unsupported: 2, writeZeroes: 1 });
      await expectServing(s);
    });
  });

  it('WRITE_ZEROES zeroes exactly its ranges in the image file (with and without UNMAP); DISCARD with UNMAP is OK', async () => {
    await withSession(h, async (s) => {
      const data = pattern(32 * 512, 3);
      await s.blk.write(1000, data);
      const before = await h.metrics.settledCounts(0);
      expect(await s.blk.writeZeroes([{ sector: 1004, numSectors: 4, flags: 0 }])).toBe(BlkStatus.OK);
      expect(await s.blk.writeZeroes([{ sector: 1020, numSectors: 2, flags: DISCARD_FLAG_UNMAP }])).toBe(BlkStatus.OK);
      const expected = Buffer.from(data);
      expected.fill(0, 4 * 512, 8 * 512);
      expected.fill(0, 20 * 512, 22 * 512);
      const image = readFileSync(h.daemon.imagePath);
      expect(Buffer.compare(image.subarray(1000 * 512, 1032 * 512), expected)).toBe(0);
      expect(Buffer.compare(await s.blk.read(1000, 32 * 512), expected)).toBe(0);
      expect(await s.blk.discard([{ sector: 2000, numSectors: 16, flags: DISCARD_FLAG_UNMAP }])).toBe(BlkStatus.OK);
      await expectDelta(h, before, { writeZeroes: 2, discards: 1, reads: 1, bytesRead: 32 * 512 });
      await expectServing(s);
    });
  });

  it('GET_ID answers the 20-byte serial, and only as many bytes as the buffer holds', async () => {
    await withSession(h, async (s) => {
      const before = await h.metrics.settledCounts(0);
      const id = await s.blk.getId();
      expect(id).toMatchObject({ status: BlkStatus.OK, id: 'vublk-rules' });
      const short = await s.blk.execute({ type: BlkRequestType.GET_ID, inLength: 5 });
      expect(short.status).toBe(BlkStatus.OK);
      expect(short.usedLen).toBe(6);
      expect(short.data.toString('latin1')).toBe('vublk');
      await expectDelta(h, before, { getIds: 2 });
    });
  });

  it('a legacy driver (VERSION_1 not negotiated) reads and writes', async () => {
    await withSession(
      h,
      async (s) => {
        expect(s.fe.hasFeature(VirtioFeature.VERSION_1)).toBe(false);
        const data = pattern(4096, 5);
        await s.blk.write(3000, data);
        expect(Buffer.compare(await s.blk.read(3000, 4096), data)).toBe(0);
        expect(Buffer.compare(readFileSync(h.daemon.imagePath).subarray(3000 * 512, 3000 * 512 + 4096), data)).toBe(0);
      },
      { features: { version1: false } },
    );
  });
});

describe('request rules (--max-discard-seg 3 --max-write-zeroes-seg 4)', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(['--max-discard-seg', '3', '--max-write-zeroes-seg', '4']);
  });
  afterAll(async () => {
    await h?.daemon.stop();
  });

  it('advertises the configured range limits and enforces them', async () => {
    await withSession(h, async (s) => {
      expect(s.fe.blkConfig).toMatchObject({ maxDiscardSeg: 3, maxWriteZeroesSeg: 4 });
      const ranges = (n: number): DiscardSegment[] => Array.from({ length: n }, (_, i) => ({ sector: 8 + i * 8, numSectors: 8, flags: 0 }));
      const before = await h.metrics.settledCounts(0);
      expect(await s.blk.writeZeroes(ranges(4))).toBe(BlkStatus.OK);
      expect(await s.blk.writeZeroes(ranges(5))).toBe(BlkStatus.UNSUPP);
      expect(await s.blk.discard(ranges(3))).toBe(BlkStatus.OK);
      expect(await s.blk.discard(ranges(4))).toBe(BlkStatus.UNSUPP);
      await expectDelta(h, before, { writeZeroes: 1, discards: 1, unsupported: 2 });
      await expectServing(s);
    });
  });
});

describe('request rules (read-only disk)', () => {
  let h: Harness;
  let dir: string;
  let image: string;
  const content = pattern(1024 * 1024, 11);

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'vublk-ro-'));
    image = path.join(dir, 'ro.img');
    writeFileSync(image, content);
    h = await startReadOnlyHarness(image);
  });
  afterAll(async () => {
    await h?.daemon.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it('OUT, DISCARD and WRITE_ZEROES are IOERR; FLUSH and IN are OK; the image is untouched', async () => {
    await withSession(h, async (s) => {
      expect(s.fe.hasFeature(BlkFeature.RO)).toBe(true);
      const before = await h.metrics.settledCounts(0);
      expect((await s.blk.execute({ type: BlkRequestType.OUT, sector: 0, out: Buffer.alloc(4096, 0x6b) })).status).toBe(BlkStatus.IOERR);
      expect(await s.blk.discard([{ sector: 0, numSectors: 8, flags: 0 }])).toBe(BlkStatus.IOERR);
      expect(await s.blk.writeZeroes([{ sector: 8, numSectors: 8, flags: 0 }])).toBe(BlkStatus.IOERR);
      expect(await s.blk.writeZeroes([{ sector: 8, numSectors: 8, flags: DISCARD_FLAG_UNMAP }])).toBe(BlkStatus.IOERR);
      expect(await s.blk.flush()).toBe(BlkStatus.OK);
      expect(Buffer.compare(await s.blk.read(0, 8192), content.subarray(0, 8192))).toBe(0);
      await expectDelta(h, before, { ioErrors: 4, flushes: 1, reads: 1, bytesRead: 8192 });
      expect(Buffer.compare(readFileSync(image), content)).toBe(0);
      await expectServing(s);
    });
  });
});
