/**
 * NBD wire formats (doc/proto.md of the NetworkBlockDevice project): the fixed-newstyle handshake, option
 * requests and replies (NBD_OPT_GO with NBD_INFO_EXPORT / NBD_INFO_BLOCK_SIZE, NBD_OPT_STRUCTURED_REPLY),
 * transmission requests, simple replies and structured reply chunks. Pure: no I/O.
 *
 * Invariant: every decoder treats its input as hostile. Lengths are bounded before anything is allocated,
 * magic numbers and reply types are checked, and anything the spec says a client must hang up on throws
 * NbdProtocolError (the caller resets the connection). All integers are big-endian on the wire.
 */
import { VublkError } from './errors.js';

export class NbdProtocolError extends VublkError {
  constructor(message: string) {
    super('NBD_PROTOCOL', `NBD protocol error: ${message}`, { peerFault: true, fatal: true });
  }
}

export const NBD_DEFAULT_PORT = 10809;

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_CLISERV_MAGIC = 0x00420281861253n; // oldstyle negotiation
export const NBD_OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

/** Transmission flags (16 bits) sent with the export's size. */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
} as const;

const REP_ERROR_BIT = 0x8000_0000;
export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: (REP_ERROR_BIT | 1) >>> 0,
  ERR_POLICY: (REP_ERROR_BIT | 2) >>> 0,
  ERR_INVALID: (REP_ERROR_BIT | 3) >>> 0,
  ERR_PLATFORM: (REP_ERROR_BIT | 4) >>> 0,
  ERR_TLS_REQD: (REP_ERROR_BIT | 5) >>> 0,
  ERR_UNKNOWN: (REP_ERROR_BIT | 6) >>> 0,
  ERR_SHUTDOWN: (REP_ERROR_BIT | 7) >>> 0,
  ERR_BLOCK_SIZE_REQD: (REP_ERROR_BIT | 8) >>> 0,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CommandFlag = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ChunkType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) | 1,
  ERROR_OFFSET: (1 << 15) | 2,
} as const;
const CHUNK_ERROR_BIT = 1 << 15;

/** The error values the spec defines; anything else a server sends is reported as EIO. */
export const NbdErrno = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;
const KNOWN_ERRNOS: ReadonlySet<number> = new Set(Object.values(NbdErrno));

/** Maps a server error value to a local errno: unknown values become EIO (the spec restricts the set). */
export function errnoFromServer(value: number): number {
  return KNOWN_ERRNOS.has(value) ? value : NbdErrno.EIO;
}

/** Strings (export names, messages) are at most 4096 bytes (spec: "MUST be no longer than 4096 bytes"). */
export const NBD_MAX_STRING = 4096;
/** An option reply we accept carries at most this much (error strings, INFO records, exports). */
export const MAX_OPTION_REPLY_PAYLOAD = 64 * 1024;
/** Default maximum payload when the server sends no NBD_INFO_BLOCK_SIZE (the spec's safe 32 MiB). */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

// ---------------------------------------------------------------- handshake

export const SERVER_GREETING_SIZE = 18;

export interface ServerGreeting {
  handshakeFlags: number;
}

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. Oldstyle servers are refused. */
export function decodeServerGreeting(bytes: Uint8Array): ServerGreeting {
  if (bytes.length !== SERVER_GREETING_SIZE) throw new NbdProtocolError(`greeting is ${bytes.length} bytes, expected 18`);
  const view = dataView(bytes);
  if (view.getBigUint64(0) !== NBD_MAGIC) throw new NbdProtocolError('greeting does not start with NBDMAGIC');
  const second = view.getBigUint64(8);
  if (second === NBD_CLISERV_MAGIC) throw new NbdProtocolError('server speaks the oldstyle handshake, which is not supported');
  if (second !== NBD_IHAVEOPT) throw new NbdProtocolError('greeting has an unknown second magic number');
  const handshakeFlags = view.getUint16(16);
  if ((handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE) === 0) {
    throw new NbdProtocolError('server does not support the fixed newstyle handshake');
  }
  return { handshakeFlags };
}

export function encodeClientFlags(flags: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(flags >>> 0, 0);
  return out;
}

export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const out = Buffer.alloc(16 + data.length);
  out.writeBigUInt64BE(NBD_IHAVEOPT, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(data.length, 12);
  out.set(data, 16);
  return out;
}

