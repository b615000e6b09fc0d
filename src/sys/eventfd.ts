import { sys, addressOf, EFD_CLOEXEC, EFD_NONBLOCK } from './libc.js';
import { check, lastErrno, Errno, SyscallError } from './errors.js';

/** Each thread gets its own scratch word; eventfd I/O is always exactly 8 bytes. */
const scratch = Buffer.alloc(8);
const scratchAddress = addressOf(scratch);
const one = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);
const oneAddress = addressOf(one);

export function createEventFd(flags = EFD_NONBLOCK | EFD_CLOEXEC): number {
  return check(sys.eventfd(0, flags), 'eventfd');
}

/** Adds 1 to the counter. EAGAIN (counter saturated) still leaves the fd readable, so it is not an error. */
export function signalEventFd(fd: number): void {
  if (sys.write(fd, oneAddress, 8) < 0) {
    const errno = lastErrno();
    if (errno !== Errno.EAGAIN) throw new SyscallError('write(eventfd)', errno);
  }
}

/** Reads and resets the counter; returns 0 when nothing was pending (non-blocking fd). */
export function drainEventFd(fd: number): number {
  if (sys.read(fd, scratchAddress, 8) < 0) {
    const errno = lastErrno();
    if (errno === Errno.EAGAIN) return 0;
    throw new SyscallError('read(eventfd)', errno);
  }
  return scratch.readUInt32LE(0) + scratch.readUInt32LE(4) * 0x1_0000_0000;
}
