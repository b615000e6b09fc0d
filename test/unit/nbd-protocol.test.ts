import { describe, expect, it } from 'vitest';
import {
  ChunkType,
  Command,
  CommandFlag,
  Info,
  NbdProtocolError,
  Option,
  OptionReply,
  TransmissionFlag,
  decodeErrorChunk,
  decodeExportNameReply,
  decodeHoleChunk,
  decodeInfoReply,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  decodeServerGreeting,
  decodeDataChunkOffset,
  encodeGoOption,
  encodeRequestHeader,
  errnoFromServer,
  type ReplyHeader,
} from '../../protocol/nbd.js';
import { parseNbdUri, NbdUriError } from '../../src/backend/nbd/nbd-uri.js';
import { clientHandshake, NbdHandshakeError, type HandshakeStep, type NbdExportInfo } from '../../src/backend/nbd/handshake.js';
import { SegmentList } from '../../src/backend/nbd/io-segments.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const GREETING = hex('4e42444d41474943 49484156454f5054 0003');

function optionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.alloc(20 + payload.length);
  out.writeBigUInt64BE(0x3e889045565a9n, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(type >>> 0, 12);
  out.writeUInt32BE(payload.length, 16);
  payload.copy(out, 20);
  return out;
}

function infoExport(size: bigint, flags: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(Info.EXPORT, 0);
  out.writeBigUInt64BE(size, 2);
  out.writeUInt16BE(flags, 10);
  return out;
}

function infoBlockSize(min: number, preferred: number, max: number): Buffer {
  const out = Buffer.alloc(14);
  out.writeUInt16BE(Info.BLOCK_SIZE, 0);
  out.writeUInt32BE(min, 2);
  out.writeUInt32BE(preferred, 6);
  out.writeUInt32BE(max >>> 0, 10);
  return out;
}

/** Runs the handshake generator against a scripted server byte stream; returns what the client sent and the result. */
function runHandshake(serverBytes: Buffer, structured = true): { sent: Buffer; info: NbdExportInfo } {
  const generator = clientHandshake({ exportName: 'disk', structuredReplies: structured });
  const sent: Buffer[] = [];
  let at = 0;
  let next = generator.next();
  for (let i = 0; i < 1000 && !next.done; i++) {
    const step: HandshakeStep = next.value;
    if ('send' in step) {
      sent.push(step.send);
      next = generator.next();
    } else {
      if (at + step.receive > serverBytes.length) throw new Error('script ran out of server bytes');
      const chunk = serverBytes.subarray(at, at + step.receive);
      at += step.receive;
      next = generator.next(Buffer.from(chunk));
    }
  }
  if (!next.done) throw new Error('handshake did not finish');
  return { sent: Buffer.concat(sent), info: next.value };
}

