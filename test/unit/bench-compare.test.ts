// The side-by-side benchmark's pure parts: /proc parsers, fio's JSON, the scenario table and its aggregation.
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import {
  cpuMicrosPerRequest,
  parseHostCpuTicks,
  parseStatCpuTicks,
  parseStatusNumber,
  processThreadKinds,
} from '../../bench/src/loadgen/proc-stats.js';
import { fioArgs, parseFioJson } from '../../bench/src/loadgen/fio.js';
import {
  BACKENDS,
  GROUPS,
  SCENARIOS,
  TARGETS,
  capabilitiesFromHelp,
  judge,
  medianOf,
  planScenarios,
  ratioOf,
  type Capability,
  type Sample,
} from '../../bench/src/loadgen/scenarios.js';
import { commonWindowSec } from '../../bench/src/loadgen/scale.js';
import { parseKeyValueLines, parseStealRerun, renderReport, stealToRerun } from '../../bench/src/loadgen/compare.js';

describe('/proc parsers', () => {
  it('reads utime+stime even when the command name holds spaces and parentheses', () => {
    // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    const stat = '4242 (node (worker) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 13 0 99 0 0';
    expect(parseStatCpuTicks(stat)).toBe(1234 + 567);
    expect(parseStatCpuTicks('garbage')).toBeNaN();
  });

  it('reads VmRSS, VmHWM and Threads from /proc/PID/status', () => {
    const status = 'Name:\tnode\nVmHWM:\t  120000 kB\nVmRSS:\t   61440 kB\nThreads:\t11\n';
    expect(parseStatusNumber(status, 'VmRSS')).toBe(61440);
    expect(parseStatusNumber(status, 'VmHWM')).toBe(120000);
    expect(parseStatusNumber(status, 'Threads')).toBe(11);
    expect(parseStatusNumber(status, 'VmSwap')).toBeNaN();
  });

  it('counts the threads of a live process by kind; a process that is gone gives NaN', () => {
    // This process submits nothing to io_uring: every task is its own, and the count is the status line's.
    const kinds = processThreadKinds(process.pid);
    expect(kinds.ioUringWorkers).toBe(0);
    expect(kinds.own).toBe(parseStatusNumber(readFileSync('/proc/self/status', 'utf8'), 'Threads'));
    expect(processThreadKinds(2 ** 22 + 1).own).toBeNaN();
  });

  it('splits /proc/stat into busy, idle (idle + iowait) and stolen jiffies', () => {
    expect(parseHostCpuTicks('cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 2 3\n')).toEqual({
      busy: 100 + 5 + 50 + 1 + 2,
      idle: 1020,
      steal: 3,
    });
  });

  it('CPU per request in µs, NaN without requests', () => {
    expect(cpuMicrosPerRequest(2, 1_000_000)).toBeCloseTo(2);
    expect(cpuMicrosPerRequest(1, 0)).toBeNaN();
    expect(cpuMicrosPerRequest(NaN, 10)).toBeNaN();
  });
});

describe('micro-cluster output', () => {
  it('reads KEY=VALUE lines and ignores the rest', () => {
    const map = parseKeyValueLines(
      'some log line\nCEPH_CONF=/var/tmp/x/ceph/ceph.conf\n  CEPH_HEALTH=HEALTH_OK  \nlower=case\nCEPH_EMPTY=\n',
    );
    expect(map.get('CEPH_CONF')).toBe('/var/tmp/x/ceph/ceph.conf');
    expect(map.get('CEPH_HEALTH')).toBe('HEALTH_OK');
    expect(map.get('CEPH_EMPTY')).toBe('');
    expect(map.has('lower')).toBe(false);
  });
});

