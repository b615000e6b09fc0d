import { describe, expect, it } from 'vitest';
import {
  Counter,
  CounterReader,
  LATENCY_BUCKETS_SECONDS,
  LatencyOp,
  QueueCounters,
  createCounterBuffer,
} from '../../src/dataplane/counters.js';
import { createMetricsRegistry, type DiskMetricsSource } from '../../src/metrics/registry.js';
import { SnapshotHistogram } from '../../src/metrics/snapshot-histogram.js';
import { parseExposition, select, sampleValue } from '../support/prom-text.js';
import { Registry } from 'prom-client';

function disk(
  name: string,
  queues: number,
  extra: Partial<DiskMetricsSource> = {},
): { source: DiskMetricsSource; writers: QueueCounters[] } {
  const buffer = createCounterBuffer(queues);
  const writers = Array.from({ length: queues }, (_, q) => new QueueCounters(buffer, q));
  return {
    writers,
    source: {
      name,
      capacityBytes: 1 << 20,
      counters: new CounterReader(buffer),
      throttleLimits: { iops: 0, iopsBurst: 0, bps: 0, bpsBurst: 0 },
      connected: false,
      connections: 0,
      lockOwner: () => null,
      ...extra,
    },
  };
}

async function scrape(sources: DiskMetricsSource[]) {
  const registry = createMetricsRegistry(() => sources, { defaultMetrics: false });
  return parseExposition(await registry.metrics());
}

