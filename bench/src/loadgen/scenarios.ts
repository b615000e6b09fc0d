/**
 * The side-by-side benchmark as data: which back-ends exist (how each is started on which image), which
 * scenarios run (a workload on a list of back-ends, the first being the vublk under test), and which targets of
 * the issues are checked against which ratio. compare.ts only walks these tables, so a new row (qcow2, NBD,
 * RBD, another cache mode) is one entry here. Pure: no I/O, unit-tested.
 *
 * Rows whose back-ends need something the daemon does not offer yet (`needs`, found in `vublk serve --help`)
 * or a tool/server that is missing are skipped, and the report says why.
 */

/** Images (or network targets) the back-ends serve; created by compare.ts before the daemons start. */
export type ImageKind = 'cached' | 'direct' | 'qcow2-full' | 'qcow2-fresh' | 'nbd' | 'rbd';
/** Daemon features a row may need, detected from `vublk serve --help`. */
export type Capability = 'cache' | 'poll' | 'qcow2' | 'nbd' | 'rbd';

export interface Workload {
  rw: 'randread' | 'randwrite' | 'read' | 'write';
  bs: string;
  iodepth: number;
  queues: number;
}

/** Where an image kind lives, as each back-end names it. */
export interface ImageTarget {
  /** vublk `--disk image=` value (a path, nbd://…, rbd:…). */
  vublkImage: string;
  /** Extra vublk --disk keys for this image (e.g. format=qcow2). */
  vublkKeys: string[];
  /** qemu-storage-daemon --blockdev options of the protocol/format node, without node-name. */
  qsdBlockdev: string;
  /** A plain file fio can open, or null (network targets). */
  file: string | null;
}

export interface BackendSpec {
  id: string;
  kind: 'vublk' | 'qsd' | 'fio';
  label: string;
  image: ImageKind;
  /** vublk: extra --disk keys (cache=none, poll-us=50); qsd: extra options appended to the file node. */
  options: string[];
  needs?: Capability;
}

export interface Scenario {
  id: string;
  group: GroupId;
  title: string;
  workload: Workload;
  /** Back-end ids; the first is the vublk under test, ratios are it / each other. */
  backends: string[];
  /** The image is created anew before every run (and its daemons started for that run only): writes into a fresh qcow2. */
  freshImage?: boolean;
  /**
   * The daemon is started for each run and stopped after it, so only one back-end holds the image at a time (RBD's
   * exclusive lock); it gets unmeasured sessions of the same load first (compare.ts PER_RUN_WARMUP_SESSIONS).
   */
  perRunDaemon?: boolean;
  /**
   * Measured time of this row instead of --runtime: shorter for rows that consume the image (fresh allocation),
   * longer where the storage's own cost moves from one second to the next (the micro Ceph OSD: 140-190 µs of
   * CPU per 4 KiB write across consecutive runs), so each run averages over more of it.
   */
  runtimeSec?: number;
}

export type GroupId = 'direct' | 'cached' | 'qcow2' | 'nbd' | 'rbd';

export interface Group {
  id: GroupId;
  title: string;
  intro: string;
  needs?: Capability;
}

/** The storage server process the benchmark runs for a group's image, whose CPU each run records (Sample.serverCpuUsPerRequest). */
export const SERVER_OF_GROUP: Partial<Record<GroupId, string>> = { nbd: 'nbdkit', rbd: 'ceph-osd' };

export const GROUPS: readonly Group[] = [
  {
    id: 'direct',
    title: 'O_DIRECT image on the host disk',
    needs: 'cache',
    intro:
      "A raw image on the root file system (not tmpfs), opened with O_DIRECT by every back-end: vublk `cache=none`, qemu-storage-daemon `cache.direct=on,aio=io_uring`, and fio (`--ioengine=io_uring --direct=1`) on the same file as the device's limit.",
  },
  {
    id: 'cached',
    title: 'Page-cached image',
    intro:
      'A raw image read once into the page cache: vublk `cache=writeback` (default) against qemu-storage-daemon `aio=io_uring`; the `--poll-us 50` rows show what adaptive polling buys and costs.',
  },
  {
    id: 'qcow2',
    title: 'qcow2',
    needs: 'qcow2',
    intro:
      "vublk `format=qcow2` against qemu-storage-daemon's qcow2 driver (aio=io_uring) on a fully allocated qcow2 (converted from the random raw image), and sequential writes into a fresh qcow2 (created anew before every run).",
  },
  {
    id: 'nbd',
    title: 'NBD',
    needs: 'nbd',
    intro:
      'vublk `image=nbd://…` against qemu-storage-daemon with an `nbd` blockdev, both to the same server (nbdkit `file` on a copy of the raw image, loopback TCP).',
  },
  {
    id: 'rbd',
    title: 'RBD',
    needs: 'rbd',
    intro:
      'vublk `image=rbd:…` against qemu-storage-daemon with an `rbd` blockdev to the same image (a 256 MiB image of random data on a micro cluster started by the benchmark, test/support/ceph/micro-cluster.sh).',
  },
];

