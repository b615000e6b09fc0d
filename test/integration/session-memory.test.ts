// Guest memory tables of the real daemon, driven by the TypeScript front-end: SET_MEM_TABLE and ADD_MEM_REG,
// a 6 GiB sparse region above 4 GiB (rings and buffers straddling the daemon's 1 GiB view windows, a buffer
// ending at the region's last byte), data buffers spanning two adjacent regions, REM_MEM_REG of an unused
// region while the rings keep running, and a table replaced while the rings run.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlkRequestType, BlkStatus, encodeRequestHeader } from '../../protocol/virtio-blk.js';
import type { BufferSpec, GuestRegionSpec, VhostUserFrontend } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { GiB, KiB, MiB, connect, memfdMappingCount, pattern, sectorBytes, useCleanups, stopCleanly } from '../support/session-harness.js';

const defer = useCleanups();
let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ size: '64M', args: ['--num-queues', '2', '--metrics-listen', 'off'] });
});

afterAll(async () => {
  await stopCleanly(daemon);
});

const MEMORY_PATHS = ['table', 'add-mem-reg'] as const;

/**
 * One request built by hand from explicit guest ranges (the driver's planner keeps a request inside one region):
 * header at `headerGpa` (or the start of the first data buffer when `headerInData`), data buffers, status byte.
 * Writes the header and `out`, reads back what the device wrote. Returns status, used length and in-data.
 */
async function handBuiltRequest(
  frontend: VhostUserFrontend,
  queueIndex: number,
  request: { type: number; sector: number; out?: Buffer; inLength?: number },
  layout: { header: number | null; data: { gpa: number; len: number }[]; status: number; indirect?: boolean },
): Promise<{ status: number; usedLen: number; data: Buffer }> {
  const memory = frontend.memory;
  const queue = frontend.queue(queueIndex);
  const header = encodeRequestHeader({ type: request.type, ioprio: 0, sector: request.sector });
  const writable = request.type === BlkRequestType.IN || request.type === BlkRequestType.GET_ID;
  // The bytes of the data area, in chain order (header first when it shares the first descriptor).
  const stream = layout.header === null ? Buffer.concat([header, request.out ?? Buffer.alloc(0)]) : (request.out ?? Buffer.alloc(0));
  let at = 0;
  for (const piece of layout.data) {
    writeAcross(frontend, piece.gpa, writable ? Buffer.alloc(piece.len, 0xee) : stream.subarray(at, at + piece.len));
    at += piece.len;
  }
  if (layout.header !== null) memory.write(layout.header, header);
  memory.fill(layout.status, 1, 0xff);
  const buffers: BufferSpec[] = [
    ...(layout.header !== null ? [{ gpa: layout.header, len: header.length, writable: false }] : []),
    ...layout.data.map((piece) => ({ gpa: piece.gpa, len: piece.len, writable })),
    { gpa: layout.status, len: 1, writable: true },
  ];
  const token = Symbol('hand-built');
  const head = queue.addChain(buffers, { indirect: layout.indirect ?? false, token });
  queue.publish(head);
  queue.kick();
  const used = await queue.waitUsed({ min: 1 });
  const mine = used.find((element) => element.token === token);
  expect(mine, 'the hand-built request completed').toBeDefined();
  const data = writable ? Buffer.concat(layout.data.map((piece) => readAcross(frontend, piece.gpa, piece.len))) : Buffer.alloc(0);
  return { status: memory.read(layout.status, 1)[0] as number, usedLen: mine?.len ?? -1, data };
}

/** The front-end's memory accessors stay inside one region; these split a range at region boundaries. */
function writeAcross(frontend: VhostUserFrontend, gpa: number, bytes: Buffer): void {
  let done = 0;
  while (done < bytes.length) {
    const region = frontend.memory.regionFor(gpa + done);
    const take = Math.min(bytes.length - done, region.end - (gpa + done));
    frontend.memory.write(gpa + done, bytes.subarray(done, done + take));
    done += take;
  }
}

function readAcross(frontend: VhostUserFrontend, gpa: number, length: number): Buffer {
  const parts: Buffer[] = [];
  let done = 0;
  while (done < length) {
    const region = frontend.memory.regionFor(gpa + done);
    const take = Math.min(length - done, region.end - (gpa + done));
    parts.push(frontend.memory.read(gpa + done, take));
    done += take;
  }
  return Buffer.concat(parts);
}