describe('metrics registry', () => {
  it('vublk_rbd_lock_owner: 1 or 0 for disks with an exclusive lock, read at each scrape; no sample for others', async () => {
    let held = true;
    const rbd = disk('vm1', 1, { lockOwner: () => held });
    const file = disk('scratch', 1);
    const registry = createMetricsRegistry(() => [rbd.source, file.source], { defaultMetrics: false });
    let m = parseExposition(await registry.metrics());
    expect(m.types.get('vublk_rbd_lock_owner')).toBe('gauge');
    expect(sampleValue(m, 'vublk_rbd_lock_owner', { disk: 'vm1' })).toBe(1);
    expect(select(m, 'vublk_rbd_lock_owner').map((sample) => sample.labels['disk'])).toEqual(['vm1']);
    held = false;
    m = parseExposition(await registry.metrics());
    expect(sampleValue(m, 'vublk_rbd_lock_owner', { disk: 'vm1' })).toBe(0);
  });

  it('exports every family with disk/queue labels, read from the shared counters at scrape time', async () => {
    const a = disk('a', 2, { connected: true, connections: 3, throttleLimits: { iops: 100, iopsBurst: 200, bps: 1000, bpsBurst: 1000 } });
    const registry = createMetricsRegistry(() => [a.source], { defaultMetrics: false });
    const before = parseExposition(await registry.metrics());
    expect(sampleValue(before, 'vublk_requests_total', { disk: 'a', queue: '1', op: 'write' })).toBe(0);

    const [q0, q1] = a.writers;
    q0!.add(Counter.reads, 5);
    q0!.add(Counter.bytesRead, 5 * 4096);
    q1!.add(Counter.writes, 2);
    q1!.add(Counter.bytesWritten, 8192);
    q1!.add(Counter.writeZeroes);
    q1!.add(Counter.getIds);
    q0!.add(Counter.ioErrors, 7);
    q1!.add(Counter.throttled);
    q0!.flush();
    q1!.flush();
    q1!.setGauge(Counter.poisoned, 1);
    q0!.setGauge(Counter.throttlePending, 1);

    const m = parseExposition(await registry.metrics());
    expect(m.types.get('vublk_requests_total')).toBe('counter');
    expect(sampleValue(m, 'vublk_requests_total', { disk: 'a', queue: '0', op: 'read' })).toBe(5);
    expect(sampleValue(m, 'vublk_requests_total', { disk: 'a', queue: '1', op: 'write' })).toBe(2);
    expect(sampleValue(m, 'vublk_requests_total', { disk: 'a', queue: '1', op: 'write_zeroes' })).toBe(1);
    expect(sampleValue(m, 'vublk_requests_total', { disk: 'a', queue: '1', op: 'get_id' })).toBe(1);
    expect(select(m, 'vublk_requests_total').map((s) => s.labels['op'])).toEqual(
      expect.arrayContaining(['read', 'write', 'flush', 'discard', 'write_zeroes', 'get_id']),
    );
    expect(select(m, 'vublk_requests_total')).toHaveLength(12);
    expect(sampleValue(m, 'vublk_bytes_total', { disk: 'a', queue: '0', direction: 'read' })).toBe(20480);
    expect(sampleValue(m, 'vublk_bytes_total', { disk: 'a', queue: '1', direction: 'write' })).toBe(8192);
    expect(sampleValue(m, 'vublk_io_errors_total', { disk: 'a', queue: '0' })).toBe(7);
    expect(sampleValue(m, 'vublk_throttled_total', { disk: 'a', queue: '1' })).toBe(1);
    expect(m.types.get('vublk_throttle_pending')).toBe('gauge');
    expect(sampleValue(m, 'vublk_throttle_pending', { disk: 'a', queue: '0' })).toBe(1);
    expect(sampleValue(m, 'vublk_queue_poisoned', { disk: 'a', queue: '1' })).toBe(1);
    expect(sampleValue(m, 'vublk_queue_poisoned', { disk: 'a', queue: '0' })).toBe(0);
    expect(sampleValue(m, 'vublk_front_end_connected', { disk: 'a' })).toBe(1);
    expect(sampleValue(m, 'vublk_front_end_connections_total', { disk: 'a' })).toBe(3);
    expect(sampleValue(m, 'vublk_disk_capacity_bytes', { disk: 'a' })).toBe(1 << 20);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'a', kind: 'iops' })).toBe(100);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'a', kind: 'iops_burst' })).toBe(200);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'a', kind: 'bps' })).toBe(1000);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'a', kind: 'bps_burst' })).toBe(1000);
    for (const name of [
      'vublk_unsupported_requests_total',
      'vublk_invalid_avail_idx_total',
      'vublk_drains_total',
      'vublk_notifications_total',
    ]) {
      expect(select(m, name)).toHaveLength(2);
    }
  });

  it('exports latency as a cumulative histogram summed over queues, with +Inf equal to _count', async () => {
    const a = disk('a', 2);
    const [q0, q1] = a.writers;
    q0!.observeLatency(LatencyOp.read, 5_000); // 5 µs: first bucket (<= 10 µs)
    q0!.observeLatency(LatencyOp.read, 300_000); // 300 µs: <= 0.5 ms
    q1!.observeLatency(LatencyOp.read, 2_000_000); // 2 ms: <= 2.5 ms
    q1!.observeLatency(LatencyOp.read, 10e9); // 10 s: +Inf only
    q1!.observeLatency(LatencyOp.flush, 1_000_000); // exactly 1 ms: le="0.001"
    q0!.flush();
    q1!.flush();
    const m = await scrape([a.source]);
    expect(m.types.get('vublk_request_duration_seconds')).toBe('histogram');
    const buckets = select(m, 'vublk_request_duration_seconds_bucket', { disk: 'a', op: 'read' });
    expect(buckets.map((b) => b.labels['le'])).toEqual([...LATENCY_BUCKETS_SECONDS.map(String), '+Inf']);
    const le = (bound: string): number => buckets.find((b) => b.labels['le'] === bound)!.value;
    expect(le('0.00001')).toBe(1);
    expect(le('0.00025')).toBe(1);
    expect(le('0.0005')).toBe(2);
    expect(le('0.0025')).toBe(3);
    expect(le('2.5')).toBe(3);
    expect(le('+Inf')).toBe(4);
    for (let i = 1; i < buckets.length; i++) expect(buckets[i]!.value).toBeGreaterThanOrEqual(buckets[i - 1]!.value);
    expect(sampleValue(m, 'vublk_request_duration_seconds_count', { disk: 'a', op: 'read' })).toBe(4);
    expect(sampleValue(m, 'vublk_request_duration_seconds_sum', { disk: 'a', op: 'read' })).toBeCloseTo(10.002305, 6);
    const flush = select(m, 'vublk_request_duration_seconds_bucket', { disk: 'a', op: 'flush' });
    expect(flush.find((b) => b.labels['le'] === '0.0005')!.value).toBe(0);
    expect(flush.find((b) => b.labels['le'] === '0.001')!.value).toBe(1);
    expect(sampleValue(m, 'vublk_request_duration_seconds_count', { disk: 'a', op: 'other' })).toBe(0);
    // No queue label on the histogram: one series set per disk and op.
    expect(select(m, 'vublk_request_duration_seconds_count')).toHaveLength(4);
    expect(select(m, 'vublk_request_duration_seconds_count').every((s) => !('queue' in s.labels))).toBe(true);
  });

  it('labels several disks apart and follows live changes of the sources', async () => {
    const a = disk('a', 1);
    const b = disk('b', 3);
    let limits = { iops: 0, iopsBurst: 0, bps: 0, bpsBurst: 0 };
    const sources: DiskMetricsSource[] = [
      a.source,
      {
        ...b.source,
        get throttleLimits() {
          return limits;
        },
      },
    ];
    const registry = createMetricsRegistry(() => sources, { defaultMetrics: false });
    let m = parseExposition(await registry.metrics());
    expect(select(m, 'vublk_io_errors_total', { disk: 'a' })).toHaveLength(1);
    expect(select(m, 'vublk_io_errors_total', { disk: 'b' })).toHaveLength(3);
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'b', kind: 'bps' })).toBe(0);
    limits = { iops: 10, iopsBurst: 10, bps: 5, bpsBurst: 5 };
    m = parseExposition(await registry.metrics());
    expect(sampleValue(m, 'vublk_throttle_limit', { disk: 'b', kind: 'bps' })).toBe(5);
  });

  it('includes the process metrics with the vublk_ prefix by default', async () => {
    const registry = createMetricsRegistry(() => [], {});
    const m = parseExposition(await registry.metrics());
    expect(m.types.get('vublk_process_start_time_seconds')).toBe('gauge');
    expect(m.types.has('vublk_nodejs_eventloop_lag_seconds')).toBe(true);
    expect([...m.types.keys()].every((name) => name.startsWith('vublk_'))).toBe(true);
  });
});

