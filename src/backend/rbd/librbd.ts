/**
 * Raw koffi bindings to librados.so.2 and librbd.so.1 (Debian: librados2, librbd1), loaded on first use so
 * that vublk runs without them until an rbd: image is configured. Handles (rados_t, rados_ioctx_t,
 * rbd_image_t, rbd_completion_t) are plain Numbers (user-space addresses fit in 47 bits), like libc.ts.
 * Every function returns what the C function returns: 0 or a negative errno, no errno variable.
 *
 * The blocking calls (connect, open, resize, close, lock) also come as `.async` (koffi runs them on a libuv
 * pool thread) so the control thread's event loop never stalls on the network. The aio calls are
 * non-blocking (librbd queues them to its own threads) and are called synchronously from a worker.
 *
 * koffi loads a library once per process; each thread that imports this module gets its own function
 * objects over the same library, so a handle opened on one thread is valid on another.
 */
import koffi, { type LibraryHandle } from 'koffi';
import { RbdError } from './rbd-error.js';

type Fn<A extends unknown[], R> = ((...args: A) => R) & {
  async: (...args: [...A, (err: unknown, result: R) => void]) => void;
};

export const RBD_LIBRARY = 'librbd.so.1';
export const RADOS_LIBRARY = 'librados.so.2';

/** rbd_set_image_notification: the fd is an eventfd. */
export const EVENT_TYPE_EVENTFD = 2;
export const RBD_LOCK_MODE_EXCLUSIVE = 0;
/** RBD_FEATURE_EXCLUSIVE_LOCK */
export const RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2;
/** sizeof(rbd_image_info_t) on LP64: size, obj_size, num_objs (u64), order (int, padded), 24 + 8 + 8 + 96 bytes. */
export const RBD_IMAGE_INFO_BYTES = 8 + 8 + 8 + 4 + 24 + 4 + 8 + 96;

