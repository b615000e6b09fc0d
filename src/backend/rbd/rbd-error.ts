/**
 * Every failure of the RBD back-end: a stable `code` for callers and counters, the negative errno librados /
 * librbd returned (0 when none), and a message that says what to check.
 */
import koffi from 'koffi';

export type RbdErrorCode =
  /** The image spec or one of its options is malformed. */
  | 'RBD_SPEC'
  /** librbd.so.1 / librados.so.2 could not be loaded. */
  | 'RBD_LIBRARY_MISSING'
  /** ceph.conf unreadable, or an option rejected by librados. */
  | 'RBD_CONFIG'
  /** No monitor answered within the connect timeout. */
  | 'RBD_CLUSTER_UNREACHABLE'
  /** Authentication failed: missing/unreadable keyring, unknown id, wrong key. */
  | 'RBD_AUTH'
  /** The pool does not exist. */
  | 'RBD_NO_POOL'
  /** The image does not exist in the pool. */
  | 'RBD_NO_IMAGE'
  /** The cluster refused the operation for this client's caps. */
  | 'RBD_PERMISSION'
  /** Another client holds the image's exclusive lock. */
  | 'RBD_LOCKED'
  /** Any other librados / librbd failure. */
  | 'RBD_FAILED';

const errnoNames = new Map<number, string>(Object.entries(koffi.os.errno).map(([name, code]) => [code, name]));

/** `ENOENT` for 2 or -2. */
export function errnoName(errno: number): string {
  return errnoNames.get(Math.abs(errno)) ?? `errno ${Math.abs(errno)}`;
}

export class RbdError extends Error {
  constructor(
    readonly code: RbdErrorCode,
    message: string,
    /** Negative errno from librados / librbd, 0 when the failure was not a library return value. */
    readonly errno = 0,
  ) {
    super(errno ? `${message} (${errnoName(errno)})` : message);
    this.name = 'RbdError';
  }
}

/** errno values librados / librbd return (negated), Linux numbering. */
export const RbdErrno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EBUSY: 16,
  EEXIST: 17,
  EINVAL: 22,
  EROFS: 30,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
  ETIMEDOUT: 110,
  EACCES: 13,
  EBLOCKLISTED: 108,
} as const;
