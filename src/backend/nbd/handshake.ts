/**
 * The client side of the fixed-newstyle handshake, written as a generator of I/O steps so one piece of logic
 * serves both the blocking open (a poll loop with a deadline) and the non-blocking reconnect inside the
 * worker's event loop. The generator yields `{send}` or `{receive: n}` and is resumed with the n bytes read.
 *
 * Sequence: greeting → client flags → [NBD_OPT_STRUCTURED_REPLY] → NBD_OPT_GO asking for NBD_INFO_EXPORT and
 * NBD_INFO_BLOCK_SIZE (NBD_OPT_EXPORT_NAME when the server does not know GO). Every reply is bounded and
 * checked; a server error becomes NbdHandshakeError naming the option and the server's message.
 */
import {
  ClientFlag,
  HandshakeFlag,
  Info,
  NbdProtocolError,
  OPTION_REPLY_HEADER_SIZE,
  Option,
  OptionReply,
  SERVER_GREETING_SIZE,
  TransmissionFlag,
  DEFAULT_MAX_PAYLOAD,
  decodeExportNameReply,
  decodeInfoReply,
  decodeOptionReplyHeader,
  decodeServerGreeting,
  decodeServerString,
  encodeClientFlags,
  encodeExportName,
  encodeGoOption,
  encodeOption,
  exportNameReplySize,
  isOptionError,
  optionReplyName,
} from '../../../protocol/nbd.js';
import { VublkError } from '../../errors.js';

export class NbdHandshakeError extends VublkError {
  constructor(
    message: string,
    /** True when retrying cannot help (unknown export, policy refusal): reconnect loops stop logging noise on it. */
    readonly permanent: boolean,
    code = 'NBD_HANDSHAKE',
  ) {
    super(code, message, { peerFault: true });
  }
}

export type HandshakeStep = { send: Buffer } | { receive: number };

/** What the handshake settled: everything the data path and the device need to know about the export. */
export interface NbdExportInfo {
  size: number;
  transmissionFlags: number;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canWriteZeroes: boolean;
  canFastZero: boolean;
  canMultiConn: boolean;
  rotational: boolean;
  structuredReplies: boolean;
  /** Requests' offsets and lengths must be multiples of this (1 when the server sent no block sizes). */
  minimumBlockSize: number;
  preferredBlockSize: number;
  /** Largest READ/WRITE payload the server accepts. */
  maximumPayload: number;
}

export interface HandshakeOptions {
  exportName: string;
  /** Ask for structured replies (default true); false is for testing the simple-reply path. */
  structuredReplies?: boolean;
}

/** Options answered by more than this many replies mean a broken or hostile server. */
const MAX_REPLIES_PER_OPTION = 64;

