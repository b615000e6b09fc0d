/**
 * Image locking compatible with QEMU's file-posix driver, so vublk, QEMU, qemu-storage-daemon and qemu-img
 * refuse each other's conflicting opens.
 *
 * QEMU's scheme (block/file-posix.c): open-file-description (OFD) read locks on single bytes. For each block
 * permission bit i a holder USES, it read-locks byte 100+i; for each bit it does NOT SHARE with others, byte
 * 200+i. A new opener first takes its own bytes, then tests (F_OFD_GETLK for a write lock) that nobody else
 * holds 200+i for a permission it wants, nor 100+i for a permission it refuses to share. Locking before
 * testing makes two racing openers see at least one conflict. OFD locks belong to the open file description:
 * they go away when the image fd is closed, also when the process dies.
 *
 * vublk takes what QEMU's virtio-blk device takes with share-rw=off: a writer uses consistent-read, write and
 * resize and shares consistent-read and write-unchanged; a read-only disk uses consistent-read and shares the
 * same. So a second writer (vublk or QEMU) is refused, `qemu-img info` (no -U) is refused while vublk writes
 * and allowed while vublk only reads, and any number of read-only openers coexist.
 */
import { addressOf, fcntlPointer, F_OFD_GETLK, F_OFD_SETLK, F_RDLCK, F_UNLCK, F_WRLCK } from './libc.js';
import { lastErrno, SyscallError, errnoName } from './errors.js';
import { VublkError } from '../errors.js';

const PERM_BASE = 100;
const SHARED_BASE = 200;

/** QEMU's BLK_PERM_* bits, by bit number. */
export const BlockPermission = { CONSISTENT_READ: 0, WRITE: 1, WRITE_UNCHANGED: 2, RESIZE: 3 } as const;
const PERMISSION_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const ALL_PERMISSIONS = [0, 1, 2, 3];

export class ImageLockError extends VublkError {
  constructor(imagePath: string, detail: string) {
    super('VUBLK_ERR_IMAGE_LOCKED', `image ${imagePath} is locked: ${detail}`, { fatal: true });
  }
}

/** struct flock on x86-64/aarch64 Linux: short type, short whence, off_t start, off_t len, pid_t pid. */
const FLOCK_SIZE = 32;

function lockRequest(type: number, offset: number): Buffer {
  const flock = Buffer.alloc(FLOCK_SIZE);
  flock.writeInt16LE(type, 0);
  flock.writeInt16LE(0 /* SEEK_SET */, 2);
  flock.writeBigInt64LE(BigInt(offset), 8);
  flock.writeBigInt64LE(1n, 16);
  return flock;
}

function setByteLock(fd: number, type: number, offset: number): number {
  const flock = lockRequest(type, offset);
  return fcntlPointer(fd, F_OFD_SETLK, addressOf(flock)) < 0 ? lastErrno() : 0;
}

/** True when another open file description holds a lock on the byte that a write lock would conflict with. */
function heldByOthers(fd: number, offset: number): boolean {
  const flock = lockRequest(F_WRLCK, offset);
  if (fcntlPointer(fd, F_OFD_GETLK, addressOf(flock)) < 0) throw new SyscallError('fcntl(F_OFD_GETLK)', lastErrno(), `byte ${offset}`);
  return flock.readInt16LE(0) !== F_UNLCK;
}

export interface ImageLockMode {
  /** The opener writes (and may resize) the image. */
  write: boolean;
}

/** The permission bits vublk uses and the ones it shares, like QEMU's virtio-blk with share-rw=off. */
export function permissionsFor(mode: ImageLockMode): { used: number[]; shared: number[] } {
  const { CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE } = BlockPermission;
  return {
    used: mode.write ? [CONSISTENT_READ, WRITE, RESIZE] : [CONSISTENT_READ],
    shared: [CONSISTENT_READ, WRITE_UNCHANGED],
  };
}

/** Unlocks every byte this scheme uses on `fd` (closing the fd does the same). */
export function unlockImage(fd: number): void {
  for (const bit of ALL_PERMISSIONS) {
    setByteLock(fd, F_UNLCK, PERM_BASE + bit);
    setByteLock(fd, F_UNLCK, SHARED_BASE + bit);
  }
}

/** Takes QEMU-compatible locks on an open image fd; throws ImageLockError naming the conflict. */
/**
 * `lockImage`, retried for up to `waitMs` while another holder has the image. A daemon restarted right after
 * a crash (systemd's Restart=, QEMU's reconnect) finds the dead process's locks still held for a moment: the
 * kernel tears down its io_uring, which keeps the open file description (and so its OFD locks) alive,
 * asynchronously. A real conflict still fails, only `waitMs` later. Blocks the calling thread: start-up only.
 */
export function lockImageWaiting(fd: number, imagePath: string, mode: ImageLockMode, waitMs: number): void {
  const deadline = Date.now() + waitMs;
  for (;;) {
    try {
      lockImage(fd, imagePath, mode);
      return;
    } catch (error) {
      if (!(error instanceof ImageLockError) || Date.now() >= deadline) throw error;
      Atomics.wait(RETRY_NAP, 0, 0, LOCK_RETRY_MS);
    }
  }
}

/** How long a start-up waits for a lock a dying process may still hold, and how often it looks again. */
export const LOCK_WAIT_MS = 3_000;
const LOCK_RETRY_MS = 100;
const RETRY_NAP = new Int32Array(new SharedArrayBuffer(4));

export function lockImage(fd: number, imagePath: string, mode: ImageLockMode): void {
  const { used, shared } = permissionsFor(mode);
  const unshared = ALL_PERMISSIONS.filter((bit) => !shared.includes(bit));
  const bytes = [...used.map((bit) => PERM_BASE + bit), ...unshared.map((bit) => SHARED_BASE + bit)];
  try {
    for (const offset of bytes) {
      const errno = setByteLock(fd, F_RDLCK, offset);
      if (errno !== 0) throw new ImageLockError(imagePath, `cannot lock byte ${offset}: ${errnoName(errno)}`);
    }
    for (const bit of used) {
      if (heldByOthers(fd, SHARED_BASE + bit)) {
        throw new ImageLockError(
          imagePath,
          `failed to get "${PERMISSION_NAMES[bit]}" lock: another process (vublk, QEMU or qemu-storage-daemon) has it open and does not share ${PERMISSION_NAMES[bit]}`,
        );
      }
    }
    for (const bit of unshared) {
      if (heldByOthers(fd, PERM_BASE + bit)) {
        throw new ImageLockError(
          imagePath,
          `failed to get shared "${PERMISSION_NAMES[bit]}" lock: another process (vublk, QEMU or qemu-storage-daemon) has it open for ${PERMISSION_NAMES[bit]}`,
        );
      }
    }
  } catch (error) {
    unlockImage(fd);
    throw error;
  }
}
