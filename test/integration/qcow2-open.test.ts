/**
 * Opening images: safe format selection (CVE-2008-2004), features refused by name, backing-chain loops,
 * malformed tables refused at open or answered with an error at access (never a crash, a hang, or a write
 * into metadata), and a header/metadata fuzzer.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Qcow2Error, Qcow2Handle, attachLayer, openImage, type LayerDescription } from '../../src/backend/qcow2/index.js';
import { Prng } from '../support/prng.js';
import {
  makeWorkload,
  qemuImg,
  qemuImgCheck,
  qemuImgCompare,
  qemuImgSkipReason,
  readThrough,
  runWorkload,
  writeThrough,
} from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';
let counter = 0;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2open-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const file = (name: string): string => path.join(dir, `${counter++}-${name}`);
const quiet = { warn: () => {} };

function qemuIo(image: string, ...commands: string[]): void {
  const args = ['-f', 'qcow2'];
  for (const c of commands) args.push('-c', c);
  execFileSync('qemu-io', [...args, image], { timeout: 60_000 });
}

function patch(image: string, offset: number, bytes: Uint8Array): void {
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, offset);
  fs.closeSync(fd);
}

function u64(value: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
}

function header(image: string): { l1: number; rt: number; cluster: number; size: number } {
  const b = Buffer.alloc(104);
  const fd = fs.openSync(image, 'r');
  fs.readSync(fd, b, 0, 104, 0);
  fs.closeSync(fd);
  return {
    cluster: 2 ** b.readUInt32BE(20),
    l1: Number(b.readBigUInt64BE(40)),
    rt: Number(b.readBigUInt64BE(48)),
    size: fs.statSync(image).size,
  };
}

function readU64(image: string, offset: number): number {
  const b = Buffer.alloc(8);
  const fd = fs.openSync(image, 'r');
  fs.readSync(fd, b, 0, 8, offset);
  fs.closeSync(fd);
  return Number(b.readBigUInt64BE(0) & 0x00ff_ffff_ffff_fe00n);
}

function openError(image: string, options: Parameters<typeof openImage>[1] = { format: 'qcow2', ...quiet }): Qcow2Error {
  try {
    openImage(image, options);
  } catch (error) {
    expect(error).toBeInstanceOf(Qcow2Error);
    return error as Qcow2Error;
  }
  throw new Error(`${image} opened`);
}

function attach(description: LayerDescription): Qcow2Handle {
  const layer = attachLayer(description);
  if (!(layer instanceof Qcow2Handle)) throw new Error('not qcow2');
  return layer;
}

function created(name: string, options = 'cluster_size=65536', size = 4 * MiB): string {
  const image = file(name);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', options, image, String(size));
  return image;
}

describe.skipIf(skip !== null)('format selection', () => {
  it('a raw disk holding a qcow2 header that names a host file is never followed when probed', () => {
    const secret = file('secret.txt');
    fs.writeFileSync(secret, 'host secret');
    // what a guest could write into its raw disk: a qcow2 header naming a host file, no backing format
    const fake = created('fake.qcow2');
    const name = Buffer.from(secret);
    patch(fake, 8, u64(512));
    const len = Buffer.alloc(4);
    len.writeUInt32BE(name.length);
    patch(fake, 16, len);
    patch(fake, 512, name);
    // make sure the backing-format extension is absent (a fresh image has none)
    const warnings: string[] = [];
    const error = openError(fake, { warn: (m) => warnings.push(m) });
    expect(error.code).toBe('VUBLK_ERR_QCOW2_FORMAT');
    expect(error.message).toMatch(/without a backing format/);
    expect(warnings.join()).toMatch(/probed 'qcow2'/);
    // an explicit raw format is honoured: the header is just guest data
    const asRaw = openImage(fake, { format: 'raw', warn: () => warnings.push('unexpected') });
    expect(asRaw.format).toBe('raw');
    expect(warnings).not.toContain('unexpected');
  });

  it('probing warns; a recorded backing format lets a probed image use its backing file', () => {
    const base = file('base.raw');
    fs.writeFileSync(base, Buffer.alloc(MiB, 7));
    const top = file('top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top, String(MiB));
    const warnings: string[] = [];
    const description = openImage(top, { warn: (m) => warnings.push(m) });
    expect(warnings.some((w) => w.includes('probed'))).toBe(true);
    const handle = attach(description);
    expect(readThrough(handle, 0, 4096).every((b) => b === 7)).toBe(true);
    handle.close();
    expect(openImage(base, { warn: (m) => warnings.push(m) }).format).toBe('raw');
  });

  it('an explicit qcow2 with a backing file but no recorded format probes the backing file (with a warning)', () => {
    const base = file('base2.raw');
    fs.writeFileSync(base, Buffer.alloc(MiB, 9));
    const top = file('top2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top, String(MiB));
    // hide the backing-format extension (type 0xe2792aca) by renaming it to an unknown, ignored type
    const head = fs.readFileSync(top).subarray(0, 4096);
    const at = head.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    expect(at).toBeGreaterThan(0);
    patch(top, at, Buffer.from([0x12, 0x34, 0x56, 0x78]));
    const warnings: string[] = [];
    const description = openImage(top, { format: 'qcow2', warn: (m) => warnings.push(m) });
    expect(warnings.join()).toMatch(/probed 'raw'/);
    const handle = attach(description);
    expect(readThrough(handle, 0, 512).every((b) => b === 9)).toBe(true);
    handle.close();
  });

  it('a backing chain loop is refused', () => {
    const a = file('loop-a.qcow2');
    const b = file('loop-b.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', a, String(MiB));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', a, '-F', 'qcow2', b, String(MiB));
    qemuImg('rebase', '-u', '-f', 'qcow2', '-b', b, '-F', 'qcow2', a);
    expect(openError(b).message).toMatch(/loop/);
    // a self-reference too
    const c = file('loop-c.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', c, String(MiB));
    qemuImg('rebase', '-u', '-f', 'qcow2', '-b', c, '-F', 'qcow2', c);
    expect(openError(c).message).toMatch(/loop/);
  });

  it('backing names with a protocol prefix are refused', () => {
    const top = created('proto.qcow2');
    qemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'nbd://127.0.0.1/x', '-F', 'raw', top);
    expect(openError(top).code).toBe('VUBLK_ERR_QCOW2_UNSUPPORTED');
  });
});

describe.skipIf(skip !== null)('unsupported features are refused by name', () => {
  const cases: Array<[string, () => string, RegExp]> = [
    [
      'encryption',
      () => {
        const image = file('aes.qcow2');
        qemuImg(
          'create',
          '-q',
          '-f',
          'qcow2',
          '--object',
          'secret,id=s0,data=abc',
          '-o',
          'encryption=on,encrypt.key-secret=s0',
          image,
          String(MiB),
        );
        return image;
      },
      /encryption/,
    ],
    ['external data file', () => created('data.qcow2', `data_file=${file('data.raw')}`), /external data file/],
    ['extended L2', () => created('ext.qcow2', 'extended_l2=on'), /extended L2/],
    ['zstd compression', () => created('zstd.qcow2', 'compression_type=zstd'), /compression type 1/],
    [
      'dirty bit',
      () => {
        const image = created('dirty.qcow2', 'lazy_refcounts=on');
        patch(image, 79, Buffer.from([0x01]));
        return image;
      },
      /dirty/,
    ],
    [
      'corrupt bit',
      () => {
        const image = created('corrupt.qcow2');
        patch(image, 79, Buffer.from([0x02]));
        return image;
      },
      /corrupt/,
    ],
    [
      'unknown incompatible bit',
      () => {
        const image = created('unknown.qcow2');
        patch(image, 77, Buffer.from([0x10]));
        return image;
      },
      /incompatible feature bit 20/,
    ],
    ['512-byte clusters', () => created('small.qcow2', 'cluster_size=512'), /cluster size/],
  ];
  for (const [name, make, pattern] of cases) {
    it(name, () => {
      const error = openError(make());
      expect(error.code).toBe('VUBLK_ERR_QCOW2_UNSUPPORTED');
      expect(error.message).toMatch(pattern);
    });
  }

  it('lazy refcounts on a clean image, 1-bit and 64-bit refcounts: accepted and kept consistent', () => {
    for (const options of [
      'lazy_refcounts=on,cluster_size=4096',
      'refcount_bits=1,cluster_size=4096',
      'refcount_bits=64,cluster_size=4096',
    ]) {
      const image = created('variant.qcow2', options, 8 * MiB);
      const handle = attach(openImage(image, { format: 'qcow2', ...quiet }));
      const model = Buffer.alloc(8 * MiB);
      runWorkload(handle, model, makeWorkload(options.length, 8 * MiB, 4096, 150), 4096);
      handle.close();
      const raw = `${image}.raw`;
      fs.writeFileSync(raw, model);
      expect(qemuImgCheck(image).output, options).toContain('No errors were found');
      expect(qemuImgCompare(image, 'qcow2', raw, 'raw').output).toContain('Images are identical');
    }
  });
});

describe.skipIf(skip !== null)('malformed images', () => {
  function withData(name: string): string {
    const image = created(name);
    qemuIo(image, 'write -P 0x41 0 256k', 'write -P 0x42 1M 64k');
    return image;
  }

  it('L1 entry past the end of the file or into the refcount table: refused at open', () => {
    const past = withData('l1-past.qcow2');
    const h = header(past);
    patch(past, h.l1, u64(0x8000_0000_0000_0000 + 0 + (h.size + 16 * h.cluster)));
    expect(openError(past).message).toMatch(/L1 entry 0 points past the end/);
    const meta = withData('l1-meta.qcow2');
    const m = header(meta);
    const entry = Buffer.from(u64(m.rt));
    entry[0] = 0x80;
    patch(meta, m.l1, entry);
    expect(openError(meta).message).toMatch(/L1 entry 0 points into metadata/);
  });

  it('L2 entries past the end of the file or into metadata: I/O errors at access, metadata untouched', () => {
    const image = withData('l2.qcow2');
    const h = header(image);
    const l2 = readU64(image, h.l1);
    const past = Buffer.from(u64(h.size + 64 * h.cluster));
    past[0] = past[0]! | 0x80;
    patch(image, l2, past); // guest cluster 0
    const into = Buffer.from(u64(h.l1));
    into[0] = into[0]! | 0x80;
    patch(image, l2 + 8, into); // guest cluster 1 → the L1 table
    const l1Before = fs.readFileSync(image).subarray(h.l1, h.l1 + h.cluster);
    const handle = attach(openImage(image, { format: 'qcow2', ...quiet }));
    try {
      expect(() => readThrough(handle, 0, 512)).toThrow(/past the end of the file/);
      expect(() => readThrough(handle, h.cluster, 512)).toThrow(/points into metadata/);
      expect(() => writeThrough(handle, h.cluster + 512, Buffer.alloc(512, 0xee))).toThrow(/points into metadata/);
      expect(() => writeThrough(handle, 0, Buffer.alloc(512, 0xee))).toThrow(Qcow2Error);
      expect(readThrough(handle, 2 * h.cluster, 512).every((b) => b === 0x41)).toBe(true); // the rest still works
    } finally {
      handle.close();
    }
    expect(
      fs
        .readFileSync(image)
        .subarray(h.l1, h.l1 + h.cluster)
        .equals(l1Before),
    ).toBe(true);
  });

  it('refcount table entry past the end of the file, refcount_order above 6: refused at open', () => {
    const image = withData('rt-past.qcow2');
    const h = header(image);
    patch(image, h.rt + 8, u64(h.size + 1024 * h.cluster));
    expect(openError(image).message).toMatch(/refcount block 1 lies past the end/);
    const order = withData('order.qcow2');
    patch(order, 96, Buffer.from([0, 0, 0, 7]));
    expect(openError(order).message).toMatch(/refcount_order 7/);
  });

  it('a refcount that would drop below zero is an error, not a crash', () => {
    const image = withData('underflow.qcow2');
    const h = header(image);
    const block = readU64(image, h.rt);
    const dataCluster = readU64(image, readU64(image, h.l1)) / h.cluster;
    patch(image, block + dataCluster * 2, Buffer.from([0, 0])); // 16-bit refcounts
    const handle = attach(openImage(image, { format: 'qcow2', ...quiet }));
    try {
      expect(() => handle.discard(0, h.cluster)).toThrow(/refcount underflow/);
    } finally {
      handle.close();
    }
  });

  it('fuzzed headers and metadata: refused or answered with Qcow2Error, never another exception', () => {
    const source = file('fuzz-src.raw');
    const content = Buffer.alloc(2 * MiB);
    new Prng(3).fill(content.subarray(0, 512 * KiB));
    content.fill(0x33, MiB, MiB + 256 * KiB);
    fs.writeFileSync(source, content);
    const base = file('fuzz-base.qcow2');
    qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', source, base);
    qemuIo(base, 'write -P 0x44 1536k 64k', 'write -z 0 8k');
    qemuImg('snapshot', '-c', 's1', base);
    qemuIo(base, 'write -P 0x55 4k 16k');
    const pristine = fs.readFileSync(base);
    // metadata clusters of the pristine image: L1, L2 tables, refcount table and blocks
    const geometry = header(base);
    const l1Size = pristine.readUInt32BE(36);
    const metadata: number[] = [geometry.l1, geometry.rt];
    for (let i = 0; i < l1Size; i++) {
      const l2 = Number(pristine.readBigUInt64BE(geometry.l1 + i * 8) & 0x00ff_ffff_ffff_fe00n);
      if (l2 !== 0) metadata.push(l2);
    }
    for (let i = 0; i < geometry.cluster / 8; i++) {
      const block = Number(pristine.readBigUInt64BE(geometry.rt + i * 8));
      if (block !== 0) metadata.push(block);
    }
    const rng = new Prng(Number(process.env['QCOW2_FUZZ_SEED'] ?? 0xf022));
    const image = file('fuzz.qcow2');
    let refused = 0;
    let opened = 0;
    let accessErrors = 0;
    for (let round = 0; round < Number(process.env['QCOW2_FUZZ_ROUNDS'] ?? 250); round++) {
      const bytes = Buffer.from(pristine);
      const flips = rng.int(1, 6);
      for (let f = 0; f < flips; f++) {
        const where = rng.int(0, 9);
        if (where < 4) {
          bytes[rng.int(0, 511)] = rng.chance(0.3) ? rng.pick([0x00, 0xff, 0x80, 0x7f]) : rng.int(0, 255);
        } else if (where < 9) {
          // a whole 8-byte entry of a metadata cluster: random, or a plausible-looking offset
          const at = rng.pick(metadata) + rng.int(0, geometry.cluster / 8 - 1) * 8;
          const value = rng.chance(0.5)
            ? BigInt(rng.int(0, 4 * 1024) * 512) | (rng.chance(0.5) ? 1n << 63n : 0n)
            : BigInt(rng.u32()) << BigInt(rng.int(0, 32));
          bytes.writeBigUInt64BE(value & 0xffff_ffff_ffff_ffffn, at);
        } else {
          bytes[rng.int(0, bytes.length - 1)] = rng.int(0, 255);
        }
      }
      fs.writeFileSync(image, bytes);
      let description: LayerDescription;
      try {
        description = openImage(image, { format: 'qcow2', ...quiet });
      } catch (error) {
        if (!(error instanceof Qcow2Error)) throw new Error(`round ${round}: open threw ${String(error)}`);
        refused++;
        continue;
      }
      opened++;
      const guarded = (op: () => unknown): void => {
        try {
          op();
        } catch (error) {
          if (!(error instanceof Qcow2Error)) throw new Error(`round ${round}: access threw ${(error as Error).stack}`);
          accessErrors++;
        }
      };
      let handle: Qcow2Handle | undefined;
      guarded(() => (handle = attach(description)));
      if (handle === undefined) continue;
      const h = handle;
      const span = Math.min(h.size, 2 * MiB);
      for (let at = 0; at + 64 * KiB <= span; at += 64 * KiB) guarded(() => readThrough(h, at, 64 * KiB));
      for (let w = 0; w < 4 && span >= 8 * KiB; w++) {
        const at = rng.int(0, span / 512 - 16) * 512;
        guarded(() => writeThrough(h, at, Buffer.alloc(rng.int(1, 16) * 512, 0xab)));
      }
      if (span >= 64 * KiB) {
        guarded(() => h.discard(0, 64 * KiB));
        guarded(() => h.writeZeroes(16 * KiB, 32 * KiB));
      }
      guarded(() => h.close());
      // growth stays bounded: a few clusters per write, never a runaway file
      expect(fs.statSync(image).size).toBeLessThan(pristine.length + 32 * MiB);
    }
    console.log(`fuzz: ${refused} refused at open, ${opened} opened, ${accessErrors} access errors`);
    expect(refused).toBeGreaterThan(0);
    expect(opened).toBeGreaterThan(0);
  });
});
