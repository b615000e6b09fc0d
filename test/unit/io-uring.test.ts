import { mkdtempSync, openSync, closeSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { addressOf } from '../../src/sys/libc.js';
import {
  CQE_BYTES,
  IoUring,
  IoUringFeature,
  IoUringOp,
  IORING_FSYNC_DATASYNC,
  PARAMS_BYTES,
  SQE_WORDS,
  SqeFlag,
  decodeSetupParams,
  decodeSqe,
  encodeSetupParams,
  encodeSqe,
  ringAdvance,
  ringCount,
  ringMapSizes,
  ringSlot,
  type RingParams,
} from '../../src/sys/io-uring.js';
import { encodeUserData, userDataKind, userDataSlot } from '../../src/dataplane/uring-executor.js';
import { skipIovecs } from '../../src/dataplane/iovec.js';

describe('SQE encoding', () => {
  it('lays a READV out like struct io_uring_sqe (opcode, flags, fd, off, addr, len, rw_flags, user_data)', () => {
    const words = new Uint32Array(SQE_WORDS * 2).fill(0xdeadbeef);
    const offset = 5 * 2 ** 32 + 4096;
    const address = 0x7f12_3456_7890;
    encodeSqe(words, SQE_WORDS, IoUringOp.READV, SqeFlag.IO_LINK, 7, offset, address, 3, 0, 0x1_0042);
    const bytes = Buffer.from(words.buffer, SQE_WORDS * 4, 64);
    expect(bytes.readUInt8(0)).toBe(1); // opcode
    expect(bytes.readUInt8(1)).toBe(4); // IOSQE_IO_LINK
    expect(bytes.readUInt16LE(2)).toBe(0); // ioprio
    expect(bytes.readInt32LE(4)).toBe(7); // fd
    expect(bytes.readBigUInt64LE(8)).toBe(BigInt(offset));
    expect(bytes.readBigUInt64LE(16)).toBe(BigInt(address));
    expect(bytes.readUInt32LE(24)).toBe(3); // len (iovecs)
    expect(bytes.readUInt32LE(28)).toBe(0); // rw_flags
    expect(bytes.readBigUInt64LE(32)).toBe(0x1_0042n); // user_data
    expect(bytes.subarray(40, 64).every((b) => b === 0)).toBe(true); // buf_index .. pad cleared
    // The SQE before it is untouched.
    expect(words[SQE_WORDS - 1]).toBe(0xdeadbeef);
  });

  it('encodes a datasync FSYNC with IO_DRAIN and round-trips through decodeSqe', () => {
    const words = new Uint32Array(SQE_WORDS);
    encodeSqe(words, 0, IoUringOp.FSYNC, SqeFlag.IO_DRAIN, 3, 0, 0, 0, IORING_FSYNC_DATASYNC, 9);
    expect(decodeSqe(words, 0)).toEqual({
      opcode: IoUringOp.FSYNC,
      flags: SqeFlag.IO_DRAIN,
      fd: 3,
      offset: 0,
      address: 0,
      length: 0,
      opFlags: IORING_FSYNC_DATASYNC,
      userData: 9,
    });
  });

  it('overwrites every word of a reused SQE', () => {
    const words = new Uint32Array(SQE_WORDS).fill(0xffffffff);
    encodeSqe(words, 0, IoUringOp.WRITEV, 0, 1, 512, 0x1000, 1, 0, 1);
    expect(Array.from(words.subarray(9))).toEqual([0, 0, 0, 0, 0, 0, 0]);
    expect(decodeSqe(words, 0)).toMatchObject({ opcode: IoUringOp.WRITEV, flags: 0, fd: 1, offset: 512, address: 0x1000 });
  });
});

describe('ring index math', () => {
  it('maps free-running u32 counters to slots with the mask', () => {
    expect(ringSlot(0, 7)).toBe(0);
    expect(ringSlot(13, 7)).toBe(5);
    expect(ringSlot(0xffff_ffff, 255)).toBe(255);
  });

  it('counts entries across the u32 wrap-around', () => {
    expect(ringCount(10, 10)).toBe(0);
    expect(ringCount(10, 42)).toBe(32);
    expect(ringCount(0xffff_fff0, 0x10)).toBe(0x20);
    expect(ringCount(0xffff_ffff, 0)).toBe(1);
  });

  it('advances a counter modulo 2^32', () => {
    expect(ringAdvance(5, 3)).toBe(8);
    expect(ringAdvance(0xffff_fffe, 3)).toBe(1);
    expect(ringSlot(ringAdvance(0xffff_ffff, 1), 127)).toBe(0);
  });
});

function paramsFixture(features: number): RingParams {
  const bytes = encodeSetupParams(0x3090);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, 256, true); // sq_entries
  view.setUint32(4, 512, true); // cq_entries
  view.setUint32(20, features, true);
  // sq_off (as a 6.x kernel fills it in for 256 entries)
  [0, 64, 256, 264, 276, 272, 8512].forEach((v, i) => view.setUint32(40 + i * 4, v, true));
  // cq_off
  [128, 192, 260, 268, 284, 320, 280].forEach((v, i) => view.setUint32(80 + i * 4, v, true));
  return decodeSetupParams(bytes);
}

