/**
 * The control side of network images: an NBD export or a Ceph RBD image is opened and validated here, on the
 * control thread, when the daemon starts (clear errors: unreachable server, missing export, missing cluster,
 * image, keyring, permission, lock held), and what the workers need is described for them (NetworkBackend).
 *
 * NBD: a probe connection learns the export (size, block sizes, read-only, flush/trim/write-zeroes,
 * multi-conn) and is closed again; each worker then keeps its own connection (multi-conn) or the disk's
 * queues are pinned to one worker with one connection. RBD: the image is opened once (with its exclusive
 * lock) and kept for the daemon's life; its handle and completion eventfd go to the one worker that runs
 * all of the disk's queues (one RbdQueue per image handle).
 *
 * Image locking (src/sys/image-lock.ts) does not apply: RBD has its exclusive lock; NBD is the server's.
 */
import { VublkError } from '../errors.js';
import { NbdClient } from '../backend/nbd/nbd-client.js';
import { NbdHandshakeError } from '../backend/nbd/handshake.js';
import { parseNbdUri, resolveEndpoint } from '../backend/nbd/nbd-uri.js';
import { describeEndpoint } from '../sys/net-socket.js';
import { SyscallError } from '../sys/errors.js';
import { RbdImage } from '../backend/rbd/rbd-image.js';
import { parseRbdSpec, rbdImageName, type RbdSpec } from '../backend/rbd/rbd-spec.js';
import type { NetworkBackend } from '../dataplane/network-backend.js';

/** The disk options that only network images use (rows of the options table). */
export interface NetworkImageOptions {
  /** Network images (NBD, RBD): seconds to connect (and, RBD, per monitor command). */
  connectTimeout?: number | undefined;
  /** NBD: seconds requests wait for a lost server before failing with IOERR. */
  reconnectTimeout?: number | undefined;
  /** NBD: seconds without a reply before the connection counts as stalled and is reset (0 = never). */
  requestTimeout?: number | undefined;
  /** NBD: connections per worker when the server advertises multi-conn (1 without it). */
  connections?: number | undefined;
  /** Largest READ / WRITE made by merging adjacent requests, in bytes; 0 = no merging (`merge=`). */
  mergeMaxBytes?: number | undefined;
  /** RBD: ceph.conf, cephx id, keyring, monitors, lock mode, OSD timeout (docs/rbd.md). */
  rbdConf?: string | undefined;
  rbdId?: string | undefined;
  rbdKeyring?: string | undefined;
  rbdMonHost?: string | undefined;
  rbdLock?: 'exclusive' | 'migratable' | 'none' | undefined;
  osdTimeout?: number | undefined;
}

export const NBD_DEFAULT_CONNECT_TIMEOUT_S = 5;
export const NBD_DEFAULT_RECONNECT_TIMEOUT_S = 30;
export const NBD_DEFAULT_REQUEST_TIMEOUT_S = 60;
/**
 * Two: a server answers one connection's requests one reply at a time (nbdkit and qemu-nbd take a per-
 * connection lock to send), so a queue whose requests all share one connection leaves the server's threads
 * waiting on each other. Measured with nbdkit, 128 KiB reads at QD8: nbdkit spent 43–66 µs per request over
 * two connections against 66–71 µs over one (docs/nbd.md, "Connections").
 */
export const NBD_DEFAULT_CONNECTIONS = 2;
/**
 * 1 MiB: a 128 KiB sequential read at QD8 over RBD ran 1.7–2.1× faster merged (the OSD spent 85 µs per
 * request against 180), and a larger operation only delays the first request of a merge more. The limit
 * also keeps a merged operation inside one 4 MiB RBD object more often than not.
 */
export const DEFAULT_MERGE_MAX_BYTES = 1024 * 1024;
export const MAX_MERGE_MAX_BYTES = 32 * 1024 * 1024;

/** The merge limit of an image whose largest operation is `largest` bytes (0 = no limit of its own). */
function mergeLimit(options: NetworkImageOptions, largest: number): number {
  const wanted = options.mergeMaxBytes ?? DEFAULT_MERGE_MAX_BYTES;
  return largest > 0 ? Math.min(wanted, largest) : wanted;
}