/** NBD_OPT_GO (or INFO): export name, then the list of NBD_INFO_* records asked for. */
export function encodeGoOption(exportName: string, infos: readonly number[], option: number = Option.GO): Buffer {
  const name = encodeExportName(exportName);
  const data = Buffer.alloc(4 + name.length + 2 + 2 * infos.length);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  data.writeUInt16BE(infos.length, 4 + name.length);
  infos.forEach((info, i) => data.writeUInt16BE(info, 4 + name.length + 2 + 2 * i));
  return encodeOption(option, data);
}

export function encodeExportName(exportName: string): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  if (name.length > NBD_MAX_STRING) throw new RangeError(`export name is ${name.length} bytes, the NBD limit is ${NBD_MAX_STRING}`);
  if (name.includes(0)) throw new RangeError('export name contains a NUL byte');
  return name;
}

export const OPTION_REPLY_HEADER_SIZE = 20;

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** Option reply header; the payload length is bounded so a hostile server cannot make us allocate. */
export function decodeOptionReplyHeader(bytes: Uint8Array, expectedOption: number): OptionReplyHeader {
  if (bytes.length !== OPTION_REPLY_HEADER_SIZE) throw new NbdProtocolError(`option reply header is ${bytes.length} bytes`);
  const view = dataView(bytes);
  if (view.getBigUint64(0) !== NBD_OPTION_REPLY_MAGIC) throw new NbdProtocolError('option reply has a bad magic number');
  const option = view.getUint32(8);
  const type = view.getUint32(12);
  const length = view.getUint32(16);
  if (option !== expectedOption) throw new NbdProtocolError(`option reply is for option ${option}, expected ${expectedOption}`);
  if (length > MAX_OPTION_REPLY_PAYLOAD) throw new NbdProtocolError(`option reply payload of ${length} bytes is too large`);
  return { option, type, length };
}

export function isOptionError(type: number): boolean {
  return (type & REP_ERROR_BIT) !== 0;
}

export function optionReplyName(type: number): string {
  const entry = Object.entries(OptionReply).find(([, value]) => value === type);
  return entry ? `NBD_REP_${entry[0]}` : `reply type 0x${type.toString(16)}`;
}

