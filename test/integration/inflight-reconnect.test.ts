// Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) against the real daemon: kill -9 while requests
// are in flight, a new daemon on the same socket and image, the front-end reconnecting like QEMU with
// reconnect=1 (same rings and outstanding requests, base = used.idx, the kept inflight region handed back
// with SET_INFLIGHT_FD). Every request must complete exactly once (the front-end's used-ring check throws on
// a completion of a head that is not in flight) and with its data on the image.
//
// How requests are kept in flight at the kill: large O_DIRECT writes (--cache none) on an image on the host
// disk; the io_uring engine submits the whole batch at once and completions trickle in, so the daemon is
// killed as soon as the first completion is seen, with most of the batch still in the kernel. Whether a given
// round caught requests in flight depends on timing, so the test requires it of the rounds together (from the
// new daemons' "inflight requests resumed" lines): a run where nothing was ever resumed fails.
import { afterAll, describe, expect, it } from 'vitest';
import { rmSync } from 'node:fs';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { InflightKeeper, VhostUserFrontend, VirtioBlkDriver, type BlkSubmission } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { KiB, MiB, errorLogs, pattern, sectorBytes, sleep, waitForExit, waitUntil } from '../support/session-harness.js';

const ROUNDS = 3;
const REQUESTS = 96;
const REQUEST_BYTES = 512 * KiB;
const SECTORS_PER_REQUEST = REQUEST_BYTES / 512;

const started: DaemonProcess[] = [];
const keeper = new InflightKeeper();
let frontend: VhostUserFrontend | undefined;

afterAll(async () => {
  frontend?.close();
  keeper.drop();
  for (const daemon of started) {
    if (daemon.running()) await daemon.stop();
    rmSync(daemon.dir, { recursive: true, force: true });
  }
});

async function startOn(socketPath: string, imagePath: string): Promise<DaemonProcess> {
  const daemon = await startDaemon({
    rawArgs: [
      'serve',
      '--socket',
      socketPath,
      '--image',
      imagePath,
      '--size',
      '256M',
      '--cache',
      'none',
      '--num-queues',
      '2',
      '--metrics-listen',
      'off',
    ],
    waitForSocket: false,
  });
  started.push(daemon);
  // Its own directory is not where the socket is: wait for the line that says it listens.
  await daemon.waitForLog((line) => line.msg === 'listening for a vhost-user front-end', 15_000);
  return daemon;
}

function resumedCount(daemon: DaemonProcess): number {
  let total = 0;
  for (const line of daemon.logs()) {
    if (line.msg !== 'inflight requests resumed') continue;
    const match = /^(\d+) requests resubmitted/.exec(String(line['reason']));
    total += match ? Number(match[1]) : 0;
  }
  return total;
}

describe('kill -9 with requests in flight', () => {
  it(`${ROUNDS} kills: every request completes exactly once with its data`, { timeout: 240_000 }, async () => {
    let daemon = await startDaemon({ size: '256M', args: ['--cache', 'none', '--num-queues', '2', '--metrics-listen', 'off'] });
    started.push(daemon);
    const { socketPath, imagePath } = daemon;
    frontend = await VhostUserFrontend.connect(socketPath, {
      timeoutMs: 20_000,
      numQueues: 2,
      queueSize: 128,
      memory: [{ gpa: 0, size: 256 * MiB }],
      protocol: { inflight: keeper },
    });
    expect(keeper.held, 'the front-end got an inflight region (GET_INFLIGHT_FD)').toBe(true);
    const blk = new VirtioBlkDriver(frontend);
    const resumedPerRound: number[] = [];

    for (let round = 0; round < ROUNDS; round++) {
      const submissions: BlkSubmission[] = [];
      const sectorOf = (i: number): number => (round * REQUESTS + i) * SECTORS_PER_REQUEST;
      for (let i = 0; i < REQUESTS; i++) {
        const queue = i % 2;
        submissions.push(
          blk.submit(
            { type: BlkRequestType.OUT, sector: sectorOf(i), out: pattern(round * 1000 + i, REQUEST_BYTES) },
            { queue, kick: i >= REQUESTS - 2, indirect: true },
          ),
        );
      }
      // Kill as soon as the daemon has completed anything: the rest of the batch is in the kernel or the ring.
      const ring0 = frontend.queue(0).ring;
      const usedBefore = ring0.usedIdx;
      await waitUntil(() => ring0.usedIdx !== usedBefore, 20_000, 'a first completion', 1);
      daemon.child.kill('SIGKILL');
      await waitForExit(daemon.child, 10_000);
      expect(errorLogs(daemon), `round ${round}: the killed daemon logged errors`).toEqual([]);

      daemon = await startOn(socketPath, imagePath);
      await frontend.reconnect(20_000);
      const completions = await blk.wait(submissions, 60_000);
      completions.forEach((c, i) => expect(c.status, `round ${round} request ${i}`).toBe(BlkStatus.OK));
      // Nothing more arrives: no request was completed twice (a second used entry of a head no longer in
      // flight would make the driver throw).
      await sleep(200);
      for (let q = 0; q < 2; q++) expect(frontend.queue(q).poll(), `round ${round} queue ${q}: late used entries`).toEqual([]);
      for (let q = 0; q < 2; q++) expect(frontend.queue(q).inflight, `round ${round} queue ${q}: chains still out`).toBe(0);

      for (let i = 0; i < REQUESTS; i++) {
        const expected = pattern(round * 1000 + i, REQUEST_BYTES);
        expect(sectorBytes(imagePath, sectorOf(i), REQUEST_BYTES).equals(expected), `round ${round} request ${i} on the image`).toBe(true);
        if (i % 8 === 0)
          expect(
            (await blk.read(sectorOf(i), REQUEST_BYTES, { queue: 1 - (i % 2) })).equals(expected),
            `round ${round} request ${i} read back`,
          ).toBe(true);
      }
      resumedPerRound.push(resumedCount(daemon));
      expect(errorLogs(daemon), `round ${round}: the new daemon logged errors`).toEqual([]);
    }
    // The point of the test: at least one kill left requests for the next daemon to resubmit.
    const resumed = resumedPerRound.reduce((a, b) => a + b, 0);
    expect(resumed, `requests resubmitted from the inflight region per round: ${resumedPerRound.join(', ')}`).toBeGreaterThan(0);
    if (process.env['VUBLK_TEST_VERBOSE'] === '1') console.info(`resubmitted per round: ${resumedPerRound.join(', ')}`);
  });
});
