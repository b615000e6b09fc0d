/**
 * What a guest-memory fd is and whether its size is frozen. A region mapped beyond its file's end, or a file
 * shrunk under a live mapping, faults the daemon with SIGBUS on the next access: the size must be checked
 * before mapping, and kept from shrinking afterwards where the kernel allows (memfd seals).
 */
import fs from 'node:fs';
import { sys, F_ADD_SEALS, F_GETFL, F_GET_SEALS, F_SEAL_SEAL, F_SEAL_SHRINK } from './libc.js';

const O_ACCMODE = 0o3;
const O_RDWR = 0o2;
import { lastErrno, SyscallError, Errno } from './errors.js';

export type FdKind =
  | 'file'
  | 'directory'
  | 'pipe'
  | 'socket'
  | 'char-device'
  | 'block-device'
  | 'symlink'
  | 'special file (an eventfd or another anonymous inode)';

export interface FdInfo {
  kind: FdKind;
  size: number;
}

export function describeFd(fd: number): FdInfo {
  let stat: fs.Stats;
  try {
    stat = fs.fstatSync(fd);
  } catch (error) {
    throw new SyscallError('fstat', Errno.EBADF, `fd ${fd}: ${(error as Error).message}`);
  }
  const kind: FdKind = stat.isFile()
    ? 'file'
    : stat.isDirectory()
      ? 'directory'
      : stat.isFIFO()
        ? 'pipe'
        : stat.isSocket()
          ? 'socket'
          : stat.isCharacterDevice()
            ? 'char-device'
            : stat.isBlockDevice()
              ? 'block-device'
              : stat.isSymbolicLink()
                ? 'symlink'
                : 'special file (an eventfd or another anonymous inode)';
  return { kind, size: stat.size };
}

/** How the fd's size is protected against shrinking. */
export type ShrinkGuard = 'sealed' | 'sealed-now' | 'unsealable';

/**
 * Ensures F_SEAL_SHRINK on a memfd: already sealed, or sealed now. 'unsealable' for files that do not support
 * seals (tmpfs/hugetlbfs files opened by path) and memfds whose seals are themselves sealed without SHRINK.
 */
export function guardAgainstShrink(fd: number): ShrinkGuard {
  const seals = sys.fcntl(fd, F_GET_SEALS, 0);
  if (seals < 0) {
    const errno = lastErrno();
    if (errno === Errno.EINVAL) return 'unsealable';
    throw new SyscallError('fcntl(F_GET_SEALS)', errno, `fd ${fd}`);
  }
  if ((seals & F_SEAL_SHRINK) !== 0) return 'sealed';
  if ((seals & F_SEAL_SEAL) !== 0) return 'unsealable';
  if (sys.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) < 0) {
    const errno = lastErrno();
    if (errno === Errno.EPERM || errno === Errno.EINVAL) return 'unsealable';
    throw new SyscallError('fcntl(F_ADD_SEALS)', errno, `fd ${fd}`);
  }
  return 'sealed-now';
}

/** True when the fd was opened O_RDWR (a MAP_SHARED, PROT_WRITE mapping needs it). */
export function isOpenReadWrite(fd: number): boolean {
  const flags = sys.fcntl(fd, F_GETFL, 0);
  return flags >= 0 && (flags & O_ACCMODE) === O_RDWR;
}