function bind(rados: LibraryHandle, rbd: LibraryHandle) {
  return {
    radosCreate2: rados.func(
      'int rados_create2(_Out_ uintptr_t *cluster, const char *clusterName, const char *name, uint64_t flags)',
    ) as Fn<[[number], string, string, number], number>,
    radosConfReadFile: rados.func('int rados_conf_read_file(uintptr_t cluster, const char *path)') as Fn<[number, string | null], number>,
    radosConfSet: rados.func('int rados_conf_set(uintptr_t cluster, const char *option, const char *value)') as Fn<
      [number, string, string],
      number
    >,
    radosConnect: rados.func('int rados_connect(uintptr_t cluster)') as Fn<[number], number>,
    radosShutdown: rados.func('void rados_shutdown(uintptr_t cluster)') as Fn<[number], void>,
    radosIoctxCreate: rados.func('int rados_ioctx_create(uintptr_t cluster, const char *pool, _Out_ uintptr_t *ioctx)') as Fn<
      [number, string, [number]],
      number
    >,
    radosIoctxSetNamespace: rados.func('void rados_ioctx_set_namespace(uintptr_t ioctx, const char *nspace)') as Fn<[number, string], void>,
    radosIoctxDestroy: rados.func('void rados_ioctx_destroy(uintptr_t ioctx)') as Fn<[number], void>,

    rbdOpen: rbd.func('int rbd_open(uintptr_t ioctx, const char *name, _Out_ uintptr_t *image, const char *snap)') as Fn<
      [number, string, [number], string | null],
      number
    >,
    rbdOpenReadOnly: rbd.func('int rbd_open_read_only(uintptr_t ioctx, const char *name, _Out_ uintptr_t *image, const char *snap)') as Fn<
      [number, string, [number], string | null],
      number
    >,
    rbdClose: rbd.func('int rbd_close(uintptr_t image)') as Fn<[number], number>,
    rbdGetSize: rbd.func('int rbd_get_size(uintptr_t image, _Out_ uint64_t *size)') as Fn<[number, [number]], number>,
    rbdGetFeatures: rbd.func('int rbd_get_features(uintptr_t image, _Out_ uint64_t *features)') as Fn<[number, [number]], number>,
    rbdStat: rbd.func('int rbd_stat(uintptr_t image, uintptr_t info, size_t infoSize)') as Fn<[number, number, number], number>,
    rbdResize: rbd.func('int rbd_resize(uintptr_t image, uint64_t size)') as Fn<[number, number], number>,
    rbdSetImageNotification: rbd.func('int rbd_set_image_notification(uintptr_t image, int fd, int type)') as Fn<
      [number, number, number],
      number
    >,
    rbdGetFlags: rbd.func('int rbd_get_flags(uintptr_t image, _Out_ uint64_t *flags)') as Fn<[number, [number]], number>,
    rbdIsExclusiveLockOwner: rbd.func('int rbd_is_exclusive_lock_owner(uintptr_t image, _Out_ int *owner)') as Fn<
      [number, [number]],
      number
    >,
    rbdLockAcquire: rbd.func('int rbd_lock_acquire(uintptr_t image, int mode)') as Fn<[number, number], number>,
    rbdLockRelease: rbd.func('int rbd_lock_release(uintptr_t image)') as Fn<[number], number>,

    rbdAioCreateCompletion: rbd.func('int rbd_aio_create_completion(uintptr_t arg, uintptr_t callback, uintptr_t completionOut)') as Fn<
      [number, number, number],
      number
    >,
    rbdAioReadv: rbd.func('int rbd_aio_readv(uintptr_t image, uintptr_t iov, int iovcnt, uint64_t off, uintptr_t completion)') as Fn<
      [number, number, number, number, number],
      number
    >,
    rbdAioWritev: rbd.func('int rbd_aio_writev(uintptr_t image, uintptr_t iov, int iovcnt, uint64_t off, uintptr_t completion)') as Fn<
      [number, number, number, number, number],
      number
    >,
    rbdAioFlush: rbd.func('int rbd_aio_flush(uintptr_t image, uintptr_t completion)') as Fn<[number, number], number>,
    rbdAioDiscard: rbd.func('int rbd_aio_discard(uintptr_t image, uint64_t off, uint64_t len, uintptr_t completion)') as Fn<
      [number, number, number, number],
      number
    >,
    rbdAioWriteZeroes: rbd.func(
      'int rbd_aio_write_zeroes(uintptr_t image, uint64_t off, size_t len, uintptr_t completion, int zeroFlags, int opFlags)',
    ) as Fn<[number, number, number, number, number, number], number>,
    rbdAioGetArg: rbd.func('uintptr_t rbd_aio_get_arg(uintptr_t completion)') as Fn<[number], number>,
    rbdAioGetReturnValue: rbd.func('intptr_t rbd_aio_get_return_value(uintptr_t completion)') as Fn<[number], number>,
    rbdAioRelease: rbd.func('void rbd_aio_release(uintptr_t completion)') as Fn<[number], void>,
    rbdPollIoEvents: rbd.func('int rbd_poll_io_events(uintptr_t image, uintptr_t completions, int count)') as Fn<
      [number, number, number],
      number
    >,
  };
}

export type LibRbd = ReturnType<typeof bind>;

let loaded: LibRbd | undefined;

/** The bindings, loading the libraries on first call; RbdError RBD_LIBRARY_MISSING when they are absent. */
export function librbd(): LibRbd {
  loaded ??= loadLibRbd(RADOS_LIBRARY, RBD_LIBRARY);
  return loaded;
}

/** Loads and binds the two libraries by file name (tests pass a missing one to see the error). */
export function loadLibRbd(radosLibrary: string, rbdLibrary: string): LibRbd {
  let rados: LibraryHandle;
  let rbd: LibraryHandle;
  try {
    rados = koffi.load(radosLibrary);
    rbd = koffi.load(rbdLibrary);
  } catch (error) {
    throw new RbdError(
      'VUBLK_ERR_RBD_LIBRARY_MISSING',
      `rbd: images need ${rbdLibrary} and ${radosLibrary} (Debian/Ubuntu: apt-get install librbd1 librados2): ${(error as Error).message}`,
    );
  }
  return bind(rados, rbd);
}
