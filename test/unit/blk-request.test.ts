import { describe, expect, it } from 'vitest';
import { BlkRequestType, BlkStatus, encodeRequestHeader, encodeDiscardSegment } from '../../protocol/virtio-blk.js';
import { ChainScratch } from '../../src/dataplane/descriptor-chain.js';
import { BlkRequest, Disposition, parseRequest, readDiscardSegments } from '../../src/dataplane/blk-request.js';
import type { DeviceLimits } from '../../src/dataplane/device-limits.js';
import { memoryFixture, GUEST_BASE } from './guest-memory-fixture.js';

const limits: DeviceLimits = {
  sizeMax: 65536,
  segMax: 8,
  logicalBlockSize: 512,
  readOnly: false,
  serial: new Uint8Array(20),
  maxDiscardSectors: 1024,
  maxDiscardSeg: 2,
  maxWriteZeroesSectors: 1024,
  maxWriteZeroesSeg: 2,
};
const CAPACITY = 1 << 20;

interface Desc {
  addr: number;
  len: number;
  write?: boolean;
}

function setup(
  type: number,
  sector: number,
  descs: (fx: ReturnType<typeof memoryFixture>) => Desc[],
  overrides: Partial<DeviceLimits> = {},
) {
  const fx = memoryFixture();
  fx.bytes.set(encodeRequestHeader({ type, ioprio: 0, sector }), 0);
  const chain = new ChainScratch(limits.segMax + 2);
  const list = descs(fx);
  list.forEach((d, i) => {
    chain.addr[i] = d.addr;
    chain.len[i] = d.len;
    chain.writable[i] = d.write ? 1 : 0;
  });
  chain.count = list.length;
  const request = new BlkRequest(limits.segMax + 2);
  const disposition = parseRequest(fx.memory, chain, { ...limits, ...overrides }, CAPACITY, request);
  return { fx, request, disposition };
}

const header = (fx: ReturnType<typeof memoryFixture>): Desc => ({ addr: fx.gpa(0), len: 16 });
const status = (fx: ReturnType<typeof memoryFixture>): Desc => ({ addr: fx.gpa(4096), len: 1, write: true });

describe('request framing (byte-stream view)', () => {
  it('accepts the classic header / data / status layout', () => {
    const { request, disposition } = setup(BlkRequestType.IN, 8, (fx) => [
      header(fx),
      { addr: fx.gpa(8192), len: 4096, write: true },
      status(fx),
    ]);
    expect(disposition).toBe(Disposition.Execute);
    expect(request.sector).toBe(8);
    expect(request.dataBytes).toBe(4096);
    expect(request.statusGpa).toBe(GUEST_BASE + 4096);
  });

  it('accepts header and data in one descriptor (OUT)', () => {
    const { request, disposition } = setup(BlkRequestType.OUT, 0, (fx) => [{ addr: fx.gpa(0), len: 16 + 1024 }, status(fx)]);
    expect(disposition).toBe(Disposition.Execute);
    expect(request.segCount).toBe(1);
    expect(request.segGpa[0]).toBe(GUEST_BASE + 16);
    expect(request.dataBytes).toBe(1024);
  });

  it('accepts data and status in one descriptor (IN): status is the last byte', () => {
    const { request, disposition } = setup(BlkRequestType.IN, 0, (fx) => [header(fx), { addr: fx.gpa(8192), len: 513, write: true }]);
    expect(disposition).toBe(Disposition.Execute);
    expect(request.dataBytes).toBe(512);
    expect(request.statusGpa).toBe(GUEST_BASE + 8192 + 512);
  });

  it('reads a header split across descriptors', () => {
    const { request, disposition } = setup(BlkRequestType.IN, 24, (fx) => [
      { addr: fx.gpa(0), len: 5 },
      { addr: fx.gpa(5), len: 11 },
      { addr: fx.gpa(8192), len: 512, write: true },
      status(fx),
    ]);
    expect(disposition).toBe(Disposition.Execute);
    expect(request.sector).toBe(24);
  });

  it('drops a chain whose last descriptor is not device-writable', () => {
    const { disposition } = setup(BlkRequestType.IN, 0, (fx) => [header(fx), { addr: fx.gpa(8192), len: 512 }]);
    expect(disposition).toBe(Disposition.Drop);
  });

  it('drops a chain whose status descriptor has length 0', () => {
    const { disposition } = setup(BlkRequestType.FLUSH, 0, (fx) => [header(fx), { addr: fx.gpa(4096), len: 0, write: true }]);
    expect(disposition).toBe(Disposition.Drop);
  });

  it('drops a chain whose status byte is outside guest memory', () => {
    const { disposition } = setup(BlkRequestType.FLUSH, 0, (fx) => [header(fx), { addr: fx.gpa(1 << 20), len: 1, write: true }]);
    expect(disposition).toBe(Disposition.Drop);
  });

  it('drops a chain whose status address overflows', () => {
    const { disposition } = setup(BlkRequestType.FLUSH, 0, (fx) => [header(fx), { addr: Infinity, len: 1, write: true }]);
    expect(disposition).toBe(Disposition.Drop);
  });

  it('fails a header shorter than 16 readable bytes with IOERR', () => {
    const { request, disposition } = setup(BlkRequestType.FLUSH, 0, (fx) => [{ addr: fx.gpa(0), len: 8 }, status(fx)]);
    expect(disposition).toBe(Disposition.Complete);
    expect(request.status).toBe(BlkStatus.IOERR);
  });

  it('fails a header outside guest memory with IOERR', () => {
    const { request } = setup(BlkRequestType.FLUSH, 0, (fx) => [{ addr: fx.gpa(1 << 21), len: 16 }, status(fx)]);
    expect(request.status).toBe(BlkStatus.IOERR);
  });

  it('fails a readable descriptor after a writable one with IOERR', () => {
    const { request, disposition } = setup(BlkRequestType.OUT, 0, (fx) => [
      header(fx),
      { addr: fx.gpa(9000), len: 1, write: true },
      { addr: fx.gpa(8192), len: 512 },
      status(fx),
    ]);
    expect(disposition).toBe(Disposition.Complete);
    expect(request.status).toBe(BlkStatus.IOERR);
  });
});