export const BACKENDS: readonly BackendSpec[] = [
  { id: 'vublk-none', kind: 'vublk', label: 'vublk cache=none', image: 'direct', options: ['cache=none'], needs: 'cache' },
  {
    id: 'qsd-direct',
    kind: 'qsd',
    label: 'qemu-storage-daemon cache.direct=on,aio=io_uring',
    image: 'direct',
    options: ['cache.direct=on', 'aio=io_uring'],
  },
  { id: 'fio-direct', kind: 'fio', label: 'fio io_uring direct=1', image: 'direct', options: [] },
  { id: 'vublk', kind: 'vublk', label: 'vublk cache=writeback', image: 'cached', options: [] },
  { id: 'vublk-poll50', kind: 'vublk', label: 'vublk cache=writeback poll-us=50', image: 'cached', options: ['poll-us=50'], needs: 'poll' },
  { id: 'qsd', kind: 'qsd', label: 'qemu-storage-daemon aio=io_uring', image: 'cached', options: ['aio=io_uring'] },
  { id: 'vublk-qcow2', kind: 'vublk', label: 'vublk format=qcow2', image: 'qcow2-full', options: [], needs: 'qcow2' },
  { id: 'qsd-qcow2', kind: 'qsd', label: 'qemu-storage-daemon qcow2 aio=io_uring', image: 'qcow2-full', options: ['aio=io_uring'] },
  { id: 'vublk-qcow2-fresh', kind: 'vublk', label: 'vublk format=qcow2 (fresh)', image: 'qcow2-fresh', options: [], needs: 'qcow2' },
  { id: 'qsd-qcow2-fresh', kind: 'qsd', label: 'qemu-storage-daemon qcow2 (fresh)', image: 'qcow2-fresh', options: ['aio=io_uring'] },
  { id: 'vublk-nbd', kind: 'vublk', label: 'vublk image=nbd://', image: 'nbd', options: [], needs: 'nbd' },
  { id: 'qsd-nbd', kind: 'qsd', label: 'qemu-storage-daemon nbd blockdev', image: 'nbd', options: [] },
  { id: 'vublk-rbd', kind: 'vublk', label: 'vublk image=rbd:', image: 'rbd', options: [], needs: 'rbd' },
  { id: 'qsd-rbd', kind: 'qsd', label: 'qemu-storage-daemon rbd blockdev', image: 'rbd', options: [] },
];

const RR4 = (iodepth: number, queues = 1): Workload => ({ rw: 'randread', bs: '4k', iodepth, queues });
const RW4 = (iodepth: number): Workload => ({ rw: 'randwrite', bs: '4k', iodepth, queues: 1 });
const SR128: Workload = { rw: 'read', bs: '128k', iodepth: 8, queues: 1 };

/** Measured seconds of each RBD run (see Scenario.runtimeSec). */
const RBD_RUNTIME_SEC = 5;

