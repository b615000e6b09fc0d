import { describe, expect, it } from 'vitest';
import {
  AdminError,
  handleAdmin,
  mergeThrottle,
  parseThrottleChange,
  type AdminDiskInfo,
  type AdminTarget,
} from '../../src/metrics/admin.js';
import type { DiskLimits, ResolvedDiskLimits } from '../../src/throttle/disk-throttle.js';
import { resolveDiskLimits } from '../../src/daemon/reload.js';

const UNLIMITED: ResolvedDiskLimits = { iops: 0, iopsBurst: 0, bps: 0, bpsBurst: 0 };

describe('parseThrottleChange', () => {
  it('accepts numbers and strings with units', () => {
    expect(parseThrottleChange({ iops: 500, bps: '100M' })).toEqual({ iops: 500, bps: 104857600 });
    expect(parseThrottleChange({ 'iops-burst': '10k', 'bps-burst': '1G' })).toEqual({ iopsBurst: 10000, bpsBurst: 1 << 30 });
    expect(parseThrottleChange({ iops: 0 })).toEqual({ iops: 0 });
  });

  it.each([
    [null, /JSON object/],
    [[1], /JSON object/],
    [{}, /at least one/],
    [{ iops: 1, colour: 'red' }, /unknown key 'colour'/],
    [{ iops: -1 }, /iops: must be a non-negative whole number/],
    [{ iops: 1.5 }, /iops: must be/],
    [{ iops: true }, /iops: must be/],
    [{ bps: 'fast' }, /bps: invalid rate/],
  ])('rejects %j', (body, message) => {
    expect(() => parseThrottleChange(body)).toThrow(AdminError);
    expect(() => parseThrottleChange(body)).toThrow(message);
  });
});

describe('mergeThrottle', () => {
  const current = resolveDiskLimits({ iops: 100, iopsBurst: 500, bps: 1000 });

  it('keeps what the change leaves out', () => {
    expect(resolveDiskLimits(mergeThrottle(current, { bps: 2000 }))).toEqual({ iops: 100, iopsBurst: 500, bps: 2000, bpsBurst: 2000 });
  });

  it('gives a new rate the default burst unless a burst comes with it', () => {
    expect(resolveDiskLimits(mergeThrottle(current, { iops: 300 }))).toEqual({ iops: 300, iopsBurst: 300, bps: 1000, bpsBurst: 1000 });
    expect(resolveDiskLimits(mergeThrottle(current, { iops: 300, iopsBurst: 900 }))).toMatchObject({ iops: 300, iopsBurst: 900 });
    expect(resolveDiskLimits(mergeThrottle(current, { iopsBurst: 50 }))).toMatchObject({ iops: 100, iopsBurst: 50 });
  });

  it('turns a limit off with 0 and refuses a burst without a rate', () => {
    expect(resolveDiskLimits(mergeThrottle(current, { iops: 0 }))).toEqual({ iops: 0, iopsBurst: 0, bps: 1000, bpsBurst: 1000 });
    expect(() => mergeThrottle(UNLIMITED, { bpsBurst: 5 })).toThrow(/bps-burst needs bps/);
    expect(() => mergeThrottle(current, { iops: 0, iopsBurst: 5 })).toThrow(/iops-burst needs iops/);
  });
});

class FakeTarget implements AdminTarget {
  limits = new Map<string, ResolvedDiskLimits>([['disk0', UNLIMITED]]);
  listDisks(): AdminDiskInfo[] {
    return [...this.limits.keys()].map((name) => ({
      name,
      image: '/i',
      socket: '/s',
      'capacity-bytes': 1,
      'num-queues': 1,
      'queue-size': 8,
      'read-only': false,
      'logical-block-size': 512,
      connected: false,
      connections: 0,
      throttle: { iops: 0, 'iops-burst': 0, bps: 0, 'bps-burst': 0 },
    }));
  }
  setThrottle(disk: string, change: DiskLimits): ResolvedDiskLimits {
    const current = this.limits.get(disk);
    if (current === undefined) throw new AdminError(404, `no disk named '${disk}'`);
    const next = resolveDiskLimits(mergeThrottle(current, change));
    this.limits.set(disk, next);
    return next;
  }
  resized: [string, number][] = [];
  async resize(disk: string, sizeBytes: number): Promise<number> {
    if (!this.limits.has(disk)) throw new AdminError(404, `no disk named '${disk}'`);
    this.resized.push([disk, sizeBytes]);
    return sizeBytes;
  }
}

describe('handleAdmin', () => {
  it('lists disks and applies throttle changes', async () => {
    const target = new FakeTarget();
    const list = await handleAdmin({ method: 'GET', pathname: '/admin/disks', body: undefined }, target);
    expect(list.status).toBe(200);
    expect((list.body as { disks: AdminDiskInfo[] }).disks[0]?.name).toBe('disk0');
    const set = await handleAdmin({ method: 'POST', pathname: '/admin/disks/disk0/throttle', body: { iops: '2k' } }, target);
    expect(set).toEqual({ status: 200, body: { disk: 'disk0', throttle: { iops: 2000, 'iops-burst': 2000, bps: 0, 'bps-burst': 0 } } });
  });

  it('answers errors with a status and an error message', async () => {
    const target = new FakeTarget();
    const call = (method: string, pathname: string, body?: unknown) => handleAdmin({ method, pathname, body }, target);
    expect(await call('POST', '/admin/disks/nope/throttle', { iops: 1 })).toEqual({ status: 404, body: { error: "no disk named 'nope'" } });
    expect((await call('GET', '/admin/disks/disk0/throttle')).status).toBe(405);
    expect((await call('POST', '/admin/disks')).status).toBe(405);
    expect((await call('POST', '/admin/disks/disk0/throttle', { iops: 'x' })).status).toBe(400);
    expect((await call('GET', '/admin/other')).status).toBe(404);
    expect((await call('POST', '/admin/disks/%E0%A4%A/throttle', { iops: 1 })).status).toBe(400);
  });

  it('routes resize with a parsed size, and validates the body', async () => {
    const target = new FakeTarget();
    expect(await handleAdmin({ method: 'POST', pathname: '/admin/disks/disk0/resize', body: { size: '2G' } }, target)).toEqual({
      status: 200,
      body: { disk: 'disk0', 'capacity-bytes': 2 * 1024 ** 3 },
    });
    expect(target.resized).toEqual([['disk0', 2 * 1024 ** 3]]);
    expect((await handleAdmin({ method: 'POST', pathname: '/admin/disks/disk0/resize', body: { size: 'big' } }, target)).status).toBe(400);
    expect((await handleAdmin({ method: 'POST', pathname: '/admin/disks/nope/resize', body: { size: '2G' } }, target)).status).toBe(404);
    expect((await handleAdmin({ method: 'GET', pathname: '/admin/disks/disk0/resize', body: null }, target)).status).toBe(405);
  });
});