describe('memory table messages', () => {
  const regions: GuestRegionSpec[] = [
    { gpa: 0, size: 16 * MiB },
    { gpa: 1 * GiB, size: 32 * MiB, fdOffset: 2 * MiB },
    { gpa: 3 * GiB, size: 8 * MiB },
  ];

  for (const memoryMessages of MEMORY_PATHS) {
    it(`${memoryMessages === 'table' ? 'SET_MEM_TABLE' : 'ADD_MEM_REG'}: three regions (one at an fd offset), I/O in each on both queues`, async () => {
      const { frontend, blk } = await connect(daemon, defer, {
        numQueues: 2,
        memory: regions,
        memoryMessages,
        ringPlacement: { region: 2 },
      });
      expect(frontend.queue(1).descGpa).toBeGreaterThanOrEqual(3 * GiB);
      for (let r = 0; r < regions.length; r++) {
        for (let q = 0; q < 2; q++) {
          const sector = 64 + r * 256 + q * 128;
          const data = pattern(r * 10 + q, 32 * KiB);
          await blk.write(sector, data, { queue: q, placement: { region: r } });
          expect((await blk.read(sector, data.length, { queue: 1 - q, placement: { region: r }, indirect: true })).equals(data)).toBe(true);
          expect(sectorBytes(daemon.imagePath, sector, data.length).equals(data), `region ${r} queue ${q}`).toBe(true);
        }
      }
    });
  }
});

describe('a 6 GiB sparse region at GPA 4 GiB', () => {
  const REGION_GPA = 4 * GiB;
  const REGION_SIZE = 6 * GiB;
  const REGION_END = REGION_GPA + REGION_SIZE;
  const memory: GuestRegionSpec[] = [
    { gpa: 0, size: 16 * MiB },
    { gpa: REGION_GPA, size: REGION_SIZE },
  ];

  for (const memoryMessages of MEMORY_PATHS) {
    it(`${memoryMessages}: rings straddle a 1 GiB window edge, buffers above 4 GiB, one ends at the region's last byte`, {
      timeout: 180_000,
    }, async () => {
      // Queue size 1024: the 16 KiB descriptor table of queue 0 runs across region offset 1 GiB (the first edge
      // between two of the daemon's views of this region).
      const ringStart = REGION_GPA + 1 * GiB - 8 * KiB;
      const { frontend, blk } = await connect(daemon, defer, {
        numQueues: 2,
        queueSize: 1024,
        memory,
        memoryMessages,
        ringPlacement: { region: 1, minAddress: ringStart },
      });
      expect(frontend.queue(0).descGpa).toBe(ringStart);
      for (const queue of frontend.queues) expect(queue.usedGpa).toBeGreaterThan(4 * GiB);

      // 9 GiB + a bit (region offset 5 GiB: the last window), both queues.
      const high = pattern(42, 128 * KiB);
      await blk.write(2048, high, { queue: 0, placement: { region: 1, minAddress: 9 * GiB + 123 * 4096 } });
      expect((await blk.read(2048, high.length, { queue: 1, placement: { region: 1, minAddress: 9 * GiB } })).equals(high)).toBe(true);
      expect(sectorBytes(daemon.imagePath, 2048, high.length).equals(high)).toBe(true);

      // Headers (read through the daemon's views) straddling the edges at region offsets 2, 3, 4 and 5 GiB.
      for (let edge = 2; edge <= 5; edge++) {
        const data = pattern(60 + edge, 16 * KiB);
        const sector = 4096 + edge * 64;
        const placement = { region: 1, minAddress: REGION_GPA + edge * GiB - 8, align: 8 };
        await blk.write(sector, data, { queue: edge % 2, placement, headerWithData: edge % 2 === 0 });
        expect(
          (await blk.read(sector, data.length, { queue: (edge + 1) % 2, placement, indirect: true })).equals(data),
          `edge ${edge} GiB`,
        ).toBe(true);
      }

      // Request buffers whose last byte (the status) is the region's last byte: a read, a 1 MiB read, a write, GET_ID.
      const tailPlacement = { region: 1, fromEnd: true, align: 1 };
      const tail = await blk.execute({ type: BlkRequestType.IN, sector: 2048, inLength: high.length }, { placement: tailPlacement });
      expect(tail.status).toBe(BlkStatus.OK);
      expect(tail.data.equals(high)).toBe(true);
      const big = pattern(43, 1 * MiB);
      await blk.write(8192, big, { queue: 1, placement: tailPlacement, statusWithData: true });
      const bigRead = await blk.execute(
        { type: BlkRequestType.IN, sector: 8192, inLength: big.length },
        { queue: 0, placement: tailPlacement, statusWithData: true },
      );
      expect([bigRead.status, bigRead.usedLen]).toEqual([BlkStatus.OK, big.length + 1]);
      expect(bigRead.data.equals(big)).toBe(true);
      expect(sectorBytes(daemon.imagePath, 8192, big.length).equals(big)).toBe(true);
      const id = await blk.execute({ type: BlkRequestType.GET_ID, inLength: 20 }, { placement: tailPlacement });
      expect(id.status).toBe(BlkStatus.OK);
      // The status byte really was the last byte of the region.
      const statusGpa = frontend.memory.alloc(1, tailPlacement);
      expect(statusGpa).toBe(REGION_END - 1);
      frontend.memory.free(statusGpa);

      // The low region still works next to it.
      expect((await blk.read(2048, 4096, { queue: 1, placement: { region: 0 } })).equals(high.subarray(0, 4096))).toBe(true);
    });
  }
});

