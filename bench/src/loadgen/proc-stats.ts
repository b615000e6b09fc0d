/**
 * What the side-by-side benchmark reads about a process or the host from /proc: CPU time (utime+stime of every
 * thread, dead ones included), memory (VmRSS, VmHWM) and thread count. The parsers are pure (text in, numbers out)
 * so they are unit-tested; the readers around them only add readFileSync.
 */
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

/** utime + stime in clock ticks from the text of /proc/PID/stat (the command name may hold spaces and parens). */
export function parseStatCpuTicks(stat: string): number {
  const close = stat.lastIndexOf(')');
  if (close < 0) return NaN;
  // After "pid (comm) " field 3 (state) comes first: utime is field 14, stime field 15.
  const fields = stat
    .slice(close + 2)
    .trim()
    .split(/\s+/);
  return Number(fields[11]) + Number(fields[12]);
}

/** A `Key:   1234 kB` (or plain number, like Threads) line of /proc/PID/status; NaN when absent. */
export function parseStatusNumber(status: string, key: string): number {
  const match = new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status);
  return match ? Number(match[1]) : NaN;
}

/**
 * Busy, idle (idle + iowait) and stolen jiffies of all CPUs together, from the first line of /proc/stat. Steal is
 * the time the hypervisor ran something else on this VM's vCPUs: neither the daemons' work nor idle.
 */
export function parseHostCpuTicks(procStat: string): { busy: number; idle: number; steal: number } {
  const line = procStat.split('\n')[0] ?? '';
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  const steal = v[7] ?? 0;
  const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - idle - steal, idle, steal };
}

/** Microseconds of CPU per request from a CPU-seconds delta and a request count (NaN when nothing completed). */
export function cpuMicrosPerRequest(cpuSeconds: number, requests: number): number {
  return requests > 0 && Number.isFinite(cpuSeconds) ? (cpuSeconds / requests) * 1e6 : NaN;
}

let clockTicks = 0;
export function ticksPerSecond(): number {
  if (clockTicks === 0) {
    const out = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
    clockTicks = Number(out.stdout?.trim()) || 100;
  }
  return clockTicks;
}

/** utime + stime of a process (all its threads, dead ones included), in seconds; NaN when it is gone. */
export function processCpuSeconds(pid: number): number {
  try {
    return parseStatCpuTicks(readFileSync(`/proc/${pid}/stat`, 'utf8')) / ticksPerSecond();
  } catch {
    return NaN;
  }
}

/** VmRSS (or another Vm* line) of a process, in MiB; NaN when it is gone. */
export function processMemoryMiB(pid: number, key = 'VmRSS'): number {
  try {
    return parseStatusNumber(readFileSync(`/proc/${pid}/status`, 'utf8'), key) / 1024;
  } catch {
    return NaN;
  }
}

/**
 * The threads of a process by kind; NaN when it is gone. `ioUringWorkers` are the kernel's io-wq workers
 * (`iou-wrk-*`, `iou-sqp-*`): they show up as tasks of the process that submitted to io_uring, come and go
 * with blocking I/O (a buffered write the kernel cannot do inline) and are bounded by the kernel per
 * submitting thread, not by the number of disks. `own` is every other thread: the ones the process started.
 */
export function processThreadKinds(pid: number): { own: number; ioUringWorkers: number } {
  let own = 0;
  let ioUringWorkers = 0;
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return { own: NaN, ioUringWorkers: NaN };
  }
  for (const tid of tids) {
    let name: string;
    try {
      name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8');
    } catch {
      continue; // the thread ended between the listing and the read
    }
    if (/^iou-(wrk|sqp)-/.test(name)) ioUringWorkers++;
    else own++;
  }
  return { own, ioUringWorkers };
}

/** Number of threads the process started itself (io_uring's kernel workers left out); NaN when it is gone. */
export function processThreads(pid: number): number {
  return processThreadKinds(pid).own;
}

export function hostCpuTicks(): { busy: number; idle: number; steal: number } {
  return parseHostCpuTicks(readFileSync('/proc/stat', 'utf8'));
}
