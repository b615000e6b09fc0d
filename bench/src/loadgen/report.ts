/** Turns bench results into the --json document and the human-readable report. */
import { BlkRequestType, BlkStatus, blkRequestName } from '../../../protocol/virtio-blk.js';
import { LatencyHistogram } from './latency-histogram.js';
import type { PhaseResult, QueueStats, RequestFailure } from './engine.js';
import type { BenchResult, VerifyResult } from './bench.js';

const MiB = 1024 * 1024;

export interface LatencySummary {
  minUs: number;
  meanUs: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  p999Us: number;
  maxUs: number;
}

export interface ThroughputSummary {
  /** null for the total. */
  queue: number | null;
  requests: number;
  reads: number;
  writes: number;
  iops: number;
  mibps: number;
  readMibps: number;
  writeMibps: number;
  latency: LatencySummary;
}

export interface GeneratorSummary {
  cpuUserSec: number;
  cpuSystemSec: number;
  /** CPU of the generator process over the measured window, as a share of one core. */
  cpuPercentOfOneCore: number;
  cpuMicrosPerRequest: number;
  wakeups: number;
  requestsPerWakeup: number;
  kicks: number;
  suppressedKicks: number;
  requestsPerKick: number;
}

export interface PhaseSummary {
  elapsedSec: number;
  queues: ThroughputSummary[];
  total: ThroughputSummary;
  generator: GeneratorSummary;
  /** Every completion of the phase, warm-up and tail included (for per-request costs measured from outside). */
  allCompletions: number;
  failure: (RequestFailure & { description: string }) | null;
}

const round = (value: number, digits = 1): number => (Number.isFinite(value) ? Number(value.toFixed(digits)) : 0);

function latencySummary(h: LatencyHistogram): LatencySummary {
  const us = (nanos: number): number => round(nanos / 1000, 1);
  return {
    minUs: us(h.count ? h.minNanos : 0),
    meanUs: us(h.count ? h.meanNanos : 0),
    p50Us: us(h.count ? h.quantile(0.5) : 0),
    p90Us: us(h.count ? h.quantile(0.9) : 0),
    p99Us: us(h.count ? h.quantile(0.99) : 0),
    p999Us: us(h.count ? h.quantile(0.999) : 0),
    maxUs: us(h.count ? h.maxNanos : 0),
  };
}

function throughput(queue: number | null, stats: readonly QueueStats[], seconds: number): ThroughputSummary {
  const latency = new LatencyHistogram();
  let requests = 0;
  let reads = 0;
  let writes = 0;
  let bytesRead = 0;
  let bytesWritten = 0;
  for (const s of stats) {
    latency.add(s.latency);
    requests += s.requests;
    reads += s.reads;
    writes += s.writes;
    bytesRead += s.bytesRead;
    bytesWritten += s.bytesWritten;
  }
  const per = (n: number): number => (seconds > 0 ? n / seconds : 0);
  return {
    queue,
    requests,
    reads,
    writes,
    iops: Math.round(per(requests)),
    mibps: round(per(bytesRead + bytesWritten) / MiB, 1),
    readMibps: round(per(bytesRead) / MiB, 1),
    writeMibps: round(per(bytesWritten) / MiB, 1),
    latency: latencySummary(latency),
  };
}

export function statusName(status: number): string {
  switch (status) {
    case BlkStatus.OK:
      return 'OK';
    case BlkStatus.IOERR:
      return 'IOERR';
    case BlkStatus.UNSUPP:
      return 'UNSUPP';
    case 0xff:
      return 'not written by the device';
    default:
      return `status ${status}`;
  }
}

export function describeFailure(f: RequestFailure): string {
  const what = f.type === BlkRequestType.FLUSH ? 'flush' : `${blkRequestName(f.type)} of ${f.bytes} bytes at offset ${f.offset}`;
  return `queue ${f.queue}: ${what} completed with ${statusName(f.status)} (${f.status})`;
}