describe('a data buffer spanning two adjacent regions', () => {
  const BOUNDARY = 16 * MiB;
  const memory: GuestRegionSpec[] = [
    { gpa: 0, size: BOUNDARY },
    { gpa: BOUNDARY, size: 16 * MiB },
  ];

  for (const memoryMessages of MEMORY_PATHS) {
    it(`${memoryMessages}: one descriptor crossing the boundary is split into iovecs of both regions`, async () => {
      const { frontend } = await connect(daemon, defer, { numQueues: 2, memory, memoryMessages });
      const mem = frontend.memory;
      const header = mem.alloc(16, { region: 0 });
      const status = mem.alloc(1, { region: 0 });
      for (const [i, indirect] of [false, true].entries()) {
        const half = 64 * KiB;
        const low = mem.alloc(half, { region: 0, fromEnd: true, align: 512 });
        const highPart = mem.alloc(half, { region: 1, minAddress: BOUNDARY });
        expect([low + half, highPart]).toEqual([BOUNDARY, BOUNDARY]);
        const data = pattern(80 + i, 2 * half);
        const sector = 512 + i * 512;
        const layout = { header, data: [{ gpa: low, len: 2 * half }], status, indirect };
        const write = await handBuiltRequest(frontend, i, { type: BlkRequestType.OUT, sector, out: data }, layout);
        expect([write.status, write.usedLen], `spanning write, indirect ${indirect}`).toEqual([BlkStatus.OK, 1]);
        expect(sectorBytes(daemon.imagePath, sector, data.length).equals(data), 'image after the spanning write').toBe(true);
        const read = await handBuiltRequest(frontend, 1 - i, { type: BlkRequestType.IN, sector, inLength: data.length }, layout);
        expect([read.status, read.usedLen], `spanning read, indirect ${indirect}`).toEqual([BlkStatus.OK, data.length + 1]);
        expect(read.data.equals(data), 'both halves of the spanning read').toBe(true);
        mem.free(low);
        mem.free(highPart);
      }

      // The header itself straddles the boundary: header and data in one readable descriptor.
      const before = mem.alloc(8, { region: 0, fromEnd: true });
      const data = pattern(90, 8 * KiB);
      const after = mem.alloc(8 + data.length, { region: 1, minAddress: BOUNDARY });
      expect([before + 8, after]).toEqual([BOUNDARY, BOUNDARY]);
      const write = await handBuiltRequest(
        frontend,
        0,
        { type: BlkRequestType.OUT, sector: 3000, out: data },
        {
          header: null,
          data: [{ gpa: before, len: 16 + data.length }],
          status,
        },
      );
      expect(write.status, 'header split across regions').toBe(BlkStatus.OK);
      expect(sectorBytes(daemon.imagePath, 3000, data.length).equals(data)).toBe(true);
    });
  }
});

