/**
 * Client stream sockets for network back-ends (NBD): non-blocking connect to a numeric IPv4/IPv6 address or a
 * Unix socket, vectored send/receive straight from/into caller memory (guest buffers), and memcpy/memset for
 * the few bytes that arrive in a staging buffer. No name resolution here: this runs on worker threads, where
 * a blocking getaddrinfo would stall every queue; callers resolve host names first (dns.lookup) or pass
 * numeric addresses.
 *
 * Hot-path calls return the byte count or a negative errno instead of throwing.
 */
import { isIPv4, isIPv6 } from 'node:net';
import {
  libc,
  sys,
  addressOf,
  type Fn,
  AF_UNIX,
  SOCK_STREAM,
  SOCK_NONBLOCK,
  SOCK_CLOEXEC,
  SOL_SOCKET,
  SO_ERROR,
  MSG_NOSIGNAL,
  POLLOUT,
  POLLERR,
  POLLHUP,
} from './libc.js';
import { check, lastErrno, Errno, SyscallError } from './errors.js';
import { encodeUnixAddress } from './unix-address.js';
import { VublkError } from '../errors.js';

/** The calls only network back-ends need; the common ones (socket, connect, recv, ...) are in `sys`. */
const net = {
  readv: libc.func('intptr_t readv(int fd, uintptr_t iov, int iovcnt)') as Fn<[number, number, number], number>,
  setsockopt: libc.func('int setsockopt(int fd, int level, int name, uintptr_t val, uint32_t len)') as Fn<
    [number, number, number, number, number],
    number
  >,
  shutdown: libc.func('int shutdown(int fd, int how)') as Fn<[number, number], number>,
  memcpy: libc.func('uintptr_t memcpy(uintptr_t dest, uintptr_t src, size_t n)') as Fn<[number, number, number], number>,
  memset: libc.func('uintptr_t memset(uintptr_t dest, int c, size_t n)') as Fn<[number, number, number], number>,
};

export const AF_INET = 2;
export const AF_INET6 = 10;
const IPPROTO_TCP = 6;
const TCP_NODELAY = 1;
const SHUT_RDWR = 2;

/** A network endpoint: a numeric IP address and port, or a Unix socket path (`@name` = abstract). */
export type StreamEndpoint = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export class EndpointError extends VublkError {
  constructor(message: string) {
    super('ENDPOINT', message, { peerFault: true });
  }
}

interface EncodedAddress {
  family: number;
  bytes: Buffer;
  length: number;
}

function encodeInet(host: string, port: number): EncodedAddress {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new EndpointError(`port ${port} is out of range`);
  const bare = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (isIPv4(bare)) {
    const bytes = Buffer.alloc(16);
    bytes.writeUInt16LE(AF_INET, 0);
    bytes.writeUInt16BE(port, 2);
    bare.split('.').forEach((part, i) => bytes.writeUInt8(Number(part), 4 + i));
    return { family: AF_INET, bytes, length: 16 };
  }
  if (isIPv6(bare)) {
    const bytes = Buffer.alloc(28);
    bytes.writeUInt16LE(AF_INET6, 0);
    bytes.writeUInt16BE(port, 2);
    ipv6Bytes(bare).copy(bytes, 8);
    return { family: AF_INET6, bytes, length: 28 };
  }
  throw new EndpointError(`'${host}' is not a numeric IPv4 or IPv6 address (resolve host names before connecting)`);
}

