import { describe, expect, it } from 'vitest';
import {
  FrontendRequest,
  MalformedMessageError,
  decodeConfigMessage,
  decodeHeader,
  decodeLogDescription,
  decodeMemoryTable,
  decodeVringAddress,
  decodeVringFdRequest,
  decodeVringState,
  encodeConfigMessage,
  encodeLogDescription,
  encodeMemoryTable,
  encodeMessage,
  encodeVringAddress,
} from '../../protocol/vhost-user.js';
import { BlkConfigOffset, decodeBlkConfig, decodeRequestHeader, encodeBlkConfig } from '../../protocol/virtio-blk.js';
import { needsEvent, ringDistance, isValidQueueSize, availEventOffset, usedEventOffset } from '../../protocol/split-ring.js';
import { featureMask, hasFeature } from '../../protocol/virtio.js';

const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString('hex');

describe('vhost-user codecs', () => {
  it('encodes a header little-endian: request, flags, size', () => {
    const bytes = encodeMessage(FrontendRequest.GET_FEATURES, 0x1, new Uint8Array([0xaa, 0xbb]));
    expect(hex(bytes)).toBe('01000000' + '01000000' + '02000000' + 'aabb');
    expect(decodeHeader(bytes)).toEqual({ request: 1, flags: 1, size: 2 });
  });

  it('decodes a vring state from hand-built bytes', () => {
    const payload = Buffer.from('0300000000010000', 'hex');
    expect(decodeVringState(FrontendRequest.SET_VRING_NUM, payload)).toEqual({ index: 3, num: 256 });
  });

  it('rejects a vring state of the wrong size, naming the request', () => {
    expect(() => decodeVringState(FrontendRequest.SET_VRING_NUM, new Uint8Array(4))).toThrow(MalformedMessageError);
    expect(() => decodeVringState(FrontendRequest.SET_VRING_NUM, new Uint8Array(4))).toThrow(/SET_VRING_NUM.*4 bytes, expected 8/);
  });

  it('round-trips a vring address', () => {
    const address = {
      index: 1,
      flags: 0,
      descUserAddr: 0x7f0000001000n,
      usedUserAddr: 0x7f0000003000n,
      availUserAddr: 0x7f0000002000n,
      logGuestAddr: 0n,
    };
    const bytes = encodeVringAddress(address);
    expect(bytes.length).toBe(40);
    expect(hex(bytes.subarray(8, 16))).toBe('00100000007f0000');
    expect(decodeVringAddress(FrontendRequest.SET_VRING_ADDR, bytes)).toEqual(address);
  });

  it('splits the kick/call payload into index and no-fd flag, rejecting reserved bits', () => {
    expect(decodeVringFdRequest(FrontendRequest.SET_VRING_KICK, Buffer.from('0201000000000000', 'hex'))).toEqual({ index: 2, noFd: true });
    expect(() => decodeVringFdRequest(FrontendRequest.SET_VRING_KICK, Buffer.from('0002000000000000', 'hex'))).toThrow(/reserved bits/);
  });

  it('round-trips a memory table and bounds its region count', () => {
    const regions = [{ guestPhysAddr: 0n, memorySize: 0x4000_0000n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n }];
    const bytes = encodeMemoryTable(regions);
    expect(bytes.length).toBe(8 + 32);
    expect(decodeMemoryTable(FrontendRequest.SET_MEM_TABLE, bytes)).toEqual(regions);
    const tooMany = new Uint8Array(8 + 9 * 32);
    new DataView(tooMany.buffer).setUint32(0, 9, true);
    expect(() => decodeMemoryTable(FrontendRequest.SET_MEM_TABLE, tooMany)).toThrow(/9 regions/);
    const truncated = new Uint8Array(8 + 16);
    new DataView(truncated.buffer).setUint32(0, 1, true);
    expect(() => decodeMemoryTable(FrontendRequest.SET_MEM_TABLE, truncated)).toThrow(/too short/);
  });

  it('validates config message ranges', () => {
    const bytes = encodeConfigMessage({ offset: 0, flags: 0, data: new Uint8Array(60) });
    expect(decodeConfigMessage(FrontendRequest.GET_CONFIG, bytes).size).toBe(60);
    const bad = new Uint8Array(12);
    new DataView(bad.buffer).setUint32(4, 1000, true);
    expect(() => decodeConfigMessage(FrontendRequest.GET_CONFIG, bad)).toThrow(/exceeds 256/);
  });

  it('decodes the SET_LOG_BASE log description (u64 size, u64 offset) and insists on 16 bytes', () => {
    const bytes = encodeLogDescription({ mmapSize: 0x2000n, mmapOffset: 0x1000n });
    expect(hex(bytes)).toBe('0020000000000000' + '0010000000000000');
    expect(decodeLogDescription(FrontendRequest.SET_LOG_BASE, bytes)).toEqual({ mmapSize: 0x2000n, mmapOffset: 0x1000n });
    expect(() => decodeLogDescription(FrontendRequest.SET_LOG_BASE, new Uint8Array(8))).toThrow(MalformedMessageError);
  });
});

describe('virtio-blk layouts', () => {
  it('places config fields at the spec offsets', () => {
    const config = {
      capacity: 0x200000,
      sizeMax: 1 << 20,
      segMax: 126,
      blkSize: 512,
      physicalBlockExp: 3,
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: 1,
      numQueues: 4,
      maxDiscardSectors: 0x3fffff,
      maxDiscardSeg: 32,
      discardSectorAlignment: 1,
      maxWriteZeroesSectors: 0x3fffff,
      maxWriteZeroesSeg: 32,
      writeZeroesMayUnmap: 1,
    };
    const bytes = encodeBlkConfig(config);
    expect(hex(bytes.subarray(0, 8))).toBe('0000200000000000');
    expect(bytes[BlkConfigOffset.writeback]).toBe(1);
    expect(bytes[BlkConfigOffset.numQueues]).toBe(4);
    expect(bytes[24]).toBe(3);
    expect(decodeBlkConfig(bytes)).toEqual(config);
  });

  it('decodes the request header', () => {
    expect(decodeRequestHeader(Buffer.from('01000000' + '00000000' + '0800000000000000', 'hex'))).toEqual({
      type: 1,
      ioprio: 0,
      sector: 8,
    });
  });
});

describe('split ring arithmetic', () => {
  it('computes distances modulo 2^16', () => {
    expect(ringDistance(2, 65534)).toBe(4);
    expect(ringDistance(5, 5)).toBe(0);
  });

  it('implements vring_need_event', () => {
    expect(needsEvent(0, 1, 0)).toBe(true);
    expect(needsEvent(5, 3, 0)).toBe(false);
    expect(needsEvent(65535, 1, 65534)).toBe(true);
  });

  it('knows valid queue sizes and trailer offsets', () => {
    expect(isValidQueueSize(256)).toBe(true);
    expect(isValidQueueSize(100)).toBe(false);
    expect(isValidQueueSize(65536)).toBe(false);
    expect(usedEventOffset(256)).toBe(4 + 512);
    expect(availEventOffset(256)).toBe(4 + 2048);
  });

  it('handles feature bits above 31', () => {
    const mask = featureMask(32, 1);
    expect(hasFeature(mask, 32)).toBe(true);
    expect(hasFeature(mask, 0)).toBe(false);
  });
});
