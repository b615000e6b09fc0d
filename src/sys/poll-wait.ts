/** Blocking wait for one fd to become readable, with a deadline (poll(2)); for bounded waits off the hot path. */
import { sys, addressOf, POLLIN } from './libc.js';
import { lastErrno, Errno, SyscallError } from './errors.js';

const pollfd = Buffer.alloc(8);
const pollfdAddress = addressOf(pollfd);

/** True when `fd` is readable within `timeoutMs`; false on timeout (or EINTR: the caller re-checks). */
export function waitReadable(fd: number, timeoutMs: number): boolean {
  pollfd.writeInt32LE(fd, 0);
  pollfd.writeInt16LE(POLLIN, 4);
  pollfd.writeInt16LE(0, 6);
  const n = sys.poll(pollfdAddress, 1, Math.max(0, Math.floor(timeoutMs)));
  if (n < 0) {
    const errno = lastErrno();
    if (errno === Errno.EINTR) return false;
    throw new SyscallError('poll', errno);
  }
  return n > 0;
}
