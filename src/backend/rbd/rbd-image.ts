/**
 * Control side of an RBD image: connect to the cluster, open the image, take its exclusive lock, size,
 * resize, close. Every call that talks to the cluster runs on a libuv pool thread (koffi `.async`), so the
 * control thread's event loop keeps serving while a monitor is slow or gone; each is bounded by the
 * connect timeout (client_mount_timeout, rados_mon_op_timeout).
 *
 * The data plane does not use this class: a worker gets `handle` (a number; valid in every thread of the
 * process) and drives I/O through `RbdQueue`. Invariants: one RbdQueue per open image (the completion
 * notification is per image handle); `close()` only after that queue is idle and closed.
 */
import { accessSync, constants } from 'node:fs';
import {
  librbd,
  EVENT_TYPE_EVENTFD,
  RBD_FEATURE_EXCLUSIVE_LOCK,
  RBD_IMAGE_INFO_BYTES,
  RBD_LOCK_MODE_EXCLUSIVE,
  type LibRbd,
} from './librbd.js';
import { RbdError } from './rbd-error.js';
import { Errno, errnoName } from '../../sys/errors.js';
import { rbdImageName, type RbdSpec } from './rbd-spec.js';
import { addressOf, sys } from '../../sys/libc.js';
import { createEventFd } from '../../sys/eventfd.js';

export interface RbdImageInfo {
  size: number;
  objectSize: number;
  objects: number;
  order: number;
}

export interface RbdOpenOptions {
  /** Extra librados/librbd options (e.g. `rbd_cache: 'false'`), set after ceph.conf is read. */
  conf?: Record<string, string>;
}

/** How often acquireLock asks again while another client holds the lock. */
const LOCK_RETRY_MS = 200;

type AsyncFn<A extends unknown[], R> = { async: (...args: [...A, (err: unknown, result: R) => void]) => void };

function call<A extends unknown[], R>(fn: AsyncFn<A, R>, ...args: A): Promise<R> {
  return new Promise((resolve, reject) => {
    fn.async(...args, (err: unknown, result: R) => (err ? reject(err as Error) : resolve(result)));
  });
}

function isAuthErrno(r: number): boolean {
  return r === -Errno.EACCES || r === -Errno.EPERM || r === -Errno.ENOENT;
}