describe('changing the table while the rings run', () => {
  it('REM_MEM_REG of an unused region: unmapped at once, the rings keep working; ADD_MEM_REG brings it back', async () => {
    const pid = daemon.child.pid as number;
    const memory: GuestRegionSpec[] = [
      { gpa: 0, size: 16 * MiB, name: 'vublk-rem-0' },
      { gpa: 64 * MiB, size: 16 * MiB, name: 'vublk-rem-1' },
      { gpa: 2 * GiB, size: 16 * MiB, name: 'vublk-rem-2' },
    ];
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2, memory, memoryMessages: 'add-mem-reg' });
    expect(memfdMappingCount(pid, 'vublk-rem-2')).toBe(1);
    const inRegion2 = pattern(200, 16 * KiB);
    await blk.write(100, inRegion2, { queue: 0, placement: { region: 2 } });

    // Requests in flight on both queues (buffers in regions 0 and 1) while region 2 goes away.
    const batch = Array.from({ length: 16 }, (_, i) => ({
      type: BlkRequestType.OUT,
      sector: 1000 + i * 32,
      out: pattern(300 + i, 16 * KiB),
      options: { queue: i % 2, placement: { region: i % 2 } },
    }));
    const submissions = batch.map((request) => blk.submit(request, { ...request.options, kick: false }));
    blk.kick(0);
    blk.kick(1);
    await frontend.remMemReg(2);
    const done = await blk.wait(submissions);
    expect(done.map((c) => c.status)).toEqual(Array(16).fill(BlkStatus.OK));
    expect(memfdMappingCount(pid, 'vublk-rem-2'), 'the removed region is unmapped by the time REM_MEM_REG is acked').toBe(0);
    expect(memfdMappingCount(pid, 'vublk-rem-0')).toBe(1);
    for (const [i, request] of batch.entries()) {
      expect((await blk.read(request.sector, request.out.length, { queue: 1 - (i % 2) })).equals(request.out), `request ${i}`).toBe(true);
    }

    // A request whose data lies in the removed region: IOERR (header and status stay in region 0).
    const header = frontend.memory.alloc(16, { region: 0 });
    const status = frontend.memory.alloc(1, { region: 0 });
    const gone = frontend.memory.alloc(4096, { region: 2 });
    const refused = await handBuiltRequest(
      frontend,
      1,
      { type: BlkRequestType.IN, sector: 100, inLength: 4096 },
      { header, data: [{ gpa: gone, len: 4096 }], status },
    );
    expect(refused.status).toBe(BlkStatus.IOERR);

    // Back in: the same buffer works again.
    await frontend.addMemReg(2);
    expect(memfdMappingCount(pid, 'vublk-rem-2')).toBe(1);
    const back = await handBuiltRequest(
      frontend,
      1,
      { type: BlkRequestType.IN, sector: 100, inLength: 4096 },
      { header, data: [{ gpa: gone, len: 4096 }], status },
    );
    expect(back.status).toBe(BlkStatus.OK);
    expect(back.data.equals(inRegion2.subarray(0, 4096))).toBe(true);
  });

  it('SET_MEM_TABLE again while the rings run: smaller table, then the full one; old mappings are released', async () => {
    const pid = daemon.child.pid as number;
    const memory: GuestRegionSpec[] = [
      { gpa: 0, size: 16 * MiB, name: 'vublk-swap-0' },
      { gpa: 1 * GiB, size: 16 * MiB, name: 'vublk-swap-1' },
    ];
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2, memory });
    const wire = frontend.memory.wireRegions();
    const fds = frontend.memory.fds;
    await blk.write(50, pattern(1, 4096), { placement: { region: 1 } });
    expect(memfdMappingCount(pid, 'vublk-swap-')).toBe(2);

    await frontend.setMemTable([wire[0]!], [fds[0]!]);
    expect(memfdMappingCount(pid, 'vublk-swap-1')).toBe(0);
    expect(
      (await blk.execute({ type: BlkRequestType.IN, sector: 50, inLength: 4096 }, { queue: 1, placement: { region: 0 } })).status,
    ).toBe(BlkStatus.OK);
    // A request buffer entirely in the dropped region (status included) is not even completed: no used entry.
    const lost = blk.submit({ type: BlkRequestType.IN, sector: 50, inLength: 4096 }, { queue: 0, placement: { region: 1 } });
    await expect(blk.wait(lost, 300)).rejects.toThrow(/not completed/);

    await frontend.setMemTable();
    expect(memfdMappingCount(pid, 'vublk-swap-')).toBe(2);
    for (let q = 0; q < 2; q++) {
      expect(
        (await blk.read(50, 4096, { queue: q, placement: { region: 1 } })).equals(pattern(1, 4096)),
        `queue ${q} after the full table`,
      ).toBe(true);
    }
  });
});
