/**
 * AF_UNIX stream sockets with SCM_RIGHTS fd passing, through raw libc calls (Node's net module cannot
 * carry fds). Sockets are non-blocking; `recvWithFds`/`sendWithFds` report EAGAIN as `null` so callers
 * can wait with `koffi.node.poll` (daemon) or `waitReadable` of poll-wait.ts (test front-end).
 */
import {
  sys,
  addressOf,
  AF_UNIX,
  SOCK_STREAM,
  SOCK_NONBLOCK,
  SOCK_CLOEXEC,
  SOL_SOCKET,
  SCM_RIGHTS,
  MSG_NOSIGNAL,
  MSG_CMSG_CLOEXEC,
  MSG_CTRUNC,
  F_DUPFD_CLOEXEC,
  MSGHDR_SIZE,
} from './libc.js';
import { encodeUnixPath } from './unix-address.js';
import { check, lastErrno, Errno, SyscallError } from './errors.js';
import { closeAll, setNonBlocking } from './fd.js';
import { VublkError } from '../errors.js';

const CMSG_HEADER_SIZE = 16;
/** Control space for up to 16 fds; more than that in one message is truncated by the kernel (and rejected by us). */
const MAX_RECEIVED_FDS = 16;
const CONTROL_SIZE = CMSG_HEADER_SIZE + MAX_RECEIVED_FDS * 4;

export function listenUnix(path: string, backlog = 16): number {
  const address = encodeUnixPath(path);
  const fd = check(sys.socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), 'socket(AF_UNIX)');
  try {
    check(sys.bind(fd, addressOf(address.bytes), address.length), 'bind', path);
    check(sys.listen(fd, backlog), 'listen', path);
  } catch (error) {
    sys.close(fd);
    throw error;
  }
  return fd;
}

/** Returns the connected fd, or null when no connection is pending. */
export function acceptConnection(listenFd: number): number | null {
  const fd = sys.accept4(listenFd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0) return fd;
  const errno = lastErrno();
  if (errno === Errno.EAGAIN || errno === Errno.EINTR) return null;
  throw new SyscallError('accept4', errno);
}

/** Blocking connect, then the socket is switched to non-blocking. */
export function connectUnix(path: string): number {
  const address = encodeUnixPath(path);
  const fd = check(sys.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), 'socket(AF_UNIX)');
  if (sys.connect(fd, addressOf(address.bytes), address.length) < 0) {
    const errno = lastErrno();
    sys.close(fd);
    throw new SyscallError('connect', errno, path);
  }
  setNonBlocking(fd);
  return fd;
}

/** True if something is listening on `path` (used to tell a live daemon's socket from a stale file). */
export function isSocketLive(path: string): boolean {
  try {
    sys.close(connectUnix(path));
    return true;
  } catch (error) {
    if (error instanceof SyscallError && (error.errno === Errno.ECONNREFUSED || error.errno === Errno.ENOENT)) return false;
    throw error;
  }
}

export interface Received {
  /** 0 means the peer closed the connection. */
  bytes: number;
  fds: number[];
}

/** Reusable per-thread scratch for msghdr, iovec and control data: no allocation per message. */
const msghdr = Buffer.alloc(MSGHDR_SIZE);
const iovec = Buffer.alloc(16);
const control = Buffer.alloc(CONTROL_SIZE);
const msghdrAddress = addressOf(msghdr);
const iovecAddress = addressOf(iovec);
const controlAddress = addressOf(control);

function prepareMsghdr(buffer: Uint8Array, offset: number, length: number, controlLength: number): void {
  msghdr.fill(0);
  iovec.writeBigUInt64LE(BigInt(addressOf(buffer) + offset), 0);
  iovec.writeBigUInt64LE(BigInt(length), 8);
  msghdr.writeBigUInt64LE(BigInt(iovecAddress), 16);
  msghdr.writeBigUInt64LE(1n, 24);
  if (controlLength > 0) {
    msghdr.writeBigUInt64LE(BigInt(controlAddress), 32);
    msghdr.writeBigUInt64LE(BigInt(controlLength), 40);
  }
}

