/**
 * `struct sockaddr_un` for both kinds of AF_UNIX names: a filesystem path, or an abstract name written
 * `@name` (the systemd convention, e.g. in NOTIFY_SOCKET): on the wire its first byte is NUL and the
 * address length, not a terminating NUL, ends the name.
 */
import { AF_UNIX } from './libc.js';
import { VublkError } from '../errors.js';

export const SOCKADDR_UN_SIZE = 110;
/** offsetof(struct sockaddr_un, sun_path) */
const SUN_PATH_OFFSET = 2;
const SUN_PATH_SIZE = SOCKADDR_UN_SIZE - SUN_PATH_OFFSET;

export class UnixAddressError extends VublkError {
  constructor(address: string, reason: string) {
    super('VUBLK_ERR_UNIX_ADDRESS', `Unix socket address '${address}': ${reason}`, { peerFault: true });
  }
}

export interface EncodedUnixAddress {
  /** SOCKADDR_UN_SIZE bytes; keep it alive while its address is in use. */
  bytes: Buffer;
  /** The socklen_t to pass with it. */
  length: number;
}

/** Encodes a path or an `@abstract` name (NOTIFY_SOCKET, NBD endpoints). */
export function encodeUnixAddress(address: string): EncodedUnixAddress {
  const abstract = address.startsWith('@');
  return encode(address, abstract ? address.slice(1) : address, abstract);
}

/** Encodes a filesystem path only: a leading `@` is part of the file name (vhost-user socket paths). */
export function encodeUnixPath(path: string): EncodedUnixAddress {
  return encode(path, path, false);
}

function encode(address: string, nameText: string, abstract: boolean): EncodedUnixAddress {
  const name = Buffer.from(nameText, 'utf8');
  if (name.length === 0) throw new UnixAddressError(address, 'is empty');
  // A path needs room for its terminating NUL; an abstract name needs room for its leading one.
  if (name.length > SUN_PATH_SIZE - 1) {
    throw new UnixAddressError(address, `is ${name.length} bytes, the limit is ${SUN_PATH_SIZE - 1}`);
  }
  if (!abstract && name.includes(0)) throw new UnixAddressError(address, 'contains a NUL byte');
  const bytes = Buffer.alloc(SOCKADDR_UN_SIZE);
  bytes.writeUInt16LE(AF_UNIX, 0);
  name.copy(bytes, SUN_PATH_OFFSET + (abstract ? 1 : 0));
  return { bytes, length: SUN_PATH_OFFSET + 1 + name.length };
}

/**
 * Decodes what getsockname/recvfrom filled in: the path, `@name` for an abstract socket, or null for an
 * unnamed socket (or an address that is not AF_UNIX).
 */
export function decodeUnixAddress(bytes: Buffer, length: number): string | null {
  if (length <= SUN_PATH_OFFSET || bytes.readUInt16LE(0) !== AF_UNIX) return null;
  const end = Math.min(length, SOCKADDR_UN_SIZE);
  if (bytes[SUN_PATH_OFFSET] === 0) return `@${bytes.toString('utf8', SUN_PATH_OFFSET + 1, end)}`;
  const nul = bytes.indexOf(0, SUN_PATH_OFFSET);
  return bytes.toString('utf8', SUN_PATH_OFFSET, nul >= 0 && nul < end ? nul : end);
}