export function summarizePhase(phase: PhaseResult): PhaseSummary {
  const seconds = phase.elapsedMs / 1000;
  const total = throughput(null, phase.queues, seconds);
  const cpuUser = phase.cpuUserMicros / 1e6;
  const cpuSystem = phase.cpuSystemMicros / 1e6;
  return {
    elapsedSec: round(seconds, 3),
    queues: phase.queues.map((s) => throughput(s.queue, [s], seconds)),
    total,
    generator: {
      cpuUserSec: round(cpuUser, 3),
      cpuSystemSec: round(cpuSystem, 3),
      cpuPercentOfOneCore: round(seconds > 0 ? ((cpuUser + cpuSystem) / seconds) * 100 : 0, 1),
      cpuMicrosPerRequest: round(total.requests > 0 ? ((cpuUser + cpuSystem) * 1e6) / total.requests : 0, 2),
      wakeups: phase.wakeups,
      requestsPerWakeup: round(phase.wakeups > 0 ? phase.allCompletions / phase.wakeups : 0, 2),
      kicks: phase.kicks,
      suppressedKicks: phase.suppressedKicks,
      requestsPerKick: round(phase.kicks > 0 ? phase.allCompletions / phase.kicks : 0, 2),
    },
    allCompletions: phase.allCompletions,
    failure: phase.failure === null ? null : { ...phase.failure, description: describeFailure(phase.failure) },
  };
}

export interface BenchDocument {
  target: BenchResult['target'];
  job: {
    rw: string;
    bs: number;
    iodepth: number;
    queues: number;
    runtimeSec: number;
    rampSec: number;
    size: number;
    seed: number;
    rwmixread: number | null;
  };
  result: PhaseSummary | null;
  /** Handshake duration and the load's wall-clock window (ms since the epoch). */
  timing: BenchResult['timing'];
  verify: {
    ok: boolean;
    bytes: number;
    writeBs: number;
    readBs: number;
    write: PhaseSummary | null;
    flush: PhaseSummary | null;
    read: PhaseSummary | null;
    mismatches: number;
    firstMismatch: { offset: number; expected: number; actual: number } | null;
  } | null;
  ok: boolean;
}

export function benchDocument(result: BenchResult): BenchDocument {
  const o = result.options;
  const verify = result.verify;
  const run = result.run === null ? null : summarizePhase(result.run);
  return {
    target: result.target,
    job: {
      rw: o.verify ? (o.verifyOnly ? 'verify-only' : 'verify') : o.rw,
      bs: o.bs,
      iodepth: o.iodepth,
      queues: o.queues,
      runtimeSec: o.runtimeSec,
      rampSec: o.rampSec,
      size: result.size,
      seed: o.seed,
      rwmixread: o.rw === 'randrw' ? o.rwmixread : null,
    },
    result: run,
    timing: result.timing,
    verify:
      verify === null
        ? null
        : {
            ok: verify.ok,
            bytes: verify.bytes,
            writeBs: verify.writeBs,
            readBs: verify.readBs,
            write: verify.write === null ? null : summarizePhase(verify.write),
            flush: verify.flush === null ? null : summarizePhase(verify.flush),
            read: verify.read === null ? null : summarizePhase(verify.read),
            mismatches: verify.mismatches,
            firstMismatch: verify.firstMismatch,
          },
    ok: verify !== null ? verify.ok : run !== null && run.failure === null,
  };
}

function formatBytes(n: number): string {
  if (n >= 1024 ** 3 && n % 1024 ** 2 === 0) return `${round(n / 1024 ** 3, 2)} GiB`;
  if (n >= MiB) return `${round(n / MiB, 2)} MiB`;
  if (n >= 1024) return `${round(n / 1024, 2)} KiB`;
  return `${n} B`;
}

function pad(text: string | number, width: number): string {
  return String(text).padStart(width);
}

