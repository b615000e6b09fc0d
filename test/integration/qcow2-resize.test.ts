/**
 * Live resize grows the virtual size for every handle of the image; when the L1 table is full it is moved
 * to new clusters. `qemu-img check` stays clean and the content matches a sparse raw mirror.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Qcow2Error, type Qcow2Handle, attachLayer, openImage } from '../../src/backend/qcow2/index.js';
import {
  patternFor,
  qemuImg,
  qemuImgCheck,
  qemuImgCompare,
  qemuImgSkipReason,
  readThrough,
  writeThrough,
} from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
let dir = '';
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2resize-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe.skipIf(skip !== null)('qcow2 live resize', () => {
  it('grows within the L1 table and past it (L1 moved), seen by every handle', () => {
    const image = path.join(dir, 'grow.qcow2');
    const mirror = path.join(dir, 'grow.raw');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, String(MiB));
    const description = openImage(image, { format: 'qcow2', warn: () => {} });
    const a = attachLayer(description) as Qcow2Handle;
    const b = attachLayer(description) as Qcow2Handle;
    const mirrorFd = fs.openSync(mirror, 'w+');
    const write = (offset: number, length: number, seed: number): void => {
      const data = patternFor(seed, length);
      writeThrough(a, offset, data);
      fs.writeSync(mirrorFd, data, 0, length, offset);
    };
    try {
      write(4096 + 512, 64 * 1024, 1);
      a.resize(512 * MiB); // L1 grows in place (one 4 KiB L1 cluster holds 512 entries = 1 GiB)
      expect(b.size).toBe(512 * MiB);
      write(500 * MiB, 300 * 1024, 2);
      a.resize(3 * GiB); // needs 1536 L1 entries: the table moves
      expect(b.size).toBe(3 * GiB);
      write(3 * GiB - 8192, 8192, 3);
      write(2 * GiB + 12345 * 512, 70000 * 2 - ((70000 * 2) % 512), 4);
      expect(() => a.resize(GiB)).toThrow(Qcow2Error);
      expect(readThrough(b, 3 * GiB - 8192, 8192).equals(patternFor(3, 8192))).toBe(true);
      expect(readThrough(b, 4096 + 512, 64 * 1024).equals(patternFor(1, 64 * 1024))).toBe(true);
    } finally {
      a.close();
      b.close();
    }
    fs.ftruncateSync(mirrorFd, 3 * GiB);
    fs.closeSync(mirrorFd);
    expect(qemuImg('info', '--output=json', image)).toContain(`"virtual-size": ${3 * GiB}`);
    expect(qemuImgCheck(image).output).toContain('No errors were found');
    expect(qemuImgCompare(image, 'qcow2', mirror, 'raw').output).toContain('Images are identical');
  });

  it('allocations past what the refcount table covers grow the refcount table', () => {
    // 4 KiB clusters with 64-bit refcounts: one refcount block covers 2 MiB, the one-cluster table 1 GiB.
    // Metadata preallocation fills ~1 GiB of host clusters, so new allocations need table entry 512+.
    const image = path.join(dir, 'rt-grow.qcow2');
    const mirror = path.join(dir, 'rt-grow.raw');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=64,preallocation=metadata', image, String(1000 * MiB));
    const tableClusters = (): number => {
      const b = Buffer.alloc(4);
      const fd = fs.openSync(image, 'r');
      fs.readSync(fd, b, 0, 4, 56);
      fs.closeSync(fd);
      return b.readUInt32BE(0);
    };
    expect(tableClusters()).toBe(1);
    const handle = attachLayer(openImage(image, { format: 'qcow2', warn: () => {} })) as Qcow2Handle;
    const mirrorFd = fs.openSync(mirror, 'w+');
    try {
      handle.resize(1100 * MiB);
      for (let i = 0; i < 12; i++) {
        const data = patternFor(100 + i, 4 * MiB);
        const offset = 1000 * MiB + i * 8 * MiB;
        writeThrough(handle, offset, data);
        fs.writeSync(mirrorFd, data, 0, data.length, offset);
      }
      expect(readThrough(handle, 1000 * MiB + 88 * MiB, 4 * MiB).equals(patternFor(111, 4 * MiB))).toBe(true);
    } finally {
      handle.close();
    }
    fs.ftruncateSync(mirrorFd, 1100 * MiB);
    fs.closeSync(mirrorFd);
    expect(tableClusters()).toBeGreaterThan(1);
    expect(qemuImgCheck(image).output).toContain('No errors were found');
    expect(qemuImgCompare(image, 'qcow2', mirror, 'raw').output).toContain('Images are identical');
  });
});