/** What NBD_REP_INFO records told us. */
export type InfoRecord =
  | { info: typeof Info.EXPORT; size: number; transmissionFlags: number }
  | { info: typeof Info.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { info: 'other'; type: number };

/** Largest export size we accept: addresses must stay exact in a JS Number (2^53). */
export const MAX_EXPORT_SIZE = Number.MAX_SAFE_INTEGER;

export function decodeInfoReply(payload: Uint8Array): InfoRecord {
  if (payload.length < 2) throw new NbdProtocolError('NBD_REP_INFO shorter than its type field');
  const view = dataView(payload);
  const type = view.getUint16(0);
  switch (type) {
    case Info.EXPORT: {
      if (payload.length !== 12) throw new NbdProtocolError(`NBD_INFO_EXPORT is ${payload.length} bytes, expected 12`);
      const size = view.getBigUint64(2);
      if (size > BigInt(MAX_EXPORT_SIZE)) throw new NbdProtocolError(`export size ${size} is beyond 2^53`);
      const transmissionFlags = view.getUint16(10);
      if ((transmissionFlags & TransmissionFlag.HAS_FLAGS) === 0) throw new NbdProtocolError('transmission flags lack NBD_FLAG_HAS_FLAGS');
      return { info: Info.EXPORT, size: Number(size), transmissionFlags };
    }
    case Info.BLOCK_SIZE: {
      if (payload.length !== 14) throw new NbdProtocolError(`NBD_INFO_BLOCK_SIZE is ${payload.length} bytes, expected 14`);
      const minimum = view.getUint32(2);
      const preferred = view.getUint32(6);
      const maximum = view.getUint32(10);
      validateBlockSizes(minimum, preferred, maximum);
      return { info: Info.BLOCK_SIZE, minimum, preferred, maximum };
    }
    default:
      return { info: 'other', type };
  }
}

function isPowerOfTwo(value: number): boolean {
  return value > 0 && (value & (value - 1)) === 0;
}

/** The spec's constraints: minimum a power of two ≤ 64 KiB, preferred a power of two ≥ it, maximum a multiple of minimum. */
function validateBlockSizes(minimum: number, preferred: number, maximum: number): void {
  if (!isPowerOfTwo(minimum) || minimum > 65536) throw new NbdProtocolError(`minimum block size ${minimum} is not a power of two ≤ 64 KiB`);
  if (!isPowerOfTwo(preferred) || preferred < minimum || preferred > 32 * 1024 * 1024) {
    throw new NbdProtocolError(`preferred block size ${preferred} is invalid for minimum ${minimum}`);
  }
  if (maximum !== 0xffffffff && (maximum < minimum || maximum % minimum !== 0)) {
    throw new NbdProtocolError(`maximum payload ${maximum} is not a multiple of the minimum block size ${minimum}`);
  }
}

/** Reply to NBD_OPT_EXPORT_NAME (the fallback when NBD_OPT_GO is unsupported): size, flags, maybe 124 zeroes. */
export function exportNameReplySize(noZeroes: boolean): number {
  return noZeroes ? 10 : 134;
}

export function decodeExportNameReply(bytes: Uint8Array): { size: number; transmissionFlags: number } {
  if (bytes.length !== 10 && bytes.length !== 134) throw new NbdProtocolError(`export reply is ${bytes.length} bytes`);
  const view = dataView(bytes);
  const size = view.getBigUint64(0);
  if (size > BigInt(MAX_EXPORT_SIZE)) throw new NbdProtocolError(`export size ${size} is beyond 2^53`);
  const transmissionFlags = view.getUint16(8);
  if ((transmissionFlags & TransmissionFlag.HAS_FLAGS) === 0) throw new NbdProtocolError('transmission flags lack NBD_FLAG_HAS_FLAGS');
  return { size: Number(size), transmissionFlags };
}

/** A human-readable string from a server (error message): bounded, decoded leniently. */
export function decodeServerString(bytes: Uint8Array): string {
  return Buffer.from(bytes.subarray(0, Math.min(bytes.length, 256)))
    .toString('utf8')
    .replace(/[^\x20-\x7e]/g, '?');
}

// ---------------------------------------------------------------- transmission

export const REQUEST_HEADER_SIZE = 28;

/**
 * Writes a request header into `out` at `at`. The 64-bit handle is given as two 32-bit halves so the hot
 * path never builds a BigInt.
 */
export function encodeRequestHeader(
  out: Buffer,
  at: number,
  flags: number,
  command: number,
  handleHigh: number,
  handleLow: number,
  offset: number,
  length: number,
): void {
  out.writeUInt32BE(NBD_REQUEST_MAGIC, at);
  out.writeUInt16BE(flags, at + 4);
  out.writeUInt16BE(command, at + 6);
  out.writeUInt32BE(handleHigh >>> 0, at + 8);
  out.writeUInt32BE(handleLow >>> 0, at + 12);
  writeU64(out, at + 16, offset);
  out.writeUInt32BE(length >>> 0, at + 24);
}

export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;

/** A reply header: simple (16 bytes) or a structured chunk header (20 bytes), as read off the wire. */
export interface ReplyHeader {
  structured: boolean;
  /** Simple: the error field. Structured: 0. */
  error: number;
  /** Structured only. */
  flags: number;
  type: number;
  handleHigh: number;
  handleLow: number;
  /** Structured: the payload length. Simple: 0 (a read's data length comes from the request). */
  length: number;
}

/** How many header bytes the reply starting with this magic has; throws on an unknown magic. */
export function replyHeaderSize(magic: number, structuredNegotiated: boolean): number {
  if (magic === NBD_SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_SIZE;
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
    if (!structuredNegotiated) throw new NbdProtocolError('structured reply chunk without NBD_OPT_STRUCTURED_REPLY');
    return CHUNK_HEADER_SIZE;
  }
  throw new NbdProtocolError(`reply has an unknown magic 0x${(magic >>> 0).toString(16)}`);
}

/** Decodes a reply header in place (`into` is reused). `bytes[at..]` holds at least replyHeaderSize bytes. */
export function decodeReplyHeader(bytes: Buffer, at: number, structuredNegotiated: boolean, into: ReplyHeader): ReplyHeader {
  const magic = bytes.readUInt32BE(at);
  const size = replyHeaderSize(magic, structuredNegotiated);
  if (size === SIMPLE_REPLY_SIZE) {
    into.structured = false;
    into.error = bytes.readUInt32BE(at + 4);
    into.flags = 0;
    into.type = 0;
    into.handleHigh = bytes.readUInt32BE(at + 8);
    into.handleLow = bytes.readUInt32BE(at + 12);
    into.length = 0;
    return into;
  }
  into.structured = true;
  into.error = 0;
  into.flags = bytes.readUInt16BE(at + 4);
  into.type = bytes.readUInt16BE(at + 6);
  into.handleHigh = bytes.readUInt32BE(at + 8);
  into.handleLow = bytes.readUInt32BE(at + 12);
  into.length = bytes.readUInt32BE(at + 16);
  return into;
}

export function isErrorChunk(type: number): boolean {
  return (type & CHUNK_ERROR_BIT) !== 0;
}

/** Largest payload of a non-data chunk we accept: an error string (≤ 4096) plus its fixed fields. */
export const MAX_NON_DATA_CHUNK = NBD_MAX_STRING + 64;

export interface ErrorChunk {
  errno: number;
  message: string;
  /** ERROR_OFFSET only, else -1. */
  offset: number;
}

/**
 * Decodes an error chunk's payload (ERROR, ERROR_OFFSET, or an unknown type with bit 15 set).
 * The error value must be non-zero and the message must fit inside the chunk.
 */
export function decodeErrorChunk(type: number, payload: Uint8Array): ErrorChunk {
  if (payload.length < 6) throw new NbdProtocolError(`error chunk of ${payload.length} bytes is shorter than 6`);
  const view = dataView(payload);
  const value = view.getUint32(0);
  const messageLength = view.getUint16(4);
  if (value === 0) throw new NbdProtocolError('error chunk with error value 0');
  const fixedTail = type === ChunkType.ERROR_OFFSET ? 8 : 0;
  if (6 + messageLength + fixedTail > payload.length) {
    throw new NbdProtocolError(`error chunk message of ${messageLength} bytes does not fit its ${payload.length}-byte payload`);
  }
  if (type === ChunkType.ERROR && payload.length !== 6 + messageLength) {
    throw new NbdProtocolError('NBD_REPLY_TYPE_ERROR has trailing bytes');
  }
  const message = decodeServerString(payload.subarray(6, 6 + messageLength));
  const offset = type === ChunkType.ERROR_OFFSET ? readU64(view, 6 + messageLength) : -1;
  return { errno: errnoFromServer(value), message, offset };
}

/** OFFSET_HOLE: 64-bit offset + 32-bit non-zero size, exactly 12 bytes. */
export function decodeHoleChunk(payload: Uint8Array): { offset: number; length: number } {
  if (payload.length !== 12) throw new NbdProtocolError(`OFFSET_HOLE chunk is ${payload.length} bytes, expected 12`);
  const view = dataView(payload);
  const offset = readU64(view, 0);
  const length = view.getUint32(8);
  if (length === 0) throw new NbdProtocolError('OFFSET_HOLE chunk with size 0');
  return { offset, length };
}

/** OFFSET_DATA: the first 8 payload bytes are the offset; the chunk must carry at least one data byte. */
export function decodeDataChunkOffset(bytes: Uint8Array, chunkLength: number): number {
  if (chunkLength < 9) throw new NbdProtocolError(`OFFSET_DATA chunk of ${chunkLength} bytes is shorter than 9`);
  return readU64(dataView(bytes), 0);
}

// ---------------------------------------------------------------- helpers

function dataView(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** 64-bit values beyond 2^53 cannot be offsets of an export we accept: they are reported as protocol errors. */
function readU64(view: DataView, at: number): number {
  const high = view.getUint32(at);
  const low = view.getUint32(at + 4);
  if (high > 0x1fffff) throw new NbdProtocolError('64-bit offset beyond 2^53');
  return high * 0x1_0000_0000 + low;
}

export function readU64BE(bytes: Buffer, at: number): number {
  return readU64(dataView(bytes), at);
}

function writeU64(out: Buffer, at: number, value: number): void {
  out.writeUInt32BE(Math.floor(value / 0x1_0000_0000), at);
  out.writeUInt32BE(value >>> 0, at + 4);
}
