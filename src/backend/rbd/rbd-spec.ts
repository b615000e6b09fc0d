/**
 * `image=rbd:POOL/IMAGE` (or `rbd:POOL/NAMESPACE/IMAGE`) plus the disk options that say how to reach the
 * cluster: `conf=`, `id=`, `keyring=`, `mon-host=`, `connect-timeout=`, `osd-timeout=`, `lock=`.
 * Pure: nothing is read or connected here, so every mistake is reported before the daemon starts.
 */
import { RbdError } from './rbd-error.js';

export const RBD_PREFIX = 'rbd:';

/** How the image's exclusive lock is used. */
export type RbdLockMode =
  /** Take the lock at open and keep it: a second daemon opening the image for writing is refused. */
  | 'exclusive'
  /**
   * Take the lock when the guest's device starts (its first ring) and give it up when the front-end stops the
   * device (GET_VRING_BASE of the last ring, a reset, a disconnect): a second writer is refused while the guest
   * runs, and a live migration hands the lock from the source to the destination at switch-over.
   */
  | 'migratable'
  /** Do not take it (librbd still hands it over cooperatively per write). */
  | 'none';

export interface RbdSpec {
  pool: string;
  /** RADOS namespace inside the pool; '' for the default one. */
  namespace: string;
  image: string;
  /** ceph.conf to read; undefined: librados' default search ($CEPH_CONF, /etc/ceph/ceph.conf, ...). */
  conf: string | undefined;
  /** Client id without the `client.` prefix. */
  id: string;
  /** Keyring file; undefined: what ceph.conf says (default /etc/ceph/$cluster.$name.keyring, ...). */
  keyring: string | undefined;
  /** Monitor addresses overriding ceph.conf's mon_host. */
  monHost: string | undefined;
  /** Seconds to reach a monitor and authenticate, and to wait for each monitor command. */
  connectTimeoutSeconds: number;
  /** Seconds before an OSD operation fails with ETIMEDOUT; 0: wait for the cluster indefinitely. */
  osdTimeoutSeconds: number;
  lock: RbdLockMode;
  readOnly: boolean;
}

export interface RbdSpecOptions {
  conf?: string | undefined;
  id?: string | undefined;
  keyring?: string | undefined;
  monHost?: string | undefined;
  connectTimeout?: string | undefined;
  osdTimeout?: string | undefined;
  lock?: string | undefined;
  readOnly?: boolean | undefined;
}

export const DEFAULT_RBD_ID = 'admin';
export const DEFAULT_CONNECT_TIMEOUT_SECONDS = 30;
const MAX_TIMEOUT_SECONDS = 24 * 3600;

export function isRbdImage(image: string): boolean {
  return image.startsWith(RBD_PREFIX);
}

function fail(detail: string): never {
  throw new RbdError('VUBLK_ERR_RBD_SPEC', detail);
}

/** Names librados would take but a spec should never carry: empty, whitespace, control characters, '@'. */
function checkName(what: string, name: string, image: string): void {
  if (name === '') fail(`${image}: the ${what} name is empty (expected rbd:POOL/IMAGE)`);
  if (/[\s\x00-\x1f\x7f]/.test(name)) fail(`${image}: the ${what} name '${name}' contains whitespace or a control character`);
}

function seconds(key: string, text: string, min: number): number {
  if (!/^\d+$/.test(text)) fail(`${key} must be a whole number of seconds, got '${text}'`);
  const value = Number(text);
  if (value < min || value > MAX_TIMEOUT_SECONDS) fail(`${key} must be between ${min} and ${MAX_TIMEOUT_SECONDS} seconds, got ${value}`);
  return value;
}

function optionalPath(key: string, text: string | undefined): string | undefined {
  if (text === undefined) return undefined;
  if (text === '') fail(`${key} is empty`);
  if (text.includes('\0')) fail(`${key} contains a NUL byte`);
  return text;
}

export function parseRbdSpec(image: string, options: RbdSpecOptions = {}): RbdSpec {
  if (!isRbdImage(image)) fail(`'${image}' is not an rbd: image (expected rbd:POOL/IMAGE)`);
  const path = image.slice(RBD_PREFIX.length);
  if (path.startsWith('//')) fail(`${image}: expected rbd:POOL/IMAGE, not a URL (rbd://…)`);
  if (path.includes(':')) {
    fail(`${image}: QEMU-style ':key=value' options are not accepted here; give conf=, id=, keyring= as disk options`);
  }
  if (path.includes('@')) fail(`${image}: snapshots (@SNAP) are not supported`);
  const parts = path.split('/');
  if (parts.length < 2 || parts.length > 3) fail(`${image}: expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE`);
  const pool = parts[0] ?? '';
  const namespace = parts.length === 3 ? (parts[1] ?? '') : '';
  const name = parts[parts.length - 1] ?? '';
  checkName('pool', pool, image);
  if (parts.length === 3) checkName('namespace', namespace, image);
  checkName('image', name, image);

  let id = options.id ?? DEFAULT_RBD_ID;
  if (id.startsWith('client.')) id = id.slice('client.'.length);
  if (id === '' || /[\s\x00-\x1f\x7f]/.test(id)) fail(`id must be a client id such as 'admin' or 'vublk', got '${options.id ?? ''}'`);

  let lock: RbdLockMode = 'exclusive';
  if (options.lock !== undefined) {
    if (options.lock !== 'exclusive' && options.lock !== 'migratable' && options.lock !== 'none')
      fail(`lock must be exclusive, migratable or none, got '${options.lock}'`);
    lock = options.lock;
  }
  const monHost = options.monHost;
  if (monHost !== undefined && monHost.trim() === '') fail('mon-host is empty');

  return {
    pool,
    namespace,
    image: name,
    conf: optionalPath('conf', options.conf),
    id,
    keyring: optionalPath('keyring', options.keyring),
    monHost,
    connectTimeoutSeconds:
      options.connectTimeout !== undefined ? seconds('connect-timeout', options.connectTimeout, 1) : DEFAULT_CONNECT_TIMEOUT_SECONDS,
    osdTimeoutSeconds: options.osdTimeout !== undefined ? seconds('osd-timeout', options.osdTimeout, 0) : 0,
    lock,
    readOnly: options.readOnly ?? false,
  };
}

/** `rbd:pool/image` (or with the namespace), for logs and errors. */
export function rbdImageName(spec: Pick<RbdSpec, 'pool' | 'namespace' | 'image'>): string {
  return `${RBD_PREFIX}${spec.pool}/${spec.namespace ? `${spec.namespace}/` : ''}${spec.image}`;
}
