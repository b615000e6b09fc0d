/**
 * Kick, call and err fds come from the front-end, which may hand over anything: a blocking eventfd whose
 * counter is at its maximum (a write of 1 would block the thread for good), a pipe, a read-only file.
 * Only eventfds are accepted, and each is switched to O_NONBLOCK at receipt so no thread of the daemon can
 * block on it; a full counter (EAGAIN) then means "an interrupt is already pending", which is what it is.
 * O_NONBLOCK lives on the open file description shared with the front-end; for an eventfd it only changes
 * whether a full counter blocks, and QEMU opens its eventfds non-blocking anyway.
 */
import { fdTarget } from '../sys/fd-kind.js';
import { setNonBlocking } from '../sys/fd.js';
import { VublkError } from '../errors.js';

export class NotifyFdError extends VublkError {
  constructor(role: string, detail: string) {
    super('VUBLK_ERR_NOTIFY_FD', `${role} fd rejected: ${detail}`, { peerFault: true });
  }
}

/** Validates and prepares a received kick/call/err fd; throws NotifyFdError (the caller still owns the fd). */
export function adoptNotifyFd(fd: number, role: 'kick' | 'call' | 'err'): void {
  const target = fdTarget(fd);
  if (target !== 'anon_inode:[eventfd]') throw new NotifyFdError(role, `it is ${target}, not an eventfd`);
  setNonBlocking(fd);
}