/** A network image the daemon opened; one per disk. */
export interface NetworkImage {
  readonly kind: 'nbd' | 'rbd';
  /** For logs: the URI or rbd:POOL/IMAGE. */
  readonly location: string;
  /** GET_ID answer when the disk has no serial= (the export or image name). */
  readonly defaultSerial: string;
  readonly sizeBytes: number;
  /** Offsets and lengths must be multiples of this (NBD minimum block size; 512 for RBD). */
  readonly minimumBlockSize: number;
  /** Preferred I/O size in bytes (config opt_io_size), 0 when unknown. */
  readonly preferredBlockSize: number;
  /** The server refuses writes (NBD read-only export, RBD opened read-only). */
  readonly readOnly: boolean;
  readonly canDiscard: boolean;
  readonly canWriteZeroes: boolean;
  /** Every queue of the disk must run on one worker (one connection / one completion queue). */
  readonly pinQueues: boolean;
  /** What workers need (structured-cloneable). */
  readonly backend: NetworkBackend;
  /** Grows the image where it lives (RBD); NBD exports cannot be resized from here. */
  resize(bytes: number): Promise<void>;
  /**
   * The guest's device is starting (the session's first ring): RBD `lock=migratable` takes the exclusive
   * lock here, waiting up to connect-timeout for a previous owner (a migration source) to give it up, or
   * until `abandoned` says the start is no longer wanted (asked at every retry).
   */
  deviceStarted?(abandoned: () => boolean): Promise<string>;
  /** The front-end stopped the device, reset it or left: RBD `lock=migratable` gives the lock up. */
  deviceStopped?(): Promise<string>;
  /** RBD: whether this daemon's client holds the image's exclusive lock now (a local check, no round trip). */
  lockOwner?(): boolean;
  close(): Promise<void>;
}

/** Opening a network image failed; the message says why and what to check. */
export class NetworkImageError extends VublkError {
  constructor(code: string, message: string, options: { cause?: unknown } = {}) {
    super(code, message, { peerFault: true, fatal: true, ...options });
  }
}

let nextKey = 1;
function backendKey(kind: string): string {
  return `${kind}-${process.pid}-${nextKey++}`;
}

/** The RBD spec of a disk's options (pure; throws RbdError with code VUBLK_ERR_RBD_SPEC). */
export function rbdSpecOf(options: NetworkImageOptions & { imagePath?: string | undefined; readOnly: boolean }): RbdSpec {
  return parseRbdSpec(options.imagePath ?? '', {
    conf: options.rbdConf,
    id: options.rbdId,
    keyring: options.rbdKeyring,
    monHost: options.rbdMonHost,
    connectTimeout: options.connectTimeout === undefined ? undefined : String(options.connectTimeout),
    osdTimeout: options.osdTimeout === undefined ? undefined : String(options.osdTimeout),
    lock: options.rbdLock,
    readOnly: options.readOnly,
  });
}

