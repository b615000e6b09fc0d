/**
 * What the live-migration e2e tests share (migration.test.ts on a shared file, rbd-migration.test.ts on a
 * shared Ceph RBD image): QEMU guests running the `migrate` workload of build-guest.sh (O_DIRECT write and
 * read-back rounds, a console-driven sentinel only the dirty log can carry over), driven over QMP; the
 * vublk daemons serving them; a QMP-held pre-copy, its switch-over and its cancellation.
 * Every wait has a deadline; a failure message carries the consoles and daemon logs (`context()`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readdirSync, readlinkSync, readSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { expect } from 'vitest';
import { guestQemuArgs, PATTERN_OFFSET } from './qemu.js';
import { QmpClient } from '../support/qmp-client.js';
import { startDaemon, waitForSocketFile, type DaemonProcess } from '../support/daemon-process.js';

const QEMU = 'qemu-system-x86_64';
/**
 * Guest RAM: 256 MiB and 8 KiB. The odd size works around a QEMU 7.2 TCG bug that loses guest CPU writes
 * during a migration: when a RAM block's length is a multiple of 256 KiB, QEMU clears its migration dirty
 * bits in bulk without resetting the vCPUs' TLB write-tracking (fixed upstream in QEMU 9.0, commit
 * 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access"), so a page the guest
 * writes again after a dirty sync is never sent. Measured with the page-by-page comparison below, QEMU's own
 * virtio-blk and no vublk: with 256 MiB, pages differed after nearly every switch-over under fast syncs (and
 * destination kernels crashed); with this size, none in 12. Any other length leaves it on the per-page path,
 * which does reset the TLB.
 */
const MEMORY_KIB = 256 * 1024 + 8;
/** Rounds the guest must complete on a QEMU before it is migrated away. */
export const ROUNDS_BEFORE = 2;
/** Rounds the guest must complete on the destination after a switch-over (or on the source after a cancel). */
export const ROUNDS_AFTER = 3;
const BOOT_TIMEOUT_MS = 120_000;
const MIGRATION_TIMEOUT_MS = 240_000;
const ROUNDS_TIMEOUT_MS = 120_000;

export interface Vm {
  name: string;
  qmp: QmpClient;
  child: ChildProcess;
  output(): string;
  /** The numbers of the "round=N ok" lines on the console so far. */
  rounds(): number[];
  /** Types a line on the guest console. */
  send(line: string): void;
  kill(): Promise<void>;
}

