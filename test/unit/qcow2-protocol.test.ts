/** The pure qcow2 codecs: header and extensions, refcount widths, compressed descriptors, entry offsets. */
import { describe, expect, it } from 'vitest';
import {
  EXT_BACKING_FORMAT,
  EXT_FEATURE_NAMES,
  Qcow2HeaderError,
  decodeCompressedEntry,
  hasQcow2Magic,
  incompatibleFeatureName,
  maxRefcount,
  parseQcow2Header,
  readRefcount,
  standardEntryOffset,
  writeRefcount,
} from '../../protocol/qcow2.js';

function v3Header(options: { backing?: string; format?: string; names?: Array<[number, number, string]> } = {}): Buffer {
  const b = Buffer.alloc(4096);
  b.writeUInt32BE(0x514649fb, 0);
  b.writeUInt32BE(3, 4);
  b.writeUInt32BE(16, 20); // 64 KiB clusters
  b.writeBigUInt64BE(1n << 30n, 24);
  b.writeUInt32BE(2, 36);
  b.writeBigUInt64BE(0x30000n, 40);
  b.writeBigUInt64BE(0x10000n, 48);
  b.writeUInt32BE(1, 56);
  b.writeUInt32BE(4, 96);
  b.writeUInt32BE(112, 100);
  let at = 112;
  if (options.format !== undefined) {
    b.writeUInt32BE(EXT_BACKING_FORMAT, at);
    b.writeUInt32BE(options.format.length, at + 4);
    b.write(options.format, at + 8);
    at += 8 + Math.ceil(options.format.length / 8) * 8;
  }
  if (options.names !== undefined) {
    b.writeUInt32BE(EXT_FEATURE_NAMES, at);
    b.writeUInt32BE(options.names.length * 48, at + 4);
    options.names.forEach(([type, bit, name], i) => {
      b[at + 8 + i * 48] = type;
      b[at + 9 + i * 48] = bit;
      b.write(name, at + 10 + i * 48);
    });
    at += 8 + options.names.length * 48;
  }
  at += 8; // end marker
  if (options.backing !== undefined) {
    b.writeBigUInt64BE(BigInt(at), 8);
    b.writeUInt32BE(options.backing.length, 16);
    b.write(options.backing, at);
  }
  return b;
}

describe('qcow2 header codec', () => {
  it('decodes the fields, the backing name, its format and feature names', () => {
    const h = parseQcow2Header(v3Header({ backing: '../base.raw', format: 'raw', names: [[0, 20, 'future thing']] }));
    expect(h.version).toBe(3);
    expect(h.clusterBits).toBe(16);
    expect(h.size).toBe(2 ** 30);
    expect(h.l1TableOffset).toBe(0x30000);
    expect(h.refcountTableOffset).toBe(0x10000);
    expect(h.backingFile).toBe('../base.raw');
    expect(h.backingFormat).toBe('raw');
    expect(incompatibleFeatureName(20, h)).toBe('future thing');
    expect(incompatibleFeatureName(4, h)).toBe('extended L2 entries');
    expect(incompatibleFeatureName(33, h)).toBe('unknown incompatible feature bit 33');
    expect(hasQcow2Magic(v3Header())).toBe(true);
    expect(hasQcow2Magic(Buffer.alloc(4))).toBe(false);
  });

  it('refuses what cannot be decoded, naming the field', () => {
    const bad = (mutate: (b: Buffer) => void): string => {
      const b = v3Header();
      mutate(b);
      try {
        parseQcow2Header(b);
      } catch (error) {
        expect(error).toBeInstanceOf(Qcow2HeaderError);
        return (error as Qcow2HeaderError).field;
      }
      throw new Error('accepted');
    };
    expect(bad((b) => b.writeUInt32BE(0x12345678, 0))).toBe('magic');
    expect(bad((b) => b.writeUInt32BE(4, 4))).toBe('version');
    expect(bad((b) => b.writeBigUInt64BE(1n << 60n, 24))).toBe('size');
    expect(bad((b) => b.writeUInt32BE(64, 100))).toBe('header_length');
    expect(bad((b) => b.writeUInt32BE(9000, 100))).toBe('header_length');
    expect(
      bad((b) => {
        b.writeUInt32BE(EXT_BACKING_FORMAT, 112);
        b.writeUInt32BE(100000, 116);
      }),
    ).toBe('extension');
    expect(
      bad((b) => {
        b.writeBigUInt64BE(4000n, 8);
        b.writeUInt32BE(200, 16);
      }),
    ).toBe('backing_file_offset');
    expect(
      bad((b) => {
        b.writeBigUInt64BE(200n, 8);
        b.writeUInt32BE(2000, 16);
      }),
    ).toBe('backing_file_size');
    expect(() => parseQcow2Header(Buffer.alloc(10))).toThrow(Qcow2HeaderError);
  });

  it('a version 2 header has 16-bit refcounts and no feature bits', () => {
    const b = v3Header();
    b.writeUInt32BE(2, 4);
    b.fill(0, 72, 112);
    const h = parseQcow2Header(b);
    expect(h.refcountOrder).toBe(4);
    expect(h.headerLength).toBe(72);
    expect(h.incompatibleFeatures).toBe(0n);
  });
});

describe('qcow2 entries', () => {
  it('refcounts of every width round-trip and stay inside their bits', () => {
    for (let order = 0; order <= 6; order++) {
      const block = new Uint8Array(512);
      const entries = (512 * 8) >> order;
      const max = maxRefcount(order);
      for (let i = 0; i < entries; i += 7) writeRefcount(block, i, order, i % 3 === 0 ? max : i % (Math.min(max, 1000) + 1));
      for (let i = 0; i < entries; i++) {
        const expected = i % 7 !== 0 ? 0 : i % 3 === 0 ? max : i % (Math.min(max, 1000) + 1);
        expect(readRefcount(block, i, order)).toBe(expected);
      }
    }
    // QEMU's sub-byte order: entry 0 in the least significant bits
    const one = new Uint8Array(1);
    writeRefcount(one, 0, 0, 1);
    expect(one[0]).toBe(1);
    writeRefcount(one, 1, 1, 3);
    expect(one[0]).toBe(0b1101);
  });

  it('standard and compressed entries decode as in qcow2.txt', () => {
    expect(standardEntryOffset(0x8000_0001, 0x0003_0000)).toBe(0x1_0003_0000);
    // 64 KiB clusters: x = 62 - 8 = 54 offset bits; sector count above
    const hostOffset = 0x12345;
    const sectors = 3; // stored as 2 additional sectors
    const value = (1n << 62n) | (BigInt(sectors - 1) << 54n) | BigInt(hostOffset);
    const d = decodeCompressedEntry(Number(value >> 32n) >>> 0, Number(value & 0xffff_ffffn) >>> 0, 16);
    expect(d.hostOffset).toBe(hostOffset);
    expect(d.maxLength).toBe(sectors * 512 - (hostOffset % 512));
  });
});
