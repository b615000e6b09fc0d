/**
 * `vublk-bench`: the TypeScript front-end as a load generator for any vhost-user-blk back-end, no VM.
 * Connects like QEMU, takes the rings over with LoadQueue (preallocated chains and buffers), and runs either
 * a timed workload or the --verify pass (seeded pattern written with --bs, flushed, read back with another
 * block size and compared).
 */
import { VhostUserFrontend } from '../frontend/vhost-user-frontend.js';
import { VirtioFeature } from '../../../protocol/virtio.js';
import { BlkFeature, BlkRequestType, SECTOR_SIZE } from '../../../protocol/virtio-blk.js';
import { LoadQueue, descriptorsPerRequest } from './load-queue.js';
import { runPhase, type PhaseResult } from './engine.js';
import { FixedSource, SequentialSource, splitRegion, timedSources, type RwMode } from './workload.js';
import { fillPattern, findMismatch, patternKey, type PatternMismatch } from './pattern.js';

export interface BenchOptions {
  socket: string;
  rw: RwMode;
  bs: number;
  iodepth: number;
  queues: number;
  runtimeSec: number;
  rampSec: number;
  /** Bytes of the disk to use from offset 0; null = the whole capacity. */
  size: number | null;
  verify: boolean;
  /** With verify: skip the write pass, only read back and compare (data written by an earlier --verify with the same seed). */
  verifyOnly: boolean;
  /** Block size of the verify read pass; null = chosen (2×bs, else 4 KiB, ...). */
  verifyBs: number | null;
  seed: number;
  rwmixread: number;
  /** Ring size; null = smallest power of two ≥ 128 that fits iodepth chains. */
  queueSize: number | null;
  indirect: boolean;
  /** Bound of every wait of the handshake, and of a stall (ms). */
  timeoutMs: number;
  /** Wall-clock time (ms since the epoch) to start the load at, after connecting; null = at once. Lets many generators hit one daemon together. */
  startAtMs?: number | null;
}

/** When things happened (ms since the epoch; connectMs is the handshake's duration). */
export interface BenchTiming {
  connectMs: number;
  loadStartMs: number;
  loadEndMs: number;
}

export interface TargetInfo {
  socket: string;
  capacityBytes: number;
  logicalBlockSize: number;
  maxQueues: number | null;
  queueSize: number;
  eventIdx: boolean;
  indirect: boolean;
  readOnly: boolean;
}

export interface VerifyResult {
  ok: boolean;
  writeBs: number;
  readBs: number;
  bytes: number;
  /** null with verifyOnly. */
  write: PhaseResult | null;
  flush: PhaseResult | null;
  read: PhaseResult | null;
  mismatches: number;
  firstMismatch: PatternMismatch | null;
}

export interface BenchResult {
  target: TargetInfo;
  options: BenchOptions;
  /** Region actually used (bytes from offset 0). */
  size: number;
  run: PhaseResult | null;
  verify: VerifyResult | null;
  timing: BenchTiming;
}

export class BenchUsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BenchUsageError';
  }
}

const MAX_QUEUE_SIZE = 1024;

