/**
 * Scrapes a test daemon's /metrics (started with `--metrics-listen 127.0.0.1:0`) and reads one queue's
 * request counters out of it, so integration tests can assert exact deltas per rule.
 */
import http from 'node:http';
import type { DaemonProcess } from './daemon-process.js';
import { parseExposition, select, type Exposition } from './prom-text.js';
import { emptyCounters, type CounterDelta } from './blk-model.js';

/** Arguments that make a test daemon serve metrics on an ephemeral loopback port. */
export const METRICS_ARGS = ['--metrics-listen', '127.0.0.1:0'] as const;

/** http://HOST:PORT of the daemon's metrics listener, from its "metrics listening" log line. */
export async function metricsUrl(daemon: DaemonProcess, timeoutMs = 15_000): Promise<string> {
  const line = await daemon.waitForLog((l) => l.msg === 'metrics listening', timeoutMs);
  const address = String(line['address']);
  if (address.startsWith('unix:')) throw new Error(`metrics listener is ${address}; tests expect a TCP address`);
  return `http://${address}`;
}

export async function scrape(base: string, timeoutMs = 10_000): Promise<Exposition> {
  const url = new URL('/metrics', base);
  const body = await new Promise<string>((resolve, reject) => {
    const req = http.get(url, { timeout: timeoutMs }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
      res.on('end', () => (res.statusCode === 200 ? resolve(text) : reject(new Error(`GET ${url.href}: HTTP ${res.statusCode}`))));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url.href}: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
  return parseExposition(body);
}

/** The per-queue series the request engine drives. */
export interface QueueCounts extends CounterDelta {
  throttled: number;
  throttlePending: number;
  invalidAvailIdx: number;
  poisoned: number;
}

const OPS: ReadonlyArray<readonly [keyof QueueCounts, string]> = [
  ['reads', 'read'],
  ['writes', 'write'],
  ['flushes', 'flush'],
  ['discards', 'discard'],
  ['writeZeroes', 'write_zeroes'],
  ['getIds', 'get_id'],
];

const PER_QUEUE: ReadonlyArray<readonly [keyof QueueCounts, string]> = [
  ['ioErrors', 'vublk_io_errors_total'],
  ['unsupported', 'vublk_unsupported_requests_total'],
  ['throttled', 'vublk_throttled_total'],
  ['throttlePending', 'vublk_throttle_pending'],
  ['invalidAvailIdx', 'vublk_invalid_avail_idx_total'],
  ['poisoned', 'vublk_queue_poisoned'],
];

function one(m: Exposition, name: string, labels: Record<string, string>): number {
  const found = select(m, name, labels);
  if (found.length !== 1) throw new Error(`expected one ${name}${JSON.stringify(labels)} in /metrics, found ${found.length}`);
  return (found[0] as { value: number }).value;
}

export function queueCounts(m: Exposition, queue: number, disk = 'disk0'): QueueCounts {
  const labels = { disk, queue: String(queue) };
  const counts = {} as QueueCounts;
  for (const [field, op] of OPS) counts[field] = one(m, 'vublk_requests_total', { ...labels, op });
  counts.bytesRead = one(m, 'vublk_bytes_total', { ...labels, direction: 'read' });
  counts.bytesWritten = one(m, 'vublk_bytes_total', { ...labels, direction: 'write' });
  for (const [field, name] of PER_QUEUE) counts[field] = one(m, name, labels);
  return counts;
}

/** after - before, field by field (gauges included, as plain differences). */
export function countsDelta(before: QueueCounts, after: QueueCounts): QueueCounts {
  const delta = {} as QueueCounts;
  for (const key of Object.keys(after) as (keyof QueueCounts)[]) delta[key] = after[key] - before[key];
  return delta;
}

/** Reads one queue's counters; `delta()` after an action gives what the action changed. */
export class QueueMetrics {
  constructor(
    readonly base: string,
    readonly disk = 'disk0',
  ) {}

  async counts(queue: number): Promise<QueueCounts> {
    return queueCounts(await scrape(this.base), queue, this.disk);
  }

  async all(queues: number): Promise<QueueCounts[]> {
    const m = await scrape(this.base);
    return Array.from({ length: queues }, (_, q) => queueCounts(m, q, this.disk));
  }

  /**
   * A baseline to diff against: the worker publishes a drain's counters just after it raises the interrupt,
   * so right after a completion the last drain may not be counted yet. Reads until two reads 15 ms apart
   * agree (bounded).
   */
  async settledCounts(queue: number, timeoutMs = 2_000): Promise<QueueCounts> {
    const deadline = Date.now() + timeoutMs;
    let previous = await this.counts(queue);
    for (;;) {
      await new Promise((r) => setTimeout(r, 15));
      const current = await this.counts(queue);
      if (JSON.stringify(current) === JSON.stringify(previous) || Date.now() > deadline) return current;
      previous = current;
    }
  }

  /** Counters are published at the end of each drain; poll (bounded) until `ready` holds, return the last read. */
  async waitFor(queue: number, ready: (c: QueueCounts) => boolean, timeoutMs = 5_000): Promise<QueueCounts> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const counts = await this.counts(queue);
      if (ready(counts) || Date.now() > deadline) return counts;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** A delta with every field zero, for `toEqual({...ZERO_DELTA, ioErrors: 1})`. */
export const ZERO_COUNTS: Readonly<QueueCounts> = Object.freeze({
  ...emptyCounters(),
  throttled: 0,
  throttlePending: 0,
  invalidAvailIdx: 0,
  poisoned: 0,
});
