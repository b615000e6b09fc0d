/**
 * Seeded random workloads through a qcow2 handle (writes of random sizes and offsets, discards,
 * write-zeroes, flushes, read checks) on images made by `qemu-img create`, cluster sizes 4 KiB, 64 KiB and
 * 2 MiB, with and without a backing file, versions 3 and 2. Afterwards `qemu-img check` must find no
 * errors and no leaks, and `qemu-img compare` must find the image identical to the model written as raw.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Qcow2Handle, attachLayer, openImage, type WriteExtent } from '../../src/backend/qcow2/index.js';
import { seedFromEnv } from '../support/prng.js';
import {
  makeWorkload,
  patternFor,
  qemuImg,
  qemuImgCheck,
  qemuImgCompare,
  qemuImgSkipReason,
  readThrough,
  runWorkload,
  writeThrough,
} from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const MiB = 1024 * 1024;
const DISK = 48 * MiB;
const SEED = seedFromEnv('QCOW2_SEED');
let dir = '';

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2-'));
  console.log(`qcow2 workload seed ${SEED} (replay with QCOW2_SEED=${SEED})`);
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function attachTop(file: string, l2CacheBytes?: number): Qcow2Handle {
  const layer = attachLayer(openImage(file, { format: 'qcow2', warn: () => {}, ...(l2CacheBytes ? { l2CacheBytes } : {}) }));
  if (!(layer instanceof Qcow2Handle)) throw new Error('not qcow2');
  return layer;
}

const cases: Array<{ cluster: number; backing: boolean; compat: string; l2CacheBytes?: number }> = [
  { cluster: 4096, backing: false, compat: '1.1' },
  // 4 cache slots for 24 L2 tables: constant eviction
  { cluster: 4096, backing: true, compat: '1.1', l2CacheBytes: 4 * 4096 },
  { cluster: 4096, backing: true, compat: '1.1' },
  { cluster: 65536, backing: false, compat: '1.1' },
  { cluster: 65536, backing: true, compat: '1.1' },
  { cluster: 2 * MiB, backing: false, compat: '1.1' },
  { cluster: 2 * MiB, backing: true, compat: '1.1' },
  { cluster: 65536, backing: false, compat: '0.10' },
  { cluster: 65536, backing: true, compat: '0.10' },
];

describe.skipIf(skip !== null)('qcow2 random workload checked by qemu-img', () => {
  for (const c of cases) {
    it(`cluster ${c.cluster / 1024} KiB, ${c.backing ? 'with' : 'without'} backing, compat ${c.compat}${c.l2CacheBytes ? `, ${c.l2CacheBytes / c.cluster}-slot L2 cache` : ''}`, () => {
      const name = `w-${c.cluster}-${c.backing}-${c.compat}-${c.l2CacheBytes ?? 0}`;
      const top = path.join(dir, `${name}.qcow2`);
      const rawModel = path.join(dir, `${name}.model.raw`);
      const model = Buffer.alloc(DISK);
      const backingView = Buffer.alloc(DISK); // what the backing file shows at each offset (zeroes past its end)
      if (c.backing) {
        const base = path.join(dir, `${name}.base.raw`);
        const baseData = patternFor(SEED ^ 0x5a5a, DISK - 3 * MiB); // shorter than the overlay: the tail reads as zeroes
        fs.writeFileSync(base, baseData);
        baseData.copy(model);
        baseData.copy(backingView);
        qemuImg(
          'create',
          '-q',
          '-f',
          'qcow2',
          '-o',
          `cluster_size=${c.cluster},compat=${c.compat}`,
          '-b',
          path.basename(base),
          '-F',
          'raw',
          top,
          String(DISK),
        );
      } else {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${c.cluster},compat=${c.compat}`, top, String(DISK));
      }
      const ops = makeWorkload(SEED + c.cluster + (c.backing ? 1 : 0) + (c.compat === '0.10' ? 2 : 0), DISK, c.cluster, 260);
      const handle = attachTop(top, c.l2CacheBytes);
      try {
        runWorkload(handle, model, ops, c.cluster, c.compat === '0.10' && c.backing ? backingView : undefined);
      } finally {
        handle.close();
      }
      fs.writeFileSync(rawModel, model);
      const check = qemuImgCheck(top);
      expect(check.output).toContain('No errors were found');
      expect(check.status).toBe(0);
      const compare = qemuImgCompare(top, 'qcow2', rawModel, 'raw');
      expect(compare.output).toContain('Images are identical');
      // and a fresh handle reads back the whole model
      const again = attachTop(top);
      try {
        expect(readThrough(again, 0, DISK).equals(model)).toBe(true);
      } finally {
        again.close();
      }
    });
  }
});

describe.skipIf(skip !== null)('write-zeroes without unmap', () => {
  it('keeps the cluster allocated under the zero flag and reuses it for the next write', () => {
    const image = path.join(dir, 'keep.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(4 * MiB));
    const handle = attachTop(image);
    const mapOf = (): Array<{ start: number; zero: boolean; data: boolean; offset?: number }> =>
      JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', image));
    try {
      writeThrough(handle, 65536, patternFor(1, 65536));
      const before = mapOf().find((m) => m.start === 65536)!;
      expect(before.data).toBe(true);
      expect(handle.writeZeroes(65536, 65536, false)).toBe(0);
      const zeroed = mapOf().find((m) => m.start === 65536)!;
      expect(zeroed).toMatchObject({ zero: true, data: false, offset: before.offset });
      expect(readThrough(handle, 65536, 65536).every((b) => b === 0)).toBe(true);
      writeThrough(handle, 65536 + 4096, patternFor(2, 4096));
      const reused = mapOf().find((m) => m.start === 65536)!;
      expect(reused).toMatchObject({ data: true, offset: before.offset });
      const expected = Buffer.alloc(65536);
      patternFor(2, 4096).copy(expected, 4096);
      expect(readThrough(handle, 65536, 65536).equals(expected)).toBe(true);
      expect(handle.writeZeroes(65536, 65536, true)).toBe(0);
      expect(mapOf().find((m) => m.start === 65536)).toMatchObject({ zero: true, data: false });
      expect(mapOf().find((m) => m.start === 65536)?.offset).toBeUndefined();
    } finally {
      handle.close();
    }
    expect(qemuImgCheck(image).output).toContain('No errors were found');
  });
});

describe.skipIf(skip !== null)('an in-place write racing a discard of its cluster', () => {
  it('the discarded cluster is not reused for other data while the write is in flight', () => {
    const image = path.join(dir, 'race.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(16 * MiB));
    const handle = attachTop(image);
    try {
      writeThrough(handle, 0, patternFor(1, 65536)); // guest cluster 0 allocated
      const extents: WriteExtent[] = [];
      const ticket = handle.prepareWrite(0, 4096, extents); // in place, not completed yet
      expect(ticket).toBeGreaterThan(0);
      const racingHost = extents[0]!.hostOffset;
      expect(handle.discard(0, 65536)).toBe(0); // the guest discards the same cluster meanwhile
      // other guest clusters are written (past the allocation reserve, so freed clusters get reused):
      // none may land on the cluster the in-flight write targets
      for (let c = 1; c < 220; c++) {
        const other: WriteExtent[] = [];
        const t = handle.prepareWrite(c * 65536, 65536, other);
        for (const e of other) expect(Math.floor(e.hostOffset / 65536)).not.toBe(Math.floor(racingHost / 65536));
        const data = patternFor(100 + c, 65536);
        let at = 0;
        for (const e of other) {
          fs.writeSync(e.fd, data, at, e.length, e.hostOffset);
          at += e.length;
        }
        handle.commitWrite(t);
      }
      fs.writeSync(extents[0]!.fd, Buffer.alloc(4096, 0xee), 0, 4096, racingHost); // the late write lands
      handle.commitWrite(ticket);
      handle.flush(); // the deferred free happens now
      for (let c = 1; c < 220; c++) expect(readThrough(handle, c * 65536, 65536).equals(patternFor(100 + c, 65536))).toBe(true);
    } finally {
      handle.close();
    }
    expect(qemuImgCheck(image).output).toContain('No errors were found');
  });
});

describe.skipIf(skip !== null)('thin provisioning', () => {
  it('DISCARD gives the freed clusters back to the file system', () => {
    const image = path.join(dir, 'thin.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(32 * MiB));
    const handle = attachTop(image);
    try {
      for (let at = 0; at < 16 * MiB; at += MiB) writeThrough(handle, at, patternFor(at, MiB));
      handle.flush();
      const full = fs.statSync(image).blocks * 512;
      expect(full).toBeGreaterThanOrEqual(16 * MiB);
      expect(handle.discard(0, 16 * MiB)).toBe(0);
      handle.flush();
      const after = fs.statSync(image).blocks * 512;
      expect(after).toBeLessThan(full - 15 * MiB);
      expect(readThrough(handle, 0, MiB).every((b) => b === 0)).toBe(true);
    } finally {
      handle.close();
    }
    expect(qemuImgCheck(image).output).toContain('No errors were found');
  });
});
