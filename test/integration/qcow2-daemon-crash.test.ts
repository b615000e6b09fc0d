/**
 * Crash consistency of qcow2 through the real daemon (`npm run build` first), under $VUBLK_IO_ENGINE:
 * the daemon serving a qcow2 (64 KiB clusters, 2 queues) is killed with SIGKILL during a write-heavy run,
 * ITERATIONS times on the same image. Each run: rounds of non-overlapping 4 KiB-block writes followed by a
 * FLUSH, then a burst of writes left in flight and the kill after a random delay. After each kill:
 * `qemu-img check` reports no corruption (leaks are allowed: clusters allocated for writes that never
 * committed), and every 4 KiB block holds what the last write acknowledged before the last completed FLUSH
 * wrote, or what a later write wrote (never a torn or foreign block). SIGKILL keeps the page cache, so this
 * checks the order of metadata updates, not power loss. QCOW2_DAEMON_CRASH_SEED replays a run.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlkStatus, SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import { VhostUserFrontend, VirtioBlkDriver, type BlkSubmission } from '../../bench/src/frontend/index.js';
import { startDaemon, waitForSocketFile } from '../support/daemon-process.js';
import { hasQemuImg } from '../support/qcow2-harness.js';
import { Prng, seedFromEnv } from '../support/prng.js';

const SEED = seedFromEnv('QCOW2_DAEMON_CRASH_SEED');
const ITERATIONS = Number(process.env['QCOW2_DAEMON_CRASH_ITERATIONS'] ?? 20);
const BLOCK = 4096;
const DISK = 32 * 1024 * 1024;
const BLOCKS = DISK / BLOCK;
const QUEUES = 2;
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** Block content: (id, block index) repeated; id 0 = a zero block. */
function blockData(id: number, block: number): Buffer {
  const data = Buffer.alloc(BLOCK);
  for (let at = 0; at < BLOCK; at += 8) {
    data.writeUInt32LE(id, at);
    data.writeUInt32LE(block, at + 4);
  }
  return data;
}

/** What a block that is neither one write's pattern nor zeroes holds: runs of (id, block) words by byte offset. */
function describeBlock(bytes: Buffer, block: number): string {
  const base = block * BLOCK;
  const runs: string[] = [];
  let start = 0;
  let current = '';
  for (let at = 0; at <= BLOCK; at += 8) {
    const word = at < BLOCK ? `id ${bytes.readUInt32LE(base + at)} block ${bytes.readUInt32LE(base + at + 4)}` : '';
    if (word !== current) {
      if (at > 0) runs.push(`[${start}, ${at}): ${current}`);
      start = at;
      current = word;
    }
  }
  return runs.join('; ');
}

/** The id a block holds, or -1 when it is neither zero nor one whole write of this block. */
function blockId(bytes: Buffer, block: number): number {
  const base = block * BLOCK;
  const id = bytes.readUInt32LE(base);
  if (id === 0) return bytes.subarray(base, base + BLOCK).every((b) => b === 0) ? 0 : -1;
  for (let at = 0; at < BLOCK; at += 8) {
    if (bytes.readUInt32LE(base + at) !== id || bytes.readUInt32LE(base + at + 4) !== block) return -1;
  }
  return id;
}

/**
 * `qemu-img check --output=json` (exit 3 = leaks only: the JSON is on stdout all the same). A killed
 * daemon's io_uring is torn down asynchronously by the kernel and holds the image's open file description,
 * and with it the OFD locks, for a moment after the process is gone: "Failed to get shared lock" is retried.
 */
