/**
 * The `vublk_*` metric families. Every value is read at scrape time, in prom-client `collect()` callbacks,
 * from state that already exists: the shared per-queue counters the workers publish (CounterReader), the
 * throttle's shared limits, the listener's session state. Nothing is counted per request here.
 *
 * docs/metrics.md is the catalogue; keep the two in step.
 */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { LATENCY_BUCKETS_SECONDS, LatencyOp, type CounterName, type CounterReader, type LatencyOpName } from '../dataplane/counters.js';
import type { ResolvedDiskLimits } from '../throttle/disk-throttle.js';
import { SnapshotHistogram, type HistogramSnapshot } from './snapshot-histogram.js';
import { quarantinedBytes } from '../sys/memory-map.js';

/** What the metrics need to know about one disk; read on every scrape. */
export interface DiskMetricsSource {
  readonly name: string;
  readonly capacityBytes: number;
  readonly counters: CounterReader;
  readonly throttleLimits: ResolvedDiskLimits;
  /** A front-end (QEMU) is connected to the disk's socket. */
  readonly connected: boolean;
  /** Front-end connections accepted since start. */
  readonly connections: number;
  /** RBD: the daemon holds the image's exclusive lock; null for images without one. Read at each scrape. */
  lockOwner(): boolean | null;
}

export interface MetricsRegistryOptions {
  /** Node process metrics (`vublk_process_*`, `vublk_nodejs_*`); default true. */
  defaultMetrics?: boolean;
}

/** `op` label of vublk_requests_total → the counter it reads. */
export const REQUEST_OPS: ReadonlyArray<readonly [op: string, counter: CounterName]> = [
  ['read', 'reads'],
  ['write', 'writes'],
  ['flush', 'flushes'],
  ['discard', 'discards'],
  ['write_zeroes', 'writeZeroes'],
  ['get_id', 'getIds'],
];

export const THROTTLE_KINDS: ReadonlyArray<readonly [kind: string, field: keyof ResolvedDiskLimits]> = [
  ['iops', 'iops'],
  ['iops_burst', 'iopsBurst'],
  ['bps', 'bps'],
  ['bps_burst', 'bpsBurst'],
];

const LATENCY_OPS = Object.keys(LatencyOp) as LatencyOpName[];

type QueueLabels = 'disk' | 'queue';

