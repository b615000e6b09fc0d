import koffi from 'koffi';
import { VublkError } from '../errors.js';

const errnoNumbers = koffi.os.errno as Readonly<Record<string, number | undefined>>;
const errnoNames = new Map<number, string>(Object.entries(errnoNumbers).map(([name, code]) => [code ?? 0, name]));

/** `ENOENT` for 2 or -2 (librados, librbd and io_uring return negated errnos). */
export function errnoName(errno: number): string {
  return errnoNames.get(Math.abs(errno)) ?? `errno ${Math.abs(errno)}`;
}

function errnoNumber(name: string): number {
  const value = errnoNumbers[name];
  if (value === undefined) throw new Error(`this platform has no errno ${name}`);
  return value;
}

/** A failed libc call: names the call, the errno and (optionally) what it was operating on. */
export class SyscallError extends VublkError {
  /** The errno's symbolic name, e.g. `ENOENT`. */
  readonly errnoName: string;
  constructor(
    readonly call: string,
    readonly errno: number,
    context?: string,
  ) {
    super('VUBLK_ERR_SYSCALL', `${call}${context ? ` (${context})` : ''} failed: ${errnoName(errno)}`);
    this.errnoName = errnoName(errno);
  }
}

/** The errnos vublk tests for, by name: the one table of errno numbers (the values of the platform's libc). */
export const Errno = {
  EPERM: errnoNumber('EPERM'),
  ENOENT: errnoNumber('ENOENT'),
  EINTR: errnoNumber('EINTR'),
  EIO: errnoNumber('EIO'),
  EBADF: errnoNumber('EBADF'),
  EAGAIN: errnoNumber('EAGAIN'),
  EACCES: errnoNumber('EACCES'),
  EBUSY: errnoNumber('EBUSY'),
  EEXIST: errnoNumber('EEXIST'),
  EINVAL: errnoNumber('EINVAL'),
  ENFILE: errnoNumber('ENFILE'),
  EMFILE: errnoNumber('EMFILE'),
  EROFS: errnoNumber('EROFS'),
  ENOTSOCK: errnoNumber('ENOTSOCK'),
  EOPNOTSUPP: errnoNumber('EOPNOTSUPP'),
  ECONNREFUSED: errnoNumber('ECONNREFUSED'),
  ETIMEDOUT: errnoNumber('ETIMEDOUT'),
  EINPROGRESS: errnoNumber('EINPROGRESS'),
  ECANCELED: errnoNumber('ECANCELED'),
} as const;

/** Reads errno of the call that just returned on this thread (must be the very next koffi call). */
export function lastErrno(): number {
  return koffi.errno();
}

/** Throws SyscallError when a libc call returned -1. */
export function check(result: number, call: string, context?: string): number {
  if (result < 0) throw new SyscallError(call, koffi.errno(), context);
  return result;
}