function nextPowerOfTwo(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** Ring size and framing for a depth: direct 3-descriptor chains when they fit in 1024 entries, else indirect. */
export function ringPlan(iodepth: number, queueSize: number | null, indirect: boolean): { queueSize: number; indirect: boolean } {
  const useIndirect = indirect || iodepth * descriptorsPerRequest(false) > (queueSize ?? MAX_QUEUE_SIZE);
  const needed = iodepth * descriptorsPerRequest(useIndirect);
  const size = queueSize ?? Math.max(128, nextPowerOfTwo(needed));
  if (needed > size) throw new BenchUsageError(`--iodepth ${iodepth} needs ${needed} descriptors, more than --queue-size ${size}`);
  return { queueSize: size, indirect: useIndirect };
}

/** The verify read block size: another size than bs that divides the region (2×bs, 4 KiB, bs/2, 512), at most `limit`. */
export function chooseVerifyBs(bs: number, size: number, limit = Infinity): number {
  for (const candidate of [2 * bs, 4096, bs / 2, 8192, 512]) {
    if (
      candidate !== bs &&
      Number.isInteger(candidate) &&
      candidate % SECTOR_SIZE === 0 &&
      candidate <= size &&
      candidate <= limit &&
      size % candidate === 0
    ) {
      return candidate;
    }
  }
  return bs;
}

function gcd(a: number, b: number): number {
  while (b !== 0) [a, b] = [b, a % b];
  return a;
}

function lcm(a: number, b: number): number {
  return (a / gcd(a, b)) * b;
}

function guestMemoryBytes(queues: number, queueSize: number, iodepth: number, maxData: number): number {
  const ring = 3 * 4096 + 16 * queueSize + 8 * queueSize + 2 * queueSize;
  const perQueue = ring + iodepth * (32 + 48 + 64) + iodepth * Math.ceil(maxData / 4096) * 4096 + 3 * 4096;
  const total = queues * perQueue + 2 * 1024 * 1024;
  const twoMiB = 2 * 1024 * 1024;
  return Math.ceil(total / twoMiB) * twoMiB;
}

export async function runBench(options: BenchOptions): Promise<BenchResult> {
  const { bs, iodepth, queues: queueCount } = options;
  const plan = ringPlan(iodepth, options.queueSize, options.indirect);
  // Guest memory for the largest buffer any request of this run may need (the verify read size is chosen later).
  const bufferBound = Math.max(bs, options.verify ? Math.max(options.verifyBs ?? 2 * bs, 8192) : 0, 4096);
  // QEMU 7.2's handshake; asking for more queues than GET_QUEUE_NUM offers fails it with a NegotiationError.
  const connectStart = Date.now();
  const frontend = await VhostUserFrontend.connect(options.socket, {
    numQueues: queueCount,
    queueSize: plan.queueSize,
    timeoutMs: options.timeoutMs,
    memory: [{ gpa: 0, size: guestMemoryBytes(queueCount, plan.queueSize, iodepth, bufferBound) }],
  });
  const connectMs = Date.now() - connectStart;
  try {
    const config = frontend.blkConfig;
    if (config === null) throw new BenchUsageError('the back-end did not answer GET_CONFIG (CONFIG protocol feature missing)');
    const capacityBytes = config.capacity * SECTOR_SIZE;
    const logicalBlockSize = frontend.hasFeature(BlkFeature.BLK_SIZE) && config.blkSize > 0 ? config.blkSize : SECTOR_SIZE;
    const readOnly = frontend.hasFeature(BlkFeature.RO);
    const target: TargetInfo = {
      socket: options.socket,
      capacityBytes,
      logicalBlockSize,
      maxQueues: frontend.maxQueues,
      queueSize: plan.queueSize,
      eventIdx: frontend.hasFeature(VirtioFeature.RING_EVENT_IDX),
      indirect: plan.indirect,
      readOnly,
    };
    if (plan.indirect && !frontend.hasFeature(VirtioFeature.RING_INDIRECT_DESC)) {
      throw new BenchUsageError('indirect descriptors are needed (--indirect or a deep --iodepth) but the back-end does not offer them');
    }
    const size = options.size ?? capacityBytes;
    if (size > capacityBytes) throw new BenchUsageError(`--size ${size} is larger than the disk (${capacityBytes} bytes)`);
    const sizeMax = frontend.hasFeature(BlkFeature.SIZE_MAX) ? config.sizeMax : 0;
    const readBs = options.verify ? (options.verifyBs ?? chooseVerifyBs(bs, size, sizeMax > 0 ? sizeMax : Infinity)) : bs;
    const maxData = Math.max(bs, readBs);
    for (const [name, value] of [
      ['--bs', bs],
      ['the verify read size (--verify-bs)', readBs],
    ] as const) {
      if (value % logicalBlockSize !== 0)
        throw new BenchUsageError(`${name} ${value} is not a multiple of the logical block size ${logicalBlockSize}`);
    }
    if (sizeMax > 0 && maxData > sizeMax)
      throw new BenchUsageError(`block size ${maxData} exceeds the device's size_max ${sizeMax} (one data segment per request)`);
    if (size < bs * queueCount) throw new BenchUsageError(`--size ${size} holds fewer than one ${bs}-byte block per queue`);
    const writes = (options.verify && !options.verifyOnly) || (!options.verify && options.rw !== 'randread' && options.rw !== 'read');
    if (writes && readOnly) throw new BenchUsageError('the disk is read-only (VIRTIO_BLK_F_RO); use --rw randread or read');

    const key = patternKey(options.seed);
    const loadQueues = frontend.queues.map(
      (driver) =>
        new LoadQueue(frontend.memory, driver, {
          depth: iodepth,
          maxDataBytes: maxData,
          indirect: plan.indirect,
          // Writes carry non-zero, non-repeating data; the pattern of a region far past the disk's end.
          fill: (bytes, slot) => fillPattern(bytes, 2 ** 50 + (driver.index * iodepth + slot) * maxData * 4, key),
        }),
    );
    const socketFd = frontend.channel.fd;
    const startAt = options.startAtMs ?? null;
    if (startAt !== null && startAt > Date.now()) await new Promise((resolve) => setTimeout(resolve, startAt - Date.now()));
    const loadStartMs = Date.now();
    if (options.verify) {
      const verify = runVerify(loadQueues, size, bs, readBs, key, options.verifyOnly, options.timeoutMs, socketFd);
      return { target, options, size, run: null, verify, timing: { connectMs, loadStartMs, loadEndMs: Date.now() } };
    }
    const run = runPhase({
      queues: loadQueues,
      sources: timedSources(options.rw, size, bs, queueCount, options.seed, options.rwmixread),
      durationMs: options.runtimeSec * 1000,
      rampMs: options.rampSec * 1000,
      stallMs: options.timeoutMs,
      socketFd,
    });
    return { target, options, size, run, verify: null, timing: { connectMs, loadStartMs, loadEndMs: Date.now() } };
  } finally {
    frontend.close();
  }
}

/** Write the pattern with bs over [0, size), flush, read back with readBs and compare every byte. */
function runVerify(
  queues: LoadQueue[],
  size: number,
  bs: number,
  readBs: number,
  key: number,
  readOnly: boolean,
  stallMs: number,
  socketFd: number,
): VerifyResult {
  const unit = lcm(bs, readBs);
  const bytes = Math.floor(size / unit) * unit;
  if (bytes === 0) throw new BenchUsageError(`--size ${size} is smaller than one ${unit}-byte verify unit (write ${bs}, read ${readBs})`);
  const writeRanges = splitRegion(bytes, bs, queues.length);
  const write = readOnly
    ? null
    : runPhase({
        queues,
        sources: queues.map((_, q) => {
          const range = writeRanges[q] as { start: number; end: number };
          if (range.end - range.start < bs) return new FixedSource(0, BlkRequestType.OUT);
          return new SequentialSource(range.start, range.end, bs, BlkRequestType.OUT, false, (queue, slot, offset, length) =>
            fillPattern((queue.data[slot] as Uint8Array).subarray(0, length), offset, key),
          );
        }),
        stallMs,
        socketFd,
      });
  const flush = readOnly
    ? null
    : runPhase({
        queues,
        sources: queues.map((_, q) => new FixedSource(q === 0 ? 1 : 0, BlkRequestType.FLUSH)),
        stallMs,
        socketFd,
      });
  let mismatches = 0;
  let firstMismatch: PatternMismatch | null = null;
  let read: PhaseResult | null = null;
  if (write?.failure == null && flush?.failure == null) {
    const readRanges = splitRegion(bytes, readBs, queues.length);
    // Each queue reads another queue's writes back (rotated), so a queue mix-up cannot hide.
    read = runPhase({
      queues,
      sources: queues.map((_, q) => {
        const range = readRanges[(q + 1) % queues.length] as { start: number; end: number };
        if (range.end - range.start < readBs) return new FixedSource(0, BlkRequestType.IN);
        return new SequentialSource(range.start, range.end, readBs, BlkRequestType.IN, false, (queue, slot, _offset, length) =>
          (queue.data[slot] as Uint8Array).fill(0xa5, 0, length),
        );
      }),
      onComplete: (queue, slot, status) => {
        if (status !== 0) return;
        const offset = queue.slotOffset[slot] as number;
        const mismatch = findMismatch((queue.data[slot] as Uint8Array).subarray(0, queue.slotBytes[slot] as number), offset, key);
        if (mismatch !== null) {
          mismatches++;
          if (firstMismatch === null || mismatch.offset < firstMismatch.offset) firstMismatch = mismatch;
        }
      },
      stallMs,
      socketFd,
    });
  }
  const ok = write?.failure == null && flush?.failure == null && read !== null && read.failure === null && mismatches === 0;
  return { ok, writeBs: bs, readBs, bytes, write, flush, read, mismatches, firstMismatch };
}