export function* clientHandshake(options: HandshakeOptions): Generator<HandshakeStep, NbdExportInfo, Buffer | undefined> {
  const greeting = decodeServerGreeting(yield* receive(SERVER_GREETING_SIZE));
  const noZeroes = (greeting.handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
  yield { send: encodeClientFlags(ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0)) };

  let structured = false;
  if (options.structuredReplies !== false) {
    yield { send: encodeOption(Option.STRUCTURED_REPLY) };
    const reply = yield* optionReply(Option.STRUCTURED_REPLY);
    if (reply.type === OptionReply.ACK) {
      if (reply.payload.length !== 0) throw new NbdProtocolError('NBD_OPT_STRUCTURED_REPLY acknowledged with a payload');
      structured = true;
    } else if (!isOptionError(reply.type)) {
      throw new NbdProtocolError(`unexpected ${optionReplyName(reply.type)} to NBD_OPT_STRUCTURED_REPLY`);
    } else if (reply.type === OptionReply.ERR_TLS_REQD) {
      throw new NbdHandshakeError('the server requires TLS, which is not supported', true, 'NBD_TLS_REQUIRED');
    } else if (reply.type === OptionReply.ERR_SHUTDOWN) {
      throw new NbdHandshakeError('the server is shutting down', false, 'NBD_SHUTDOWN');
    }
    // Any other error: the server simply has no structured replies; simple replies work everywhere.
  }

  yield { send: encodeGoOption(options.exportName, [Info.EXPORT, Info.BLOCK_SIZE]) };
  let exportInfo: { size: number; transmissionFlags: number } | null = null;
  let blockSizes: { minimum: number; preferred: number; maximum: number } | null = null;
  for (let replies = 0; ; replies++) {
    if (replies >= MAX_REPLIES_PER_OPTION) throw new NbdProtocolError('too many replies to NBD_OPT_GO');
    const reply = yield* optionReply(Option.GO);
    if (reply.type === OptionReply.INFO) {
      const record = decodeInfoReply(reply.payload);
      if (record.info === Info.EXPORT) exportInfo = { size: record.size, transmissionFlags: record.transmissionFlags };
      else if (record.info === Info.BLOCK_SIZE) blockSizes = record;
      continue;
    }
    if (reply.type === OptionReply.ACK) {
      if (!exportInfo) throw new NbdProtocolError('NBD_OPT_GO acknowledged without NBD_INFO_EXPORT');
      break;
    }
    if (reply.type === OptionReply.ERR_UNSUP) {
      // A server that predates NBD_OPT_GO: the old option cannot report errors, it just hangs up.
      yield { send: encodeOption(Option.EXPORT_NAME, encodeExportName(options.exportName)) };
      exportInfo = decodeExportNameReply(yield* receive(exportNameReplySize(noZeroes)));
      break;
    }
    if (isOptionError(reply.type)) throw goError(options.exportName, reply.type, reply.payload);
    throw new NbdProtocolError(`unexpected ${optionReplyName(reply.type)} to NBD_OPT_GO`);
  }

  const flags = exportInfo.transmissionFlags;
  const has = (flag: number): boolean => (flags & flag) !== 0;
  const minimum = blockSizes?.minimum ?? 1;
  const maximum = Math.min(blockSizes && blockSizes.maximum !== 0xffffffff ? blockSizes.maximum : DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD);
  return {
    size: exportInfo.size,
    transmissionFlags: flags,
    readOnly: has(TransmissionFlag.READ_ONLY),
    canFlush: has(TransmissionFlag.SEND_FLUSH),
    canFua: has(TransmissionFlag.SEND_FUA),
    canTrim: has(TransmissionFlag.SEND_TRIM),
    canWriteZeroes: has(TransmissionFlag.SEND_WRITE_ZEROES),
    canFastZero: has(TransmissionFlag.SEND_FAST_ZERO),
    canMultiConn: has(TransmissionFlag.CAN_MULTI_CONN),
    rotational: has(TransmissionFlag.ROTATIONAL),
    structuredReplies: structured,
    minimumBlockSize: minimum,
    preferredBlockSize: blockSizes?.preferred ?? 4096,
    maximumPayload: Math.max(minimum, maximum - (maximum % minimum)),
  };
}

function goError(exportName: string, type: number, payload: Buffer): NbdHandshakeError {
  const message = payload.length > 0 ? `: ${decodeServerString(payload)}` : '';
  switch (type) {
    case OptionReply.ERR_UNKNOWN:
      return new NbdHandshakeError(`the server has no export named '${exportName}'${message}`, true, 'NBD_UNKNOWN_EXPORT');
    case OptionReply.ERR_TLS_REQD:
      return new NbdHandshakeError(`the server requires TLS, which is not supported${message}`, true, 'NBD_TLS_REQUIRED');
    case OptionReply.ERR_POLICY:
      return new NbdHandshakeError(`the server refused export '${exportName}' by policy${message}`, true, 'NBD_POLICY');
    case OptionReply.ERR_SHUTDOWN:
      return new NbdHandshakeError(`the server is shutting down${message}`, false, 'NBD_SHUTDOWN');
    default:
      return new NbdHandshakeError(`NBD_OPT_GO failed with ${optionReplyName(type)}${message}`, false);
  }
}

function* receive(length: number): Generator<HandshakeStep, Buffer, Buffer | undefined> {
  const bytes = yield { receive: length };
  if (!bytes || bytes.length !== length) throw new Error(`handshake driver returned ${bytes?.length ?? 0} bytes, expected ${length}`);
  return bytes;
}

function* optionReply(option: number): Generator<HandshakeStep, { type: number; payload: Buffer }, Buffer | undefined> {
  const header = decodeOptionReplyHeader(yield* receive(OPTION_REPLY_HEADER_SIZE), option);
  const payload = header.length > 0 ? yield* receive(header.length) : Buffer.alloc(0);
  return { type: header.type, payload };
}
