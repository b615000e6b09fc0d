import { describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/daemon/config-file.js';
import { planReload, resolveDiskLimits } from '../../src/daemon/reload.js';

const FILE = '/etc/vublk/v.yaml';

function config(text: string) {
  return parseConfig(text, FILE);
}

const START = config(`
metrics-listen: 127.0.0.1:9477
disks:
  - { name: a, image: a.img, socket: a.sock, throttle: { iops: 100 } }
  - { name: b, image: b.img, socket: b.sock, num-queues: 2 }
`);

function running(limits = START.disks.map((spec) => resolveDiskLimits(spec.options.throttle))) {
  return START.disks.map((spec, i) => ({ spec, limits: limits[i]! }));
}

describe('planReload', () => {
  it('changes nothing for the same file', () => {
    expect(planReload(running(), START, START)).toEqual({ throttle: [], restart: [] });
  });

  it('applies throttle changes live, with bursts resolved', () => {
    const next = config(`
metrics-listen: 127.0.0.1:9477
disks:
  - { name: a, image: a.img, socket: a.sock, throttle: { iops: 200, bps: 1M } }
  - { name: b, image: b.img, socket: b.sock, num-queues: 2, throttle: { bps: 5M, bps-burst: 10M } }
`);
    const plan = planReload(running(), START, next);
    expect(plan.restart).toEqual([]);
    expect(plan.throttle).toEqual(
      [
        {
          disk: 'a',
          from: { iops: 100, iopsBurst: 100, bps: 0, bpsBurst: 0 },
          to: { iops: 200, iopsBurst: 200, bps: 1 << 20, bpsBurst: 1 << 20 },
          limits: { iops: 200, bps: 1 << 20 },
        },
        {
          disk: 'b',
          from: { iops: 0, iopsBurst: 0, bps: 0, bpsBurst: 0 },
          to: { iops: 0, iopsBurst: 0, bps: 5 << 20, bpsBurst: 10 << 20 },
          limits: { bps: 5 << 20, bpsBurst: 10 << 20 },
        },
      ].map(({ limits, ...rest }) => ({ ...rest, limits: expect.objectContaining(limits) })),
    );
  });

  it('makes the file authoritative: limits changed since (admin) are set back', () => {
    const now = running([{ iops: 999, iopsBurst: 999, bps: 0, bpsBurst: 0 }, resolveDiskLimits({})]);
    const plan = planReload(now, START, START);
    expect(plan.throttle).toHaveLength(1);
    expect(plan.throttle[0]).toMatchObject({ disk: 'a', to: { iops: 100, iopsBurst: 100 } });
  });

  it('reports other changes as needing a restart', () => {
    const next = config(`
metrics-listen: 127.0.0.1:9999
log-level: debug
disks:
  - { name: a, image: other.img, socket: a.sock, read-only: true, throttle: { iops: 100 } }
  - { name: c, image: c.img, socket: c.sock }
`);
    const plan = planReload(running(), START, next);
    expect(plan.throttle).toEqual([]);
    expect(plan.restart).toEqual([
      { change: 'changed', keys: ['metrics-listen', 'log-level'] },
      { disk: 'a', change: 'changed', keys: ['image', 'read-only'] },
      { disk: 'b', change: 'removed', keys: [] },
      { disk: 'c', change: 'added', keys: [] },
    ]);
  });

  it('compares with the running specs, so a pending change is reported again', () => {
    const next = config(`
metrics-listen: 127.0.0.1:9477
disks:
  - { name: a, image: a.img, socket: a.sock, throttle: { iops: 100 } }
  - { name: b, image: b.img, socket: b.sock, num-queues: 4, size: 1G }
`);
    for (let i = 0; i < 2; i++) {
      expect(planReload(running(), START, next).restart).toEqual([{ disk: 'b', change: 'changed', keys: ['size', 'num-queues'] }]);
    }
  });
});
