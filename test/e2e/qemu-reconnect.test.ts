// End to end: vublk dies or restarts under a running QEMU 7.2 guest that writes and reads back with O_DIRECT
// (the `reconnect` workload of build-guest.sh), and QEMU (`-chardev socket,…,reconnect=1`) reattaches to the
// next daemon.
// - kill -9 three times: the requests the dead daemon had in flight are resubmitted by the next one from the
//   inflight region QEMU keeps (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD). Each kill waits until the region (read
//   through QEMU's fd in /proc) shows a request marked in flight. No I/O error, no mismatch, no hang, progress
//   after each restart, and at least one resubmission.
// - SIGTERM → restart three times under systemd socket activation: the listening socket comes from the real
//   systemd-socket-activate and outlives every daemon (a supervisor holds it as fd 3 and starts vublk on it
//   again with LISTEN_FDS/LISTEN_PID, as a .socket unit does across `systemctl restart`), so QEMU's reconnect
//   is never refused. No I/O error, no mismatch, every daemon exits 0.
// The image is on the host disk with O_DIRECT (--cache directsync / none), so the io_uring engine really has
// requests in flight; the guest runs four writers at once.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { directIoDir } from '../support/host-disk.js';
import { waitForSocketFile } from '../support/daemon-process.js';
import { guestReport, qemuAvailable, runGuest, type GuestResult } from './qemu.js';

const CLI = fileURLToPath(new URL('../../dist/src/cli.js', import.meta.url));
const ROUNDS = 10;
const RESTARTS = 3;
/** Restart n happens while round FIRST_RESTART_ROUND + n * ROUNDS_BETWEEN writes. */
const FIRST_RESTART_ROUND = 2;
const ROUNDS_BETWEEN = 2;
const GUEST_TIMEOUT_MS = 240_000;
const TEST_TIMEOUT_MS = 300_000;

const unavailable = qemuAvailable();
const required = process.env.VUBLK_E2E_REQUIRED === '1';
const socketActivate =
  spawnSync('systemd-socket-activate', ['--help'], { encoding: 'utf8' }).error === undefined
    ? null
    : 'systemd-socket-activate is not installed';
if (unavailable !== null) console.warn(`QEMU reconnect tests ${required ? 'cannot run' : 'skipped'}: ${unavailable}`);

if (required && (unavailable !== null || socketActivate !== null)) {
  it('QEMU, the test guest and systemd-socket-activate are available (VUBLK_E2E_REQUIRED=1)', () => {
    expect.fail(unavailable ?? socketActivate ?? '');
  });
}

const dirs: string[] = [];
const children: ChildProcess[] = [];
afterAll(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  for (const dir of dirs) await rm(dir, { recursive: true, force: true });
});

async function workDir(): Promise<string> {
  const dir = await mkdtemp(path.join(directIoDir() ?? os.tmpdir(), 'vublk-e2e-reconnect-'));
  dirs.push(dir);
  return dir;
}

/** directsync (O_DIRECT + O_DSYNC): each write lasts until it is durable, so requests are in flight longer. */
function vublkArgs(socketPath: string, imagePath: string, dir: string, cache = 'none'): string[] {
  return [
    'serve',
    '--socket',
    socketPath,
    '--image',
    imagePath,
    '--size',
    '64M',
    '--cache',
    cache,
    '--metrics-listen',
    'off',
    '--admin-socket',
    path.join(dir, 'admin.sock'),
  ];
}

/** The round the guest writes now (from its last "ROUND n writing" line), -1 before the first. */
/** The inflight memfd QEMU keeps for the disk on `socketPath`, as a /proc path, or null. */
function qemuInflightFd(socketPath: string): string | null {
  for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(socketPath)) continue;
      for (const fd of readdirSync(`/proc/${pid}/fd`)) {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/memfd:vublk-inflight')) return `/proc/${pid}/fd/${fd}`;
      }
    } catch {
      // The process went away, or it is not ours to read.
    }
  }
  return null;
}

/** Resolves once queue 0 of the region has a descriptor marked in flight, or after `timeoutMs`. */
async function untilMarked(socketPath: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const file = qemuInflightFd(socketPath);
  while (file !== null && Date.now() < deadline) {
    try {
      const region = readFileSync(file);
      // Queue 0's descriptor states: 16-byte header, then 16 bytes each, flag first.
      for (let offset = 16; offset + 16 <= region.length && offset < 16 + 16 * 128; offset += 16) if (region[offset] === 1) return;
    } catch {
      return;
    }
    await new Promise((resolve) => setImmediate(resolve));
  }
}

