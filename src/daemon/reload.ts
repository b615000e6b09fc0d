/**
 * SIGHUP: what a re-read config file changes. Options the table (disk-options.ts) marks `live` — the
 * throttle limits — apply live; `restart` ones are only reported. Pure: the daemon applies the plan.
 *
 * The file is authoritative for throttle limits: after a reload every disk runs with the limits the file
 * gives it (none = unlimited), including a disk whose limits were changed through the admin API since.
 * Other keys are compared with the specs the daemon started with, so a pending change keeps being
 * reported on every reload until the daemon is restarted.
 */
import { resolveBucketLimits } from '../throttle/token-bucket.js';
import type { DiskLimits, ResolvedDiskLimits } from '../throttle/disk-throttle.js';
import type { DiskSpec } from './disk-spec.js';
import { DISK_OPTIONS, configKeyOf } from './disk-options.js';
import type { ServeConfig } from './config-file.js';

export interface RunningDiskState {
  /** The spec the disk was started with, as the config file gave it. */
  spec: DiskSpec;
  /** The limits in effect now. */
  limits: ResolvedDiskLimits;
}

export interface ThrottleChange {
  disk: string;
  from: ResolvedDiskLimits;
  to: ResolvedDiskLimits;
  /** What to pass to DiskThrottle.setLimits. */
  limits: DiskLimits;
}

export interface RestartChange {
  /** Absent for daemon-wide keys. */
  disk?: string;
  change: 'added' | 'removed' | 'changed';
  /** Config keys that differ (kebab-case, as in the file). */
  keys: string[];
}

export interface ReloadPlan {
  throttle: ThrottleChange[];
  restart: RestartChange[];
}

/** Limits as DiskThrottle would resolve them (default bursts, 0 = unlimited). Throws RangeError on bad values. */
export function resolveDiskLimits(limits: DiskLimits): ResolvedDiskLimits {
  const ops = resolveBucketLimits({ rate: limits.iops ?? 0, burst: limits.iopsBurst });
  const bytes = resolveBucketLimits({ rate: limits.bps ?? 0, burst: limits.bpsBurst });
  return { iops: ops.rate, iopsBurst: ops.burst, bps: bytes.rate, bpsBurst: bytes.burst };
}

export function sameLimits(a: ResolvedDiskLimits, b: ResolvedDiskLimits): boolean {
  return a.iops === b.iops && a.iopsBurst === b.iopsBurst && a.bps === b.bps && a.bpsBurst === b.bpsBurst;
}

/** Restart-only options (per the option table) whose values differ, named as in the config file. */
export function changedDiskKeys(running: DiskSpec, next: DiskSpec): string[] {
  return DISK_OPTIONS.filter(
    (row) => row.reload === 'restart' && row.field !== 'name' && running.fields[row.field] !== next.fields[row.field],
  ).map(configKeyOf);
}

export function planReload(running: readonly RunningDiskState[], previous: ServeConfig, next: ServeConfig): ReloadPlan {
  const plan: ReloadPlan = { throttle: [], restart: [] };
  const daemonKeys: string[] = [];
  if (previous.metricsListen !== next.metricsListen) daemonKeys.push('metrics-listen');
  if (previous.adminPublic !== next.adminPublic) daemonKeys.push('admin-public');
  if (previous.logLevel !== next.logLevel) daemonKeys.push('log-level');
  if (previous.logFormat !== next.logFormat) daemonKeys.push('log-format');
  if (daemonKeys.length > 0) plan.restart.push({ change: 'changed', keys: daemonKeys });

  const nextByName = new Map(next.disks.map((spec) => [spec.options.name, spec]));
  const runningNames = new Set(running.map((disk) => disk.spec.options.name));
  for (const { spec, limits } of running) {
    const name = spec.options.name;
    const wanted = nextByName.get(name);
    if (wanted === undefined) {
      plan.restart.push({ disk: name, change: 'removed', keys: [] });
      continue;
    }
    const keys = changedDiskKeys(spec, wanted);
    if (keys.length > 0) plan.restart.push({ disk: name, change: 'changed', keys });
    const to = resolveDiskLimits(wanted.options.throttle);
    if (!sameLimits(limits, to)) plan.throttle.push({ disk: name, from: limits, to, limits: wanted.options.throttle });
  }
  for (const spec of next.disks) {
    if (!runningNames.has(spec.options.name)) plan.restart.push({ disk: spec.options.name, change: 'added', keys: [] });
  }
  return plan;
}