export const SCENARIOS: readonly Scenario[] = [
  {
    id: 'd-rr-qd32',
    group: 'direct',
    title: '4 KiB randread QD32, 1 queue',
    workload: RR4(32),
    backends: ['vublk-none', 'qsd-direct', 'fio-direct'],
  },
  {
    id: 'd-rr-qd1',
    group: 'direct',
    title: '4 KiB randread QD1, 1 queue',
    workload: RR4(1),
    backends: ['vublk-none', 'qsd-direct', 'fio-direct'],
  },
  {
    id: 'd-rw-qd32',
    group: 'direct',
    title: '4 KiB randwrite QD32, 1 queue',
    workload: RW4(32),
    backends: ['vublk-none', 'qsd-direct', 'fio-direct'],
  },
  {
    id: 'd-sr-qd8',
    group: 'direct',
    title: '128 KiB seq read QD8, 1 queue',
    workload: SR128,
    backends: ['vublk-none', 'qsd-direct', 'fio-direct'],
  },
  { id: 'c-rr-qd1', group: 'cached', title: '4 KiB randread QD1, 1 queue', workload: RR4(1), backends: ['vublk', 'qsd', 'vublk-poll50'] },
  {
    id: 'c-rr-qd32',
    group: 'cached',
    title: '4 KiB randread QD32, 1 queue',
    workload: RR4(32),
    backends: ['vublk', 'qsd', 'vublk-poll50'],
  },
  { id: 'c-rr-qd32-q2', group: 'cached', title: '4 KiB randread QD32, 2 queues', workload: RR4(32, 2), backends: ['vublk', 'qsd'] },
  { id: 'c-rw-qd32', group: 'cached', title: '4 KiB randwrite QD32, 1 queue', workload: RW4(32), backends: ['vublk', 'qsd'] },
  { id: 'c-sr-qd8', group: 'cached', title: '128 KiB seq read QD8, 1 queue', workload: SR128, backends: ['vublk', 'qsd'] },
  {
    id: 'q-rr-qd32',
    group: 'qcow2',
    title: '4 KiB randread QD32, fully allocated qcow2',
    workload: RR4(32),
    backends: ['vublk-qcow2', 'qsd-qcow2'],
  },
  {
    id: 'q-rw-qd32',
    group: 'qcow2',
    title: '4 KiB randwrite QD32, fully allocated qcow2',
    workload: RW4(32),
    backends: ['vublk-qcow2', 'qsd-qcow2'],
  },
  {
    id: 'q-sw-fresh',
    group: 'qcow2',
    title: '64 KiB seq write QD8 into a fresh qcow2',
    workload: { rw: 'write', bs: '64k', iodepth: 8, queues: 1 },
    backends: ['vublk-qcow2-fresh', 'qsd-qcow2-fresh'],
    freshImage: true,
    runtimeSec: 1,
  },
  { id: 'n-rr-qd32', group: 'nbd', title: '4 KiB randread QD32 over NBD', workload: RR4(32), backends: ['vublk-nbd', 'qsd-nbd'] },
  { id: 'n-rw-qd32', group: 'nbd', title: '4 KiB randwrite QD32 over NBD', workload: RW4(32), backends: ['vublk-nbd', 'qsd-nbd'] },
  { id: 'n-sr-qd8', group: 'nbd', title: '128 KiB seq read QD8 over NBD', workload: SR128, backends: ['vublk-nbd', 'qsd-nbd'] },
  {
    id: 'r-rr-qd32',
    group: 'rbd',
    perRunDaemon: true,
    runtimeSec: RBD_RUNTIME_SEC,
    title: '4 KiB randread QD32 over RBD',
    workload: RR4(32),
    backends: ['vublk-rbd', 'qsd-rbd'],
  },
  {
    id: 'r-rw-qd32',
    group: 'rbd',
    perRunDaemon: true,
    runtimeSec: RBD_RUNTIME_SEC,
    title: '4 KiB randwrite QD32 over RBD',
    workload: RW4(32),
    backends: ['vublk-rbd', 'qsd-rbd'],
  },
  {
    id: 'r-sr-qd8',
    group: 'rbd',
    perRunDaemon: true,
    runtimeSec: RBD_RUNTIME_SEC,
    title: '128 KiB seq read QD8 over RBD',
    workload: SR128,
    backends: ['vublk-rbd', 'qsd-rbd'],
  },
];

export type Metric = 'iops' | 'mibps' | 'p50Us' | 'p99Us' | 'cpuUsPerRequest';

/** A target of the issues: ratio(metric of `backend` / metric of `against`) in `scenario`, compared with `bound`. */
export interface Target {
  issue: number;
  text: string;
  scenario: string;
  backend: string;
  against: string;
  metric: Metric;
  /** 'min': ratio ≥ bound is met; 'max': ratio ≤ bound is met. */
  kind: 'min' | 'max';
  bound: number;
}

