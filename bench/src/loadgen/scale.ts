/**
 * Many disks on one daemon: idle RSS and thread count for 1, 8 and 64 configured disks, and 32 disks × 2 queues
 * all connected and serving at once (one `vublk-bench run` per disk, all started with the same --start-at, so
 * every session is up before any load starts). vublk and qemu-storage-daemon alike. Sessions and their load
 * windows come back from each generator's JSON (`timing`), so "all at once" is checked, not assumed.
 */
import { closeSync, openSync, ftruncateSync } from 'node:fs';
import path from 'node:path';
import { BENCH_CLI, DAEMON_CLI } from '../paths.js';
import { DaemonProcess, runChild, shellQuote, sleep } from './daemon-process.js';
import { median } from './scenarios.js';
import { cpuMicrosPerRequest, processCpuSeconds, processMemoryMiB, processThreads } from './proc-stats.js';
import type { BenchDocument } from './report.js';

export type ScaleBackend = 'vublk' | 'qsd';

export interface IdleSample {
  backend: ScaleBackend;
  disks: number;
  rssMiB: number;
  threads: number;
}

export interface ServingSample {
  backend: ScaleBackend;
  disks: number;
  queues: number;
  sessionsOk: number;
  sessionsTotal: number;
  /** Handshake duration of the slowest session (VhostUserFrontend.connect), ms. */
  maxConnectMs: number;
  medianConnectMs: number;
  /** Seconds during which every session was generating load at the same time. */
  commonWindowSec: number;
  rssIdleMiB: number;
  rssPeakMiB: number;
  threadsIdle: number;
  threadsPeak: number;
  totalIops: number;
  cpuUsPerRequest: number;
  failures: string[];
}

export interface ScaleResult {
  idle: IdleSample[];
  serving: ServingSample[];
  commands: string[];
}

export interface ScaleOptions {
  dir: string;
  qsdBinary: string | null;
  idleDiskCounts: number[];
  /** Disk counts of the serving part, e.g. [1, 32]: threads and RSS per count show what a disk costs. */
  servingDiskCounts: number[];
  runtimeSec: number;
  log: (text: string) => void;
}

export interface LoadWindow {
  loadStartMs: number;
  loadEndMs: number;
}

/** Seconds all windows overlap (0 when some pair does not): max of the starts to min of the ends. */
export function commonWindowSec(windows: readonly LoadWindow[]): number {
  if (windows.length === 0) return 0;
  const start = Math.max(...windows.map((w) => w.loadStartMs));
  const end = Math.min(...windows.map((w) => w.loadEndMs));
  return Math.max(0, (end - start) / 1000);
}

const DISK_BYTES = 64 * 1024 * 1024;

function image(dir: string, i: number): string {
  return path.join(dir, `scale-${i}.img`);
}

function socket(dir: string, backend: ScaleBackend, disks: number, i: number): string {
  return path.join(dir, `scale-${backend}-${disks}-${i}.sock`);
}

export function scaleCommand(backend: ScaleBackend, qsdBinary: string, dir: string, disks: number): string[] {
  if (backend === 'vublk') {
    const argv = [process.execPath, DAEMON_CLI, 'serve'];
    for (let i = 0; i < disks; i++)
      argv.push('--disk', `image=${image(dir, i)},socket=${socket(dir, backend, disks, i)},num-queues=2,locking=off`);
    return [...argv, '--metrics-listen', 'off', '--admin-socket', 'off', '--log-level', 'warn'];
  }
  const argv = [qsdBinary];
  for (let i = 0; i < disks; i++) {
    argv.push('--blockdev', `driver=file,node-name=f${i},filename=${image(dir, i)},aio=io_uring,locking=off`);
    argv.push(
      '--export',
      `type=vhost-user-blk,id=e${i},node-name=f${i},addr.type=unix,addr.path=${socket(dir, backend, disks, i)},writable=on,num-queues=2`,
    );
  }
  return argv;
}

function display(argv: string[], dir: string, disks: number): string {
  // One disk's arguments stand for all of them.
  const perDisk = argv[0] === process.execPath ? 2 : 4;
  const head = argv.slice(0, argv[0] === process.execPath ? 3 : 1);
  const tail = argv[0] === process.execPath ? argv.slice(3 + disks * perDisk) : [];
  const one = argv.slice(head.length, head.length + perDisk);
  return `${[...head, ...one].map(shellQuote).join(' ')} … (×${disks}, i = 0…${disks - 1}) ${tail.map(shellQuote).join(' ')}`
    .replaceAll(dir, '$DIR')
    .replace(process.execPath, 'node')
    .replace(DAEMON_CLI, 'dist/src/cli.js')
    .replace(/-0\b/g, '-$i')
    .replace(/f0\b/g, 'f$i')
    .replace(/e0\b/g, 'e$i');
}

async function settle(pid: number): Promise<{ rssMiB: number; threads: number }> {
  await sleep(1500);
  return { rssMiB: processMemoryMiB(pid), threads: processThreads(pid) };
}

