/**
 * The daemon with each request engine (`--io-engine io_uring` and `--io-engine sync`), driven by the test
 * front-end: many random 4 KiB–128 KiB writes and reads at depth 32 on each of two queues, split into
 * several descriptors and placed in guest memory below and above 4 GiB, then flushes, a read-back of
 * everything, and the image file compared byte for byte with what the guest wrote.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { BlkRequestType, BlkStatus, SECTOR_SIZE, encodeDiscardSegment } from '../../protocol/virtio-blk.js';
import { VhostUserFrontend, VirtioBlkDriver, type BlkRequest, type BlkSubmitOptions } from '../../bench/src/frontend/index.js';
import { probeIoUring } from '../../src/sys/io-uring.js';
import { startDaemon, type DaemonProcess, type LogLine } from '../support/daemon-process.js';
import { Prng } from '../support/prng.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const DISK_BYTES = 64 * MiB;
const DEPTH = 32;
const QUEUES = 2;
const ROUNDS = 10;
const uringUnavailable = probeIoUring();
if (uringUnavailable !== null) console.warn(`io_uring engine tests skipped: ${uringUnavailable}`);

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** mulberry32: a seeded generator so a failure can be replayed. */
function random(seed: number): () => number {
  const prng = new Prng(seed);
  return () => prng.next();
}

function fill(rand: () => number, length: number): Buffer {
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) data.writeUInt32LE(Math.floor(rand() * 0x1_0000_0000), i);
  return data;
}

interface Op {
  queue: number;
  kind: 'read' | 'write';
  offset: number;
  length: number;
  data?: Buffer;
  options: BlkSubmitOptions;
}

function engineLog(daemon: DaemonProcess, queue: number): Promise<LogLine> {
  return daemon.waitForLog((l) => l.msg === 'queue worker io engine' && l['queue'] === queue);
}

async function start(
  engine: string,
  extra: string[] = [],
): Promise<{ daemon: DaemonProcess; frontend: VhostUserFrontend; blk: VirtioBlkDriver }> {
  const daemon = await startDaemon({ args: ['--io-engine', engine, '--num-queues', String(QUEUES), ...extra], size: `${DISK_BYTES}` });
  cleanups.push(() => daemon.stop());
  const frontend = await VhostUserFrontend.connect(daemon.socketPath, {
    numQueues: QUEUES,
    timeoutMs: 20_000,
    // Data correctness is the point here, not interrupt coverage: the front-end's strict interrupt check
    // can flag entries it reaped by polling just before the daemon's end-of-drain used_event check (which
    // then legitimately sees used_event already past them and skips the interrupt).
    requireInterrupts: false,
    // A region above 4 GiB puts high bits in every iovec address.
    memory: [
      { gpa: 0, size: 32 * MiB },
      { gpa: 4 * GiB, size: 32 * MiB },
    ],
  });
  cleanups.push(() => frontend.close());
  return { daemon, frontend, blk: new VirtioBlkDriver(frontend) };
}

/** Submits all ops (kick once per queue), waits for all; returns completions in op order. */
async function runBatch(blk: VirtioBlkDriver, ops: readonly Op[]) {
  const submissions = ops.map((op) => {
    const request: BlkRequest =
      op.kind === 'write'
        ? { type: BlkRequestType.OUT, sector: op.offset / SECTOR_SIZE, out: op.data! }
        : { type: BlkRequestType.IN, sector: op.offset / SECTOR_SIZE, inLength: op.length };
    return blk.submit(request, { ...op.options, queue: op.queue, kick: false });
  });
  for (let q = 0; q < QUEUES; q++) blk.kick(q);
  return blk.wait(submissions, 30_000);
}