async function checkReport(image: string, iteration: number): Promise<Record<string, unknown>> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return JSON.parse(
        execFileSync('qemu-img', ['check', '--output=json', image], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }),
      ) as Record<string, unknown>;
    } catch (error) {
      const { stdout = '', stderr = '' } = error as { stdout?: string; stderr?: string };
      if (stdout.trim() !== '') return JSON.parse(stdout) as Record<string, unknown>;
      if (!/lock/.test(stderr) || Date.now() > deadline)
        throw new Error(`iteration ${iteration}, seed ${SEED}: qemu-img check failed: ${stderr}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

describe(`qcow2 crash: kill -9 during writes (engine ${process.env['VUBLK_IO_ENGINE'] ?? 'auto'}, seed ${SEED})`, () => {
  it(`${ITERATIONS} kills: qemu-img check finds no corruption, flushed writes survive`, { timeout: 600_000 }, async (ctx) => {
    if (!hasQemuImg()) {
      if (required) throw new Error('VUBLK_E2E_REQUIRED=1 but qemu-img is not installed');
      ctx.skip('qemu-img is not installed');
    }
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2crash-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const image = path.join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(DISK)]);
    const rng = new Prng(SEED);
    /** Per block: the id acknowledged before the last completed flush, and ids written after it. */
    const durable = new Uint32Array(BLOCKS);
    const later: Set<number>[] = Array.from({ length: BLOCKS }, () => new Set<number>());
    let nextId = 1;
    let leaks = 0;

    for (let iteration = 0; iteration < ITERATIONS; iteration++) {
      const socket = path.join(dir, `vublk-${iteration}.sock`);
      const daemon = await startDaemon({
        rawArgs: ['serve', '--socket', socket, '--image', image, '--format', 'qcow2', '--num-queues', String(QUEUES)],
        waitForSocket: false,
      });
      cleanups.push(() => daemon.stop());
      await waitForSocketFile(daemon, socket);
      const fe = await VhostUserFrontend.connect(socket, { numQueues: QUEUES, timeoutMs: 20_000, requireInterrupts: false });
      const blk = new VirtioBlkDriver(fe);

      /** Submits writes of 1–16 blocks at random places, not overlapping each other. */
      const submitWrites = (count: number): { subs: BlkSubmission[]; written: [number, number][] } => {
        const subs: BlkSubmission[] = [];
        const written: [number, number][] = [];
        const used = new Set<number>();
        for (let i = 0; i < count; i++) {
          const blocks = rng.int(1, 16);
          const first = rng.int(0, BLOCKS - blocks);
          let clash = false;
          for (let b = first; b < first + blocks; b++) if (used.has(b)) clash = true;
          if (clash) continue;
          const parts: Buffer[] = [];
          for (let b = first; b < first + blocks; b++) {
            used.add(b);
            const id = nextId++;
            written.push([b, id]);
            parts.push(blockData(id, b));
          }
          subs.push(
            blk.submit(
              { type: 1, sector: (first * BLOCK) / SECTOR_SIZE, out: Buffer.concat(parts) },
              { kick: false, queue: i % QUEUES, dataSegments: 1 + (i % 3) },
            ),
          );
        }
        for (let q = 0; q < QUEUES; q++) blk.kick(q);
        return { subs, written };
      };

      const rounds = rng.int(1, 4);
      for (let round = 0; round < rounds; round++) {
        const { subs, written } = submitWrites(24);
        for (const [b, id] of written) later[b]!.add(id);
        const done = await blk.wait(subs, 30_000);
        expect(done.every((c) => c.status === BlkStatus.OK)).toBe(true);
        expect(await blk.flush()).toBe(BlkStatus.OK);
        for (const [b, id] of written) {
          durable[b] = id;
          later[b]!.clear();
        }
      }
      // A burst left in flight, then the kill.
      const { written } = submitWrites(48);
      for (const [b, id] of written) later[b]!.add(id);
      await new Promise((resolve) => setTimeout(resolve, rng.int(0, 15)));
      daemon.child.kill('SIGKILL');
      await new Promise<void>((resolve) => {
        if (daemon.child.exitCode !== null || daemon.child.signalCode !== null) resolve();
        else daemon.child.once('exit', () => resolve());
      });
      try {
        fe.close();
      } catch {
        // the daemon is gone
      }

      const report = await checkReport(image, iteration);
      expect(report['corruptions'] ?? 0, `iteration ${iteration}, seed ${SEED}: ${JSON.stringify(report)}`).toBe(0);
      expect(report['check-errors'] ?? 0).toBe(0);
      leaks = Number(report['leaks'] ?? 0);

      const raw = path.join(dir, 'now.raw');
      execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
      const bytes = readFileSync(raw);
      rmSync(raw);
      for (let b = 0; b < BLOCKS; b++) {
        const id = blockId(bytes, b);
        const ok = id === durable[b] || (id > 0 && later[b]!.has(id));
        if (!ok)
          throw new Error(
            `iteration ${iteration}, seed ${SEED}: block ${b} holds id ${id}, expected ${durable[b]} or one of [${[...later[b]!].join(', ')}]` +
              (id === -1 ? ` (${describeBlock(bytes, b)})` : ''),
          );
        durable[b] = id;
        later[b]!.clear();
      }
    }
    console.log(`[qcow2-crash] seed ${SEED}: ${ITERATIONS} kills, no corruption; leaked clusters after the last kill: ${leaks}`);
  });
});