describe('NBD handshake codecs', () => {
  it('accepts a fixed-newstyle greeting and refuses oldstyle or plain newstyle', () => {
    expect(decodeServerGreeting(GREETING)).toEqual({ handshakeFlags: 3 });
    expect(() => decodeServerGreeting(hex('4e42444d41474943 0000420281861253 0000'))).toThrow(/oldstyle/);
    expect(() => decodeServerGreeting(hex('4e42444d41474943 49484156454f5054 0000'))).toThrow(/fixed newstyle/);
    expect(() => decodeServerGreeting(hex('0000000000000000 49484156454f5054 0001'))).toThrow(NbdProtocolError);
  });

  it('encodes NBD_OPT_GO with the export name and the info requests', () => {
    const bytes = encodeGoOption('ab', [Info.EXPORT, Info.BLOCK_SIZE]);
    expect(bytes.toString('hex')).toBe('49484156454f5054' + '00000007' + '0000000c' + '00000002' + '6162' + '0002' + '0000' + '0003');
  });

  it('bounds option reply payloads and checks the option and magic', () => {
    expect(decodeOptionReplyHeader(optionReply(Option.GO, OptionReply.ACK), Option.GO)).toEqual({ option: 7, type: 1, length: 0 });
    const huge = optionReply(Option.GO, OptionReply.INFO);
    huge.writeUInt32BE(0x7fffffff, 16);
    expect(() => decodeOptionReplyHeader(huge, Option.GO)).toThrow(/too large/);
    expect(() => decodeOptionReplyHeader(optionReply(Option.INFO, OptionReply.ACK), Option.GO)).toThrow(/option 6/);
    const bad = optionReply(Option.GO, OptionReply.ACK);
    bad[0] = 0xff;
    expect(() => decodeOptionReplyHeader(bad, Option.GO)).toThrow(/magic/);
  });

  it('decodes NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE and rejects malformed ones', () => {
    expect(decodeInfoReply(infoExport(1n << 30n, 0x1 | 0x4))).toEqual({ info: Info.EXPORT, size: 1 << 30, transmissionFlags: 5 });
    expect(() => decodeInfoReply(infoExport(1n << 60n, 1))).toThrow(/2\^53/);
    expect(() => decodeInfoReply(infoExport(4096n, 0))).toThrow(/HAS_FLAGS/);
    expect(() => decodeInfoReply(infoExport(4096n, 1).subarray(0, 11))).toThrow(/expected 12/);
    expect(decodeInfoReply(infoBlockSize(512, 4096, 65536))).toEqual({
      info: Info.BLOCK_SIZE,
      minimum: 512,
      preferred: 4096,
      maximum: 65536,
    });
    expect(() => decodeInfoReply(infoBlockSize(3, 4096, 65536))).toThrow(/power of two/);
    expect(() => decodeInfoReply(infoBlockSize(512, 256, 65536))).toThrow(/preferred/);
    expect(() => decodeInfoReply(infoBlockSize(512, 4096, 1000))).toThrow(/multiple/);
    expect(decodeInfoReply(Buffer.from([0, 9, 1, 2]))).toEqual({ info: 'other', type: 9 });
  });

  it('decodes the NBD_OPT_EXPORT_NAME reply with and without the 124 zero bytes', () => {
    const short = Buffer.alloc(10);
    short.writeBigUInt64BE(8192n, 0);
    short.writeUInt16BE(1, 8);
    expect(decodeExportNameReply(short)).toEqual({ size: 8192, transmissionFlags: 1 });
    expect(decodeExportNameReply(Buffer.concat([short, Buffer.alloc(124)])).size).toBe(8192);
    expect(() => decodeExportNameReply(Buffer.alloc(11))).toThrow(NbdProtocolError);
  });
});

describe('NBD transmission codecs', () => {
  it('encodes a request header big-endian with a split 64-bit handle and offset', () => {
    const out = Buffer.alloc(28);
    encodeRequestHeader(out, 0, CommandFlag.FUA, Command.WRITE, 0x01020304, 0x05060708, 0x1_0000_0200, 4096);
    expect(out.toString('hex')).toBe('25609513' + '0001' + '0001' + '0102030405060708' + '0000000100000200' + '00001000');
  });

  it('decodes simple and structured reply headers and rejects unknown magic or unnegotiated chunks', () => {
    const into: ReplyHeader = { structured: false, error: 0, flags: 0, type: 0, handleHigh: 0, handleLow: 0, length: 0 };
    decodeReplyHeader(hex('67446698 00000005 0000000100000002'), 0, false, into);
    expect(into).toMatchObject({ structured: false, error: 5, handleHigh: 1, handleLow: 2 });
    decodeReplyHeader(hex('668e33ef 0001 0002 0000000300000004 0000000c'), 0, true, into);
    expect(into).toMatchObject({ structured: true, flags: 1, type: ChunkType.OFFSET_HOLE, handleHigh: 3, handleLow: 4, length: 12 });
    expect(() => decodeReplyHeader(hex('668e33ef 0001 0002 0000000300000004 0000000c'), 0, false, into)).toThrow(
      /without NBD_OPT_STRUCTURED_REPLY/,
    );
    expect(() => decodeReplyHeader(hex('deadbeef 00000000 0000000000000000'), 0, true, into)).toThrow(/unknown magic/);
  });

  it('decodes error chunks and rejects messages longer than the chunk or a zero error', () => {
    expect(decodeErrorChunk(ChunkType.ERROR, hex('00000005 0002 6869'))).toEqual({ errno: 5, message: 'hi', offset: -1 });
    expect(decodeErrorChunk(ChunkType.ERROR_OFFSET, hex('0000001c 0000 0000000000001000'))).toEqual({
      errno: 28,
      message: '',
      offset: 4096,
    });
    expect(() => decodeErrorChunk(ChunkType.ERROR, hex('00000005 0010 6869'))).toThrow(/does not fit/);
    expect(() => decodeErrorChunk(ChunkType.ERROR, hex('00000000 0000'))).toThrow(/error value 0/);
    expect(() => decodeErrorChunk(ChunkType.ERROR_OFFSET, hex('00000005 0000 00000000'))).toThrow(/does not fit/);
    expect(() => decodeErrorChunk(ChunkType.ERROR, hex('0005'))).toThrow(/shorter than 6/);
    // Unknown error values are EIO: the spec restricts the set and a server must not make us report nonsense.
    expect(decodeErrorChunk(0x8000 | 7, hex('000003e7 0000')).errno).toBe(5);
    expect(errnoFromServer(28)).toBe(28);
    expect(errnoFromServer(999)).toBe(5);
  });

  it('decodes holes and data offsets and rejects bad lengths', () => {
    expect(decodeHoleChunk(hex('0000000000002000 00001000'))).toEqual({ offset: 0x2000, length: 0x1000 });
    expect(() => decodeHoleChunk(hex('0000000000002000 00000000'))).toThrow(/size 0/);
    expect(() => decodeHoleChunk(hex('0000000000002000'))).toThrow(/expected 12/);
    expect(() => decodeHoleChunk(hex('ffffffffffffffff 00001000'))).toThrow(/2\^53/);
    expect(decodeDataChunkOffset(hex('0000000000000200'), 9)).toBe(512);
    expect(() => decodeDataChunkOffset(hex('0000000000000200'), 8)).toThrow(/shorter than 9/);
  });
});