/** A batch of non-overlapping random ops (concurrent overlapping requests have no defined order). */
function randomBatch(rand: () => number, writeShare: number): Op[] {
  const taken: [number, number][] = [];
  const ops: Op[] = [];
  for (let queue = 0; queue < QUEUES; queue++) {
    for (let i = 0; i < DEPTH; i++) {
      const length = 4096 * (1 + Math.floor(rand() * 32)); // 4 KiB .. 128 KiB
      let offset = 0;
      for (let attempt = 0; ; attempt++) {
        offset = 4096 * Math.floor(rand() * ((DISK_BYTES - length) / 4096 + 1));
        if (!taken.some(([a, b]) => offset < b && a < offset + length)) break;
        if (attempt > 50) throw new Error('could not place a request');
      }
      taken.push([offset, offset + length]);
      const options: BlkSubmitOptions = {
        dataSegments: 1 + Math.floor(rand() * 4),
        indirect: rand() < 0.5,
        placement: { region: rand() < 0.5 ? 0 : 1 },
      };
      if (rand() < writeShare) ops.push({ queue, kind: 'write', offset, length, data: fill(rand, length), options });
      else ops.push({ queue, kind: 'read', offset, length, options });
    }
  }
  return ops;
}

const engines = [
  ['io_uring', uringUnavailable !== null],
  ['sync', false],
] as const;

describe.each(engines)('--io-engine %s', (engine, skip) => {
  for (const mode of ['writeback', 'writethrough'] as const) {
    it.skipIf(skip)(`random writes and reads at depth ${DEPTH} on ${QUEUES} queues (${mode}) land in the image`, async () => {
      const { daemon, blk } = await start(engine, mode === 'writethrough' ? ['--writethrough'] : []);
      for (let q = 0; q < QUEUES; q++) expect((await engineLog(daemon, q))['ioEngine']).toBe(engine);

      const rand = random(engine === 'sync' ? 1 : 2);
      const model = Buffer.alloc(DISK_BYTES); // the image starts sparse
      const written: [number, number][] = [];
      let requests = 0;
      for (let round = 0; round < ROUNDS; round++) {
        const ops = randomBatch(rand, round < 2 ? 1 : 0.6);
        const completions = await runBatch(blk, ops);
        completions.forEach((completion, i) => {
          const op = ops[i]!;
          const what = `round ${round} op ${i}: ${op.kind} ${op.length} bytes at ${op.offset} on queue ${op.queue}`;
          expect(completion.status, what).toBe(BlkStatus.OK);
          if (op.kind === 'write') {
            expect(completion.usedLen, what).toBe(1);
            op.data!.copy(model, op.offset);
            written.push([op.offset, op.length]);
          } else {
            expect(completion.usedLen, what).toBe(op.length + 1);
            expect(completion.data.equals(model.subarray(op.offset, op.offset + op.length)), what).toBe(true);
          }
        });
        requests += ops.length;
      }
      expect(requests).toBe(ROUNDS * DEPTH * QUEUES);
      for (let q = 0; q < QUEUES; q++) expect(await blk.flush({ queue: q })).toBe(BlkStatus.OK);

      // Read back everything written, 32 at a time per queue.
      for (let at = 0; at < written.length; at += DEPTH * QUEUES) {
        const ops: Op[] = written.slice(at, at + DEPTH * QUEUES).map(([offset, length], i) => ({
          queue: i % QUEUES,
          kind: 'read',
          offset,
          length,
          options: { dataSegments: 1 + (i % 3) },
        }));
        const completions = await runBatch(blk, ops);
        completions.forEach((completion, i) => {
          const op = ops[i]!;
          expect(completion.status).toBe(BlkStatus.OK);
          expect(completion.data.equals(model.subarray(op.offset, op.offset + op.length)), `read-back at ${op.offset}`).toBe(true);
        });
      }

      // The image file on the host holds exactly what the guest wrote.
      const image = readFileSync(daemon.imagePath);
      expect(image.length).toBe(DISK_BYTES);
      for (let at = 0; at < DISK_BYTES; at += MiB) {
        expect(image.subarray(at, at + MiB).equals(model.subarray(at, at + MiB)), `image MiB ${at / MiB}`).toBe(true);
      }
      expect(daemon.running()).toBe(true);
    });
  }

  it.skipIf(skip)('serves GET_ID, FLUSH, DISCARD and WRITE_ZEROES between writes, in order', async () => {
    const { daemon, blk } = await start(engine);
    const data = fill(random(7), 256 * 1024);
    // Write, then zero the middle, in one batch on one queue: the zeroing must come after the write.
    const subs = [
      blk.submit({ type: BlkRequestType.OUT, sector: 2048, out: data }, { kick: false }),
      blk.submit({ type: BlkRequestType.FLUSH }, { kick: false }),
      blk.submit(
        { type: BlkRequestType.WRITE_ZEROES, out: encodeDiscardSegment({ sector: 2048 + 128, numSectors: 128, flags: 0 }) },
        { kick: false },
      ),
      blk.submit({ type: BlkRequestType.GET_ID, inLength: 20 }, { kick: false }),
    ];
    blk.kick(0);
    const completions = await blk.wait(subs);
    expect(completions.map((c) => c.status)).toEqual([BlkStatus.OK, BlkStatus.OK, BlkStatus.OK, BlkStatus.OK]);
    const expected = Buffer.from(data);
    expected.fill(0, 128 * SECTOR_SIZE, 256 * SECTOR_SIZE);
    expect((await blk.read(2048, data.length, { queue: 1 })).equals(expected)).toBe(true);
    expect(await blk.discard([{ sector: 2048, numSectors: 512, flags: 0 }])).toBe(BlkStatus.OK);
    expect((await blk.read(2048, data.length)).every((b) => b === 0)).toBe(true);
    const image = readFileSync(daemon.imagePath);
    expect(image.subarray(2048 * SECTOR_SIZE, 2048 * SECTOR_SIZE + data.length).every((b) => b === 0)).toBe(true);
  });
});

