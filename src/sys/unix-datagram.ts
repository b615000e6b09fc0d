/**
 * AF_UNIX datagram sockets, for sd_notify (Node's dgram module only speaks UDP). Sockets are non-blocking
 * and close-on-exec; a send that would block is reported like any other failure, never waited for.
 */
import { sys, addressOf, AF_UNIX, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC, MSG_NOSIGNAL, MSG_DONTWAIT } from './libc.js';
import { check, lastErrno, Errno, SyscallError } from './errors.js';
import { encodeUnixAddress, type EncodedUnixAddress } from './unix-address.js';

export function openDatagramSocket(): number {
  return check(sys.socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), 'socket(AF_UNIX, SOCK_DGRAM)');
}

/** A datagram socket bound to a path or an `@abstract` name (the receiving end; used by tests). */
export function bindDatagram(address: string): number {
  const encoded = encodeUnixAddress(address);
  const fd = openDatagramSocket();
  if (sys.bind(fd, addressOf(encoded.bytes), encoded.length) < 0) {
    const errno = lastErrno();
    sys.close(fd);
    throw new SyscallError('bind', errno, address);
  }
  return fd;
}

/** Sends one datagram to `to`; throws SyscallError on any failure (EAGAIN included: the peer's queue is full). */
export function sendDatagram(fd: number, to: EncodedUnixAddress, data: Uint8Array, context?: string): void {
  const sent = sys.sendto(fd, addressOf(data), data.length, MSG_NOSIGNAL | MSG_DONTWAIT, addressOf(to.bytes), to.length);
  if (sent < 0) throw new SyscallError('sendto', lastErrno(), context);
  if (sent !== data.length) throw new Error(`sendto${context ? ` (${context})` : ''}: sent ${sent} of ${data.length} bytes`);
}

/** Receives one datagram without waiting; null when none is queued. Longer datagrams are truncated to maxBytes. */
export function receiveDatagram(fd: number, maxBytes = 4096): Buffer | null {
  const buffer = Buffer.alloc(maxBytes);
  const received = sys.recv(fd, addressOf(buffer), maxBytes, MSG_DONTWAIT);
  if (received < 0) {
    const errno = lastErrno();
    if (errno === Errno.EAGAIN || errno === Errno.EINTR) return null;
    throw new SyscallError('recv', errno);
  }
  return buffer.subarray(0, received);
}