describe('NBD handshake (generator against scripted server bytes)', () => {
  it('negotiates structured replies and NBD_OPT_GO, honouring NO_ZEROES and the block sizes', () => {
    const flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_TRIM | TransmissionFlag.CAN_MULTI_CONN;
    const server = Buffer.concat([
      GREETING,
      optionReply(Option.STRUCTURED_REPLY, OptionReply.ACK),
      optionReply(Option.GO, OptionReply.INFO, infoBlockSize(512, 4096, 65536)),
      optionReply(Option.GO, OptionReply.INFO, Buffer.from([0, 2, 0x41])), // description: ignored
      optionReply(Option.GO, OptionReply.INFO, infoExport(1n << 20n, flags)),
      optionReply(Option.GO, OptionReply.ACK),
    ]);
    const { sent, info } = runHandshake(server);
    expect(sent.subarray(0, 4).toString('hex')).toBe('00000003'); // FIXED_NEWSTYLE | NO_ZEROES
    expect(sent.subarray(4, 20).toString('hex')).toBe('49484156454f5054' + '00000008' + '00000000');
    expect(info).toMatchObject({
      size: 1 << 20,
      canFlush: true,
      canTrim: true,
      canMultiConn: true,
      canFua: false,
      readOnly: false,
      structuredReplies: true,
      minimumBlockSize: 512,
      preferredBlockSize: 4096,
      maximumPayload: 65536,
    });
  });

  it('works without structured replies when the server does not know them, and falls back to EXPORT_NAME', () => {
    const exportReply = Buffer.alloc(10);
    exportReply.writeBigUInt64BE(4096n, 0);
    exportReply.writeUInt16BE(TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY, 8);
    const server = Buffer.concat([
      GREETING,
      optionReply(Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP),
      optionReply(Option.GO, OptionReply.ERR_UNSUP),
      exportReply,
    ]);
    const { info } = runHandshake(server);
    expect(info).toMatchObject({ size: 4096, readOnly: true, structuredReplies: false, minimumBlockSize: 1, maximumPayload: 32 << 20 });
  });

  it('reports an unknown export as a permanent NbdHandshakeError with the server message', () => {
    const server = Buffer.concat([
      GREETING,
      optionReply(Option.STRUCTURED_REPLY, OptionReply.ACK),
      optionReply(Option.GO, OptionReply.ERR_UNKNOWN, Buffer.from('no such export')),
    ]);
    let caught: unknown;
    try {
      runHandshake(server);
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(NbdHandshakeError);
    expect((caught as NbdHandshakeError).code).toBe('NBD_UNKNOWN_EXPORT');
    expect((caught as NbdHandshakeError).permanent).toBe(true);
    expect((caught as Error).message).toMatch(/'disk'.*no such export/);
  });

  it('treats an ACK without NBD_INFO_EXPORT, a malformed INFO or an endless reply stream as protocol errors', () => {
    const noExport = Buffer.concat([
      GREETING,
      optionReply(Option.STRUCTURED_REPLY, OptionReply.ACK),
      optionReply(Option.GO, OptionReply.ACK),
    ]);
    expect(() => runHandshake(noExport)).toThrow(/without NBD_INFO_EXPORT/);
    const badInfo = Buffer.concat([
      GREETING,
      optionReply(Option.STRUCTURED_REPLY, OptionReply.ACK),
      optionReply(Option.GO, OptionReply.INFO, infoExport(4096n, 1).subarray(0, 11)),
    ]);
    expect(() => runHandshake(badInfo)).toThrow(NbdProtocolError);
    const endless = Buffer.concat([
      GREETING,
      optionReply(Option.STRUCTURED_REPLY, OptionReply.ACK),
      ...new Array<Buffer>(70).fill(optionReply(Option.GO, OptionReply.INFO, Buffer.from([0, 1]))),
    ]);
    expect(() => runHandshake(endless)).toThrow(/too many replies/);
    const wrongType = Buffer.concat([GREETING, optionReply(Option.STRUCTURED_REPLY, OptionReply.SERVER)]);
    expect(() => runHandshake(wrongType)).toThrow(NbdProtocolError);
  });
});

describe('NBD URIs', () => {
  it('parses TCP URIs with the default port, IPv6 literals and percent-encoded export names', () => {
    expect(parseNbdUri('nbd://example.com/disk')).toEqual({
      endpoint: { kind: 'tcp', host: 'example.com', port: 10809 },
      exportName: 'disk',
    });
    expect(parseNbdUri('nbd://127.0.0.1:2000/')).toEqual({ endpoint: { kind: 'tcp', host: '127.0.0.1', port: 2000 }, exportName: '' });
    expect(parseNbdUri('nbd://127.0.0.1')).toMatchObject({ exportName: '' });
    expect(parseNbdUri('nbd://[::1]:10810/a')).toEqual({ endpoint: { kind: 'tcp', host: '::1', port: 10810 }, exportName: 'a' });
    expect(parseNbdUri('nbd://h//disk').exportName).toBe('/disk');
    expect(parseNbdUri('nbd://h/hello%20world').exportName).toBe('hello world');
  });

  it('parses Unix URIs, including abstract sockets', () => {
    expect(parseNbdUri('nbd+unix:///disk?socket=/run/nbd.sock')).toEqual({
      endpoint: { kind: 'unix', path: '/run/nbd.sock' },
      exportName: 'disk',
    });
    expect(parseNbdUri('nbd+unix:///?socket=%00/abstract')).toEqual({ endpoint: { kind: 'unix', path: '@/abstract' }, exportName: '' });
  });

  it('rejects TLS, unknown parameters, missing sockets and bad ports with a clear error', () => {
    const bad = [
      ['nbds://h/x', /TLS/],
      ['nbds+unix:///x?socket=/s', /TLS/],
      ['nbd://h/x?tls-type=x509', /TLS/],
      ['nbd://h/x?foo=1', /unknown query parameter 'foo'/],
      ['nbd+unix:///x', /'socket'/],
      ['nbd+unix://host/x?socket=/s', /no host/],
      ['nbd://h:99999/x', /NBD URI/],
      ['nbd://user@h/x', /user information/],
      ['http://h/x', /unknown scheme/],
      ['nbd:/x', /expected/],
      ['nbd://h/%zz', /percent/],
      ['nbd://h/x?socket=/s', /only valid with nbd\+unix/],
    ] as const;
    for (const [uri, message] of bad) {
      expect(() => parseNbdUri(uri), uri).toThrow(NbdUriError);
      expect(() => parseNbdUri(uri), uri).toThrow(message);
    }
  });
});

describe('host segment lists', () => {
  it('emits the iovecs of a byte range across segment boundaries', () => {
    const list = new SegmentList({ count: 3, addresses: [0x1000, 0x5000, 0x2_0000_0000], lengths: [100, 200, 300] });
    const iov = new Uint32Array(16);
    const end = list.fill(50, 300, iov, 0, 4);
    expect(end).toBe(3);
    expect(Array.from(iov.subarray(0, 12))).toEqual([0x1000 + 50, 0, 50, 0, 0x5000, 0, 200, 0, 0, 2, 50, 0]);
    expect(() => new SegmentList({ count: 1, addresses: [0], lengths: [1] })).toThrow(RangeError);
  });
});