export function createMetricsRegistry(disks: () => readonly DiskMetricsSource[], options: MetricsRegistryOptions = {}): Registry {
  const registry = new Registry();
  const registers = [registry];

  /** Each queue's value of one shared counter, as a Counter (`total`) or Gauge family. */
  const perQueue = (type: 'counter' | 'gauge', name: string, help: string, counter: CounterName): void => {
    const fill = (set: (labels: Record<QueueLabels, string>, value: number) => void): void => {
      for (const disk of disks()) {
        for (let q = 0; q < disk.counters.queues; q++) set({ disk: disk.name, queue: String(q) }, disk.counters.read(q, counter));
      }
    };
    if (type === 'counter') {
      new Counter<QueueLabels>({
        name,
        help,
        labelNames: ['disk', 'queue'],
        registers,
        collect(this: Counter<QueueLabels>) {
          this.reset();
          fill((labels, value) => this.inc(labels, value));
        },
      });
    } else {
      new Gauge<QueueLabels>({
        name,
        help,
        labelNames: ['disk', 'queue'],
        registers,
        collect(this: Gauge<QueueLabels>) {
          this.reset();
          fill((labels, value) => this.set(labels, value));
        },
      });
    }
  };

  new Counter<'disk' | 'queue' | 'op'>({
    name: 'vublk_requests_total',
    help: 'Requests completed successfully, by operation.',
    labelNames: ['disk', 'queue', 'op'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) {
        for (let q = 0; q < disk.counters.queues; q++) {
          for (const [op, counter] of REQUEST_OPS) this.inc({ disk: disk.name, queue: String(q), op }, disk.counters.read(q, counter));
        }
      }
    },
  });

  new Counter<'disk' | 'queue' | 'direction'>({
    name: 'vublk_bytes_total',
    help: 'Bytes transferred by successful reads and writes (guest data only).',
    labelNames: ['disk', 'queue', 'direction'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) {
        for (let q = 0; q < disk.counters.queues; q++) {
          this.inc({ disk: disk.name, queue: String(q), direction: 'read' }, disk.counters.read(q, 'bytesRead'));
          this.inc({ disk: disk.name, queue: String(q), direction: 'write' }, disk.counters.read(q, 'bytesWritten'));
        }
      }
    },
  });

  perQueue(
    'counter',
    'vublk_io_errors_total',
    'Requests completed with VIRTIO_BLK_S_IOERR, chains dropped as malformed, and ring faults.',
    'ioErrors',
  );
  perQueue(
    'counter',
    'vublk_unsupported_requests_total',
    'Requests completed with VIRTIO_BLK_S_UNSUPP (unknown request type).',
    'unsupported',
  );
  perQueue(
    'counter',
    'vublk_throttled_total',
    'Times the queue stalled on the disk throttle (once per stall, not per retry).',
    'throttled',
  );
  perQueue('gauge', 'vublk_throttle_pending', '1 while the queue is waiting for throttle tokens, else 0.', 'throttlePending');
  perQueue(
    'counter',
    'vublk_invalid_avail_idx_total',
    'Times the driver moved avail.idx more than the queue size ahead (the queue is poisoned).',
    'invalidAvailIdx',
  );
  perQueue('gauge', 'vublk_queue_poisoned', '1 while the queue is poisoned (device needs reset), else 0.', 'poisoned');
  perQueue('counter', 'vublk_drains_total', 'Wake-ups of the queue worker that drained the ring.', 'drains');
  perQueue('counter', 'vublk_notifications_total', 'Used-buffer notifications (interrupts) sent to the front-end.', 'notifications');
  perQueue(
    'counter',
    'vublk_bounce_requests_total',
    'Requests whose guest buffers missed the O_DIRECT alignment and went through a bounce buffer.',
    'bounced',
  );
  perQueue(
    'counter',
    'vublk_merged_requests_total',
    'READ / WRITE requests that joined the back-end operation of the request before them (network images, merge=).',
    'merged',
  );
  perQueue(
    'counter',
    'vublk_watchdog_drains_total',
    'Drains run because requests were outstanding and no wake-up came within the worker watchdog period (a lost notification; should stay 0).',
    'watchdogDrains',
  );
  // Network back-end connections (NBD): a worker's connections serve every queue of the disk it runs, so an
  // event is counted on whichever of those queues polled them when it happened; sum over queues per disk.
  const backendEvents: Array<[string, string, CounterName]> = [
    [
      'vublk_backend_connects_total',
      'Network back-end connections made (handshakes completed), the first ones included.',
      'backendConnects',
    ],
    [
      'vublk_backend_connect_failures_total',
      'Network back-end connection attempts that failed (refused, timed out, export refused).',
      'backendConnectFailures',
    ],
    [
      'vublk_backend_connections_lost_total',
      'Network back-end connections that broke (EOF, socket error, protocol error, stall).',
      'backendConnectionsLost',
    ],
    ['vublk_backend_requests_resent_total', 'Requests sent again on a network back-end connection after it came back.', 'backendResent'],
    [
      'vublk_backend_requests_handed_over_total',
      'Requests moved from a network back-end connection that was down to one that was up (NBD multi-conn).',
      'backendHandedOver',
    ],
    [
      'vublk_backend_requests_timed_out_total',
      'Requests failed because no network back-end connection came back within reconnect-timeout (also in vublk_io_errors_total).',
      'backendTimedOut',
    ],
    [
      'vublk_backend_stalls_total',
      'Network back-end connections reset because a request got no reply within request-timeout.',
      'backendStalls',
    ],
    [
      'vublk_backend_protocol_errors_total',
      'Network back-end connections reset because the server broke the protocol.',
      'backendProtocolErrors',
    ],
    [
      'vublk_backend_short_reads_total',
      'Reads the network back-end answered with fewer bytes than asked (RBD: the image ends sooner than the disk); the rest was zeroed.',
      'backendShortReads',
    ],
  ];
  for (const [name, help, counter] of backendEvents) perQueue('counter', name, help, counter);
  perQueue(
    'gauge',
    'vublk_backend_connections_down',
    'Network back-end connections not up right now (connecting, or waiting to reconnect); one queue per worker carries them.',
    'backendConnectionsDown',
  );
  perQueue('counter', 'vublk_dirty_log_pages_total', 'Guest pages marked in the live-migration dirty log.', 'dirtyPagesLogged');
  perQueue(
    'counter',
    'vublk_dirty_log_out_of_range_total',
    'Device writes to guest pages beyond the dirty log the front-end supplied (not marked).',
    'dirtyLogOutOfRange',
  );

  new SnapshotHistogram<'disk' | 'op'>({
    name: 'vublk_request_duration_seconds',
    help: 'Service time of a request (the syscalls, excluding throttle waits), all queues of a disk; op="other" is discard, write-zeroes and get-id.',
    labelNames: ['disk', 'op'],
    buckets: LATENCY_BUCKETS_SECONDS,
    registers,
    snapshot: () => latencySnapshots(disks()),
  });

  new Gauge<'disk'>({
    name: 'vublk_disk_capacity_bytes',
    help: 'Capacity the disk presents to the guest, in bytes.',
    labelNames: ['disk'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) this.set({ disk: disk.name }, disk.capacityBytes);
    },
  });

  new Gauge<'disk'>({
    name: 'vublk_front_end_connected',
    help: '1 while a vhost-user front-end (QEMU) is connected to the disk, else 0.',
    labelNames: ['disk'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) this.set({ disk: disk.name }, disk.connected ? 1 : 0);
    },
  });

  new Gauge<'disk'>({
    name: 'vublk_rbd_lock_owner',
    help: "1 while the daemon's client holds the RBD image's exclusive lock, else 0 (RBD disks only).",
    labelNames: ['disk'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) {
        const owner = disk.lockOwner();
        if (owner !== null) this.set({ disk: disk.name }, owner ? 1 : 0);
      }
    },
  });

  new Gauge({
    name: 'vublk_guest_memory_quarantined_bytes',
    help: 'Guest memory mappings kept as placeholders instead of unmapped, because a ring stopped with requests its back-end had not answered (a stalled cluster); address space only, given back at restart (should stay 0).',
    registers,
    collect() {
      this.set(quarantinedBytes());
    },
  });

  new Counter<'disk'>({
    name: 'vublk_front_end_connections_total',
    help: 'Front-end connections accepted since the daemon started.',
    labelNames: ['disk'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) this.inc({ disk: disk.name }, disk.connections);
    },
  });

  new Gauge<'disk' | 'kind'>({
    name: 'vublk_throttle_limit',
    help: 'Throttle limits in effect: iops/iops_burst in requests(/s), bps/bps_burst in bytes(/s); 0 = unlimited.',
    labelNames: ['disk', 'kind'],
    registers,
    collect() {
      this.reset();
      for (const disk of disks()) {
        const limits = disk.throttleLimits;
        for (const [kind, field] of THROTTLE_KINDS) this.set({ disk: disk.name, kind }, limits[field]);
      }
    },
  });

  if (options.defaultMetrics !== false) {
    collectDefaultMetrics({ register: registry, prefix: 'vublk_' });
    // prom-client's `nodejs_active_{handles,requests,resources}_total` are gauges named like counters, which
    // `promtool check metrics` rejects; the same numbers are the sum over `type` of the families without `_total`.
    for (const name of NON_COUNTER_TOTALS) registry.removeSingleMetric(name);
  }
  return registry;
}

export const NON_COUNTER_TOTALS = [
  'vublk_nodejs_active_handles_total',
  'vublk_nodejs_active_requests_total',
  'vublk_nodejs_active_resources_total',
] as const;

/** One histogram series per disk and op, the queues' buckets added together. */
function latencySnapshots(disks: readonly DiskMetricsSource[]): HistogramSnapshot<'disk' | 'op'>[] {
  const series: HistogramSnapshot<'disk' | 'op'>[] = [];
  for (const disk of disks) {
    for (const op of LATENCY_OPS) {
      const buckets = new Array<number>(LATENCY_BUCKETS_SECONDS.length + 1).fill(0);
      let sum = 0;
      for (let q = 0; q < disk.counters.queues; q++) {
        const snapshot = disk.counters.latency(q, op);
        snapshot.buckets.forEach((n, i) => (buckets[i] = (buckets[i] ?? 0) + n));
        sum += snapshot.sumSeconds;
      }
      series.push({ labels: { disk: disk.name, op }, buckets, sum });
    }
  }
  return series;
}