export async function runScale(options: ScaleOptions): Promise<ScaleResult> {
  const { dir, log } = options;
  const maxDisks = Math.max(...options.servingDiskCounts, ...options.idleDiskCounts);
  for (let i = 0; i < maxDisks; i++) {
    const fd = openSync(image(dir, i), 'w');
    ftruncateSync(fd, DISK_BYTES);
    closeSync(fd);
  }
  const backends: ScaleBackend[] = options.qsdBinary === null ? ['vublk'] : ['vublk', 'qsd'];
  const qsd = options.qsdBinary ?? '';
  const result: ScaleResult = { idle: [], serving: [], commands: [] };

  for (const backend of backends) {
    for (const disks of options.idleDiskCounts) {
      const argv = scaleCommand(backend, qsd, dir, disks);
      const daemon = new DaemonProcess(
        `${backend} ${disks} disks`,
        argv,
        Array.from({ length: disks }, (_, i) => socket(dir, backend, disks, i)),
      );
      try {
        await daemon.ready(60_000);
        const s = await settle(daemon.pid);
        result.idle.push({ backend, disks, ...s });
        log(`scale: ${backend} ${disks} idle disks: RSS ${s.rssMiB.toFixed(1)} MiB, ${s.threads} threads`);
      } catch (error) {
        log(`scale: ${backend} ${disks} idle disks FAILED: ${(error as Error).message.slice(0, 300)}`);
      } finally {
        await daemon.stop();
      }
    }
  }

  for (const backend of backends)
    for (const disks of options.servingDiskCounts) {
      const argv = scaleCommand(backend, qsd, dir, disks);
      if (disks === Math.max(...options.servingDiskCounts)) result.commands.push(display(argv, dir, disks));
      const sockets = Array.from({ length: disks }, (_, i) => socket(dir, backend, disks, i));
      const daemon = new DaemonProcess(`${backend} ${disks} disks`, argv, sockets);
      try {
        await daemon.ready(60_000);
        const idle = await settle(daemon.pid);
        const cpuBefore = processCpuSeconds(daemon.pid);
        // Every generator connects as soon as it is up; the load starts for all at the same wall-clock time.
        const startAt = Date.now() + 3000 + 150 * disks;
        const runs = sockets.map((sock, i) =>
          runChild(
            [
              process.execPath,
              BENCH_CLI,
              'run',
              '--socket',
              sock,
              '--rw',
              'randread',
              '--bs',
              '4k',
              '--iodepth',
              '8',
              '--queues',
              '2',
              '--runtime',
              String(options.runtimeSec),
              '--seed',
              String(i + 1),
              '--timeout',
              '20000',
              '--start-at',
              String(startAt),
              '--json',
            ],
            60_000 + 150 * disks,
          ),
        );
        let rssPeak = idle.rssMiB;
        let threadsPeak = idle.threads;
        let pending = runs.length;
        for (const r of runs) void r.then(() => pending--);
        const deadline = Date.now() + 90_000 + 150 * disks;
        while (pending > 0 && Date.now() < deadline) {
          if (Date.now() >= startAt) {
            rssPeak = Math.max(rssPeak, processMemoryMiB(daemon.pid));
            threadsPeak = Math.max(threadsPeak, processThreads(daemon.pid));
          }
          await sleep(200);
        }
        const done = await Promise.all(runs);
        const cpu = processCpuSeconds(daemon.pid) - cpuBefore;
        const failures: string[] = [];
        const docs: BenchDocument[] = [];
        done.forEach((r, i) => {
          try {
            const doc = JSON.parse(r.stdout) as BenchDocument;
            if (r.code === 0 && doc.ok && doc.result !== null) docs.push(doc);
            else failures.push(`disk ${i}: exit ${r.code} ${r.stderr.trim().slice(0, 200)}`);
          } catch {
            failures.push(`disk ${i}: exit ${r.code} ${r.stderr.trim().slice(0, 200)}`);
          }
        });
        const completions = docs.reduce((sum, d) => sum + (d.result?.allCompletions ?? 0), 0);
        const sample: ServingSample = {
          backend,
          disks,
          queues: 2,
          sessionsOk: docs.length,
          sessionsTotal: disks,
          maxConnectMs: docs.length > 0 ? Math.max(...docs.map((d) => d.timing.connectMs)) : NaN,
          medianConnectMs: median(docs.map((d) => d.timing.connectMs)),
          commonWindowSec: docs.length === disks ? commonWindowSec(docs.map((d) => d.timing)) : 0,
          rssIdleMiB: idle.rssMiB,
          rssPeakMiB: rssPeak,
          threadsIdle: idle.threads,
          threadsPeak,
          totalIops: docs.reduce((sum, d) => sum + (d.result?.total.iops ?? 0), 0),
          cpuUsPerRequest: cpuMicrosPerRequest(cpu, completions),
          failures,
        };
        result.serving.push(sample);
        log(
          `scale: ${backend} ${disks} disks × 2 queues serving: ${sample.sessionsOk}/${disks} sessions ok, all at once for ${sample.commonWindowSec.toFixed(1)} s, ` +
            `RSS ${idle.rssMiB.toFixed(1)} → peak ${rssPeak.toFixed(1)} MiB, threads ${idle.threads} → ${threadsPeak}, slowest handshake ${sample.maxConnectMs} ms`,
        );
      } catch (error) {
        log(`scale: ${backend} serving FAILED: ${(error as Error).message.slice(0, 300)}`);
      } finally {
        await daemon.stop();
      }
    }
  return result;
}