export const TARGETS: readonly Target[] = [
  {
    issue: 9,
    text: 'O_DIRECT 4 KiB randread QD32: IOPS ≥ 0.95× QSD',
    scenario: 'd-rr-qd32',
    backend: 'vublk-none',
    against: 'qsd-direct',
    metric: 'iops',
    kind: 'min',
    bound: 0.95,
  },
  {
    issue: 9,
    text: 'O_DIRECT 4 KiB randread QD32: IOPS ≥ 0.85× fio',
    scenario: 'd-rr-qd32',
    backend: 'vublk-none',
    against: 'fio-direct',
    metric: 'iops',
    kind: 'min',
    bound: 0.85,
  },
  {
    issue: 9,
    text: 'O_DIRECT 4 KiB randread QD1: p50 ≤ 1.1× QSD',
    scenario: 'd-rr-qd1',
    backend: 'vublk-none',
    against: 'qsd-direct',
    metric: 'p50Us',
    kind: 'max',
    bound: 1.1,
  },
  {
    issue: 9,
    text: 'page-cached 4 KiB randread QD32, 1 queue: IOPS ≥ 1.3× QSD',
    scenario: 'c-rr-qd32',
    backend: 'vublk',
    against: 'qsd',
    metric: 'iops',
    kind: 'min',
    bound: 1.3,
  },
  {
    issue: 9,
    text: 'page-cached 128 KiB read QD8: MiB/s ≥ 1.0× QSD',
    scenario: 'c-sr-qd8',
    backend: 'vublk',
    against: 'qsd',
    metric: 'mibps',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 11,
    text: 'qcow2 4 KiB randread QD32: IOPS ≥ 1.0× QSD qcow2',
    scenario: 'q-rr-qd32',
    backend: 'vublk-qcow2',
    against: 'qsd-qcow2',
    metric: 'iops',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 11,
    text: 'qcow2 4 KiB randwrite QD32: IOPS ≥ 1.0× QSD qcow2',
    scenario: 'q-rw-qd32',
    backend: 'vublk-qcow2',
    against: 'qsd-qcow2',
    metric: 'iops',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 11,
    text: 'qcow2 fresh 64 KiB seq write: MiB/s ≥ 0.9× QSD',
    scenario: 'q-sw-fresh',
    backend: 'vublk-qcow2-fresh',
    against: 'qsd-qcow2-fresh',
    metric: 'mibps',
    kind: 'min',
    bound: 0.9,
  },
  {
    issue: 12,
    text: 'NBD 4 KiB randread QD32: IOPS ≥ 1.0× QSD nbd',
    scenario: 'n-rr-qd32',
    backend: 'vublk-nbd',
    against: 'qsd-nbd',
    metric: 'iops',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 12,
    text: 'NBD 4 KiB randwrite QD32: IOPS ≥ 1.0× QSD nbd',
    scenario: 'n-rw-qd32',
    backend: 'vublk-nbd',
    against: 'qsd-nbd',
    metric: 'iops',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 12,
    text: 'NBD 128 KiB read: MiB/s ≥ 1.0× QSD nbd',
    scenario: 'n-sr-qd8',
    backend: 'vublk-nbd',
    against: 'qsd-nbd',
    metric: 'mibps',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 12,
    text: 'RBD 4 KiB randread QD32: IOPS ≥ 1.0× QSD rbd',
    scenario: 'r-rr-qd32',
    backend: 'vublk-rbd',
    against: 'qsd-rbd',
    metric: 'iops',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 12,
    text: 'RBD 4 KiB randwrite QD32: IOPS ≥ 1.0× QSD rbd',
    scenario: 'r-rw-qd32',
    backend: 'vublk-rbd',
    against: 'qsd-rbd',
    metric: 'iops',
    kind: 'min',
    bound: 1.0,
  },
  {
    issue: 12,
    text: 'RBD 128 KiB read: MiB/s ≥ 1.0× QSD rbd',
    scenario: 'r-sr-qd8',
    backend: 'vublk-rbd',
    against: 'qsd-rbd',
    metric: 'mibps',
    kind: 'min',
    bound: 1.0,
  },
];