/** A connected cluster handle plus the pool's I/O context; torn down in reverse order. */
async function connect(lib: LibRbd, spec: RbdSpec, options: RbdOpenOptions): Promise<{ cluster: number; ioctx: number }> {
  const who = `client.${spec.id}`;
  if (spec.keyring !== undefined) {
    try {
      accessSync(spec.keyring, constants.R_OK);
    } catch (error) {
      throw new RbdError(
        'VUBLK_ERR_RBD_AUTH',
        `keyring ${spec.keyring} for ${who} is not readable: ${(error as NodeJS.ErrnoException).code ?? String(error)}`,
      );
    }
  }
  if (spec.conf !== undefined) {
    try {
      accessSync(spec.conf, constants.R_OK);
    } catch (error) {
      throw new RbdError(
        'VUBLK_ERR_RBD_CONFIG',
        `ceph configuration ${spec.conf} is not readable: ${(error as NodeJS.ErrnoException).code ?? String(error)}`,
      );
    }
  }
  const out: [number] = [0];
  let r = lib.radosCreate2(out, 'ceph', who, 0);
  if (r < 0) throw new RbdError('VUBLK_ERR_RBD_CONFIG', `rados_create2 for ${who} failed`, r);
  const cluster = out[0];
  try {
    // Quiet: librados' own stderr lines ("unable to find a keyring ...") would interleave with the daemon's
    // logs; what went wrong is reported through RbdError instead.
    for (const [key, value] of [
      ['log_to_stderr', 'false'],
      ['err_to_stderr', 'false'],
    ] as const) {
      lib.radosConfSet(cluster, key, value);
    }
    r = await call(lib.radosConfReadFile, cluster, spec.conf ?? null);
    if (r < 0 && (spec.conf !== undefined || spec.monHost === undefined)) {
      throw new RbdError(
        'VUBLK_ERR_RBD_CONFIG',
        spec.conf !== undefined
          ? `cannot read ceph configuration ${spec.conf}`
          : 'no ceph configuration found ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf): give conf= or mon-host=',
        r,
      );
    }
    const settings: [string, string][] = [
      ['client_mount_timeout', String(spec.connectTimeoutSeconds)],
      ['rados_mon_op_timeout', String(spec.connectTimeoutSeconds)],
      ['rados_osd_op_timeout', String(spec.osdTimeoutSeconds)],
    ];
    if (spec.keyring !== undefined) settings.push(['keyring', spec.keyring]);
    if (spec.monHost !== undefined) settings.push(['mon_host', spec.monHost]);
    for (const [key, value] of Object.entries(options.conf ?? {})) settings.push([key, value]);
    for (const [key, value] of settings) {
      r = lib.radosConfSet(cluster, key, value);
      if (r < 0) throw new RbdError('VUBLK_ERR_RBD_CONFIG', `ceph option ${key}=${value} rejected`, r);
    }
    r = await call(lib.radosConnect, cluster);
    if (r === -Errno.ETIMEDOUT) {
      throw new RbdError(
        'VUBLK_ERR_RBD_CLUSTER_UNREACHABLE',
        `no Ceph monitor answered within ${spec.connectTimeoutSeconds} s (mon_host from ${spec.monHost !== undefined ? 'mon-host=' : (spec.conf ?? 'the default ceph.conf')})`,
        r,
      );
    }
    if (isAuthErrno(r)) {
      throw new RbdError(
        'VUBLK_ERR_RBD_AUTH',
        `the cluster refused ${who}: check id= and keyring=${spec.keyring !== undefined ? ` (${spec.keyring})` : ' (default keyring search)'}`,
        r,
      );
    }
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `connecting to the Ceph cluster as ${who} failed`, r);

    const io: [number] = [0];
    r = await call(lib.radosIoctxCreate, cluster, spec.pool, io);
    if (r === -Errno.ENOENT) throw new RbdError('VUBLK_ERR_RBD_NO_POOL', `pool '${spec.pool}' does not exist`, r);
    if (r === -Errno.EACCES || r === -Errno.EPERM)
      throw new RbdError('VUBLK_ERR_RBD_PERMISSION', `${who} may not use pool '${spec.pool}'`, r);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `opening pool '${spec.pool}' failed`, r);
    if (spec.namespace !== '') lib.radosIoctxSetNamespace(io[0], spec.namespace);
    return { cluster, ioctx: io[0] };
  } catch (error) {
    await call(lib.radosShutdown, cluster).catch(() => undefined);
    throw error;
  }
}

export class RbdImage {
  private closed = false;
  /**
   * Cluster calls on the handle still running on a pool thread (lock, release, resize): rbd_close must not
   * race them (librbd would free the image under them), so close waits for them first.
   */
  private readonly running = new Set<Promise<unknown>>();

  private constructor(
    private readonly lib: LibRbd,
    readonly spec: RbdSpec,
    private readonly cluster: number,
    private readonly ioctx: number,
    /** rbd_image_t, for `RbdQueue` on a worker thread. */
    readonly handle: number,
    /** Whether this handle took the exclusive lock at open (spec.lock 'exclusive', writable). */
    readonly lockHeld: boolean,
    /** eventfd librbd signals when an aio completion is ready (for `RbdQueue`); closed after rbd_close. */
    readonly eventFd: number,
  ) {}

  get name(): string {
    return rbdImageName(this.spec);
  }