describe('data rules', () => {
  const cases: [string, number, (fx: ReturnType<typeof memoryFixture>) => Desc[], Partial<DeviceLimits>?][] = [
    ['IN without data', BlkRequestType.IN, (fx) => [header(fx), status(fx)]],
    ['OUT without data', BlkRequestType.OUT, (fx) => [header(fx), status(fx)]],
    ['GET_ID without data', BlkRequestType.GET_ID, (fx) => [header(fx), status(fx)]],
    ['FLUSH with data', BlkRequestType.FLUSH, (fx) => [header(fx), { addr: fx.gpa(8192), len: 512 }, status(fx)]],
    ['IN with sub-sector data', BlkRequestType.IN, (fx) => [header(fx), { addr: fx.gpa(8192), len: 100, write: true }, status(fx)]],
    ['OUT with sub-sector data', BlkRequestType.OUT, (fx) => [header(fx), { addr: fx.gpa(8192), len: 700 }, status(fx)]],
    ['IN with device-readable data', BlkRequestType.IN, (fx) => [header(fx), { addr: fx.gpa(8192), len: 512 }, status(fx)]],
    ['OUT with device-writable data', BlkRequestType.OUT, (fx) => [header(fx), { addr: fx.gpa(8192), len: 512, write: true }, status(fx)]],
    ['GET_ID with device-readable data', BlkRequestType.GET_ID, (fx) => [header(fx), { addr: fx.gpa(8192), len: 20 }, status(fx)]],
    [
      'a data segment over size_max',
      BlkRequestType.IN,
      (fx) => [header(fx), { addr: fx.gpa(8192), len: 8192, write: true }, status(fx)],
      { sizeMax: 4096 },
    ],
    [
      'data outside guest memory',
      BlkRequestType.IN,
      (fx) => [header(fx), { addr: fx.gpa((1 << 20) - 256), len: 512, write: true }, status(fx)],
    ],
    [
      'IN not aligned to a 4096-byte block',
      BlkRequestType.IN,
      (fx) => [header(fx), { addr: fx.gpa(8192), len: 512, write: true }, status(fx)],
      { logicalBlockSize: 4096 },
    ],
    ['OUT on a read-only disk', BlkRequestType.OUT, (fx) => [header(fx), { addr: fx.gpa(8192), len: 512 }, status(fx)], { readOnly: true }],
    [
      'DISCARD on a read-only disk',
      BlkRequestType.DISCARD,
      (fx) => [header(fx), { addr: fx.gpa(8192), len: 16 }, status(fx)],
      { readOnly: true },
    ],
    [
      'WRITE_ZEROES on a read-only disk',
      BlkRequestType.WRITE_ZEROES,
      (fx) => [header(fx), { addr: fx.gpa(8192), len: 16 }, status(fx)],
      { readOnly: true },
    ],
    ['DISCARD with a partial segment', BlkRequestType.DISCARD, (fx) => [header(fx), { addr: fx.gpa(8192), len: 24 }, status(fx)]],
  ];
  for (const [name, type, descs, overrides] of cases) {
    it(`fails ${name} with IOERR`, () => {
      const { request, disposition } = setup(type, 0, descs, overrides);
      expect(disposition).toBe(Disposition.Complete);
      expect(request.status).toBe(BlkStatus.IOERR);
    });
  }

  it('fails a range past the capacity with IOERR', () => {
    const { request } = setup(BlkRequestType.IN, CAPACITY / 512 - 1, (fx) => [
      header(fx),
      { addr: fx.gpa(8192), len: 1024, write: true },
      status(fx),
    ]);
    expect(request.status).toBe(BlkStatus.IOERR);
  });

  it('fails a sector number beyond 2^53 with IOERR', () => {
    const { request } = setup(BlkRequestType.IN, 0, (fx) => {
      fx.view.setUint32(12, 0xffffffff, true);
      return [header(fx), { addr: fx.gpa(8192), len: 512, write: true }, status(fx)];
    });
    expect(request.sector).toBe(Infinity);
    expect(request.status).toBe(BlkStatus.IOERR);
  });

  it('answers an unknown type with UNSUPP', () => {
    const { request, disposition } = setup(99, 0, (fx) => [header(fx), status(fx)]);
    expect(disposition).toBe(Disposition.Complete);
    expect(request.status).toBe(BlkStatus.UNSUPP);
  });

  it('completes FLUSH on a read-only disk with OK and no I/O', () => {
    const { request, disposition } = setup(BlkRequestType.FLUSH, 0, (fx) => [header(fx), status(fx)], { readOnly: true });
    expect(disposition).toBe(Disposition.Complete);
    expect(request.status).toBe(BlkStatus.OK);
  });

  it('answers more discard segments than advertised with UNSUPP', () => {
    const { request, disposition } = setup(BlkRequestType.DISCARD, 0, (fx) => [header(fx), { addr: fx.gpa(8192), len: 48 }, status(fx)]);
    expect(disposition).toBe(Disposition.Complete);
    expect(request.status).toBe(BlkStatus.UNSUPP);
  });

  it('fails FLUSH whose status descriptor carries extra writable bytes with IOERR', () => {
    const { request } = setup(BlkRequestType.FLUSH, 0, (fx) => [header(fx), { addr: fx.gpa(4096), len: 4, write: true }]);
    expect(request.status).toBe(BlkStatus.IOERR);
  });
});