/** Capabilities `vublk serve --help` advertises (the --disk key list and option names). */
export function capabilitiesFromHelp(help: string): Set<Capability> {
  const caps = new Set<Capability>();
  if (/--cache\b/.test(help)) caps.add('cache');
  if (/--poll-us\b/.test(help)) caps.add('poll');
  if (/\bformat\b/.test(help) && /qcow2/.test(help)) caps.add('qcow2');
  if (/nbd:\/\//.test(help)) caps.add('nbd');
  if (/\brbd:/.test(help)) caps.add('rbd');
  return caps;
}

export function backendById(id: string): BackendSpec {
  const b = BACKENDS.find((x) => x.id === id);
  if (b === undefined) throw new Error(`unknown back-end ${id}`);
  return b;
}

/**
 * Which scenarios run and which back-ends of them, given the daemon's capabilities and which images/tools are
 * available; every skipped row or back-end comes with its reason.
 */
export function planScenarios(
  caps: ReadonlySet<Capability>,
  available: (backend: BackendSpec) => string | null,
  only?: ReadonlySet<GroupId>,
): { scenarios: Array<Scenario & { running: string[] }>; skipped: string[] } {
  const scenarios: Array<Scenario & { running: string[] }> = [];
  const skipped: string[] = [];
  for (const group of GROUPS) {
    if (only !== undefined && !only.has(group.id)) continue;
    if (group.needs !== undefined && !caps.has(group.needs)) {
      skipped.push(`${group.title}: the daemon does not offer ${group.needs} yet (not in \`vublk serve --help\`)`);
      continue;
    }
    for (const scenario of SCENARIOS.filter((s) => s.group === group.id)) {
      const running: string[] = [];
      for (const id of scenario.backends) {
        const backend = backendById(id);
        const missing =
          backend.needs !== undefined && !caps.has(backend.needs) ? `the daemon does not offer ${backend.needs}` : available(backend);
        if (missing === null) running.push(id);
        else if (!skipped.some((s) => s.startsWith(`${backend.label}:`))) skipped.push(`${backend.label}: ${missing}`);
      }
      // A row needs its vublk and at least one reference.
      if (running[0] === scenario.backends[0] && running.length >= 2) scenarios.push({ ...scenario, running });
      else skipped.push(`${group.title} / ${scenario.title}: not enough back-ends available`);
    }
  }
  return { scenarios, skipped };
}

/** Median of the finite values; NaN when there are none. */
export function median(values: readonly number[]): number {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

export interface Sample {
  scenario: string;
  backend: string;
  round: number;
  iops: number;
  mibps: number;
  p50Us: number;
  p99Us: number;
  p999Us: number;
  cpuUsPerRequest: number;
  /** Daemon CPU over the run's wall time, % of one core (NaN for fio). */
  daemonCpuPercent: number;
  hostIdlePercent: number;
  /** Share of the host's CPU time the hypervisor took from this VM during the run (see STEAL_RERUN_PERCENT). */
  hostStealPercent: number;
  generatorCpuPercent: number;
  /**
   * CPU of the storage server the benchmark runs for this image (nbdkit, the Ceph OSD) per request, µs; NaN where
   * there is none. On a shared host a server's cost per request moves between runs, and the IOPS with it.
   */
  serverCpuUsPerRequest: number;
}

export function medianOf(samples: readonly Sample[], scenario: string, backend: string, metric: keyof Sample): number {
  return median(samples.filter((s) => s.scenario === scenario && s.backend === backend).map((s) => Number(s[metric])));
}

/** Median over rounds of the per-round ratio a/b (rounds where both ran): ratios measured in the same minute. */
export function ratioOf(samples: readonly Sample[], scenario: string, a: string, b: string, metric: keyof Sample): number {
  const ratios: number[] = [];
  for (const x of samples.filter((s) => s.scenario === scenario && s.backend === a)) {
    const y = samples.find((s) => s.scenario === scenario && s.backend === b && s.round === x.round);
    const num = Number(x[metric]);
    const den = y === undefined ? NaN : Number(y[metric]);
    if (Number.isFinite(num) && Number.isFinite(den) && den > 0) ratios.push(num / den);
  }
  return median(ratios);
}

/** A target's verdict: met / missed, or null when it was not measured. */
export function judge(target: Target, samples: readonly Sample[]): { ratio: number; met: boolean | null } {
  const ratio = ratioOf(samples, target.scenario, target.backend, target.against, target.metric);
  if (!Number.isFinite(ratio)) return { ratio, met: null };
  return { ratio, met: target.kind === 'min' ? ratio >= target.bound : ratio <= target.bound };
}