describe('io engine selection', () => {
  it('takes the engine from an io-engine= disk key and the default from $VUBLK_IO_ENGINE', async () => {
    const keyed = await startDaemon({
      rawArgs: ['serve', '--disk', 'image=disk.img,socket=vublk.sock,size=16M,io-engine=sync'],
      env: { VUBLK_IO_ENGINE: 'io_uring' },
    });
    cleanups.push(() => keyed.stop());
    const f1 = await VhostUserFrontend.connect(keyed.socketPath, {});
    cleanups.push(() => f1.close());
    expect((await engineLog(keyed, 0))['ioEngine']).toBe('sync');

    const fromEnv = await startDaemon({ size: '16M', env: { VUBLK_IO_ENGINE: 'sync' } });
    cleanups.push(() => fromEnv.stop());
    const f2 = await VhostUserFrontend.connect(fromEnv.socketPath, {});
    cleanups.push(() => f2.close());
    expect((await engineLog(fromEnv, 0))['ioEngine']).toBe('sync');
  });

  it.skipIf(uringUnavailable !== null)('auto picks io_uring where the kernel has it', async () => {
    const daemon = await startDaemon({ size: '16M', args: ['--io-engine', 'auto'] });
    cleanups.push(() => daemon.stop());
    const frontend = await VhostUserFrontend.connect(daemon.socketPath, {});
    cleanups.push(() => frontend.close());
    const line = await engineLog(daemon, 0);
    expect(line['ioEngine']).toBe('io_uring');
    const blk = new VirtioBlkDriver(frontend);
    await blk.write(0, Buffer.alloc(4096, 1));
    expect((await blk.read(0, 4096)).every((b) => b === 1)).toBe(true);
  });

  it('refuses an unknown engine before creating anything', async () => {
    const daemon = await startDaemon({ args: ['--io-engine', 'aio'], waitForSocket: false });
    cleanups.push(() => daemon.stop());
    if (daemon.running()) await new Promise<void>((resolve) => daemon.child.once('exit', () => resolve()));
    expect(daemon.child.exitCode).not.toBe(0);
    expect(daemon.output()).toMatch(/--io-engine: must be one of auto, io_uring, sync, got 'aio'/);
  });
});