describe('SnapshotHistogram', () => {
  it('renders through the registry and as JSON, and refuses direct observations', async () => {
    const registry = new Registry();
    const histogram = new SnapshotHistogram<'disk'>({
      name: 'test_seconds',
      help: 'test',
      labelNames: ['disk'],
      buckets: [0.1, 1],
      registers: [registry],
      snapshot: () => [{ labels: { disk: 'x' }, buckets: [1, 2, 3], sum: 7.5 }],
    });
    const m = parseExposition(await registry.metrics());
    expect(m.types.get('test_seconds')).toBe('histogram');
    expect(select(m, 'test_seconds_bucket').map((s) => [s.labels['le'], s.value])).toEqual([
      ['0.1', 1],
      ['1', 3],
      ['+Inf', 6],
    ]);
    expect(sampleValue(m, 'test_seconds_sum')).toBe(7.5);
    expect(sampleValue(m, 'test_seconds_count')).toBe(6);
    const json = await registry.getMetricsAsJSON();
    expect(json[0]?.name).toBe('test_seconds');
    expect(() => histogram.observe(1)).toThrow(/shared counters/);
  });

  it('rejects a snapshot with the wrong number of buckets', async () => {
    const registry = new Registry();
    new SnapshotHistogram<'disk'>({
      name: 'bad_seconds',
      help: 'test',
      labelNames: ['disk'],
      buckets: [0.1, 1],
      registers: [registry],
      snapshot: () => [{ labels: { disk: 'x' }, buckets: [1, 2], sum: 0 }],
    });
    await expect(registry.metrics()).rejects.toThrow(/expected 3/);
  });
});