describe('discard and write-zeroes segments', () => {
  function discard(type: number, segments: { sector: number; numSectors: number; flags: number }[]) {
    const { fx, request, disposition } = setup(type, 0, (f) => [header(f), { addr: f.gpa(8192), len: 16 * segments.length }, status(f)]);
    segments.forEach((s, i) => fx.bytes.set(encodeDiscardSegment(s), 8192 + 16 * i));
    expect(disposition).toBe(Disposition.Execute);
    return readDiscardSegments(fx.memory, request, limits, CAPACITY);
  }

  it('returns validated byte ranges', () => {
    expect(discard(BlkRequestType.WRITE_ZEROES, [{ sector: 8, numSectors: 16, flags: 1 }])).toEqual([
      { offset: 4096, length: 8192, unmap: true },
    ]);
  });

  it('ignores the unmap flag on DISCARD', () => {
    expect(discard(BlkRequestType.DISCARD, [{ sector: 0, numSectors: 1, flags: 1 }])).toEqual([{ offset: 0, length: 512, unmap: false }]);
  });

  it('answers reserved flag bits with UNSUPP', () => {
    expect(discard(BlkRequestType.DISCARD, [{ sector: 0, numSectors: 1, flags: 2 }])).toMatchObject({ status: BlkStatus.UNSUPP });
  });

  it('fails more sectors than advertised with IOERR', () => {
    expect(discard(BlkRequestType.WRITE_ZEROES, [{ sector: 0, numSectors: 2048, flags: 0 }])).toMatchObject({ status: BlkStatus.IOERR });
  });

  it('fails a segment past the capacity with IOERR', () => {
    expect(discard(BlkRequestType.DISCARD, [{ sector: CAPACITY / 512, numSectors: 1, flags: 0 }])).toMatchObject({
      status: BlkStatus.IOERR,
    });
  });
});