/** Opens `imagePath` when it names a network image; null for files and block devices. */
export async function openNetworkImage(
  options: NetworkImageOptions & { imagePath: string; readOnly: boolean },
): Promise<NetworkImage | null> {
  const image = options.imagePath;
  if (image.startsWith('rbd:')) return openRbd(rbdSpecOf(options), mergeLimit(options, 0));
  if (/^nbds?(\+unix)?:\/\//i.test(image)) return openNbd(image, options);
  return null;
}

async function openNbd(uri: string, options: NetworkImageOptions): Promise<NetworkImage> {
  const target = parseNbdUri(uri);
  let endpoint: Awaited<ReturnType<typeof resolveEndpoint>>;
  try {
    endpoint = await resolveEndpoint(target.endpoint);
  } catch (error) {
    throw new NetworkImageError(
      'VUBLK_ERR_NBD_UNREACHABLE',
      `NBD server ${uri}: cannot resolve the host name: ${(error as Error).message}`,
      { cause: error },
    );
  }
  const connectTimeoutMs = (options.connectTimeout ?? NBD_DEFAULT_CONNECT_TIMEOUT_S) * 1000;
  const where = describeEndpoint(endpoint);
  let probe: NbdClient;
  try {
    probe = NbdClient.open({ endpoint, exportName: target.exportName, connectTimeoutMs }, () => undefined);
  } catch (error) {
    const detail = (error as Error).message;
    if (error instanceof NbdHandshakeError && error.code === 'NBD_UNKNOWN_EXPORT') {
      throw new NetworkImageError('VUBLK_ERR_NBD_NO_EXPORT', `NBD server ${where} has no export '${target.exportName}' (${detail})`, {
        cause: error,
      });
    }
    if (error instanceof NbdHandshakeError) {
      throw new NetworkImageError('VUBLK_ERR_NBD_REFUSED', `NBD server ${where} refused export '${target.exportName}': ${detail}`, {
        cause: error,
      });
    }
    if (
      error instanceof SyscallError ||
      (error as { code?: string }).code === 'NBD_TIMEOUT' ||
      (error as { code?: string }).code === 'NBD_EOF'
    ) {
      throw new NetworkImageError(
        'VUBLK_ERR_NBD_UNREACHABLE',
        `NBD server ${where} is unreachable (is it running, and listening there?): ${detail}`,
        { cause: error },
      );
    }
    throw new NetworkImageError('VUBLK_ERR_NBD_HANDSHAKE', `NBD server ${where}: ${detail}`, { cause: error });
  }
  const info = probe.info;
  probe.close();
  const backend: NetworkBackend = {
    kind: 'nbd',
    key: backendKey('nbd'),
    endpoint,
    exportName: target.exportName,
    info,
    connectTimeoutMs,
    reconnectTimeoutMs: (options.reconnectTimeout ?? NBD_DEFAULT_RECONNECT_TIMEOUT_S) * 1000,
    requestTimeoutMs: (options.requestTimeout ?? NBD_DEFAULT_REQUEST_TIMEOUT_S) * 1000,
    // Without multi-conn a FLUSH on one connection would not cover writes acknowledged on another.
    connections: info.canMultiConn ? (options.connections ?? NBD_DEFAULT_CONNECTIONS) : 1,
    // A merge past the server's largest payload would only be split again.
    mergeMaxBytes: mergeLimit(options, info.maximumPayload),
  };
  return {
    kind: 'nbd',
    location: uri,
    defaultSerial: target.exportName || 'nbd',
    sizeBytes: info.size,
    minimumBlockSize: info.minimumBlockSize,
    preferredBlockSize: info.preferredBlockSize,
    readOnly: info.readOnly,
    canDiscard: info.canTrim,
    canWriteZeroes: info.canWriteZeroes,
    pinQueues: !info.canMultiConn,
    backend,
    resize: () =>
      Promise.reject(new NetworkImageError('VUBLK_ERR_NBD_RESIZE', `${uri}: an NBD export is resized on its server, not through vublk`)),
    close: () => Promise.resolve(),
  };
}

/**
 * lock=migratable: the lock follows the device. A stop that comes while a start still waits for the lock
 * (the front-end left) ends that wait, and a lock the start took after all is given back: `generation`
 * counts the stops.
 */
function migratableLock(image: RbdImage, spec: RbdSpec): Pick<NetworkImage, 'deviceStarted' | 'deviceStopped'> {
  const name = rbdImageName(spec);
  let generation = 0;
  return {
    deviceStarted: async (abandoned) => {
      const started = generation;
      await image.acquireLock(spec.connectTimeoutSeconds * 1000, () => generation !== started || abandoned());
      if (generation !== started) {
        await image.releaseLock();
        return `exclusive lock of ${name} taken and given back: the device stopped meanwhile`;
      }
      return `exclusive lock of ${name} taken`;
    },
    deviceStopped: async () => {
      generation++;
      await image.releaseLock();
      return `exclusive lock of ${name} released`;
    },
  };
}

async function openRbd(spec: RbdSpec, mergeMaxBytes: number): Promise<NetworkImage> {
  // librbd's cache is off: a write completes when the OSDs have it, and FLUSH has nothing to lose. Write data
  // is copied at submission (Ceph's default, pinned here): a write left in flight by a ring that stopped
  // never reads the guest memory again, which the session then quarantines (control/memory-table.ts).
  const image = await RbdImage.open(spec, { conf: { rbd_cache: 'false', rbd_disable_zero_copy_writes: 'true' } });
  let size: number;
  try {
    size = image.size();
  } catch (error) {
    await image.close().catch(() => undefined);
    throw error;
  }
  return {
    kind: 'rbd',
    location: rbdImageName(spec),
    defaultSerial: spec.image,
    sizeBytes: size,
    minimumBlockSize: 512,
    preferredBlockSize: 0,
    readOnly: spec.readOnly,
    canDiscard: true,
    canWriteZeroes: true,
    pinQueues: true,
    backend: { kind: 'rbd', key: backendKey('rbd'), handle: image.handle, eventFd: image.eventFd, mergeMaxBytes },
    resize: (bytes) => image.resize(bytes),
    lockOwner: () => image.isLockOwner(),
    ...(spec.lock === 'migratable' && !spec.readOnly ? migratableLock(image, spec) : {}),
    close: () => image.close(),
  };
}
