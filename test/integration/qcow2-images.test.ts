/**
 * Images made by other tools read back exactly what `qemu-img convert -O raw` gives: compressed images
 * (`qemu-img convert -c`), images with internal snapshots (`qemu-img snapshot -c`), and a
 * qcow2 → qcow2 → raw backing chain named with relative paths. Writes on top of them leave a clean image
 * (`qemu-img check`), identical to the model, and leave internal snapshots intact (`qemu-img snapshot -a`).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { Qcow2Handle, attachLayer, openImage } from '../../src/backend/qcow2/index.js';
import { Prng } from '../support/prng.js';
import {
  makeWorkload,
  qemuImg,
  qemuImgCheck,
  qemuImgCompare,
  qemuImgSkipReason,
  readThrough,
  runWorkload,
} from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const MiB = 1024 * 1024;
let dir = '';

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2img-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function attachTop(file: string, readOnly = false): Qcow2Handle {
  const layer = attachLayer(openImage(file, { format: 'qcow2', readOnly, warn: () => {} }));
  if (!(layer instanceof Qcow2Handle)) throw new Error('not qcow2');
  return layer;
}

/** Compressible but varied content: random runs, repeated bytes and holes. */
function mixedContent(seed: number, length: number): Buffer {
  const rng = new Prng(seed);
  const data = Buffer.alloc(length);
  for (let at = 0; at < length; ) {
    const n = Math.min(length - at, rng.int(1, 64) * 1024);
    const kind = rng.int(0, 2);
    if (kind === 0) rng.fill(data.subarray(at, at + n));
    else if (kind === 1) data.fill(rng.int(1, 255), at, at + n);
    at += n;
  }
  return data;
}

function convertToRaw(image: string, extra: string[] = []): Buffer {
  const out = path.join(dir, `conv-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg('convert', ...extra, '-O', 'raw', image, out);
  const data = fs.readFileSync(out);
  fs.rmSync(out);
  return data;
}

function qemuIo(image: string, format: string, ...commands: string[]): void {
  const args = ['-f', format];
  for (const c of commands) args.push('-c', c);
  execFileSync('qemu-io', [...args, image], { timeout: 60_000 });
}

function writeModelAndCompare(image: string, model: Buffer): void {
  const raw = `${image}.model.raw`;
  fs.writeFileSync(raw, model);
  const check = qemuImgCheck(image);
  expect(check.output).toContain('No errors were found');
  expect(qemuImgCompare(image, 'qcow2', raw, 'raw').output).toContain('Images are identical');
}

describe.skipIf(skip !== null)('qcow2 images made by qemu-img', () => {
  for (const cluster of [4096, 65536]) {
    it(`compressed image (convert -c, cluster ${cluster / 1024} KiB) reads back as convert -O raw, then takes writes`, () => {
      const size = 12 * MiB;
      const source = path.join(dir, `src-${cluster}.raw`);
      fs.writeFileSync(source, mixedContent(cluster, size));
      const image = path.join(dir, `comp-${cluster}.qcow2`);
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, source, image);
      const expected = convertToRaw(image);
      const handle = attachTop(image);
      try {
        expect(readThrough(handle, 0, size).equals(expected)).toBe(true);
        const model = Buffer.from(expected);
        runWorkload(handle, model, makeWorkload(cluster + 7, size, cluster, 150), cluster);
        handle.close();
        writeModelAndCompare(image, model);
      } finally {
        handle.close();
      }
    });
  }

  for (const cluster of [4096, 65536, 2 * MiB])
    it(`internal snapshots, cluster ${cluster / 1024} KiB: reads match, writes never touch the snapshot (snapshot -a then compare)`, () => {
      const size = 16 * MiB;
      const image = path.join(dir, `snap-${cluster}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, image, String(size));
      qemuIo(image, 'qcow2', 'write -P 0x11 0 6M', 'write -P 0x22 8M 1M', 'write -z 9M 512k');
      qemuImg('snapshot', '-c', 's1', image);
      qemuIo(image, 'qcow2', 'write -P 0x33 1M 512k', 'discard 3M 1M');
      qemuImg('snapshot', '-c', 's2', image);
      qemuIo(image, 'qcow2', 'write -P 0x44 5M 64k');
      const snapshot1 = convertToRaw(image, ['-l', 'snapshot.name=s1']);
      const expected = convertToRaw(image);
      const handle = attachTop(image);
      const model = Buffer.from(expected);
      try {
        expect(readThrough(handle, 0, size).equals(expected)).toBe(true);
        runWorkload(handle, model, makeWorkload(99 + cluster, size, cluster, 200), cluster);
      } finally {
        handle.close();
      }
      writeModelAndCompare(image, model);
      qemuImg('snapshot', '-a', 's1', image);
      expect(convertToRaw(image).equals(snapshot1)).toBe(true);
      expect(qemuImgCheck(image).output).toContain('No errors were found');
    });

  it('qcow2 → qcow2 → raw chain with relative backing names, resolved from each image directory', () => {
    const size = 20 * MiB;
    const chainDir = path.join(dir, 'chain');
    fs.mkdirSync(path.join(chainDir, 'mid'), { recursive: true });
    const base = path.join(chainDir, 'base.raw');
    fs.writeFileSync(base, mixedContent(5, size - 2 * MiB));
    const mid = path.join(chainDir, 'mid', 'mid.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', '../base.raw', '-F', 'raw', mid, String(size));
    qemuIo(mid, 'qcow2', 'write -P 0x5a 1M 3M', 'write -z 6M 2M', 'write -P 0x6b 18M 100k');
    // and a compressed layer in the middle of the chain: mid.qcow2 rewritten by convert -c, same backing
    const compressedMid = path.join(chainDir, 'mid', 'mid-c.qcow2');
    qemuImg('convert', '-c', '-B', '../base.raw', '-F', 'raw', '-O', 'qcow2', mid, compressedMid);
    fs.renameSync(compressedMid, mid);
    expect(qemuImgCheck(mid).output).toMatch(/[1-9][0-9.]*% compressed clusters/);
    const top = path.join(chainDir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid/mid.qcow2', '-F', 'qcow2', top, String(size));
    qemuIo(top, 'qcow2', 'write -P 0x7c 2M 64k', 'write -P 0x7d 7M 4k');
    const description = openImage(top, { format: 'qcow2', warn: () => {} });
    expect(description.format === 'qcow2' && description.shared.backing?.format).toBe('qcow2');
    const expected = convertToRaw(top);
    const handle = attachTop(top);
    const model = Buffer.from(expected);
    try {
      expect(readThrough(handle, 0, size).equals(expected)).toBe(true);
      runWorkload(handle, model, makeWorkload(17, size, 4096, 200), 4096);
    } finally {
      handle.close();
    }
    writeModelAndCompare(top, model);
    // the backing files were opened read-only and are unchanged
    expect(qemuImgCheck(mid).output).toContain('No errors were found');
  });
});
