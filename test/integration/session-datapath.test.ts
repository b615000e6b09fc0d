// The data path of the real daemon through the TypeScript front-end: read / write / flush / GET_ID on every
// queue, random offsets and sizes (512 B – 1 MiB), depth-32 batches across queues, EVENT_IDX and INDIRECT on
// and off, the framings a guest may use, and a legacy (pre-VERSION_1) driver. Every byte is checked against a
// shadow copy of the disk and against the image file on the host. Runs once per request engine.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VirtioFeature } from '../../protocol/virtio.js';
import { BlkRequestType, BlkStatus, SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import type { BlkRequest, BlkSubmitOptions, FrontendOptions, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import {
  KiB,
  MiB,
  Prng,
  connect,
  imageBytes,
  pattern,
  sectorBytes,
  testSeed,
  useCleanups,
  stopCleanly,
} from '../support/session-harness.js';

const NUM_QUEUES = 4;
const DISK_BYTES = 64 * MiB;
const DISK_SECTORS = DISK_BYTES / SECTOR_SIZE;
/** Guest RAM large enough for 32 requests of 1 MiB plus rings. */
const GUEST_MEMORY = [{ gpa: 0, size: 128 * MiB }];
const defer = useCleanups();

/** What the disk must hold: every write of the tests is applied here too. */
class ShadowDisk {
  readonly bytes = Buffer.alloc(DISK_BYTES);

  write(sector: number, data: Uint8Array): void {
    this.bytes.set(data, sector * SECTOR_SIZE);
  }

  read(sector: number, length: number): Buffer {
    return this.bytes.subarray(sector * SECTOR_SIZE, sector * SECTOR_SIZE + length);
  }

  zero(sector: number, sectors: number): void {
    this.bytes.fill(0, sector * SECTOR_SIZE, (sector + sectors) * SECTOR_SIZE);
  }
}

/** Non-overlapping random extents (sector, bytes) for one batch: the disk is cut into `count` zones. */
function randomExtents(rng: Prng, count: number, maxBytes: number): { sector: number; bytes: number }[] {
  const zoneSectors = Math.floor(DISK_SECTORS / count);
  return Array.from({ length: count }, (_, i) => {
    const bytes = rng.int(1, Math.min(maxBytes, zoneSectors * SECTOR_SIZE) / SECTOR_SIZE) * SECTOR_SIZE;
    const sector = i * zoneSectors + rng.int(0, zoneSectors - bytes / SECTOR_SIZE);
    return { sector, bytes };
  });
}

function shuffle<T>(rng: Prng, items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = rng.int(0, i);
    [items[i], items[j]] = [items[j] as T, items[i] as T];
  }
  return items;
}

for (const engine of ['auto', 'sync'] as const) {
  describe(`data path (--io-engine ${engine})`, () => {
    let daemon: DaemonProcess;
    const shadow = new ShadowDisk();
    let seed = 0;

    beforeAll(async () => {
      daemon = await startDaemon({
        size: '64M',
        args: ['--num-queues', String(NUM_QUEUES), '--serial', `dp-${engine}`, '--io-engine', engine, '--metrics-listen', 'off'],
      });
    });

    afterAll(async () => {
      await stopCleanly(daemon);
    });

    async function open(options: FrontendOptions = {}): Promise<VirtioBlkDriver> {
      const { blk } = await connect(daemon, defer, { numQueues: NUM_QUEUES, memory: GUEST_MEMORY, ...options });
      return blk;
    }

    /** Writes a batch (one kick per queue), then reads every extent back on another queue; checks all of it. */
    async function writeThenRead(
      blk: VirtioBlkDriver,
      rng: Prng,
      count: number,
      maxBytes: number,
      framing: (i: number) => BlkSubmitOptions,
    ): Promise<void> {
      const extents = randomExtents(rng, count, maxBytes);
      const writes = extents.map(({ sector, bytes }, i) => ({
        type: BlkRequestType.OUT,
        sector,
        out: pattern(rng.u32(), bytes),
        options: { queue: rng.int(0, NUM_QUEUES - 1), ...framing(i) },
      }));
      const written = await blk.executeAll(writes);
      written.forEach((c, i) => expect(c.status, `write ${i} (seed ${seed})`).toBe(BlkStatus.OK));
      writes.forEach((w) => shadow.write(w.sector, w.out));
      const reads: (BlkRequest & { options: BlkSubmitOptions })[] = shuffle(rng, [...extents]).map(({ sector, bytes }, i) => ({
        type: BlkRequestType.IN,
        sector,
        inLength: bytes,
        options: { queue: rng.int(0, NUM_QUEUES - 1), ...framing(i + 1) },
      }));
      const read = await blk.executeAll(reads);
      read.forEach((c, i) => {
        const r = reads[i] as BlkRequest;
        expect(c.status, `read ${i} (seed ${seed})`).toBe(BlkStatus.OK);
        expect(c.usedLen, `read ${i}: used.len = data + status`).toBe((r.inLength ?? 0) + 1);
        expect(c.data.equals(shadow.read(r.sector ?? 0, r.inLength ?? 0)), `read ${i} at sector ${r.sector} (seed ${seed})`).toBe(true);
      });
      for (const w of writes) {
        expect(sectorBytes(daemon.imagePath, w.sector, w.out.length).equals(w.out), `image at sector ${w.sector} (seed ${seed})`).toBe(
          true,
        );
      }
    }

    it('read, write, flush and GET_ID round trips on every queue; the image file holds the bytes', async () => {
      const blk = await open();
      for (let q = 0; q < NUM_QUEUES; q++) {
        const sector = 8 + q * 256;
        const data = pattern(100 + q, 64 * KiB);
        await blk.write(sector, data, { queue: q });
        shadow.write(sector, data);
        expect(await blk.flush({ queue: q })).toBe(BlkStatus.OK);
        expect(sectorBytes(daemon.imagePath, sector, data.length).equals(data), `image after queue ${q} write`).toBe(true);
        for (let r = 0; r < NUM_QUEUES; r++) {
          expect((await blk.read(sector, data.length, { queue: r })).equals(data), `written on ${q}, read on ${r}`).toBe(true);
        }
        const id = await blk.getId({ queue: q });
        expect(id, `GET_ID on queue ${q}`).toMatchObject({ status: BlkStatus.OK, id: `dp-${engine}` });
        expect(id.raw.subarray(`dp-${engine}`.length).every((b) => b === 0)).toBe(true);
        // Write-zeroes and discard of part of it, on the same queue.
        expect(await blk.writeZeroes([{ sector: sector + 8, numSectors: 8, flags: 0 }], { queue: q })).toBe(BlkStatus.OK);
        shadow.zero(sector + 8, 8);
        expect((await blk.read(sector, data.length, { queue: q })).equals(shadow.read(sector, data.length))).toBe(true);
      }
      // Reading the last sector works, one past it is IOERR.
      expect((await blk.read(DISK_SECTORS - 1, 512)).length).toBe(512);
      expect((await blk.execute({ type: BlkRequestType.IN, sector: DISK_SECTORS, inLength: 512 })).status).toBe(BlkStatus.IOERR);
    });

    it('random offsets and sizes from 512 B to 1 MiB, one at a time, every queue', { timeout: 180_000 }, async () => {
      seed = testSeed();
      const rng = new Prng(seed);
      const blk = await open();
      for (let i = 0; i < 48; i++) {
        const bytes = (i === 0 ? 1 : i === 1 ? 2048 : rng.int(1, 2048)) * SECTOR_SIZE; // 512 B and 1 MiB always included
        const sector = rng.int(0, DISK_SECTORS - bytes / SECTOR_SIZE);
        const queue = rng.int(0, NUM_QUEUES - 1);
        const indirect = rng.int(0, 1) === 1;
        const data = pattern(rng.u32(), bytes);
        await blk.write(sector, data, { queue, indirect });
        shadow.write(sector, data);
        const back = await blk.read(sector, bytes, { queue: (queue + 1) % NUM_QUEUES, indirect: !indirect });
        expect(back.equals(data), `request ${i}: ${bytes} bytes at sector ${sector} (seed ${seed})`).toBe(true);
      }
      expect(await blk.flush()).toBe(BlkStatus.OK);
      expect(imageBytes(daemon.imagePath, 0, DISK_BYTES).equals(shadow.bytes), `whole image vs shadow (seed ${seed})`).toBe(true);
    });

    it('depth-32 batches across all queues, mixed sizes up to 1 MiB', { timeout: 180_000 }, async () => {
      seed = testSeed();
      const rng = new Prng(seed);
      const blk = await open();
      for (let round = 0; round < 6; round++) {
        await writeThenRead(blk, rng, 32, round % 2 === 0 ? 16 * KiB : 1 * MiB, (i) => ({ indirect: i % 3 === 0 }));
      }
      expect(imageBytes(daemon.imagePath, 0, DISK_BYTES).equals(shadow.bytes), `whole image vs shadow (seed ${seed})`).toBe(true);
    });

    for (const eventIdx of [true, false]) {
      for (const indirect of [true, false]) {
        it(`EVENT_IDX ${eventIdx ? 'on' : 'off'}, INDIRECT ${indirect ? 'on' : 'off'}: depth-32 batches, every completion interrupts`, {
          timeout: 180_000,
        }, async () => {
          seed = testSeed();
          const rng = new Prng(seed);
          const { frontend, blk } = await connect(daemon, defer, {
            numQueues: NUM_QUEUES,
            memory: GUEST_MEMORY,
            features: { eventIdx, indirect },
          });
          expect(frontend.hasFeature(VirtioFeature.RING_EVENT_IDX)).toBe(eventIdx);
          expect(frontend.hasFeature(VirtioFeature.RING_INDIRECT_DESC)).toBe(indirect);
          for (let round = 0; round < 3; round++) {
            await writeThenRead(blk, rng, 32, 64 * KiB, (i) => ({ indirect: indirect && i % 2 === 0, dataSegments: 1 + (i % 3) }));
          }
          // Single requests too: the interrupt decision for one completion at a time.
          for (let i = 0; i < 16; i++) {
            const data = pattern(rng.u32(), 4096);
            await blk.write(i * 8, data, { queue: i % NUM_QUEUES, indirect: indirect && i % 2 === 1 });
            shadow.write(i * 8, data);
            expect((await blk.read(i * 8, 4096, { queue: (i + 3) % NUM_QUEUES })).equals(data)).toBe(true);
          }
          // requireInterrupts (the default) made every wait above fail if a completion came without one.
          const completions = frontend.queues.reduce((sum, q) => sum + q.stats.completions, 0);
          expect(completions).toBe(3 * 64 + 32);
          for (const queue of frontend.queues) {
            expect(queue.inflight).toBe(0);
            expect(queue.freeDescriptors).toBe(queue.size);
          }
        });
      }
    }

    it('every framing: header+data in one descriptor, data+status in one, split segments, long status, indirect', async () => {
      const blk = await open();
      const framings: BlkSubmitOptions[] = [
        { headerWithData: true },
        { statusWithData: true },
        { headerWithData: true, statusWithData: true },
        { headerWithData: true, statusWithData: true, indirect: true },
        { dataSegments: 7 },
        { headerWithData: true, dataSegments: 4, indirect: true },
        { statusWithData: true, dataSegments: 3 },
      ];
      for (const [i, framing] of framings.entries()) {
        const what = JSON.stringify(framing);
        for (let q = 0; q < NUM_QUEUES; q++) {
          const sector = 4096 + i * 512 + q * 64;
          const data = pattern(500 + i * 8 + q, 16 * KiB + q * 4 * KiB);
          const write = await blk.execute({ type: BlkRequestType.OUT, sector, out: data }, { ...framing, queue: q });
          expect([write.status, write.usedLen], `write ${what} on queue ${q}`).toEqual([BlkStatus.OK, 1]);
          shadow.write(sector, data);
          expect(sectorBytes(daemon.imagePath, sector, data.length).equals(data), `image after ${what}`).toBe(true);
          const read = await blk.execute(
            { type: BlkRequestType.IN, sector, inLength: data.length },
            { ...framing, queue: (q + 1) % NUM_QUEUES },
          );
          expect([read.status, read.usedLen], `read ${what}`).toEqual([BlkStatus.OK, data.length + 1]);
          expect(read.data.equals(data), `read ${what} on queue ${(q + 1) % NUM_QUEUES}`).toBe(true);
        }
      }
      // GET_ID with its 20 bytes and the status in one descriptor; FLUSH with a longer status descriptor.
      const id = await blk.execute({ type: BlkRequestType.GET_ID, inLength: 20 }, { statusWithData: true, indirect: true });
      expect(id.status).toBe(BlkStatus.OK);
      expect(id.data.subarray(0, `dp-${engine}`.length).toString('latin1')).toBe(`dp-${engine}`);
      // A status descriptor longer than one byte: vublk counts the extra writable bytes as data (documented in
      // docs/architecture.md), so FLUSH and OUT with one are IOERR (qemu-storage-daemon accepts them) and a
      // read's extra bytes must make a whole block. The status still lands in the descriptor's last byte.
      const flush = await blk.execute({ type: BlkRequestType.FLUSH }, { statusBytes: 4 });
      expect([flush.status, flush.usedLen]).toEqual([BlkStatus.IOERR, 1]);
      const longStatusWrite = await blk.execute(
        { type: BlkRequestType.OUT, sector: 64, out: pattern(7, 512) },
        { statusBytes: 8, indirect: true },
      );
      expect(longStatusWrite.status).toBe(BlkStatus.IOERR);
      expect((await blk.read(64, 512)).equals(shadow.read(64, 512)), 'the refused write changed nothing').toBe(true);
      expect(await blk.flush({ statusBytes: 1 })).toBe(BlkStatus.OK);
    });

    it('a legacy driver (VERSION_1 not acknowledged) is served on every queue', async () => {
      seed = testSeed();
      const rng = new Prng(seed);
      const { frontend, blk } = await connect(daemon, defer, {
        numQueues: NUM_QUEUES,
        memory: GUEST_MEMORY,
        features: { version1: false },
      });
      expect(frontend.hasFeature(VirtioFeature.VERSION_1)).toBe(false);
      expect(frontend.offeredFeatures & (1n << BigInt(VirtioFeature.VERSION_1))).not.toBe(0n);
      await daemon.waitForLog((l) => l.msg === 'features negotiated' && l['version1'] === false);
      for (let q = 0; q < NUM_QUEUES; q++) {
        const id = await blk.getId({ queue: q });
        expect(id.status).toBe(BlkStatus.OK);
        expect(await blk.flush({ queue: q })).toBe(BlkStatus.OK);
      }
      await writeThenRead(blk, rng, 32, 128 * KiB, (i) => ({ indirect: i % 2 === 1 }));
    });
  });
}