export interface VmOptions {
  name: string;
  /** Where the QMP socket goes. */
  dir: string;
  /** The disk's QEMU arguments (vhostUserDisk(), or a -drive for a control run). */
  disk: string[];
  /** Listen for an incoming migration on this loopback port (a destination), or null (a source). */
  incomingPort: number | null;
  /** vCPUs (as many as the disk has queues, so the guest uses all of them). */
  cpus?: number;
  /** More QEMU arguments (e.g. -S: a destination that stays paused after the switch-over until `cont`). */
  extraArgs?: string[];
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** The QEMU arguments of a vhost-user-blk disk on `socketPath`. */
export function vhostUserDisk(socketPath: string, numQueues = 1): string[] {
  return ['-chardev', `socket,id=vu0,path=${socketPath}`, '-device', `vhost-user-blk-pci,chardev=vu0,num-queues=${numQueues}`];
}

/** Starts a QEMU running the `migrate` workload (or waiting for it with -incoming) and connects its QMP. */
export async function startVm(options: VmOptions): Promise<Vm> {
  const { name, dir, disk, incomingPort, cpus = 1, extraArgs = [] } = options;
  const qmpPath = path.join(dir, `${name}.qmp`);
  const args = [
    // Both QEMUs share nothing but the image: each maps its own guest RAM, shared with its own vublk.
    // init_on_alloc=0: pages the CPU zeroes on allocation would be re-sent anyway and hide a missing bit.
    ...guestQemuArgs({
      cpus,
      memoryKiB: MEMORY_KIB,
      disk,
      kernelArgs: ['init_on_alloc=0', 'vublk.test=migrate', `vublk.offset=${PATTERN_OFFSET}`, 'vublk.timeout=1800'],
    }),
    '-qmp',
    `unix:${qmpPath},server=on,wait=off`,
    ...(incomingPort === null ? [] : ['-incoming', `tcp:127.0.0.1:${incomingPort}`]),
    ...extraArgs,
  ];
  // stdin is the guest's console input: the host drives the sentinel with it.
  const child = spawn(QEMU, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.setEncoding('utf8').on('data', (text: string) => (output += text));
  child.stderr?.setEncoding('utf8').on('data', (text: string) => (output += text));
  // A QEMU that died (e.g. a destination whose migration was cancelled) must not fail the test on EPIPE.
  child.stdin?.on('error', () => undefined);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let qmp: QmpClient;
  try {
    qmp = await QmpClient.connect(qmpPath, 30_000);
  } catch (error) {
    child.kill('SIGKILL');
    throw new Error(`${name}: ${error instanceof Error ? error.message : String(error)}\n${output}`);
  }
  return {
    name,
    qmp,
    child,
    // Line ends are \r\n on the serial console; a chunk may split them, so they are normalised when read.
    output: () => output.replace(/\r/g, ''),
    rounds: () => [...output.replace(/\r/g, '').matchAll(/^VUBLK-E2E: round=(\d+) ok$/gm)].map((m) => Number(m[1])),
    send: (line) => void child.stdin?.write(`${line}\n`),
    async kill() {
      qmp.close();
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await Promise.race([exited, sleep(10_000)]);
      }
    },
  };
}

/**
 * The guest's RAM as QEMU holds it (the memory-backend-memfd, read through /proc/PID/fd): MEMORY_KIB, guest
 * physical address = offset (q35 below 4 GiB).
 */
export function guestRam(vm: Vm): Buffer {
  const pid = vm.child.pid;
  if (pid === undefined) throw new Error(`${vm.name} has no process`);
  const fd = readdirSync(`/proc/${pid}/fd`).find((n) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${n}`).startsWith('/memfd:memory-backend-memfd');
    } catch {
      return false; // an fd closed meanwhile
    }
  });
  if (fd === undefined) throw new Error(`${vm.name}: no guest RAM memfd among its fds`);
  const ram = Buffer.alloc(MEMORY_KIB * 1024);
  const file = openSync(`/proc/${pid}/fd/${fd}`, 'r');
  try {
    for (let at = 0; at < ram.length; ) {
      const n = readSync(file, ram, at, Math.min(1 << 24, ram.length - at), at);
      if (n <= 0) throw new Error(`${vm.name}: guest RAM ends at ${at} bytes`);
      at += n;
    }
  } finally {
    closeSync(file);
  }
  return ram;
}

/** The 4 KiB pages where two RAM images differ, described (address, zero or not, first differing bytes). */
export function differingPages(source: Buffer, destination: Buffer): string[] {
  const pages: string[] = [];
  for (let at = 0; at < source.length; at += 4096) {
    const a = source.subarray(at, at + 4096);
    const b = destination.subarray(at, at + 4096);
    if (a.equals(b)) continue;
    let first = 0;
    while (a[first] === b[first]) first++;
    const zero = (page: Buffer) => (page.every((byte) => byte === 0) ? ' (zero)' : '');
    pages.push(
      `0x${at.toString(16)}+${first}: source ${a.subarray(first, first + 8).toString('hex')}${zero(a)}, ` +
        `destination ${b.subarray(first, first + 8).toString('hex')}${zero(b)}`,
    );
  }
  return pages;
}

/** The guest's FAIL lines (an I/O error, a mismatch, a watchdog timeout). */
export function failures(vm: Vm): string[] {
  return [...vm.output().matchAll(/^VUBLK-E2E: FAIL .*$/gm)].map((m) => m[0]);
}

export function latestRound(vm: Vm): number {
  return Math.max(0, ...vm.rounds());
}

/** Waits until the VM's console shows round `after + count`; fails on a FAIL line or when QEMU exits. */
export async function waitForRounds(
  vm: Vm,
  after: number,
  count: number,
  context: () => string,
  timeoutMs = ROUNDS_TIMEOUT_MS,
): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    expect(failures(vm), context()).toEqual([]);
    const latest = latestRound(vm);
    if (latest >= after + count) return latest;
    if (Date.now() > deadline)
      expect.fail(`${vm.name}: no round past ${after + count - 1} within ${timeoutMs} ms (latest ${latest})\n${context()}`);
    if (vm.child.exitCode !== null || vm.child.signalCode !== null) expect.fail(`${vm.name} exited\n${context()}`);
    await sleep(250);
  }
}

/** Waits for the first VM to boot and complete ROUNDS_BEFORE rounds. */
export function waitForBoot(vm: Vm, context: () => string): Promise<number> {
  return waitForRounds(vm, 0, ROUNDS_BEFORE, context, BOOT_TIMEOUT_MS);
}

/** Waits for a console line that `matches`, failing early on a FAIL line. */
async function waitForConsole(
  vm: Vm,
  matches: (line: string) => boolean,
  what: string,
  timeoutMs: number,
  context: () => string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!vm.output().split('\n').some(matches)) {
    expect(failures(vm), context()).toEqual([]);
    if (Date.now() > deadline) expect.fail(`${vm.name}: no "${what}" within ${timeoutMs} ms\n${context()}`);
    await sleep(200);
  }
}

export interface MigrationInfo {
  status: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred: number; remaining: number; 'dirty-sync-count': number; 'dirty-pages-rate'?: number };
}

/**
 * Starts a migration of `source` to the loopback `port` that cannot converge on its own: 16 MiB/s for 1 ms
 * means QEMU switches over only when under 16 KiB are left, which the guest's steady dirtier never allows.
 */
async function startHeldMigration(source: Vm, port: number): Promise<void> {
  await source.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 16 * 1024 * 1024, 'downtime-limit': 1 });
  await source.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
}

/** query-migrate on the source; fails on `failed`/`cancelled` (unless `expected`) or past the deadline. */
async function queryMigration(
  source: Vm,
  destination: Vm,
  deadline: number,
  context: () => string,
  expected: string[] = [],
): Promise<MigrationInfo> {
  const info = await source.qmp.execute<MigrationInfo>('query-migrate');
  if ((info.status === 'failed' || info.status === 'cancelled') && !expected.includes(info.status))
    expect.fail(`migration ${source.name} → ${destination.name} ${info.status}: ${info['error-desc'] ?? ''}\n${context()}`);
  if (Date.now() > deadline)
    expect.fail(`migration ${source.name} → ${destination.name} still ${info.status} after ${MIGRATION_TIMEOUT_MS} ms\n${context()}`);
  return info;
}

/**
 * Waits (30 s at most) until `vm` runs, or, for `paused`, until a destination started with -S has loaded the
 * migration stream (paused, no longer inmigrate).
 */
async function waitForStatus(vm: Vm, wanted: 'running' | 'paused', context: () => string): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const status = await vm.qmp.execute<{ status: string; running: boolean }>('query-status');
    if (wanted === 'running' ? status.running : status.status === wanted) return;
    if (Date.now() > deadline) expect.fail(`${vm.name} is ${status.status}, not ${wanted}\n${context()}`);
    await sleep(100);
  }
}

/**
 * Migrates `source` to `destination` (listening on `port`, started with -S). Pre-copy is held open until the
 * first full RAM pass is done and the guest has filled the sentinel — pages the device writes after they were
 * sent once; then the limits are raised and query-migrate is polled until completed. Then, before the
 * destination runs, its guest RAM is compared with the source's page by page: the source's vCPUs and device
 * are stopped, so any page that differs is one the migration failed to carry (a write nobody marked dirty).
 * Returns query-migrate's last answer.
 */
export async function migrate(source: Vm, destination: Vm, port: number, hop: number, context: () => string): Promise<MigrationInfo> {
  await startHeldMigration(source, port);
  const deadline = Date.now() + MIGRATION_TIMEOUT_MS;
  let info = await queryMigration(source, destination, deadline, context);
  // The first full pass is over once the dirty bitmap has been synced again after it.
  while (info.status !== 'active' || (info.ram?.['dirty-sync-count'] ?? 0) < 2) {
    expect(info.status, `pre-copy converged before the sentinel was filled\n${context()}`).not.toBe('completed');
    await sleep(100);
    info = await queryMigration(source, destination, deadline, context);
  }
  source.send(`fill ${hop}`);
  await waitForConsole(source, (l) => l.startsWith(`VUBLK-E2E: filled ${hop} `), `filled ${hop} ...`, 60_000, context);
  info = await queryMigration(source, destination, deadline, context);
  expect(info.status, `pre-copy converged before the sentinel was filled\n${context()}`).toBe('active');
  // Fast passes for a moment: QEMU syncs the dirty log every few milliseconds while the guest does I/O, so a
  // page the device writes after it was sent and that vublk failed to mark is likely to show below. (QEMU may
  // switch over on its own meanwhile: that is a switch-over like any other.)
  await source.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 * 1024 * 1024, 'downtime-limit': 1 });
  await sleep(1500);
  // Loopback is fast; let it converge now.
  await source.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 * 1024 * 1024, 'downtime-limit': 300 });
  while (info.status !== 'completed') {
    await sleep(200);
    info = await queryMigration(source, destination, deadline, context);
  }
  await waitForStatus(destination, 'paused', context);
  const lost = differingPages(guestRam(source), guestRam(destination));
  expect(
    lost.slice(0, 16),
    `${lost.length} guest pages differ between ${source.name} and ${destination.name} after the switch-over\n${context()}`,
  ).toEqual([]);
  await destination.qmp.execute('cont');
  await waitForStatus(destination, 'running', context);
  return info;
}

export interface HopResult {
  destination: Vm;
  info: MigrationInfo;
  /** The source's latest round when the migration started, and the destination's when the hop was done. */
  before: number;
  reached: number;
  /** One line for the test's report. */
  summary: string;
}

export interface HopOptions {
  dir: string;
  /** The destination QEMU's name and disk arguments. */
  name: string;
  disk: string[];
  cpus?: number;
  /** Every VM started is pushed here (the caller kills them at the end). */
  vms: Vm[];
  context: () => string;
}

/**
 * One live migration: starts the destination QEMU with -incoming, migrates the guest there, checks the
 * sentinel (carried only by the dirty log) and waits for ROUNDS_AFTER more rounds on the destination with
 * no FAIL on either side; then the source QEMU quits (its vhost-user session ends, its daemon stays up).
 */
export async function hopTo(source: Vm, hop: number, options: HopOptions): Promise<HopResult> {
  const { dir, name, disk, cpus, vms, context } = options;
  const port = await freePort();
  // Paused after the switch-over (as libvirt starts a destination), so its RAM can be compared first.
  const destination = await startVm({ name, dir, disk, incomingPort: port, cpus, extraArgs: ['-S'] });
  vms.push(destination);
  const before = latestRound(source);
  const info = await migrate(source, destination, port, hop, context);
  destination.send(`check ${hop}`);
  await waitForConsole(destination, (l) => l === `VUBLK-E2E: sentinel ${hop} ok`, `sentinel ${hop} ok`, 60_000, context);
  const reached = await waitForRounds(destination, before, ROUNDS_AFTER, context);
  expect(failures(source), context()).toEqual([]);
  await source.qmp.execute('quit').catch(() => undefined);
  const summary =
    `${source.name} → ${name}: ${info['total-time']} ms, downtime ${info.downtime} ms, ${info.ram?.['dirty-sync-count']} dirty syncs, ` +
    `${info.ram?.transferred} bytes; ${name} ran rounds ${before + 1}..${reached}`;
  return { destination, info, before, reached, summary };
}

export interface CancelResult {
  info: MigrationInfo;
  before: number;
  reached: number;
  summary: string;
}

/**
 * A failed migration: starts a destination QEMU with -incoming, migrates to it with pre-copy held open,
 * cancels with `migrate_cancel` once RAM is moving, and checks the source runs on and completes
 * ROUNDS_AFTER more rounds with no FAIL. The destination QEMU is killed.
 */
export async function cancelledHop(source: Vm, options: HopOptions): Promise<CancelResult> {
  const { dir, name, disk, cpus, vms, context } = options;
  const port = await freePort();
  const destination = await startVm({ name, dir, disk, incomingPort: port, cpus });
  vms.push(destination);
  await startHeldMigration(source, port);
  const deadline = Date.now() + MIGRATION_TIMEOUT_MS;
  let info = await queryMigration(source, destination, deadline, context);
  while (info.status !== 'active' || (info.ram?.transferred ?? 0) < 8 * 1024 * 1024) {
    expect(info.status, `pre-copy converged although it was held open\n${context()}`).not.toBe('completed');
    await sleep(100);
    info = await queryMigration(source, destination, deadline, context);
  }
  const before = latestRound(source);
  // query-migrate reports no RAM figures once cancelled: keep the last ones.
  const transferred = info.ram?.transferred;
  await source.qmp.execute('migrate_cancel');
  while (info.status !== 'cancelled') {
    expect(info.status, `the cancelled migration completed\n${context()}`).not.toBe('completed');
    await sleep(200);
    info = await queryMigration(source, destination, deadline, context, ['cancelled']);
  }
  await waitForStatus(source, 'running', context);
  await destination.kill();
  const reached = await waitForRounds(source, before, ROUNDS_AFTER, context);
  const summary = `${source.name} → ${name} cancelled after ${transferred} bytes of pre-copy; ${source.name} ran rounds ${before + 1}..${reached}`;
  return { info, before, reached, summary };
}

/**
 * Pauses the VM (`stop` drains its vhost-user rings: every write it submitted has completed in the back-end)
 * and returns the latest round it completed. The image then holds only whole writes of two round patterns.
 */
export async function pauseVm(vm: Vm, context: () => string): Promise<number> {
  await vm.qmp.execute('stop');
  const status = await vm.qmp.execute<{ status: string; running: boolean }>('query-status');
  expect(status.running, context()).toBe(false);
  expect(failures(vm), context()).toEqual([]);
  return latestRound(vm);
}

/** Starts `vublk serve --disk SPEC` (no metrics listener) and waits up to `timeoutMs` for its socket. */
export async function startServingDaemon(disk: string, socketPath: string, timeoutMs = 15_000): Promise<DaemonProcess> {
  const daemon = await startDaemon({ rawArgs: ['serve', '--disk', disk, '--metrics-listen', 'off'], waitForSocket: false });
  try {
    await waitForSocketFile(daemon, socketPath, timeoutMs);
  } catch (error) {
    await daemon.stop();
    throw error;
  }
  return daemon;
}

/**
 * The failure context: the tail of every console and daemon log (VUBLK_MIGRATION_DUMP=PREFIX also writes
 * them whole to PREFIX-NAME.log).
 */
export function migrationContext(vms: Vm[], daemons: DaemonProcess[]): () => string {
  return () => {
    const dump = process.env['VUBLK_MIGRATION_DUMP'];
    if (dump) {
      for (const vm of vms) writeFileSync(`${dump}-${vm.name}.log`, vm.output());
      daemons.forEach((d, i) => writeFileSync(`${dump}-daemon${i}.log`, d.output()));
    }
    return [
      ...vms.map((vm) => `--- ${vm.name} console:\n${vm.output().split('\n').slice(-30).join('\n')}`),
      ...daemons.map((d, i) => `--- daemon ${i} log:\n${d.output().split('\n').slice(-25).join('\n')}`),
    ].join('\n');
  };
}

/** The lifetime dirty-page counts each daemon logged at each ring stop. */
export function dirtyPagesLogged(daemons: DaemonProcess[]): unknown[][] {
  return daemons.map((d) =>
    d
      .logs()
      .filter((line) => line.msg === 'ring stopped')
      .map((line) => line['pagesLogged']),
  );
}
