/**
 * fio as the device's limit in the O_DIRECT rows: the same workload on the same file with
 * `--ioengine=io_uring --direct=1`, no vhost-user in between. fioArgs builds the command, parseFioJson reads
 * `--output-format=json` (pure, unit-tested). fio's CPU is its own process (submission and completion, no
 * separate generator), so its CPU per request is the whole cost of doing the I/O, not a daemon's share.
 */
import { spawn } from 'node:child_process';

export interface FioJob {
  rw: 'randread' | 'randwrite' | 'read' | 'write';
  bs: string;
  iodepth: number;
  runtimeSec: number;
  rampSec: number;
  seed: number;
}

export interface FioResult {
  iops: number;
  mibps: number;
  p50Us: number;
  p99Us: number;
  p999Us: number;
  /** Requests completed in the measured window. */
  ios: number;
  /** fio's own CPU (user+system) per request in the measured window, µs. */
  cpuMicrosPerRequest: number;
}

export function fioArgs(job: FioJob, file: string): string[] {
  return [
    '--name=vublk-bench',
    `--filename=${file}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    '--ioengine=io_uring',
    '--direct=1',
    '--numjobs=1',
    '--time_based',
    `--runtime=${job.runtimeSec}`,
    `--ramp_time=${job.rampSec}`,
    `--randseed=${job.seed}`,
    '--norandommap',
    '--output-format=json',
  ];
}

interface FioDirection {
  iops?: number;
  bw_bytes?: number;
  total_ios?: number;
  clat_ns?: { percentile?: Record<string, number> };
}

/** The one job of fio's JSON output: reads and writes summed, percentiles of the busier direction. */
export function parseFioJson(text: string): FioResult {
  // fio may print warnings before the JSON document.
  const start = text.indexOf('{');
  if (start < 0) throw new Error(`fio printed no JSON: ${text.trim().slice(0, 200)}`);
  const doc = JSON.parse(text.slice(start)) as {
    jobs?: Array<{ read?: FioDirection; write?: FioDirection; usr_cpu?: number; sys_cpu?: number; job_runtime?: number; error?: number }>;
  };
  const job = doc.jobs?.[0];
  if (job === undefined) throw new Error('fio JSON has no job');
  if (job.error) throw new Error(`fio job failed with error ${job.error}`);
  const read = job.read ?? {};
  const write = job.write ?? {};
  const ios = (read.total_ios ?? 0) + (write.total_ios ?? 0);
  const main = (write.total_ios ?? 0) > (read.total_ios ?? 0) ? write : read;
  const pct = (p: string): number => (main.clat_ns?.percentile?.[p] ?? NaN) / 1000;
  const cpuSec = (((job.usr_cpu ?? 0) + (job.sys_cpu ?? 0)) / 100) * ((job.job_runtime ?? 0) / 1000);
  return {
    iops: (read.iops ?? 0) + (write.iops ?? 0),
    mibps: ((read.bw_bytes ?? 0) + (write.bw_bytes ?? 0)) / (1024 * 1024),
    p50Us: pct('50.000000'),
    p99Us: pct('99.000000'),
    p999Us: pct('99.900000'),
    ios,
    cpuMicrosPerRequest: ios > 0 ? (cpuSec / ios) * 1e6 : NaN,
  };
}

export function runFio(binary: string, job: FioJob, file: string, timeoutMs: number): Promise<FioResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(binary, fioArgs(job, file), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`fio exited with ${code ?? signal}: ${stderr.trim() || stdout.trim().slice(0, 300)}`));
      try {
        resolve(parseFioJson(stdout));
      } catch (error) {
        reject(error as Error);
      }
    });
  });
}