/** The peer sent more fds than fit: the stream can no longer be trusted, so the connection closes. */
export class TruncatedFdsError extends VublkError {
  constructor() {
    super('VUBLK_ERR_TRUNCATED_FDS', `a message carried more than ${MAX_RECEIVED_FDS} fds; the extra ones were discarded`, {
      peerFault: true,
      fatal: true,
    });
  }
}

/**
 * One non-blocking recvmsg into buffer[offset, offset+length). Returns null on EAGAIN.
 * Received fds are close-on-exec and owned by the caller (also when this throws TruncatedFdsError: they are closed).
 */
export function recvWithFds(fd: number, buffer: Uint8Array, offset: number, length: number): Received | null {
  prepareMsghdr(buffer, offset, length, CONTROL_SIZE);
  control.fill(0);
  const bytes = sys.recvmsg(fd, msghdrAddress, MSG_CMSG_CLOEXEC);
  if (bytes < 0) {
    const errno = lastErrno();
    if (errno === Errno.EAGAIN || errno === Errno.EINTR) return null;
    throw new SyscallError('recvmsg', errno);
  }
  const fds: number[] = [];
  const controlLength = Number(msghdr.readBigUInt64LE(40));
  let at = 0;
  while (at + CMSG_HEADER_SIZE <= controlLength) {
    const cmsgLength = Number(control.readBigUInt64LE(at));
    if (cmsgLength < CMSG_HEADER_SIZE) break;
    const level = control.readInt32LE(at + 8);
    const type = control.readInt32LE(at + 12);
    if (level === SOL_SOCKET && type === SCM_RIGHTS) {
      for (let p = at + CMSG_HEADER_SIZE; p + 4 <= at + cmsgLength; p += 4) fds.push(control.readInt32LE(p));
    }
    at += (cmsgLength + 7) & ~7;
  }
  if (msghdr.readInt32LE(48) & MSG_CTRUNC) {
    closeAll(fds);
    // The kernel also truncates SCM_RIGHTS when this process has no free fd: say so rather than blame the peer.
    if (outOfFds())
      throw new SyscallError('recvmsg', Errno.EMFILE, 'fds passed with a message were dropped: the process has no free fd (RLIMIT_NOFILE)');
    throw new TruncatedFdsError();
  }
  return { bytes, fds };
}

/** True when the process cannot open one more fd (EMFILE/ENFILE). */
export function outOfFds(): boolean {
  const probe = sys.fcntl(0, F_DUPFD_CLOEXEC, 0);
  if (probe >= 0) {
    sys.close(probe);
    return false;
  }
  const errno = lastErrno();
  return errno === Errno.EMFILE || errno === Errno.ENFILE;
}

/** One sendmsg; fds (if any) ride on the first byte. Returns bytes sent, or null on EAGAIN. */
export function sendWithFds(fd: number, data: Uint8Array, offset: number, fds: readonly number[] = []): number | null {
  if (fds.length > MAX_RECEIVED_FDS) throw new RangeError(`cannot send more than ${MAX_RECEIVED_FDS} fds at once`);
  const controlLength = fds.length > 0 ? CMSG_HEADER_SIZE + ((fds.length * 4 + 7) & ~7) : 0;
  prepareMsghdr(data, offset, data.length - offset, controlLength);
  if (controlLength > 0) {
    control.fill(0);
    control.writeBigUInt64LE(BigInt(CMSG_HEADER_SIZE + fds.length * 4), 0);
    control.writeInt32LE(SOL_SOCKET, 8);
    control.writeInt32LE(SCM_RIGHTS, 12);
    fds.forEach((f, i) => control.writeInt32LE(f, CMSG_HEADER_SIZE + i * 4));
  }
  const sent = sys.sendmsg(fd, msghdrAddress, MSG_NOSIGNAL);
  if (sent < 0) {
    const errno = lastErrno();
    if (errno === Errno.EAGAIN || errno === Errno.EINTR) return null;
    throw new SyscallError('sendmsg', errno);
  }
  return sent;
}
