/** What an inherited fd is: socket domain, type, listening state, bound name; and close-on-exec. */
import { sys, addressOf, SOL_SOCKET, SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN, F_GETFD, F_SETFD, FD_CLOEXEC } from './libc.js';
import { check, lastErrno, SyscallError } from './errors.js';
import { decodeUnixAddress, SOCKADDR_UN_SIZE } from './unix-address.js';

/** An integer socket option (SOL_SOCKET level). Throws SyscallError (ENOTSOCK, EBADF, ...) like getsockopt. */
export function socketOption(fd: number, name: number, label = `option ${name}`): number {
  const value = Buffer.alloc(4);
  const length = Buffer.alloc(4);
  length.writeUInt32LE(4, 0);
  if (sys.getsockopt(fd, SOL_SOCKET, name, addressOf(value), addressOf(length)) < 0) {
    throw new SyscallError(`getsockopt(${label})`, lastErrno(), `fd ${fd}`);
  }
  return value.readInt32LE(0);
}

export interface SocketDescription {
  domain: number;
  type: number;
  listening: boolean;
}

export function describeSocket(fd: number): SocketDescription {
  return {
    domain: socketOption(fd, SO_DOMAIN, 'SO_DOMAIN'),
    type: socketOption(fd, SO_TYPE, 'SO_TYPE'),
    listening: socketOption(fd, SO_ACCEPTCONN, 'SO_ACCEPTCONN') !== 0,
  };
}

/** The AF_UNIX name the socket is bound to: a path, `@abstract`, or null when unnamed. */
export function unixSocketName(fd: number): string | null {
  const address = Buffer.alloc(SOCKADDR_UN_SIZE);
  const length = Buffer.alloc(4);
  length.writeUInt32LE(SOCKADDR_UN_SIZE, 0);
  check(sys.getsockname(fd, addressOf(address), addressOf(length)), 'getsockname', `fd ${fd}`);
  return decodeUnixAddress(address, length.readUInt32LE(0));
}

export function setCloseOnExec(fd: number): void {
  const flags = check(sys.fcntl(fd, F_GETFD, 0), 'fcntl(F_GETFD)', `fd ${fd}`);
  check(sys.fcntl(fd, F_SETFD, flags | FD_CLOEXEC), 'fcntl(F_SETFD)', `fd ${fd}`);
}