describe('io_uring_params', () => {
  it('is 120 bytes with flags at 8 and the CQ size at 4', () => {
    const bytes = encodeSetupParams(0x10, 64);
    expect(bytes.length).toBe(PARAMS_BYTES);
    expect(Buffer.from(bytes).readUInt32LE(8)).toBe(0x10);
    expect(Buffer.from(bytes).readUInt32LE(4)).toBe(64);
  });

  it('decodes the ring offsets the kernel writes back', () => {
    const params = paramsFixture(IoUringFeature.SINGLE_MMAP);
    expect(params.sqEntries).toBe(256);
    expect(params.cqEntries).toBe(512);
    expect(params.flags).toBe(0x3090);
    expect(params.sqOff).toEqual({ head: 0, tail: 64, ringMask: 256, ringEntries: 264, flags: 276, dropped: 272, array: 8512 });
    expect(params.cqOff).toEqual({ head: 128, tail: 192, ringMask: 260, ringEntries: 268, overflow: 284, cqes: 320, flags: 280 });
  });

  it('sizes the mappings: one shared ring mapping with SINGLE_MMAP, two without', () => {
    const single = ringMapSizes(paramsFixture(IoUringFeature.SINGLE_MMAP | IoUringFeature.NODROP));
    const sq = 8512 + 256 * 4;
    const cq = 320 + 512 * CQE_BYTES;
    expect(single).toEqual({ sqRingBytes: Math.max(sq, cq), cqRingBytes: Math.max(sq, cq), sqesBytes: 256 * 64, single: true });
    const separate = ringMapSizes(paramsFixture(0));
    expect(separate).toEqual({ sqRingBytes: sq, cqRingBytes: cq, sqesBytes: 256 * 64, single: false });
  });
});

describe('uring executor helpers', () => {
  it('packs slot and CQE kind into 32-bit user data', () => {
    for (const [slot, kind] of [
      [0, 0],
      [127, 1],
      [0x7fff, 1],
    ] as const) {
      const ud = encodeUserData(slot, kind);
      expect(ud).toBeLessThan(2 ** 32);
      expect(userDataSlot(ud)).toBe(slot);
      expect(userDataKind(ud)).toBe(kind);
    }
  });

  function iovecs(...entries: [address: number, length: number][]): Uint32Array {
    const words = new Uint32Array(4 + entries.length * 4).fill(0xaaaa); // one foreign iovec before
    entries.forEach(([address, length], i) => {
      const w = 4 + i * 4;
      words[w] = address % 2 ** 32;
      words[w + 1] = Math.floor(address / 2 ** 32);
      words[w + 2] = length;
      words[w + 3] = 0;
    });
    return words;
  }
  const iov = (words: Uint32Array, i: number): [number, number] => [
    (words[4 + i * 4] ?? 0) + (words[5 + i * 4] ?? 0) * 2 ** 32,
    words[6 + i * 4] ?? 0,
  ];

  it('skips whole iovecs after a short transfer', () => {
    const words = iovecs([0x1000, 512], [0x2000, 1024], [0x3000, 4096]);
    expect(skipIovecs(words, 4, 0, 1536)).toBe(2);
    expect(iov(words, 2)).toEqual([0x3000, 4096]);
  });

  it('trims the iovec a short transfer ended in, carrying into the high address word', () => {
    const words = iovecs([0x1_ffff_ff00, 4096], [0x5000, 512]);
    expect(skipIovecs(words, 4, 0, 0x200)).toBe(0);
    expect(iov(words, 0)).toEqual([0x2_0000_0100, 4096 - 0x200]);
    expect(skipIovecs(words, 4, 0, 4096 - 0x200 + 100)).toBe(1);
    expect(iov(words, 1)).toEqual([0x5000 + 100, 412]);
    expect(words[0]).toBe(0xaaaa);
  });

  it('leaves the array alone for a zero-byte advance', () => {
    const words = iovecs([0x1000, 512]);
    expect(skipIovecs(words, 4, 0, 0)).toBe(0);
    expect(iov(words, 0)).toEqual([0x1000, 512]);
  });
});

describe('IoUring on this kernel: probe and one-buffer READ', () => {
  it('reports the opcodes the kernel implements and not the ones it does not', () => {
    const ring = IoUring.create({ entries: 4 });
    try {
      expect(ring.supportsOp(IoUringOp.READV)).toBe(true);
      expect(ring.supportsOp(IoUringOp.READ)).toBe(true);
      expect(ring.supportsOp(255)).toBe(false);
    } finally {
      ring.close();
    }
  });

  it('reads with a one-buffer READ at the given offset, and reports a bad fd in its CQE', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vublk-uring-'));
    const path = join(dir, 'data');
    writeFileSync(path, Buffer.from('0123456789abcdef'));
    const fd = openSync(path, 'r');
    const ring = IoUring.create({ entries: 4 });
    try {
      const buffer = Buffer.alloc(6);
      expect(ring.prepare(IoUringOp.READ, 0, fd, 4, addressOf(buffer), 6, 0, 7)).toBe(true);
      expect(ring.submitAndWait(1)).toBe(true);
      const results: number[][] = [];
      ring.reap((userData, res) => results.push([userData, res]));
      expect(results).toEqual([[7, 6]]);
      expect(buffer.toString()).toBe('456789');
      expect(ring.prepare(IoUringOp.READ, 0, -1, 0, addressOf(buffer), 6, 0, 8)).toBe(true);
      expect(ring.submitAndWait(1)).toBe(true);
      results.length = 0;
      ring.reap((userData, res) => results.push([userData, res]));
      expect(results).toEqual([[8, -9]]);
    } finally {
      ring.close();
      closeSync(fd);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
