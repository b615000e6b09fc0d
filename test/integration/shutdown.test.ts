// Shutdown of a real daemon process after real front-ends have used it: SIGTERM syncs the images, logs
// `stopped` and exits 0 (also without a metrics listener keeping the event loop alive), with several disks
// whose rings ran on shared workers; a second signal exits at once.
import { afterEach, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import {
  KiB,
  MiB,
  connect,
  disconnects,
  errorLogs,
  pattern,
  sectorBytes,
  useCleanups,
  waitForDisconnects,
  waitForExit,
  waitUntil,
} from '../support/session-harness.js';

const defer = useCleanups();

/** Sends SIGTERM and waits (bounded) for the exit. */
async function terminate(daemon: DaemonProcess, timeoutMs: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  daemon.child.kill('SIGTERM');
  return waitForExit(daemon.child, timeoutMs);
}

describe('shutdown', () => {
  const daemons: DaemonProcess[] = [];
  afterEach(async () => {
    // stop() SIGKILLs what a failed test left running.
    for (const d of daemons.splice(0)) await d.stop();
  });

  it('SIGTERM without a metrics listener, after a front-end came and went: `stopped` is logged and the exit is 0', {
    timeout: 60_000,
  }, async () => {
    const daemon = await startDaemon({ size: '16M', args: ['--metrics-listen', 'off', '--num-queues', '2'] });
    daemons.push(daemon);
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2, memory: [{ gpa: 0, size: 8 * MiB }] });
    const data = pattern(7, 4 * KiB);
    await blk.write(64, data, { queue: 1 });
    const seen = disconnects(daemon);
    frontend.close();
    await waitForDisconnects(daemon, seen + 1);

    const exit = await terminate(daemon, 20_000);
    expect(exit, daemon.output().slice(-3000)).toEqual({ code: 0, signal: null });
    const messages = daemon.logs().map((l) => l.msg);
    expect(messages).toContain('shutting down');
    expect(messages.at(-1)).toBe('stopped');
    expect(sectorBytes(daemon.imagePath, 64, data.length).equals(data)).toBe(true);
    expect(errorLogs(daemon)).toEqual([]);
  });

  it('SIGTERM after 4 disks × 2 queues were each used in turn for a second of 4 KiB reads exits 0 in time', {
    timeout: 90_000,
  }, async () => {
    const daemon = await startFourDisks(daemons);
    for (let i = 0; i < 4; i++) {
      const frontend = await connectTwoQueues(daemon, i);
      const blk = new VirtioBlkDriver(frontend);
      const until = Date.now() + 1000;
      let reads = 0;
      while (Date.now() < until) {
        await Promise.all([blk.read((reads % 512) * 8, 4 * KiB, { queue: 0 }), blk.read(((reads + 7) % 512) * 8, 4 * KiB, { queue: 1 })]);
        reads += 2;
      }
      expect(reads).toBeGreaterThan(0);
      const seen = disconnects(daemon);
      frontend.close();
      await waitForDisconnects(daemon, seen + 1);
    }

    const pid = daemon.child.pid as number;
    const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    console.log(
      `[shutdown] after 4 disks used in turn: ${readdirSync(`/proc/${pid}/task`).length} threads, RSS ${Math.round(Number(rss) / 1024)} MiB`,
    );
    const exit = await terminate(daemon, 20_000);
    expect(exit, daemon.output().slice(-3000)).toEqual({ code: 0, signal: null });
    expect(daemon.logs().at(-1)?.msg).toBe('stopped');
    expect(errorLogs(daemon)).toEqual([]);
  });

  it('a second SIGTERM during shutdown exits at once, even with front-ends connected to several disks', { timeout: 60_000 }, async () => {
    const daemon = await startFourDisks(daemons);
    for (let i = 0; i < 4; i++) {
      const frontend = await connectTwoQueues(daemon, i);
      defer(() => frontend.close());
      await new VirtioBlkDriver(frontend).read(0, 4 * KiB, { queue: i % 2 });
    }
    // Both signals before the daemon can have finished the first shutdown: the second one ends it.
    daemon.child.kill('SIGTERM');
    daemon.child.kill('SIGTERM');
    const exit = await waitForExit(daemon.child, 10_000);
    const messages = daemon.logs().map((l) => l.msg);
    if (messages.includes('second signal: exiting immediately')) expect(exit).toEqual({ code: 1, signal: null });
    else expect(exit, daemon.output().slice(-3000)).toEqual({ code: 0, signal: null });
  });
});

/** A daemon serving 4 disks of 2 queues each (sockets s0..s3.sock), once every socket exists; pushed to `daemons` for clean-up. */
async function startFourDisks(daemons: DaemonProcess[]): Promise<DaemonProcess> {
  const args = ['serve', '--metrics-listen', 'off'];
  for (let i = 0; i < 4; i++) args.push('--disk', `name=d${i},image=d${i}.img,socket=s${i}.sock,num-queues=2,size=16M`);
  const daemon = await startDaemon({ rawArgs: args, waitForSocket: false });
  daemons.push(daemon);
  await waitUntil(() => [0, 1, 2, 3].every((i) => existsSync(path.join(daemon.dir, `s${i}.sock`))), 20_000, 'every socket');
  return daemon;
}

function connectTwoQueues(daemon: DaemonProcess, disk: number): Promise<VhostUserFrontend> {
  return VhostUserFrontend.connect(path.join(daemon.dir, `s${disk}.sock`), {
    numQueues: 2,
    timeoutMs: 10_000,
    memory: [{ gpa: 0, size: 8 * MiB }],
  });
}