function tableLines(phase: PhaseSummary): string[] {
  const head = `${'queue'.padEnd(6)}${pad('IOPS', 10)}${pad('MiB/s', 10)}${pad('mean µs', 10)}${pad('p50 µs', 9)}${pad('p99 µs', 9)}${pad('p99.9 µs', 10)}${pad('max µs', 10)}`;
  const row = (name: string, t: ThroughputSummary): string =>
    `${name.padEnd(6)}${pad(t.iops, 10)}${pad(t.mibps.toFixed(1), 10)}${pad(t.latency.meanUs.toFixed(1), 10)}${pad(t.latency.p50Us.toFixed(1), 9)}` +
    `${pad(t.latency.p99Us.toFixed(1), 9)}${pad(t.latency.p999Us.toFixed(1), 10)}${pad(t.latency.maxUs.toFixed(1), 10)}`;
  const lines = [head];
  for (const q of phase.queues) lines.push(row(String(q.queue), q));
  if (phase.queues.length > 1) lines.push(row('total', phase.total));
  return lines;
}

function generatorLine(phase: PhaseSummary): string {
  const g = phase.generator;
  return (
    `generator: ${(g.cpuUserSec + g.cpuSystemSec).toFixed(2)} s CPU (user ${g.cpuUserSec.toFixed(2)} + sys ${g.cpuSystemSec.toFixed(2)}) = ` +
    `${g.cpuPercentOfOneCore.toFixed(0)} % of one core, ${g.cpuMicrosPerRequest.toFixed(2)} µs per request; ` +
    `${g.wakeups} wake-ups (${g.requestsPerWakeup} requests each), ${g.kicks} kicks (${g.requestsPerKick} requests each, ${g.suppressedKicks} suppressed)`
  );
}

export function formatHuman(doc: BenchDocument): string {
  const t = doc.target;
  const j = doc.job;
  const lines: string[] = [];
  lines.push(
    `vublk-bench: ${j.rw}${j.rwmixread !== null ? ` (${j.rwmixread} % reads)` : ''} bs=${j.bs} iodepth=${j.iodepth} queues=${j.queues}` +
      (j.rw.startsWith('verify') ? '' : ` runtime=${j.runtimeSec}s${j.rampSec > 0 ? ` (+${j.rampSec}s ramp)` : ''}`) +
      ` size=${formatBytes(j.size)} seed=${j.seed}`,
  );
  lines.push(
    `target ${t.socket}: ${formatBytes(t.capacityBytes)}, logical block ${t.logicalBlockSize}, ${t.maxQueues ?? 1} queue(s) offered, ` +
      `ring size ${t.queueSize}, ${t.indirect ? 'indirect' : 'direct'} chains, event_idx ${t.eventIdx ? 'on' : 'off'}${t.readOnly ? ', read-only' : ''}`,
  );
  if (doc.result !== null) {
    lines.push('', ...tableLines(doc.result), '', generatorLine(doc.result));
    if (doc.result.failure !== null) lines.push(`FAILED: ${doc.result.failure.description}`);
  }
  const v = doc.verify;
  if (v !== null) {
    const rate = (p: PhaseSummary | null): string => (p === null ? '-' : `${p.total.mibps.toFixed(1)} MiB/s`);
    lines.push(
      v.write === null
        ? `verify: read ${formatBytes(v.bytes)} with ${v.readBs}-byte requests (${rate(v.read)}) and compared it with the pattern of seed ${j.seed} (no write pass)`
        : `verify: wrote ${formatBytes(v.bytes)} with ${v.writeBs}-byte requests (${rate(v.write)}), flushed, read back with ${v.readBs}-byte requests (${rate(v.read)})`,
    );
    for (const [name, p] of [
      ['write', v.write],
      ['flush', v.flush],
      ['read', v.read],
    ] as const) {
      if (p?.failure) lines.push(`FAILED (${name}): ${p.failure.description}`);
    }
    if (v.firstMismatch !== null) {
      const m = v.firstMismatch;
      lines.push(
        `FAILED: ${v.mismatches} block(s) of ${v.readBs} bytes differ; first mismatch at byte offset ${m.offset} ` +
          `(expected 0x${m.expected.toString(16).padStart(2, '0')}, read 0x${m.actual.toString(16).padStart(2, '0')})`,
      );
    }
    if (v.ok) lines.push('verify: OK, every byte matches');
  }
  return `${lines.join('\n')}\n`;
}

export type { VerifyResult };
