import { describe, expect, it } from 'vitest';
import { DEFAULT_CONNECT_TIMEOUT_SECONDS, isRbdImage, parseRbdSpec, rbdImageName } from '../../src/backend/rbd/rbd-spec.js';
import { RbdError } from '../../src/backend/rbd/rbd-error.js';

function specError(image: string, options = {}): RbdError {
  try {
    parseRbdSpec(image, options);
  } catch (error) {
    expect(error).toBeInstanceOf(RbdError);
    expect((error as RbdError).code).toBe('VUBLK_ERR_RBD_SPEC');
    return error as RbdError;
  }
  throw new Error(`parseRbdSpec accepted ${image}`);
}

describe('rbd: image spec', () => {
  it('recognises rbd: images only', () => {
    expect(isRbdImage('rbd:pool/img')).toBe(true);
    expect(isRbdImage('/var/lib/img.raw')).toBe(false);
    expect(isRbdImage('nbd://host/export')).toBe(false);
  });

  it('parses POOL/IMAGE with defaults', () => {
    expect(parseRbdSpec('rbd:rbd/img1')).toEqual({
      pool: 'rbd',
      namespace: '',
      image: 'img1',
      conf: undefined,
      id: 'admin',
      keyring: undefined,
      monHost: undefined,
      connectTimeoutSeconds: DEFAULT_CONNECT_TIMEOUT_SECONDS,
      osdTimeoutSeconds: 0,
      lock: 'exclusive',
      readOnly: false,
    });
  });

  it('parses POOL/NAMESPACE/IMAGE and every option', () => {
    const spec = parseRbdSpec('rbd:vms/tenant-a/disk.0', {
      conf: '/etc/ceph/ceph.conf',
      id: 'client.vublk',
      keyring: '/etc/ceph/ceph.client.vublk.keyring',
      monHost: 'v2:10.0.0.1:3300',
      connectTimeout: '5',
      osdTimeout: '60',
      lock: 'none',
      readOnly: true,
    });
    expect(spec).toMatchObject({
      pool: 'vms',
      namespace: 'tenant-a',
      image: 'disk.0',
      conf: '/etc/ceph/ceph.conf',
      id: 'vublk',
      keyring: '/etc/ceph/ceph.client.vublk.keyring',
      monHost: 'v2:10.0.0.1:3300',
      connectTimeoutSeconds: 5,
      osdTimeoutSeconds: 60,
      lock: 'none',
      readOnly: true,
    });
    expect(rbdImageName(spec)).toBe('rbd:vms/tenant-a/disk.0');
    expect(rbdImageName(parseRbdSpec('rbd:a/b'))).toBe('rbd:a/b');
  });

  it('takes each lock mode by name', () => {
    for (const lock of ['exclusive', 'migratable', 'none'] as const) expect(parseRbdSpec('rbd:a/b', { lock }).lock).toBe(lock);
  });

  it.each([
    ['img.raw', /not an rbd: image/],
    ['rbd:', /expected rbd:POOL\/IMAGE/],
    ['rbd:pool', /expected rbd:POOL\/IMAGE/],
    ['rbd:pool/', /image name is empty/],
    ['rbd:/img', /pool name is empty/],
    ['rbd:a/b/c/d', /expected rbd:POOL\/IMAGE/],
    ['rbd:a//c', /namespace name is empty/],
    ['rbd://mon/pool/img', /not a URL/],
    ['rbd:pool/img@snap', /snapshots/],
    ['rbd:pool/img:id=admin', /QEMU-style/],
    ['rbd:po ol/img', /whitespace/],
    ['rbd:pool/im\tg', /whitespace/],
  ])('rejects %s', (image, message) => {
    expect(specError(image).message).toMatch(message);
  });

  it.each([
    [{ id: '' }, /id must be/],
    [{ id: 'client.' }, /id must be/],
    [{ id: 'a b' }, /id must be/],
    [{ conf: '' }, /conf is empty/],
    [{ keyring: '' }, /keyring is empty/],
    [{ monHost: ' ' }, /mon-host is empty/],
    [{ connectTimeout: '0' }, /connect-timeout must be between 1/],
    [{ connectTimeout: '5s' }, /whole number of seconds/],
    [{ connectTimeout: '-1' }, /whole number of seconds/],
    [{ osdTimeout: '100000' }, /osd-timeout must be between/],
    [{ lock: 'shared' }, /lock must be exclusive, migratable or none/],
  ])('rejects option %o', (options, message) => {
    expect(specError('rbd:pool/img', options).message).toMatch(message);
  });
});

describe('rbd: library loading', () => {
  it('a missing librbd is RBD_LIBRARY_MISSING naming the packages', async () => {
    const { loadLibRbd } = await import('../../src/backend/rbd/librbd.js');
    let caught: unknown;
    try {
      loadLibRbd('librados-vublk-missing.so.2', 'librbd-vublk-missing.so.1');
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(RbdError);
    expect((caught as RbdError).code).toBe('VUBLK_ERR_RBD_LIBRARY_MISSING');
    expect((caught as RbdError).message).toMatch(/apt-get install librbd1 librados2/);
  });
});