function shellQuote(text: string): string {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function currentRound(output: string): number {
  const rounds = [...output.matchAll(/^VUBLK-E2E: ROUND (\d+) writing/gm)];
  return rounds.length === 0 ? -1 : Number(rounds[rounds.length - 1]![1]);
}

function progressed(output: string): number {
  const lines = [...output.matchAll(/^VUBLK-E2E: PROGRESS (\d+)/gm)];
  return lines.length === 0 ? -1 : Number(lines[lines.length - 1]![1]);
}

/** Restart n is due once the guest writes round FIRST_RESTART_ROUND + n * ROUNDS_BETWEEN. */
function restartDue(output: string, done: number): boolean {
  return done < RESTARTS && currentRound(output) >= FIRST_RESTART_ROUND + done * ROUNDS_BETWEEN;
}

/**
 * Boots the reconnect workload on `socketPath` and calls `restart` once per due restart (one at a time: the
 * next waits until `done`). `index` counts the restarts before this one. Returns the guest's result and the
 * round of each restart.
 */
async function runRestartingGuest(
  socketPath: string,
  restart: (index: number, done: () => void) => void,
): Promise<{ result: GuestResult; restartedAt: number[] }> {
  const restartedAt: number[] = [];
  let restarting = false;
  const result = await runGuest({
    socketPath,
    workload: 'reconnect',
    reconnectSeconds: 1,
    kernelArgs: [`vublk.rounds=${ROUNDS}`],
    timeoutMs: GUEST_TIMEOUT_MS,
    onOutput: (output) => {
      if (restarting || !restartDue(output, restartedAt.length)) return;
      restarting = true;
      const round = currentRound(output);
      restart(restartedAt.length, () => {
        restartedAt.push(round);
        restarting = false;
      });
    },
  });
  return { result, restartedAt };
}

function context(result: GuestResult, log: string): string {
  return [
    `guest console (exit ${result.exitCode}${result.timedOut ? ', timed out' : ''}):`,
    result.output,
    'daemon logs (tail):',
    log.split('\n').slice(-60).join('\n'),
  ].join('\n');
}

function checkGuest(result: GuestResult, log: string, restartedAt: number[]): void {
  const why = context(result, log);
  expect(guestReport(result.output).verdict, why).toBe(`PASS reconnect rounds=${ROUNDS}`);
  expect(result.output, why).not.toMatch(/I\/O error/i);
  expect(restartedAt, why).toHaveLength(RESTARTS);
  // Progress after each restart: the guest completed rounds after it (the next restart waits for a later round).
  const progress = [...result.output.matchAll(/^VUBLK-E2E: PROGRESS (\d+)/gm)].map((m) => Number(m[1]));
  for (const at of restartedAt)
    expect(
      progress.some((round) => round > at),
      `progress after the restart during round ${at}\n${why}`,
    ).toBe(true);
}

describe.skipIf(unavailable !== null)('vublk restarted under a QEMU guest (reconnect=1)', () => {
  it(`kill -9 ${RESTARTS} times: in-flight requests are resubmitted from the inflight region`, { timeout: TEST_TIMEOUT_MS }, async () => {
    const dir = await workDir();
    const socketPath = path.join(dir, 'vublk.sock');
    const imagePath = path.join(dir, 'disk.img');
    let log = '';
    let daemon: ChildProcess;
    const start = async (): Promise<ChildProcess> => {
      const child = spawn(process.execPath, [CLI, ...vublkArgs(socketPath, imagePath, dir, 'directsync')], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      children.push(child);
      child.stdout?.setEncoding('utf8').on('data', (text: string) => (log += text));
      child.stderr?.setEncoding('utf8').on('data', (text: string) => (log += text));
      const deadline = Date.now() + 20_000;
      const before = log.length;
      while (!log.slice(before).includes('listening for a vhost-user front-end')) {
        if (Date.now() > deadline || child.exitCode !== null) throw new Error(`vublk did not start; log:\n${log}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      return child;
    };
    daemon = await start();

    const { result, restartedAt } = await runRestartingGuest(socketPath, (_index, done) => {
      // Into the round's writes (64 KiB O_DIRECT each): killed the moment QEMU's inflight region shows a
      // request marked (watched through QEMU's fd), or after 2 s of looking.
      void untilMarked(socketPath, 2_000).then(() => {
        const victim = daemon;
        victim.once('exit', () => {
          start()
            .then((next) => (daemon = next))
            .catch((error: unknown) => (log += `\nRESTART FAILED: ${String(error)}\n`))
            .finally(done);
        });
        victim.kill('SIGKILL');
      });
    });
    const resumed = [...log.matchAll(/"reason":"(\d+) requests resubmitted/g)].map((m) => Number(m[1]));
    const regions = [...log.matchAll(/"msg":"inflight region set"/g)].length;
    if (process.env['VUBLK_TEST_VERBOSE'] === '1') {
      console.info(
        `kill -9 during rounds ${restartedAt.join(', ')}; inflight regions set ${regions}; resubmitted per resume: ${resumed.join(', ') || 'none'}; last progress ${progressed(result.output)}`,
      );
      if (process.env['VUBLK_TEST_DUMP'] === '1') console.info(log);
    }
    // QEMU handed the region to every daemon: the first, and each one after a kill.
    expect(regions, context(result, log)).toBeGreaterThanOrEqual(RESTARTS + 1);
    checkGuest(result, log, restartedAt);
    // Kills are timed on a marked request, so the next daemon had something to resubmit at least once.
    expect(resumed.length, `resubmissions after the kills\n${context(result, log)}`).toBeGreaterThan(0);
    daemon.kill('SIGTERM');
  });

  it.skipIf(socketActivate !== null)(
    `SIGTERM → restart ${RESTARTS} times with the socket kept by systemd socket activation`,
    { timeout: TEST_TIMEOUT_MS },
    async () => {
      const dir = await workDir();
      const socketPath = path.join(dir, 'vublk.sock');
      const imagePath = path.join(dir, 'disk.img');
      // What a .socket unit does across `systemctl restart`: the listening socket (fd 3, from
      // systemd-socket-activate) stays open here while vublk is started on it again and again.
      const supervisor = path.join(dir, 'supervisor.sh');
      await writeFile(
        supervisor,
        [
          '#!/bin/sh',
          'n=0',
          `while [ $n -lt ${RESTARTS + 1} ]; do`,
          // LISTEN_PID must name the process that reads it: the shell's pid, which exec hands to node.
          // systemd-socket-activate passes no environment through, so the paths are written in.
          `  sh -c 'echo "SUPERVISOR-PID $$"; LISTEN_PID=$$; export LISTEN_PID; exec "$@"' vublk ${shellQuote(process.execPath)} ${shellQuote(CLI)} "$@"`,
          '  echo "SUPERVISOR-EXIT $?"',
          '  n=$((n + 1))',
          'done',
          '',
        ].join('\n'),
        { mode: 0o755 },
      );
      let log = '';
      const activator = spawn(
        'systemd-socket-activate',
        ['-l', socketPath, '/bin/sh', supervisor, ...vublkArgs(socketPath, imagePath, dir)],
        {
          stdio: ['ignore', 'pipe', 'pipe'],
        },
      );
      children.push(activator);
      activator.stdout?.setEncoding('utf8').on('data', (text: string) => (log += text));
      activator.stderr?.setEncoding('utf8').on('data', (text: string) => (log += text));
      const pids = (): number[] => [...log.matchAll(/^SUPERVISOR-PID (\d+)$/gm)].map((m) => Number(m[1]));
      const exits = (): number[] => [...log.matchAll(/^SUPERVISOR-EXIT (\d+)$/gm)].map((m) => Number(m[1]));
      // systemd-socket-activate binds now and starts the supervisor at the first connection (QEMU's).
      await waitForSocketFile({ running: () => activator.exitCode === null, output: () => log }, socketPath, 20_000);

      const { result, restartedAt } = await runRestartingGuest(socketPath, (index, done) => {
        setTimeout(
          () => {
            const pid = pids().at(-1);
            try {
              if (pid !== undefined) process.kill(pid, 'SIGTERM');
            } catch (error) {
              log += `\nSIGTERM FAILED: ${String(error)}\n`;
            }
            done();
          },
          300 + 250 * index,
        );
      });
      // The last daemon: a clean stop ends the supervisor's loop, and systemd-socket-activate with it.
      const last = pids().at(-1);
      try {
        if (last !== undefined) process.kill(last, 'SIGTERM');
      } catch {
        // Already gone: the checks below say why.
      }
      const ended = Date.now() + 20_000;
      while (activator.exitCode === null && activator.signalCode === null && Date.now() < ended)
        await new Promise((resolve) => setTimeout(resolve, 100));
      if (process.env['VUBLK_TEST_VERBOSE'] === '1')
        console.info(
          `SIGTERM during rounds ${restartedAt.join(', ')}; daemon exits ${exits().join(', ')}; last progress ${progressed(result.output)}`,
        );
      checkGuest(result, log, restartedAt);
      const why = context(result, log);
      expect(pids(), why).toHaveLength(RESTARTS + 1);
      expect(exits(), `every daemon exits 0 on SIGTERM\n${why}`).toEqual(new Array<number>(RESTARTS + 1).fill(0));
      // The socket never went away: QEMU's reconnects were never refused.
      expect(result.output, why).not.toMatch(/Connection refused|No such file or directory/);
    },
  );
});
