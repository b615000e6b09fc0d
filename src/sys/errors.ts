import koffi from 'koffi';
import { VublkError } from '../errors.js';

const errnoNames = new Map<number, string>(Object.entries(koffi.os.errno).map(([name, code]) => [code, name]));

export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `errno ${errno}`;
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

export const Errno = {
  EINTR: koffi.os.errno['EINTR'] ?? 4,
  EAGAIN: koffi.os.errno['EAGAIN'] ?? 11,
  EBADF: koffi.os.errno['EBADF'] ?? 9,
  ENOENT: koffi.os.errno['ENOENT'] ?? 2,
  ECONNREFUSED: koffi.os.errno['ECONNREFUSED'] ?? 111,
  EINVAL: koffi.os.errno['EINVAL'] ?? 22,
  EOPNOTSUPP: koffi.os.errno['EOPNOTSUPP'] ?? 95,
  EMFILE: koffi.os.errno['EMFILE'] ?? 24,
  ENFILE: koffi.os.errno['ENFILE'] ?? 23,
  EPERM: koffi.os.errno['EPERM'] ?? 1,
  EACCES: koffi.os.errno['EACCES'] ?? 13,
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
