// End to end over Ceph RBD: a real single-node cluster (test/support/ceph/micro-cluster.sh, started once for
// this file), an image made with `rbd create`, served by vublk (image=rbd:POOL/IMAGE,conf=,id=,keyring=) to a
// real QEMU guest that writes and reads back a pattern (checked with `rbd export`); a live resize the guest
// sees; vublk stopped with SIGTERM under I/O (lock released, restart at once) and killed with SIGKILL under
// I/O (restart waits for Ceph to expire the dead client's lock, ~30 s) with the flushed data intact after
// each. The cluster is shut down cleanly at the end. Skips with the reason when Ceph or QEMU is missing
// (fails under VUBLK_E2E_REQUIRED=1).
import { createHash } from 'node:crypto';
import http from 'node:http';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { guestReport, PATTERN_OFFSET, PATTERN_PATH, qemuAvailable, runGuest } from './qemu.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { cephMissing, startMicroCluster, type MicroCluster } from '../support/ceph/micro-cluster.js';
import { METRICS_ARGS, metricsUrl, queueCounts, scrape } from '../support/metrics-scrape.js';
import { runBench, verifyArgs, type BenchResult } from '../support/bench-run.js';
import { fillPattern, patternKey } from '../../bench/src/loadgen/pattern.js';

const MiB = 1024 * 1024;
const GUEST_TIMEOUT_MS = 100_000;
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';
const missing = cephMissing() ?? qemuAvailable();
if (missing !== null) console.warn(`RBD guest tests ${required ? 'cannot run' : 'skipped'}: ${missing}`);

function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

function bench(args: string[], timeoutMs = 90_000): Promise<BenchResult> {
  return runBench(args, timeoutMs);
}

function adminResize(adminSocket: string, disk: string, size: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        socketPath: adminSocket,
        path: `/admin/disks/${disk}/resize`,
        method: 'POST',
        timeout: 30_000,
        headers: { 'content-type': 'application/json' },
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (chunk: string) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on('error', reject);
    req.end(JSON.stringify({ size }));
  });
}