/** Expands a (validated) IPv6 literal, with `::` and an optional embedded IPv4 tail, to its 16 bytes. */
function ipv6Bytes(address: string): Buffer {
  if (address.includes('%')) throw new EndpointError(`IPv6 zone identifiers are not supported: ${address}`);
  let text = address;
  const lastColon = text.lastIndexOf(':');
  const last = text.slice(lastColon + 1);
  if (last.includes('.')) {
    const [a = 0, b = 0, c = 0, d = 0] = last.split('.').map(Number);
    text = `${text.slice(0, lastColon + 1)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const halves = text.split('::');
  const parse = (part: string | undefined): number[] => (part ? part.split(':').map((g) => parseInt(g, 16)) : []);
  const head = parse(halves[0]);
  const tail = parse(halves[1]);
  const groups = halves.length > 1 ? [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail] : head;
  const out = Buffer.alloc(16);
  groups.slice(0, 8).forEach((g, i) => out.writeUInt16BE(g & 0xffff, i * 2));
  return out;
}

export interface PendingConnect {
  fd: number;
  /** True when the connect is still in progress: wait for writability, then call `finishConnect`. */
  inProgress: boolean;
}

/**
 * Starts a non-blocking connect. A refused or unreachable endpoint that fails at once throws SyscallError;
 * otherwise the fd is returned (owned by the caller) and may still be connecting.
 */
export function startConnect(endpoint: StreamEndpoint): PendingConnect {
  const address =
    endpoint.kind === 'tcp'
      ? encodeInet(endpoint.host, endpoint.port)
      : (() => {
          const encoded = encodeUnixAddress(endpoint.path);
          return { family: AF_UNIX, bytes: encoded.bytes, length: encoded.length };
        })();
  const fd = check(sys.socket(address.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), 'socket');
  if (address.family !== AF_UNIX) {
    // Requests are small and latency-bound: never let Nagle hold a request header back.
    const one = Buffer.alloc(4);
    one.writeInt32LE(1, 0);
    net.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, addressOf(one), 4);
  }
  if (sys.connect(fd, addressOf(address.bytes), address.length) === 0) return { fd, inProgress: false };
  const errno = lastErrno();
  if (errno === Errno.EINPROGRESS) return { fd, inProgress: true };
  sys.close(fd);
  throw new SyscallError('connect', errno, describeEndpoint(endpoint));
}

/**
 * Result of a non-blocking connect: EINPROGRESS while it is still under way, 0 once connected, else the
 * errno it failed with. (SO_ERROR alone reads 0 while the connect is still in progress.)
 */
export function connectResult(fd: number): number {
  const pollfd = Buffer.alloc(8);
  pollfd.writeInt32LE(fd, 0);
  pollfd.writeInt16LE(POLLOUT, 4);
  const ready = sys.poll(addressOf(pollfd), 1, 0);
  if (ready === 0) return Errno.EINPROGRESS;
  if (ready > 0 && (pollfd.readInt16LE(6) & (POLLOUT | POLLERR | POLLHUP)) === 0) return Errno.EINPROGRESS;
  const value = Buffer.alloc(4);
  const length = Buffer.alloc(4);
  length.writeUInt32LE(4, 0);
  if (sys.getsockopt(fd, SOL_SOCKET, SO_ERROR, addressOf(value), addressOf(length)) < 0) return lastErrno();
  return value.readInt32LE(0);
}

export function describeEndpoint(endpoint: StreamEndpoint): string {
  if (endpoint.kind === 'unix') return `unix:${endpoint.path}`;
  return endpoint.host.includes(':') && !endpoint.host.startsWith('[')
    ? `[${endpoint.host}]:${endpoint.port}`
    : `${endpoint.host}:${endpoint.port}`;
}

/** readv into `count` iovecs at `iovAddress`: bytes read (0 = peer closed) or -errno. */
export function readVector(fd: number, iovAddress: number, count: number): number {
  const n = net.readv(fd, iovAddress, count);
  return n >= 0 ? n : -lastErrno();
}

/** recv into raw memory: bytes read (0 = peer closed) or -errno. */
export function receiveInto(fd: number, address: number, length: number): number {
  const n = sys.recv(fd, address, length, 0);
  return n >= 0 ? n : -lastErrno();
}

/**
 * sendmsg of `count` iovecs with MSG_NOSIGNAL (a dead peer must be an EPIPE, not a SIGPIPE): bytes sent or
 * -errno. `msghdr` is a MSGHDR_SIZE-byte scratch Buffer the caller owns (one per connection, so no allocation).
 */
export function sendVector(fd: number, msghdr: Buffer, iovAddress: number, count: number): number {
  msghdr.fill(0);
  msghdr.writeBigUInt64LE(BigInt(iovAddress), 16);
  msghdr.writeBigUInt64LE(BigInt(count), 24);
  const n = sys.sendmsg(fd, addressOf(msghdr), MSG_NOSIGNAL);
  return n >= 0 ? n : -lastErrno();
}

/** Shuts both directions so a peer blocked on us sees EOF even before the fd is closed. Errors are ignored. */
export function shutdownSocket(fd: number): void {
  net.shutdown(fd, SHUT_RDWR);
}

export function copyMemory(destination: number, source: number, length: number): void {
  if (length > 0) net.memcpy(destination, source, length);
}

export function zeroMemory(destination: number, length: number): void {
  if (length > 0) net.memset(destination, 0, length);
}