  /**
   * Connects, opens the image and (lock 'exclusive', writable) takes its exclusive lock, so a second
   * daemon opening it for writing fails with RBD_LOCKED. Throws RbdError with a code for each cause.
   */
  static async open(spec: RbdSpec, options: RbdOpenOptions = {}): Promise<RbdImage> {
    const lib = librbd();
    const { cluster, ioctx } = await connect(lib, spec, options);
    const name = rbdImageName(spec);
    const out: [number] = [0];
    let handle = 0;
    let eventFd = -1;
    try {
      const r = await call(spec.readOnly ? lib.rbdOpenReadOnly : lib.rbdOpen, ioctx, spec.image, out, null);
      if (r === -Errno.ENOENT)
        throw new RbdError(
          'VUBLK_ERR_RBD_NO_IMAGE',
          `image '${spec.image}' does not exist in pool '${spec.pool}'${spec.namespace ? ` namespace '${spec.namespace}'` : ''}`,
          r,
        );
      if (r === -Errno.EACCES || r === -Errno.EPERM)
        throw new RbdError('VUBLK_ERR_RBD_PERMISSION', `client.${spec.id} may not open ${name}`, r);
      if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `opening ${name} failed`, r);
      handle = out[0];
      const lockHeld = !spec.readOnly && spec.lock === 'exclusive';
      if (lockHeld) await RbdImage.takeLock(lib, handle, name, spec.id);
      // migratable: the lock is taken when the guest's device starts; refuse now what could never take it.
      else if (!spec.readOnly && spec.lock === 'migratable') RbdImage.requireLockFeature(lib, handle, name);
      eventFd = createEventFd();
      const n = lib.rbdSetImageNotification(handle, eventFd, EVENT_TYPE_EVENTFD);
      if (n < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `rbd_set_image_notification on ${name} failed`, n);
      return new RbdImage(lib, spec, cluster, ioctx, handle, lockHeld, eventFd);
    } catch (error) {
      if (handle !== 0) await call(lib.rbdClose, handle).catch(() => undefined);
      if (eventFd >= 0) sys.close(eventFd);
      lib.radosIoctxDestroy(ioctx);
      await call(lib.radosShutdown, cluster).catch(() => undefined);
      throw error;
    }
  }

  private static requireLockFeature(lib: LibRbd, handle: number, name: string): void {
    const features: [number] = [0];
    const r = lib.rbdGetFeatures(handle, features);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `reading the features of ${name} failed`, r);
    if ((features[0] & RBD_FEATURE_EXCLUSIVE_LOCK) === 0) {
      throw new RbdError(
        'VUBLK_ERR_RBD_LOCKED',
        `${name} has no exclusive-lock feature, so two daemons could write it at once: enable it (rbd feature enable ${name.slice(4)} exclusive-lock) or open with lock=none`,
      );
    }
  }

  private static async takeLock(lib: LibRbd, handle: number, name: string, id: string): Promise<void> {
    RbdImage.requireLockFeature(lib, handle, name);
    const r = await call(lib.rbdLockAcquire, handle, RBD_LOCK_MODE_EXCLUSIVE);
    if (r === -Errno.EROFS || r === -Errno.EBUSY || r === -Errno.EEXIST) {
      throw new RbdError(
        'VUBLK_ERR_RBD_LOCKED',
        `${name} is in use: another client holds its exclusive lock (see 'rbd lock ls ${name.slice(4)}' and 'rbd status ${name.slice(4)}'; a disk that live-migrates between daemons uses lock=migratable)`,
        r,
      );
    }
    if (r === -Errno.EACCES || r === -Errno.EPERM) throw new RbdError('VUBLK_ERR_RBD_PERMISSION', `client.${id} may not lock ${name}`, r);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `taking the exclusive lock of ${name} failed`, r);
  }

  private track<T>(promise: Promise<T>): Promise<T> {
    this.running.add(promise);
    const done = (): void => void this.running.delete(promise);
    promise.then(done, done);
    return promise;
  }

  private live(): void {
    if (this.closed) throw new RbdError('VUBLK_ERR_RBD_FAILED', `${this.name} is closed`);
  }

  /** Size in bytes from the image's cached header (no cluster round trip); follows resizes by any client. */
  size(): number {
    this.live();
    const out: [number] = [0];
    const r = this.lib.rbdGetSize(this.handle, out);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `reading the size of ${this.name} failed`, r);
    return Number(out[0]);
  }

  stat(): RbdImageInfo {
    this.live();
    const info = Buffer.alloc(RBD_IMAGE_INFO_BYTES);
    const r = this.lib.rbdStat(this.handle, addressOf(info), info.length);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `rbd_stat of ${this.name} failed`, r);
    return {
      size: Number(info.readBigUInt64LE(0)),
      objectSize: Number(info.readBigUInt64LE(8)),
      objects: Number(info.readBigUInt64LE(16)),
      order: info.readInt32LE(24),
    };
  }

  /** Whether this client holds the exclusive lock now (librbd may hand it over when lock is 'none'). */
  isLockOwner(): boolean {
    this.live();
    const out: [number] = [0];
    const r = this.lib.rbdIsExclusiveLockOwner(this.handle, out);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `rbd_is_exclusive_lock_owner on ${this.name} failed`, r);
    return out[0] !== 0;
  }

  /**
   * Gives the exclusive lock up (live migration: the source releases it at switch-over so the target's
   * writes can take it). Call with no write in flight; later writes through this handle may take it back.
   */
  async releaseLock(): Promise<void> {
    this.live();
    const r = await this.track(call(this.lib.rbdLockRelease, this.handle));
    if (r < 0 && r !== -Errno.EINVAL) throw new RbdError('VUBLK_ERR_RBD_FAILED', `releasing the exclusive lock of ${this.name} failed`, r);
  }

  /**
   * Takes the exclusive lock and keeps it (the target of a migration, once the source released it). While
   * another client holds it (VUBLK_ERR_RBD_LOCKED) it tries again every LOCK_RETRY_MS for up to `waitMs`:
   * a migration source gives the lock up while the destination is already starting. `cancelled` is asked
   * before each new try (the device stopped meanwhile): then the last refusal is thrown.
   */
  async acquireLock(waitMs = 0, cancelled: () => boolean = () => false): Promise<void> {
    this.live();
    const deadline = Date.now() + waitMs;
    for (;;) {
      try {
        await this.track(RbdImage.takeLock(this.lib, this.handle, this.name, this.spec.id));
        return;
      } catch (error) {
        const left = deadline - Date.now();
        if (!(error instanceof RbdError) || error.code !== 'VUBLK_ERR_RBD_LOCKED' || left <= 0 || cancelled()) throw error;
        await new Promise((resolve) => setTimeout(resolve, Math.min(LOCK_RETRY_MS, left)));
        this.live();
      }
    }
  }

  /** Grows (or shrinks) the image in the cluster; the guest sees the new size after a config change. */
  async resize(bytes: number): Promise<void> {
    this.live();
    if (!Number.isSafeInteger(bytes) || bytes < 0) throw new RbdError('VUBLK_ERR_RBD_SPEC', `resize: ${bytes} is not a size in bytes`);
    const r = await this.track(call(this.lib.rbdResize, this.handle, bytes));
    if (r === -Errno.EROFS) throw new RbdError('VUBLK_ERR_RBD_FAILED', `${this.name} is read-only: cannot resize`, r);
    if (r === -Errno.EACCES || r === -Errno.EPERM)
      throw new RbdError('VUBLK_ERR_RBD_PERMISSION', `client.${this.spec.id} may not resize ${this.name}`, r);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `resizing ${this.name} to ${bytes} bytes failed`, r);
  }

  /** Flushes, releases the lock and disconnects. Idempotent. The RbdQueue on this image must be closed first. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Bounded: each call is bounded by the cluster timeouts, and this wait by the connect timeout; a call still
    // running then keeps the handle (and its lock, until the cluster expires this client's watch) rather
    // than crash the daemon.
    if (this.running.size > 0) {
      const bound = new Promise((resolve) => setTimeout(resolve, this.spec.connectTimeoutSeconds * 1000).unref());
      await Promise.race([Promise.allSettled([...this.running]), bound]);
      if (this.running.size > 0)
        throw new RbdError('VUBLK_ERR_RBD_FAILED', `closing ${this.name}: a cluster call on it is still running; the image is left open`);
    }
    const r = await call(this.lib.rbdClose, this.handle);
    sys.close(this.eventFd);
    this.lib.radosIoctxDestroy(this.ioctx);
    await call(this.lib.radosShutdown, this.cluster);
    if (r < 0) throw new RbdError('VUBLK_ERR_RBD_FAILED', `closing ${this.name} failed (${errnoName(r)})`, r);
  }
}
