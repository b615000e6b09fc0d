/**
 * `vublk-bench run --verify` (the bench/ workspace package): the seeded-pattern write / flush / read-back check passes against vublk and
 * qemu-storage-daemon, and fails (exit 1, first mismatching offset printed) when the data on the disk is wrong.
 * The comparison logic itself is unit-tested on corrupted buffers. qemu-storage-daemon tests are skipped with
 * the reason when it is not installed (VUBLK_E2E_REQUIRED=1: they fail instead).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { closeSync, openSync, writeSync } from 'node:fs';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { requireQsd, startQsd } from '../frontend/qsd-harness.js';
import { fillPattern, findMismatch, patternKey, patternWord } from '../../bench/src/loadgen/pattern.js';
import type { BenchDocument } from '../../bench/src/loadgen/report.js';
import { runBench, verifyArgs, type BenchResult } from '../support/bench-run.js';

const MiB = 1024 * 1024;

function bench(args: string[], timeoutMs = 30_000): Promise<BenchResult> {
  return runBench(args, timeoutMs);
}

/** Overwrites `bytes` of the image file at `offset` behind the back-end's back (both use the page cache). */
function corrupt(image: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(image, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

describe('verifier comparison logic', () => {
  const key = patternKey(42);

  it('accepts the pattern it wrote, whatever the block sizes used to write and to read', () => {
    const whole = new Uint8Array(64 * 1024);
    fillPattern(whole, 1 * MiB, key);
    expect(findMismatch(whole, 1 * MiB, key)).toBeNull();
    // Written in 4 KiB pieces, read back as one 64 KiB block and as 512-byte blocks: the same bytes.
    const pieces = new Uint8Array(64 * 1024);
    for (let at = 0; at < pieces.length; at += 4096) fillPattern(pieces.subarray(at, at + 4096), 1 * MiB + at, key);
    expect(Buffer.compare(Buffer.from(pieces), Buffer.from(whole))).toBe(0);
    for (let at = 0; at < whole.length; at += 512) expect(findMismatch(whole.subarray(at, at + 512), 1 * MiB + at, key)).toBeNull();
  });

  it('reports the first corrupted byte with its absolute disk offset and both values', () => {
    const block = new Uint8Array(8192);
    fillPattern(block, 40960, key);
    const original = block[5003] as number;
    block[5003] = original ^ 0x10;
    block[7000] = (block[7000] as number) ^ 0xff;
    expect(findMismatch(block, 40960, key)).toEqual({ offset: 40960 + 5003, expected: original, actual: original ^ 0x10 });
  });

  it('catches a block read from the wrong place, a stale block of another seed and an all-zero block', () => {
    const block = new Uint8Array(4096);
    fillPattern(block, 8192, key);
    expect(findMismatch(block, 12288, key)?.offset).toBe(12288);
    expect(findMismatch(block, 8192, patternKey(43))?.offset).toBe(8192);
    expect(findMismatch(new Uint8Array(4096), 0, key)).not.toBeNull();
    // Offsets beyond 2^32 words (16 GiB) still differ from their low-word twins.
    expect(patternWord(key, 2 ** 32 + 5)).not.toBe(patternWord(key, 5));
  });

  it('gives the same answers for buffers that are not 4-byte aligned (DataView path)', () => {
    const backing = new Uint8Array(4096 + 1);
    const unaligned = backing.subarray(1);
    fillPattern(unaligned, 4096, key);
    const aligned = new Uint8Array(4096);
    fillPattern(aligned, 4096, key);
    expect(Buffer.compare(Buffer.from(unaligned), Buffer.from(aligned))).toBe(0);
    unaligned[100] = (unaligned[100] as number) ^ 1;
    expect(findMismatch(unaligned, 4096, key)?.offset).toBe(4196);
  });
});

describe('vublk-bench run --verify against vublk', () => {
  let daemon: DaemonProcess;

  beforeAll(async () => {
    daemon = await startDaemon({ size: '32M', args: ['--num-queues', '2', '--metrics-listen', 'off'] });
  });

  afterAll(async () => {
    await daemon?.stop();
  });

  it('writes the pattern with 4 KiB, reads it back with 8 KiB on two queues and passes', async () => {
    const result = await bench([...verifyArgs(daemon.socketPath, { size: '8M', bs: '4k', queues: 2, iodepth: 8, seed: 5 }), '--json']);
    expect(result.code, result.stderr).toBe(0);
    const doc = JSON.parse(result.stdout) as BenchDocument;
    expect(doc.ok).toBe(true);
    expect(doc.verify).toMatchObject({ ok: true, bytes: 8 * MiB, writeBs: 4096, readBs: 8192, mismatches: 0, firstMismatch: null });
    expect(doc.verify?.write?.total.writes).toBe((8 * MiB) / 4096);
    expect(doc.verify?.read?.total.reads).toBe((8 * MiB) / 8192);
  });

  it('exits 1 and names the first mismatching offset when the disk holds other data', async () => {
    const written = await bench(verifyArgs(daemon.socketPath, { size: '4M', bs: '16k', queues: 2, iodepth: 4, seed: 9 }));
    expect(written.code, written.stderr).toBe(0);
    expect(written.stdout).toContain('verify: OK');
    const intact = await bench(verifyArgs(daemon.socketPath, { size: '4M', bs: '16k', seed: 9, only: true }));
    expect(intact.code, intact.stdout + intact.stderr).toBe(0);

    corrupt(daemon.imagePath, 3 * MiB + 777, Uint8Array.of(0x00, 0x11, 0x22));
    corrupt(daemon.imagePath, 1 * MiB + 5, Uint8Array.of(0xee));
    const broken = await bench(verifyArgs(daemon.socketPath, { size: '4M', bs: '16k', queues: 2, seed: 9, only: true }));
    expect(broken.code).toBe(1);
    expect(broken.stdout).toMatch(
      new RegExp(`FAILED: 2 block\\(s\\) of 32768 bytes differ; first mismatch at byte offset ${1 * MiB + 5} `),
    );

    // Another seed: every block differs, the first one at offset 0.
    const otherSeed = await bench([...verifyArgs(daemon.socketPath, { size: '4M', bs: '16k', seed: 10, only: true }), '--json']);
    expect(otherSeed.code).toBe(1);
    const doc = JSON.parse(otherSeed.stdout) as BenchDocument;
    expect(doc.ok).toBe(false);
    expect(doc.verify?.firstMismatch?.offset).toBe(0);
    expect(doc.verify?.mismatches).toBe((4 * MiB) / 32768);
  });

  it('refuses what the back-end cannot do: more queues than offered, a region larger than the disk', async () => {
    const queues = await bench(['--socket', daemon.socketPath, '--queues', '3', '--runtime', '0.1']);
    expect(queues.code).not.toBe(0);
    expect(queues.stderr).toContain('3 queues asked for, the back-end supports 2');
    const size = await bench(['--socket', daemon.socketPath, '--verify', '--size', '64M']);
    expect(size.code).toBe(2);
    expect(size.stderr).toContain('larger than the disk');
  });

  it('runs a timed mixed workload on both queues and reports per-queue and total figures', async () => {
    const result = await bench([
      '--socket',
      daemon.socketPath,
      '--rw',
      'randrw',
      '--rwmixread',
      '70',
      '--bs',
      '8k',
      '--iodepth',
      '4',
      '--queues',
      '2',
      '--runtime',
      '0.3',
      '--json',
    ]);
    expect(result.code, result.stderr).toBe(0);
    const doc = JSON.parse(result.stdout) as BenchDocument;
    const run = doc.result;
    expect(run?.queues).toHaveLength(2);
    expect(run?.total.requests).toBeGreaterThan(0);
    expect(run?.total.reads).toBeGreaterThan(0);
    expect(run?.total.writes).toBeGreaterThan(0);
    expect(run?.total.requests).toBe((run?.queues[0]?.requests ?? 0) + (run?.queues[1]?.requests ?? 0));
    expect(run?.total.latency.p50Us).toBeGreaterThan(0);
    expect(run?.total.latency.p99Us).toBeGreaterThanOrEqual(run?.total.latency.p50Us ?? 0);
    expect(run?.generator.cpuMicrosPerRequest).toBeGreaterThan(0);
  });

  it('--start-at connects at once and holds the load until that wall-clock time; the JSON says when it ran', async () => {
    const startAt = Date.now() + 1500;
    const result = await bench([
      '--socket',
      daemon.socketPath,
      '--bs',
      '4k',
      '--iodepth',
      '2',
      '--runtime',
      '0.2',
      '--start-at',
      String(startAt),
      '--json',
    ]);
    expect(result.code, result.stderr).toBe(0);
    const doc = JSON.parse(result.stdout) as BenchDocument;
    expect(doc.timing.connectMs).toBeGreaterThanOrEqual(0);
    expect(doc.timing.loadStartMs).toBeGreaterThanOrEqual(startAt);
    expect(doc.timing.loadEndMs).toBeGreaterThan(doc.timing.loadStartMs);
    expect(doc.result?.total.requests).toBeGreaterThan(0);
    const bad = await bench(['--socket', daemon.socketPath, '--start-at', 'soon']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--start-at');
  });
});

describe('vublk-bench run --verify against qemu-storage-daemon', () => {
  it('passes, and fails with the first mismatching offset once the image is corrupted', async (context) => {
    requireQsd(context);
    const qsd = await startQsd({ sizeBytes: 32 * MiB, numQueues: 2 });
    try {
      const result = await bench(verifyArgs(qsd.socketPath, { size: '8M', bs: '4k', queues: 2, iodepth: 8, seed: 3 }));
      expect(result.code, result.stderr + qsd.daemon.output).toBe(0);
      expect(result.stdout).toContain('verify: OK, every byte matches');

      corrupt(qsd.image, 6 * MiB + 4095, Uint8Array.of(0x5a, 0xa5));
      const broken = await bench(verifyArgs(qsd.socketPath, { size: '8M', bs: '4k', seed: 3, only: true }));
      expect(broken.code).toBe(1);
      expect(broken.stdout).toContain(`first mismatch at byte offset ${6 * MiB + 4095} `);
    } finally {
      await qsd.close();
    }
  });
});