describe('fio', () => {
  it('runs the same workload with io_uring and O_DIRECT on the file', () => {
    const args = fioArgs({ rw: 'randread', bs: '4k', iodepth: 32, runtimeSec: 2, rampSec: 0.3, seed: 7 }, '/var/tmp/x.img');
    expect(args).toEqual(
      expect.arrayContaining([
        '--ioengine=io_uring',
        '--direct=1',
        '--iodepth=32',
        '--rw=randread',
        '--bs=4k',
        '--filename=/var/tmp/x.img',
        '--output-format=json',
        '--randseed=7',
      ]),
    );
  });

  const job = (read: object, write: object): string =>
    JSON.stringify({ jobs: [{ error: 0, usr_cpu: 10, sys_cpu: 30, job_runtime: 2000, read, write }] });

  it('parses IOPS, bandwidth, percentiles (ns → µs) and CPU per request', () => {
    const text = `fio: some warning\n${job(
      {
        iops: 50_000.5,
        bw_bytes: 204_802_048,
        total_ios: 100_001,
        clat_ns: { percentile: { '50.000000': 415_744, '99.000000': 2_000_000, '99.900000': 5_000_000 } },
      },
      { iops: 0, bw_bytes: 0, total_ios: 0, clat_ns: { percentile: {} } },
    )}`;
    const r = parseFioJson(text);
    expect(r.iops).toBeCloseTo(50_000.5);
    expect(r.mibps).toBeCloseTo(195.3, 1);
    expect(r.p50Us).toBeCloseTo(415.744);
    expect(r.p99Us).toBe(2000);
    expect(r.p999Us).toBe(5000);
    expect(r.ios).toBe(100_001);
    // 40 % of a core for 2 s = 0.8 s over 100,001 requests.
    expect(r.cpuMicrosPerRequest).toBeCloseTo(0.8e6 / 100_001, 3);
  });

  it('takes the percentiles of the busier direction (writes)', () => {
    const r = parseFioJson(
      job({ total_ios: 0 }, { iops: 10, bw_bytes: 40960, total_ios: 20, clat_ns: { percentile: { '50.000000': 1000 } } }),
    );
    expect(r.p50Us).toBe(1);
    expect(r.iops).toBe(10);
  });

  it('refuses output without a job, a failed job, or no JSON', () => {
    expect(() => parseFioJson('{"jobs": []}')).toThrow(/no job/);
    expect(() => parseFioJson(JSON.stringify({ jobs: [{ error: 5 }] }))).toThrow(/error 5/);
    expect(() => parseFioJson('fio: file not found')).toThrow(/no JSON/);
  });
});

describe('scenario table', () => {
  it('is consistent: every back-end, group and target reference exists, ids are unique', () => {
    const backendIds = new Set(BACKENDS.map((b) => b.id));
    expect(backendIds.size).toBe(BACKENDS.length);
    expect(new Set(SCENARIOS.map((s) => s.id)).size).toBe(SCENARIOS.length);
    for (const s of SCENARIOS) {
      expect(GROUPS.some((g) => g.id === s.group)).toBe(true);
      for (const b of s.backends) expect(backendIds.has(b), `${s.id}: ${b}`).toBe(true);
      // The first back-end is the vublk under test.
      expect(BACKENDS.find((b) => b.id === s.backends[0])?.kind).toBe('vublk');
      // RBD rows never keep two daemons on the image at once (exclusive lock): a daemon per run.
      if (s.group === 'rbd') expect(s.perRunDaemon).toBe(true);
    }
    for (const t of TARGETS) {
      const s = SCENARIOS.find((x) => x.id === t.scenario);
      expect(s, t.text).toBeDefined();
      expect(s?.backends).toContain(t.backend);
      expect(s?.backends).toContain(t.against);
    }
  });

  it('finds capabilities in `vublk serve --help`', () => {
    expect([...capabilitiesFromHelp('--cache <mode>  --poll-us <n>')].sort()).toEqual(['cache', 'poll']);
    const caps = capabilitiesFromHelp('--disk keys: image, format (raw|qcow2), ... image=nbd://host:port/export or rbd:pool/image');
    expect(caps.has('qcow2') && caps.has('nbd') && caps.has('rbd')).toBe(true);
    expect(capabilitiesFromHelp('--image <path>').size).toBe(0);
  });

  it('skips groups the daemon cannot serve and back-ends that are unavailable, with reasons', () => {
    const caps = new Set<Capability>(['cache', 'poll']);
    const plan = planScenarios(caps, (b) => (b.kind === 'fio' ? 'fio is not installed' : null));
    const groups = new Set(plan.scenarios.map((s) => s.group));
    expect([...groups].sort()).toEqual(['cached', 'direct']);
    expect(plan.scenarios.every((s) => !s.running.includes('fio-direct'))).toBe(true);
    expect(plan.skipped.some((s) => s.includes('fio is not installed'))).toBe(true);
    expect(plan.skipped.some((s) => s.startsWith('qcow2:'))).toBe(true);
    // Without poll support the poll back-end drops out of the rows, the rows stay.
    const noPoll = planScenarios(new Set<Capability>(['cache']), () => null);
    expect(noPoll.scenarios.find((s) => s.id === 'c-rr-qd32')?.running).toEqual(['vublk', 'qsd']);
    // A row without its reference does not run.
    const noQsd = planScenarios(caps, (b) => (b.kind === 'qsd' ? 'missing' : null), new Set(['cached']));
    expect(noQsd.scenarios.map((s) => s.id)).toEqual(['c-rr-qd1', 'c-rr-qd32']);
  });
});

