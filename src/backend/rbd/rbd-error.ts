/**
 * Every failure of the RBD back-end: a VublkError with a stable `code` (VUBLK_ERR_RBD_*), the negative errno
 * librados / librbd returned (0 when none), and a message that says what to check. A malformed spec is the
 * operator's input (peerFault); any other failure ends the open of that disk (fatal).
 */
import { VublkError } from '../../errors.js';
import { errnoName } from '../../sys/errors.js';

export type RbdErrorCode =
  /** The image spec or one of its options is malformed. */
  | 'VUBLK_ERR_RBD_SPEC'
  /** librbd.so.1 / librados.so.2 could not be loaded. */
  | 'VUBLK_ERR_RBD_LIBRARY_MISSING'
  /** ceph.conf unreadable, or an option rejected by librados. */
  | 'VUBLK_ERR_RBD_CONFIG'
  /** No monitor answered within the connect timeout. */
  | 'VUBLK_ERR_RBD_CLUSTER_UNREACHABLE'
  /** Authentication failed: missing/unreadable keyring, unknown id, wrong key. */
  | 'VUBLK_ERR_RBD_AUTH'
  /** The pool does not exist. */
  | 'VUBLK_ERR_RBD_NO_POOL'
  /** The image does not exist in the pool. */
  | 'VUBLK_ERR_RBD_NO_IMAGE'
  /** The cluster refused the operation for this client's caps. */
  | 'VUBLK_ERR_RBD_PERMISSION'
  /** Another client holds the image's exclusive lock. */
  | 'VUBLK_ERR_RBD_LOCKED'
  /** Any other librados / librbd failure. */
  | 'VUBLK_ERR_RBD_FAILED';

export class RbdError extends VublkError {
  declare readonly code: RbdErrorCode;

  constructor(
    code: RbdErrorCode,
    message: string,
    /** Negative errno from librados / librbd, 0 when the failure was not a library return value. */
    readonly errno = 0,
  ) {
    super(
      code,
      errno ? `${message} (${errnoName(errno)})` : message,
      code === 'VUBLK_ERR_RBD_SPEC' ? { peerFault: true } : { fatal: true },
    );
  }
}