describe('vublk over Ceph RBD with a QEMU guest', () => {
  if (missing !== null) {
    if (required) it('Ceph and QEMU are available (VUBLK_E2E_REQUIRED=1)', () => expect.fail(missing));
    else it.skip(`not available: ${missing}`, () => undefined);
    return;
  }

  let cluster: MicroCluster;
  const daemons: DaemonProcess[] = [];

  beforeAll(async () => {
    cluster = await startMicroCluster();
    await cluster.run('rbd', ['create', '--size', '64M', 'rbd/vm1']);
  }, 260_000);

  afterEach(async () => {
    // A failed test must not leave its daemon holding the image's lock for the next one.
    await Promise.all(daemons.splice(0).map((d) => d.stop()));
  }, 30_000);

  afterAll(async () => {
    await Promise.all(daemons.map((d) => d.stop()));
    await cluster?.stop();
  }, 90_000);

  async function serveAt(socket: string, extra = '', timeoutMs = 20_000): Promise<DaemonProcess> {
    const daemon = await startDaemon({
      rawArgs: [
        'serve',
        ...METRICS_ARGS,
        '--disk',
        `name=vm1,image=rbd:rbd/vm1,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=${socket}${extra}`,
      ],
      waitForSocket: false,
    });
    daemons.push(daemon);
    await daemon.waitForLog((l) => l.msg === 'listening for a vhost-user front-end' || l.level >= 50, timeoutMs);
    expect(daemon.running(), daemon.output()).toBe(true);
    return daemon;
  }

  async function stop(daemon: DaemonProcess, signal: NodeJS.Signals): Promise<number | null> {
    if (!daemon.running()) {
      daemons.splice(daemons.indexOf(daemon), 1);
      return daemon.child.exitCode;
    }
    const exited = new Promise<number | null>((resolve) => daemon.child.once('exit', (code) => resolve(code)));
    daemon.child.kill(signal);
    const code = await exited;
    daemons.splice(daemons.indexOf(daemon), 1);
    return code;
  }

  it('the guest writes and reads back the pattern on two queues; rbd export has it', { timeout: 150_000 }, async () => {
    const socket = path.join(cluster.dir, '..', 'vm1.sock');
    const daemon = await serveAt(socket, ',num-queues=2');
    const ready = await daemon.waitForLog((l) => l.msg === 'disk ready');
    expect(ready['backend']).toBe('rbd');
    expect(ready['queuesPinned']).toBe(true);
    const result = await runGuest({ socketPath: socket, numQueues: 2, workload: 'rw', timeoutMs: GUEST_TIMEOUT_MS });
    const pattern = readFileSync(PATTERN_PATH);
    const report = guestReport(result.output);
    expect(report.verdict, `${result.output}\n${daemon.output().slice(-3000)}`).toBe(`PASS rw md5=${md5(pattern)}`);
    expect(report.sizeSectors).toBe((64 * MiB) / 512);
    const exported = await cluster.run('rbd', ['export', 'rbd/vm1', '-'], 60_000);
    expect(md5(exported.subarray(PATTERN_OFFSET, PATTERN_OFFSET + pattern.length))).toBe(md5(pattern));
    const counts = queueCounts(await scrape(await metricsUrl(daemon)), 0, 'vm1');
    expect(counts.ioErrors).toBe(0);

    // A second vublk on the same image is refused while the first holds the exclusive lock.
    const second = await startDaemon({
      rawArgs: [
        'serve',
        '--disk',
        `name=vm1,image=rbd:rbd/vm1,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=${socket}2,connect-timeout=10`,
      ],
      waitForSocket: false,
    });
    daemons.push(second);
    const code = await new Promise<number | null>((resolve, reject) => {
      if (!second.running()) return resolve(second.child.exitCode);
      const timer = setTimeout(() => reject(new Error(`the second daemon neither failed nor served:\n${second.output()}`)), 60_000);
      second.child.once('exit', (c) => {
        clearTimeout(timer);
        resolve(c);
      });
    });
    daemons.splice(daemons.indexOf(second), 1);
    expect(code).not.toBe(0);
    expect(second.output()).toMatch(/VUBLK_ERR_RBD_LOCKED|is in use: another client holds its exclusive lock/);
    await stop(daemon, 'SIGTERM');
  });

  it('start-up errors name the cause: no such image, unreadable keyring, a read-only client writing', { timeout: 120_000 }, async () => {
    const cases: [string, RegExp, RegExp][] = [
      [
        `image=rbd:rbd/missing,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring}`,
        /"code":"VUBLK_ERR_RBD_NO_IMAGE"/,
        /image 'missing' does not exist in pool 'rbd'/,
      ],
      [`image=rbd:rbd/vm1,conf=${cluster.conf},id=vublk,keyring=${cluster.dir}/no.keyring`, /"code":"VUBLK_ERR_RBD_AUTH"/, /no\.keyring/],
      [
        `image=rbd:rbd/vm1,conf=${cluster.conf},id=reader,keyring=${cluster.readerKeyring}`,
        /"code":"VUBLK_ERR_RBD_(PERMISSION|LOCKED)"/,
        /client\.reader/,
      ],
    ];
    for (const [disk, code, message] of cases) {
      const daemon = await startDaemon({
        rawArgs: [
          'serve',
          '--metrics-listen',
          'off',
          '--disk',
          `${disk},socket=${path.join(cluster.dir, '..', 'err.sock')},connect-timeout=10`,
        ],
        waitForSocket: false,
      });
      daemons.push(daemon);
      const exit = await new Promise<number | null>((resolve, reject) => {
        if (!daemon.running()) return resolve(daemon.child.exitCode);
        const timer = setTimeout(() => reject(new Error(`vublk did not fail:\n${daemon.output()}`)), 60_000);
        daemon.child.once('exit', (c) => {
          clearTimeout(timer);
          resolve(c);
        });
      });
      daemons.splice(daemons.indexOf(daemon), 1);
      expect(exit, daemon.output()).not.toBe(0);
      expect(daemon.output()).toMatch(code);
      expect(daemon.output()).toMatch(message);
    }
  });

  it('a live resize from the admin API reaches the running guest and the cluster', { timeout: 150_000 }, async () => {
    const socket = path.join(cluster.dir, '..', 'vm1.sock');
    const daemon = await serveAt(socket);
    const adminSocket = path.join(path.dirname(socket), 'vm1.admin.sock');
    let resize: Promise<{ status: number; body: string }> | null = null;
    const result = await runGuest({
      socketPath: socket,
      workload: 'resize',
      timeoutMs: GUEST_TIMEOUT_MS,
      onOutput: (output) => {
        if (resize === null && /VUBLK-E2E: size=\d+/.test(output)) resize = adminResize(adminSocket, 'vm1', '128M');
      },
    });
    expect(resize, 'the guest never reported its size').not.toBeNull();
    const reply = await resize!;
    expect(reply.status, reply.body).toBe(200);
    expect(guestReport(result.output).verdict, `${result.output}\n${daemon.output().slice(-3000)}`).toBe('PASS resize size=262144');
    const info = JSON.parse((await cluster.run('rbd', ['info', '--format', 'json', 'rbd/vm1'])).toString()) as { size: number };
    expect(info.size).toBe(128 * MiB);
    await stop(daemon, 'SIGTERM');
  });

  it('live-migration lock handover: two vublk with lock=none write in turn, librbd hands the lock over each time', {
    timeout: 120_000,
  }, async () => {
    const source = path.join(cluster.dir, '..', 'src.sock');
    const target = path.join(cluster.dir, '..', 'dst.sock');
    await serveAt(source, ',lock=none');
    await serveAt(target, ',lock=none');
    const run = async (socket: string, seed: number): Promise<void> => {
      const result = await bench(verifyArgs(socket, { size: '4M', bs: '64k', iodepth: 8, seed: seed }));
      expect(result.code, result.stdout + result.stderr).toBe(0);
    };
    await run(source, 51); // the source writes (takes the lock)
    await run(target, 52); // switch-over: the destination's writes take it over
    await run(source, 53); // a failed migration: the source takes it back
    const expected = new Uint8Array(4 * MiB);
    fillPattern(expected, 0, patternKey(53));
    const image = await cluster.run('rbd', ['export', 'rbd/vm1', '-'], 90_000);
    expect(Buffer.from(expected).equals(image.subarray(0, 4 * MiB))).toBe(true);
  });

  it('SIGTERM under I/O releases the lock (restart at once); SIGKILL under I/O: the restart waits for the lock; flushed data survives both', {
    timeout: 200_000,
  }, async () => {
    const socket = path.join(cluster.dir, '..', 'vm1.sock');
    let daemon = await serveAt(socket, ',num-queues=2');
    // Flushed data over the first 64 MiB; the random writes below stay in the first 32 MiB, so the pattern
    // in [32 MiB, 64 MiB) must be there after every stop.
    const written = await bench(verifyArgs(socket, { size: '64M', bs: '128k', queues: 2, iodepth: 8, seed: 31 }));
    expect(written.code, written.stdout + written.stderr).toBe(0);
    const expected = new Uint8Array(32 * MiB);
    fillPattern(expected, 32 * MiB, patternKey(31));

    for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
      const base = await metricsUrl(daemon);
      const before = queueCounts(await scrape(base), 0, 'vm1').writes;
      const load = bench(
        [
          '--socket',
          socket,
          '--rw',
          'randwrite',
          '--size',
          '32M',
          '--bs',
          '4k',
          '--queues',
          '2',
          '--iodepth',
          '16',
          '--runtime',
          '30',
          '--timeout',
          '5000',
        ],
        60_000,
      );
      const deadline = Date.now() + 30_000;
      while (queueCounts(await scrape(base), 0, 'vm1').writes < before + 100) {
        if (Date.now() > deadline) throw new Error(`no random writes reached the image:\n${daemon.output().slice(-2000)}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const code = await stop(daemon, signal);
      if (signal === 'SIGTERM') expect(code, daemon.output().slice(-2000)).toBe(0);
      const interrupted = await load;
      expect(interrupted.code, 'the load generator should have lost its back-end').not.toBe(0);
      const restartedAt = Date.now();
      // After SIGKILL the dead client's lock must expire first (its watch times out: osd_client_watch_timeout, 30 s).
      daemon = await serveAt(socket, ',num-queues=2', 90_000);
      const waited = (Date.now() - restartedAt) / 1000;
      console.log(`[e2e rbd] restart after ${signal} under I/O: serving again after ${waited.toFixed(1)} s`);
      if (signal === 'SIGTERM') expect(waited).toBeLessThan(20);
      const image = await cluster.run('rbd', ['export', 'rbd/vm1', '-'], 90_000);
      expect(Buffer.from(expected).equals(image.subarray(32 * MiB, 64 * MiB)), `flushed data lost after ${signal}`).toBe(true);
      // And I/O works again.
      const check = await bench(verifyArgs(socket, { size: '4M', bs: '4k', queues: 2, iodepth: 8, seed: 41 }));
      expect(check.code, check.stdout + check.stderr).toBe(0);
    }
    await stop(daemon, 'SIGTERM');
  });
});