describe('aggregation', () => {
  const sample = (scenario: string, backend: string, round: number, iops: number, p50Us = 10): Sample => ({
    scenario,
    backend,
    round,
    iops,
    mibps: iops / 256,
    p50Us,
    p99Us: 2 * p50Us,
    p999Us: 3 * p50Us,
    cpuUsPerRequest: 2,
    daemonCpuPercent: 50,
    hostIdlePercent: 20,
    hostStealPercent: 0,
    generatorCpuPercent: 30,
    serverCpuUsPerRequest: Number.NaN,
  });

  it('ratios are medians of per-round ratios, rounds missing on one side are ignored', () => {
    const samples = [
      sample('d-rr-qd32', 'vublk-none', 1, 100),
      sample('d-rr-qd32', 'qsd-direct', 1, 50),
      sample('d-rr-qd32', 'vublk-none', 2, 90),
      sample('d-rr-qd32', 'qsd-direct', 2, 100),
      sample('d-rr-qd32', 'vublk-none', 3, 120),
      sample('d-rr-qd32', 'qsd-direct', 3, 100),
      sample('d-rr-qd32', 'vublk-none', 4, 1000),
    ];
    // Per round: 2, 0.9, 1.2 → median 1.2 (not 310 / 250 from the medians of the values).
    expect(ratioOf(samples, 'd-rr-qd32', 'vublk-none', 'qsd-direct', 'iops')).toBeCloseTo(1.2);
    expect(medianOf(samples, 'd-rr-qd32', 'vublk-none', 'iops')).toBe(110);
    expect(ratioOf(samples, 'd-rr-qd32', 'vublk-none', 'fio-direct', 'iops')).toBeNaN();
  });

  it('judges min and max targets, and "not measured"', () => {
    const min = TARGETS.find((t) => t.scenario === 'd-rr-qd32' && t.against === 'qsd-direct')!;
    const max = TARGETS.find((t) => t.scenario === 'd-rr-qd1')!;
    const s = [
      sample('d-rr-qd32', 'vublk-none', 1, 94),
      sample('d-rr-qd32', 'qsd-direct', 1, 100),
      sample('d-rr-qd1', 'vublk-none', 1, 1, 11),
      sample('d-rr-qd1', 'qsd-direct', 1, 1, 10),
    ];
    expect(judge(min, s).met).toBe(false);
    expect(judge(min, [sample('d-rr-qd32', 'vublk-none', 1, 95), sample('d-rr-qd32', 'qsd-direct', 1, 100)]).met).toBe(true);
    expect(judge(max, s)).toEqual({ ratio: expect.closeTo(1.1, 5), met: true });
    expect(judge(max, []).met).toBeNull();
  });

  it('the common load window of many generators', () => {
    expect(
      commonWindowSec([
        { loadStartMs: 1000, loadEndMs: 4000 },
        { loadStartMs: 1500, loadEndMs: 4200 },
      ]),
    ).toBeCloseTo(2.5);
    expect(
      commonWindowSec([
        { loadStartMs: 0, loadEndMs: 1000 },
        { loadStartMs: 2000, loadEndMs: 3000 },
      ]),
    ).toBe(0);
    expect(commonWindowSec([])).toBe(0);
  });

  it('renders targets with the figures and skips rows that did not run', () => {
    const plan = planScenarios(new Set<Capability>(['cache', 'poll']), () => null, new Set(['direct']));
    const samples = [
      sample('d-rr-qd32', 'vublk-none', 1, 60_000),
      sample('d-rr-qd32', 'qsd-direct', 1, 50_000),
      sample('d-rr-qd32', 'fio-direct', 1, 64_000),
    ];
    const report = renderReport({
      facts: { nproc: '2' },
      scenarios: plan.scenarios,
      skipped: plan.skipped,
      samples: samples.map((s) => ({ ...s, loadAvg1: 1.5, generatorMicrosPerRequest: 1 })),
      memory: [],
      failures: [],
      stealReruns: [],
      stealRerunPercent: Number.POSITIVE_INFINITY,
      commands: ['qemu-storage-daemon …'],
      imageNotes: [],
      rounds: 1,
      runtime: 2,
      ramp: 0.3,
      imageBytes: 1 << 30,
      scale: { idle: [{ backend: 'vublk', disks: 64, rssMiB: 62, threads: 11 }], serving: [], commands: [] },
    });
    expect(report.markdown).toContain(
      '| #9 O_DIRECT 4 KiB randread QD32: IOPS ≥ 0.95× QSD | 1.20× | **met** | 60,000 vs 50,000 IOPS | 1.50 |',
    );
    expect(report.markdown).toContain('| #9 O_DIRECT 4 KiB randread QD32: IOPS ≥ 0.85× fio | 0.94× | **met** |');
    expect(report.markdown).toContain('| #9 64 idle disks: RSS ≤ 80 MiB | 62.0 MiB | **met** |');
    expect(report.markdown).not.toContain('page-cached 4 KiB randread');
    expect(report.markdown, 'no storage server ran: no server table').not.toContain('CPU µs/req (median)');
    expect(report.summary).toContain('Targets:');
    expect(report.markdown).toContain('| rounds run again for steal | none |');
    expect(report.markdown).toContain('rounds were not run again for steal in this run (`--steal-rerun off`)');
  });

  it('runs a round again while the hypervisor took 3 % of the CPU or more in one of its runs, at most twice', () => {
    const calm = [sample('r-rr-qd32', 'vublk-rbd', 1, 18_000), sample('r-rr-qd32', 'qsd-rbd', 1, 17_000)];
    const stolen = [calm[0] as Sample, { ...(calm[1] as Sample), hostStealPercent: 9.5 }];
    expect(stealToRerun(calm, 0)).toBeNull();
    expect(stealToRerun([{ ...(calm[0] as Sample), hostStealPercent: 2.9 }], 0)).toBeNull();
    expect(stealToRerun(stolen, 0)).toBe(9.5);
    expect(stealToRerun(stolen, 1)).toBe(9.5);
    expect(stealToRerun(stolen, 2), 'after two re-runs the round is kept').toBeNull();
    expect(stealToRerun([{ ...(calm[0] as Sample), hostStealPercent: Number.NaN }], 0)).toBeNull();
    expect(stealToRerun(calm, 0, 0), '--steal-rerun 0: every round runs again').toBe(0);
    expect(stealToRerun(stolen, 0, Number.POSITIVE_INFINITY), '--steal-rerun off').toBeNull();
  });

  it('--steal-rerun takes a share from 0 to 100 or off, and refuses anything else', () => {
    expect(parseStealRerun('3')).toBe(3);
    expect(parseStealRerun('0')).toBe(0);
    expect(parseStealRerun('off')).toBe(Number.POSITIVE_INFINITY);
    for (const bad of ['', '-1', '101', 'x', 'NaN']) expect(() => parseStealRerun(bad), bad).toThrow(/--steal-rerun/);
  });

  it("shows the storage server's CPU per request by round where it was measured (RBD: the OSD)", () => {
    const plan = planScenarios(new Set<Capability>(['rbd']), () => null, new Set(['rbd']));
    const samples = [1, 2, 3].flatMap((round) => [
      { ...sample('r-rw-qd32', 'vublk-rbd', round, 6000), serverCpuUsPerRequest: 150 + round },
      { ...sample('r-rw-qd32', 'qsd-rbd', round, 6100), serverCpuUsPerRequest: 160 + round },
    ]);
    const report = renderReport({
      facts: { nproc: '2' },
      scenarios: plan.scenarios.filter((s) => s.id === 'r-rw-qd32'),
      skipped: [],
      samples: samples.map((s) => ({ ...s, loadAvg1: 1.5, generatorMicrosPerRequest: 1 })),
      memory: [],
      failures: [],
      stealReruns: ['round 2 r-rw-qd32: 9.5 %'],
      stealRerunPercent: 3,
      commands: [],
      imageNotes: [],
      rounds: 3,
      runtime: 2,
      ramp: 0.3,
      imageBytes: 1 << 30,
      scale: { idle: [], serving: [], commands: [] },
    });
    expect(report.markdown).toContain('| workload | back-end | ceph-osd CPU µs/req (median) | by round |');
    expect(report.markdown).toContain('| 4 KiB randwrite QD32 over RBD | vublk image=rbd: | 152.0 | 151.0, 152.0, 153.0 |');
    expect(report.markdown).toContain('|  | qemu-storage-daemon rbd blockdev | 162.0 | 161.0, 162.0, 163.0 |');
    expect(report.markdown).toContain('| rounds run again for steal | 1: round 2 r-rw-qd32: 9.5 % |');
    expect(report.markdown).toContain('a round of a row with a run at 3 % or more is run again');
    expect(report.markdown).toMatch(/\| 4 KiB randwrite QD32 over RBD \| vublk image=rbd: \|.*\| 20 \| 0\.0 \|/);
  });
});
