import { sys } from './libc.js';
import { check } from './errors.js';

/** Closes an fd we own; a negative fd means "none" and is ignored so callers need no guard. */
export function closeFd(fd: number): void {
  if (fd < 0) return;
  sys.close(fd);
}

export function closeAll(fds: Iterable<number>): void {
  for (const fd of fds) closeFd(fd);
}

export function setNonBlocking(fd: number): void {
  const flags = check(sys.fcntl(fd, 3 /* F_GETFL */, 0), 'fcntl(F_GETFL)');
  check(sys.fcntl(fd, 4 /* F_SETFL */, flags | 0o4000 /* O_NONBLOCK */), 'fcntl(F_SETFL)');
}
