// A seeded random-chain fuzzer against the real daemon (`npm run build` first). Chains are made from a valid
// template per request type plus random mutations (lengths, flags, order, addresses at region edges, outside
// memory and near 2^64, indirect tables valid and malformed, header types and sectors), written straight
// into the ring, published 64 at a time on each of two queues and kicked once. An independent model of the
// rules (test/support/blk-model.ts, from design.md §3) says what each chain must do; the test checks that
// the daemon never crashes or hangs, completes exactly the chains the model completes with the model's
// status and used length, never completes a dropped chain, returns the bytes the model's image holds, and
// that at the end the image file and every counter match the model.
//
//   VUBLK_FUZZ_CHAINS=1000000 VUBLK_FUZZ_SEED=1234 npx vitest run test/integration/fuzz.test.ts
//
// The request engine follows $VUBLK_IO_ENGINE (io_uring: completions out of order across drains).
// VUBLK_FUZZ_CACHE=none serves the image with --cache none (O_DIRECT, bounce buffers for unaligned chains)
// from a file system that accepts O_DIRECT (test/support/host-disk.ts); .ci/run runs both configurations.
// VUBLK_FUZZ_FORMAT=qcow2 serves a qcow2 image (qemu-img create; VUBLK_FUZZ_CLUSTER sets the cluster size):
// the qcow2 executor under the same model, the image read back with qemu-img convert.
//
// The seed is printed at the start and in every failure; the same seed replays the same chains.
// VUBLK_FUZZ_DEBUG=1 also prints the end of the daemon's log when a batch fails.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DescFlag } from '../../protocol/split-ring.js';
import { DeviceStatus } from '../../protocol/virtio.js';
import {
  FrontendTimeoutError,
  GuestMemory,
  VhostUserFrontend,
  writeDescriptorTable,
  type DescriptorInput,
  type VirtqueueDriver,
} from '../../bench/src/frontend/index.js';
import {
  ReqType,
  Status,
  countVerdict,
  emptyCounters,
  evaluateChain,
  type ByteRange,
  type CounterDelta,
  type ModelLimits,
  type ModelMemory,
  type Verdict,
} from '../support/blk-model.js';
import { restartQueue } from '../support/chain-builder.js';
import { startDaemon, waitForSocketFile, type DaemonProcess } from '../support/daemon-process.js';
import { METRICS_ARGS, QueueMetrics, countsDelta, metricsUrl, type QueueCounts } from '../support/metrics-scrape.js';
import { Prng, seedFromEnv } from '../support/prng.js';
import { directIoDir } from '../support/host-disk.js';

const CHAINS = Number(process.env['VUBLK_FUZZ_CHAINS'] ?? 100_000);
const CACHE = process.env['VUBLK_FUZZ_CACHE'] ?? 'writeback';
/** VUBLK_FUZZ_FORMAT=qcow2: the image is a qcow2 (VUBLK_FUZZ_CLUSTER bytes per cluster, default 64K) made by qemu-img. */
const FORMAT = process.env['VUBLK_FUZZ_FORMAT'] ?? 'raw';
const CLUSTER = process.env['VUBLK_FUZZ_CLUSTER'] ?? '65536';
const SEED = seedFromEnv('VUBLK_FUZZ_SEED');

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const QUEUES = 2;
const QUEUE_SIZE = 1024;
/** Consecutive batches of a queue use alternate halves of its descriptor table, so a late completion is caught. */
const HALF = QUEUE_SIZE / 2;
const BATCH_CHAINS = 64;
const CAPACITY = 32 * MiB;
const SERIAL = 'vublk-fuzz';

// Guest memory: two adjacent regions (one memfd each) and a high one with a hole before it.
const R0 = { gpa: 0, size: 128 * MiB };
const R1 = { gpa: 128 * MiB, size: 8 * MiB };
const R2 = { gpa: 4 * GiB, size: 8 * MiB };
const REGIONS = [R0, R1, R2] as const;
const ARENA_BYTES = 48 * MiB;
const ZONE_BYTES = 4 * MiB;
/** Largest buffer placed in an edge zone. */
const ZONE_MAX_LEN = ZONE_BYTES - 8192;
/** Bytes of arena one chain may use. */
const CHAIN_BUDGET = 5 * MiB;
/** Restart a ring before dropped chains push the driver's 16-bit outstanding count near a wrap. */
const DROPS_BEFORE_RESTART = 20_000;
const WAIT_MS = 15_000;

type ZoneName = 'r0r1' | 'r1top' | 'r2low' | 'r2top';
const ZONES: readonly ZoneName[] = ['r0r1', 'r1top', 'r2low', 'r2top'];
type Outside = 'hole' | 'pastEnd' | 'high' | 'wrap';
type Place = { kind: 'arena' } | { kind: 'zone'; zone: ZoneName; over: boolean } | { kind: 'outside'; which: Outside };

interface DescSpec {
  len: number;
  write: boolean;
  place: Place;
}

type IndirectMode = 'valid' | 'badLen' | 'zeroLen' | 'withNext' | 'outside' | 'nested' | 'extraLen' | 'loop' | 'nextOutOfRange';
type NextMode = { kind: 'none' } | { kind: 'loop'; to: number } | { kind: 'outOfRange'; value: number } | { kind: 'truncate'; at: number };

interface ChainSpec {
  type: number;
  sector: bigint;
  ioprio: number;
  descs: DescSpec[];
  /** DISCARD / WRITE_ZEROES segments written at the start of the payload. */
  segments: { sector: bigint; num: number; flags: number }[] | null;
  layout: 'direct' | 'indirect' | 'mixed';
  /** For 'mixed': how many descriptors stay in the ring before the INDIRECT one. */
  mixedSplit: number;
  indirectMode: IndirectMode;
  next: NextMode;
  headOutOfRange: number | null;
  mutations: string[];
}

interface ChainRecord {
  position: number;
  head: number;
  verdict: Verdict;
  spec: ChainSpec;
  ranges: Lock[];
  done: boolean;
}

interface Lock {
  start: number;
  end: number;
  write: boolean;
  queue: number;
}

// ------------------------------------------------------------------------------------------- guest access

/** Guest memory as a device sees it: any byte range, across adjacent regions; BigInt addresses. */
class Guest implements Omit<ModelMemory, 'descriptor'> {
  constructor(readonly memory: GuestMemory) {}

  private static regionAt(at: number): (typeof REGIONS)[number] | undefined {
    return REGIONS.find((r) => at >= r.gpa && at < r.gpa + r.size);
  }

  /** Mapped sub-ranges of [addr, addr+len) as [gpa, len] inside one region each. */
  static mappedParts(addr: bigint, len: number): [number, number][] {
    const parts: [number, number][] = [];
    if (addr >= BigInt(Number.MAX_SAFE_INTEGER)) return parts;
    const start = Number(addr);
    const end = start + len;
    for (const r of REGIONS) {
      const a = Math.max(start, r.gpa);
      const b = Math.min(end, r.gpa + r.size);
      if (a < b) parts.push([a, b - a]);
    }
    return parts;
  }

  mapped(addr: bigint, len: number): boolean {
    if (addr + BigInt(len) > BigInt(Number.MAX_SAFE_INTEGER)) return false;
    let at = Number(addr);
    const end = at + len;
    while (at < end) {
      const r = Guest.regionAt(at);
      if (r === undefined) return false;
      at = Math.min(end, r.gpa + r.size);
    }
    return true;
  }

  withinOneRegion(addr: bigint, len: number): boolean {
    if (addr + BigInt(len) > BigInt(Number.MAX_SAFE_INTEGER)) return false;
    const at = Number(addr);
    const r = Guest.regionAt(at);
    return r !== undefined && at + len <= r.gpa + r.size;
  }

  read(addr: bigint, len: number): Uint8Array {
    const out = new Uint8Array(len);
    const start = Number(addr);
    for (const [gpa, n] of Guest.mappedParts(addr, len)) out.set(this.memory.view(gpa, n), gpa - start);
    return out;
  }

  /** Writes the mapped parts of [addr, addr+bytes.length). */
  writeMapped(addr: bigint, bytes: Uint8Array): void {
    const start = Number(addr);
    for (const [gpa, n] of Guest.mappedParts(addr, bytes.length)) this.memory.write(gpa, bytes.subarray(gpa - start, gpa - start + n));
  }

  /**
   * Writes stream bytes [streamOffset, streamOffset+len) to the mapped parts of [addr, addr+len): bytes below
   * prefix.length come from `prefix`, the rest from `pool` (starting at poolBase, wrapping around).
   */
  writeStream(addr: bigint, len: number, streamOffset: number, prefix: Uint8Array, pool: Uint8Array, poolBase: number): void {
    const start = Number(addr);
    for (const [gpa, n] of Guest.mappedParts(addr, len)) {
      const target = this.memory.view(gpa, n);
      let s = streamOffset + (gpa - start);
      let t = 0;
      while (t < n && s < prefix.length) target[t++] = prefix[s++] as number;
      while (t < n) {
        const from = (poolBase + s) % pool.length;
        const take = Math.min(n - t, pool.length - from);
        target.set(pool.subarray(from, from + take), t);
        t += take;
        s += take;
      }
    }
  }

  fillMapped(addr: bigint, len: number, value: number): void {
    for (const [gpa, n] of Guest.mappedParts(addr, len)) this.memory.fill(gpa, n, value);
  }
}

// ------------------------------------------------------------------------------------------- image model

class ImageModel {
  readonly bytes = new Uint8Array(CAPACITY);
  /** Sectors a DISCARD may have punched: they hold either the model's bytes or zeroes. */
  readonly fuzzy = new Uint8Array(CAPACITY / 512);

  write(offset: number, data: Uint8Array): void {
    this.bytes.set(data, offset);
    this.fuzzy.fill(0, offset / 512, (offset + data.length) / 512);
  }

  zero(range: ByteRange): void {
    this.bytes.fill(0, range.offset, range.offset + range.length);
    this.fuzzy.fill(0, range.offset / 512, (range.offset + range.length) / 512);
  }

  discard(range: ByteRange): void {
    this.fuzzy.fill(1, range.offset / 512, (range.offset + range.length) / 512);
  }

  /** Checks bytes the device returned for [offset, +actual.length); settles fuzzy sectors to what was seen. */
  check(offset: number, actual: Uint8Array): string | null {
    for (let s = 0; s < actual.length; s += 512) {
      const sector = (offset + s) / 512;
      const got = actual.subarray(s, s + 512);
      const want = this.bytes.subarray(offset + s, offset + s + 512);
      if (Buffer.compare(got, want) === 0) {
        this.fuzzy[sector] = 0;
        continue;
      }
      if (this.fuzzy[sector] === 1 && got.every((b) => b === 0)) {
        want.fill(0);
        this.fuzzy[sector] = 0;
        continue;
      }
      const at = got.findIndex((b, i) => b !== want[i]);
      return `sector ${sector} byte ${at}: got 0x${(got[at] ?? 0).toString(16)}, model 0x${(want[at] ?? 0).toString(16)}${this.fuzzy[sector] ? ' (discarded)' : ''}`;
    }
    return null;
  }
}

// ------------------------------------------------------------------------------------------- the fuzzer

interface Shared {
  rng: Prng;
  /** Random bytes that write payloads are copied from. */
  pool: Uint8Array;
  fe: VhostUserFrontend;
  guest: Guest;
  image: ImageModel;
  limits: ModelLimits;
  serial: Uint8Array;
  locks: Lock[];
  zoneOwner: Map<ZoneName, number>;
  stats: {
    chains: number;
    completed: number;
    poisoned: number;
    restarts: number;
    ok: number;
    ioerr: number;
    unsupp: number;
    verdicts: Map<string, number>;
    /** Milliseconds spent generating + writing chains, waiting for the daemon, checking results. */
    buildMs: number;
    waitMs: number;
    verifyMs: number;
  };
}

class QueueFuzzer {
  readonly queue: VirtqueueDriver;
  readonly expected: CounterDelta = emptyCounters();
  private readonly arenaBase: number;
  private arenaCursor = 0;
  private half = 0;
  private descCursor = 0;
  private batch: ChainRecord[] = [];
  private byHead = new Map<number, ChainRecord>();
  private previousByHead = new Map<number, ChainRecord>();
  private claimedZones: ZoneName[] = [];
  private batchPoisons = false;
  private dropsSinceRestart = 0;
  batchNumber = 0;

  constructor(
    readonly index: number,
    private readonly s: Shared,
  ) {
    this.queue = s.fe.queue(index);
    this.queue.strictUsed = false;
    this.arenaBase = s.fe.memory.alloc(ARENA_BYTES, { region: 0, align: 4096 });
  }

  private get limits(): ModelLimits {
    return this.s.limits;
  }

  private get rng(): Prng {
    return this.s.rng;
  }

  // --- resources

  private arenaAlloc(len: number, align = 16): number | null {
    const start = Math.ceil((this.arenaBase + this.arenaCursor) / align) * align;
    const end = start + Math.max(len, 1);
    if (end > this.arenaBase + ARENA_BYTES) return null;
    this.arenaCursor = end - this.arenaBase;
    return start;
  }

  private takeDescriptors(n: number): number[] | null {
    if (this.descCursor + n > HALF) return null;
    const first = this.half * HALF + this.descCursor;
    this.descCursor += n;
    return Array.from({ length: n }, (_, i) => first + i);
  }

  private claimZone(zone: ZoneName): boolean {
    if (this.s.zoneOwner.has(zone)) return false;
    this.s.zoneOwner.set(zone, this.index);
    this.claimedZones.push(zone);
    return true;
  }

  // --- random values

  private dataLen(): number {
    // Mostly small: the fuzzer is about chain shapes; a few large ones reach size_max.
    return (
      512 *
      this.rng.weighted<() => number>([
        [40, () => 1],
        [35, () => this.rng.int(2, 8)],
        [19, () => this.rng.int(9, 64)],
        [4, () => this.rng.int(65, 256)],
        [1.5, () => this.rng.int(257, this.limits.sizeMax / 512)],
        [0.5, () => this.limits.sizeMax / 512],
      ])()
    );
  }

  /** Any length, biased to edges: 0, around 16, around 512, around size_max, up to 2 × size_max. */
  private anyLen(): number {
    const m = this.limits.sizeMax;
    return this.rng.weighted<() => number>([
      [6, () => 0],
      [6, () => 1],
      [4, () => this.rng.pick([15, 16, 17, 20, 21])],
      [4, () => this.rng.pick([511, 512, 513, 1023, 1024])],
      [8, () => 512 * this.rng.int(1, 16)],
      [5, () => this.rng.int(2, 64)],
      [4, () => this.rng.int(0, 65536)],
      [3, () => this.rng.pick([m - 1, m, m + 1, m + 512])],
      [1, () => 2 * m],
      [1, () => this.rng.int(0, 2 * m)],
    ])();
  }

  private sectorFor(dataBytes: number): bigint {
    const capSectors = CAPACITY / 512;
    const n = Math.ceil(dataBytes / 512);
    return this.rng.weighted<() => bigint>([
      [75, () => BigInt(this.rng.int(0, Math.max(0, capSectors - n)))],
      [8, () => BigInt(Math.max(0, capSectors - n))],
      [7, () => BigInt(capSectors - n + this.rng.int(1, 8))],
      [2, () => BigInt(capSectors)],
      [
        8,
        () =>
          this.rng.pick([
            1n << 32n,
            (1n << 53n) + 1n,
            (1n << 55n) - 1n,
            1n << 63n,
            (1n << 64n) - 1n,
            BigInt(capSectors) + BigInt(this.rng.u32()),
          ]),
      ],
    ])();
  }

  private segment(maxSectors: number): { sector: bigint; num: number; flags: number } {
    const num = this.rng.weighted<() => number>([
      [3, () => 0],
      [40, () => this.rng.int(1, 8)],
      [45, () => this.rng.int(9, 2048)],
      [2, () => maxSectors],
      [5, () => maxSectors + 1],
      [5, () => 0xffff_ffff],
    ])();
    const sector = this.sectorFor(Math.min(num, 2048) * 512);
    const flags = this.rng.weighted<() => number>([
      [45, () => 0],
      [45, () => 1],
      [10, () => this.rng.pick([2, 3, 0x8000_0000, this.rng.u32() | 2])],
    ])();
    return { sector, num, flags };
  }

  private place(): Place {
    return this.rng.weighted<() => Place>([
      [88, () => ({ kind: 'arena' })],
      [8, () => ({ kind: 'zone', zone: this.rng.pick(ZONES), over: this.rng.chance(0.4) })],
      [4, () => ({ kind: 'outside', which: this.rng.pick<Outside>(['hole', 'pastEnd', 'high', 'wrap']) })],
    ])();
  }

  // --- chain specs

  /** A well-formed request of a random type, then 0..3 mutations. */
  private spec(): ChainSpec {
    const rng = this.rng;
    const type = rng.weighted<() => number>([
      [30, () => ReqType.IN],
      [25, () => ReqType.OUT],
      [8, () => ReqType.FLUSH],
      [7, () => ReqType.GET_ID],
      [10, () => ReqType.DISCARD],
      [10, () => ReqType.WRITE_ZEROES],
      [10, () => rng.pick([2, 3, 5, 6, 7, 9, 10, 12, 14, 15, 16, rng.u32()])],
    ])();
    const arena: Place = { kind: 'arena' };
    const descs: DescSpec[] = [];
    // Header: usually one descriptor, sometimes split at random points.
    const headerPieces = rng.chance(0.15) ? splitLength(rng, 16, rng.int(2, 3)) : [16];
    for (const len of headerPieces) descs.push({ len, write: false, place: arena });
    let segments: ChainSpec['segments'] = null;
    let dataBytes = 0;
    const budget = CHAIN_BUDGET;
    const dataPieces = (write: boolean, total: number, maxPieces: number): void => {
      const count = Math.min(maxPieces, Math.max(1, total / 512));
      for (const len of splitSectors(rng, total, rng.int(1, count))) descs.push({ len, write, place: arena });
    };
    switch (type) {
      case ReqType.IN:
      case ReqType.OUT: {
        const segs = rng.weighted<() => number>([
          [55, () => 1],
          [28, () => rng.int(2, 4)],
          [13, () => rng.int(5, 16)],
          [4, () => rng.int(17, this.limits.segMax)],
        ])();
        let total = 0;
        for (let i = 0; i < segs && total < budget / 2; i++) total += this.dataLen();
        total = Math.min(total, Math.floor(budget / 2 / 512) * 512);
        dataBytes = total;
        const write = type === ReqType.IN;
        const pieces = splitSectors(rng, total, Math.min(segs, total / 512), this.limits.sizeMax);
        for (const len of pieces) descs.push({ len, write, place: arena });
        break;
      }
      case ReqType.GET_ID:
        descs.push({ len: rng.chance(0.7) ? 20 : rng.int(1, 64), write: true, place: arena });
        break;
      case ReqType.FLUSH:
        break;
      case ReqType.DISCARD:
      case ReqType.WRITE_ZEROES: {
        const max = type === ReqType.DISCARD ? this.limits.maxDiscardSeg : this.limits.maxWriteZeroesSeg;
        const n = rng.weighted<() => number>([
          [50, () => 1],
          [30, () => rng.int(2, 4)],
          [10, () => rng.int(5, 20)],
          [5, () => max],
          [5, () => max + 1],
        ])();
        const maxSectors = type === ReqType.DISCARD ? this.limits.maxDiscardSectors : this.limits.maxWriteZeroesSectors;
        segments = Array.from({ length: n }, () => this.segment(maxSectors));
        dataBytes = n * 16;
        const pieces = splitLength(rng, dataBytes, rng.int(1, Math.min(3, dataBytes)));
        for (const len of pieces) descs.push({ len, write: false, place: arena });
        break;
      }
      default:
        if (rng.chance(0.5)) dataPieces(rng.chance(0.5), 512 * rng.int(1, 4), 3);
    }
    // Header merged with the first readable data piece; data merged with the status.
    const last = descs[descs.length - 1] as DescSpec;
    if (descs.length > 1 && rng.chance(0.15) && last.write) {
      last.len += 1;
    } else {
      descs.push({ len: rng.chance(0.9) ? 1 : rng.int(2, 16), write: true, place: arena });
    }
    if (headerPieces.length === 1 && descs.length > 2 && !(descs[1] as DescSpec).write && rng.chance(0.15)) {
      const second = descs[1] as DescSpec;
      second.len += 16;
      descs.shift();
    }
    const sector = type === ReqType.IN || type === ReqType.OUT ? this.sectorFor(dataBytes) : rng.chance(0.8) ? 0n : this.sectorFor(512);
    const spec: ChainSpec = {
      type,
      sector,
      ioprio: rng.chance(0.1) ? rng.u32() : 0,
      descs,
      segments,
      layout: rng.weighted<() => ChainSpec['layout']>([
        [77, () => 'direct'],
        [20, () => 'indirect'],
        [3, () => 'mixed'],
      ])(),
      mixedSplit: 0,
      indirectMode: 'valid',
      next: { kind: 'none' },
      headOutOfRange: null,
      mutations: [],
    };
    const mutations = rng.weighted<() => number>([
      [50, () => 0],
      [30, () => 1],
      [15, () => 2],
      [5, () => 3],
    ])();
    for (let i = 0; i < mutations; i++) this.mutate(spec);
    if (spec.layout === 'mixed') spec.mixedSplit = rng.int(1, Math.max(1, spec.descs.length - 1));
    return spec;
  }

  private mutate(spec: ChainSpec): void {
    const rng = this.rng;
    const d = spec.descs;
    const anyIndex = (): number => rng.int(0, d.length - 1);
    const name = rng.weighted<() => string>([
      [14, () => 'len'],
      [8, () => 'flipWrite'],
      [5, () => 'swap'],
      [5, () => 'delete'],
      [5, () => 'insert'],
      [4, () => 'extend'],
      [12, () => 'place'],
      [3, () => 'statusLen0'],
      [3, () => 'lastReadable'],
      [5, () => 'type'],
      [5, () => 'sector'],
      [8, () => 'indirect'],
      [3, () => 'truncate'],
      // Ring-structure faults poison the queue (and end the batch): keep them rare.
      [0.1, () => 'loop'],
      [0.06, () => 'nextOutOfRange'],
      [0.03, () => 'headOutOfRange'],
    ])();
    spec.mutations.push(name);
    switch (name) {
      case 'len':
        (d[anyIndex()] as DescSpec).len = this.anyLen();
        break;
      case 'flipWrite': {
        const x = d[anyIndex()] as DescSpec;
        x.write = !x.write;
        break;
      }
      case 'swap': {
        const i = anyIndex();
        const j = anyIndex();
        [d[i], d[j]] = [d[j] as DescSpec, d[i] as DescSpec];
        break;
      }
      case 'delete':
        if (d.length > 1) d.splice(anyIndex(), 1);
        break;
      case 'insert':
        d.splice(rng.int(0, d.length), 0, { len: this.anyLen(), write: rng.chance(0.5), place: { kind: 'arena' } });
        break;
      case 'extend': {
        // Around the seg_max + 2 bound: exactly at it, or one or two past it.
        const target = this.limits.segMax + 2 + rng.pick([-1, 0, 0, 1, 1, 2]);
        const write = spec.type === ReqType.IN || spec.type === ReqType.GET_ID;
        while (d.length < target) d.splice(d.length - 1, 0, { len: 512, write, place: { kind: 'arena' } });
        break;
      }
      case 'place':
        (d[anyIndex()] as DescSpec).place = this.place();
        break;
      case 'statusLen0':
        (d[d.length - 1] as DescSpec).len = 0;
        break;
      case 'lastReadable':
        (d[d.length - 1] as DescSpec).write = false;
        break;
      case 'type':
        spec.type = rng.pick([
          ReqType.IN,
          ReqType.OUT,
          ReqType.FLUSH,
          ReqType.GET_ID,
          ReqType.DISCARD,
          ReqType.WRITE_ZEROES,
          2,
          10,
          14,
          rng.u32(),
        ]);
        break;
      case 'sector':
        spec.sector = this.sectorFor(512 * rng.int(1, 64));
        break;
      case 'indirect':
        spec.layout = rng.chance(0.8) ? 'indirect' : 'mixed';
        spec.indirectMode = rng.pick<IndirectMode>([
          'badLen',
          'zeroLen',
          'withNext',
          'outside',
          'nested',
          'extraLen',
          'loop',
          'nextOutOfRange',
          'valid',
        ]);
        break;
      case 'truncate':
        if (d.length > 1) spec.next = { kind: 'truncate', at: rng.int(0, d.length - 2) };
        break;
      case 'loop':
        spec.next = { kind: 'loop', to: rng.int(0, d.length - 1) };
        break;
      case 'nextOutOfRange':
        spec.next = { kind: 'outOfRange', value: rng.int(QUEUE_SIZE, 0xffff) };
        break;
      case 'headOutOfRange':
        spec.headOutOfRange = rng.int(QUEUE_SIZE, 0xffff);
        break;
    }
  }

  // --- materialization

  /** An address for a descriptor; null when the arena is exhausted. */
  private addressFor(d: DescSpec): bigint | null {
    const rng = this.rng;
    let place = d.place;
    if (place.kind === 'zone' && (d.len > ZONE_MAX_LEN || !this.claimZone(place.zone))) place = { kind: 'arena' };
    switch (place.kind) {
      case 'arena': {
        const misalign = d.len > 0 && rng.chance(0.2) ? rng.int(1, 15) : 0;
        const at = this.arenaAlloc(d.len + misalign);
        return at === null ? null : BigInt(at + misalign);
      }
      case 'outside':
        switch (place.which) {
          case 'hole':
            return BigInt(GiB + 16 * rng.int(0, GiB / 16));
          case 'pastEnd':
            return BigInt(R2.gpa + R2.size + rng.int(0, 1 << 20));
          case 'high':
            return rng.pick([1n << 53n, (1n << 53n) + BigInt(rng.u32()), 1n << 62n, 1n << 63n]);
          case 'wrap':
            return (1n << 64n) - BigInt(rng.int(1, Math.max(1, d.len)));
        }
        break;
      case 'zone': {
        const len = d.len;
        const over = place.over && len > 0 ? rng.int(1, Math.min(len, 4096)) : 0;
        switch (place.zone) {
          case 'r0r1': {
            const k = len >= 2 ? rng.int(1, len - 1) : rng.int(0, 1);
            return BigInt(R1.gpa - k);
          }
          case 'r1top':
            return BigInt(R1.gpa + R1.size - len + over);
          case 'r2low':
            return BigInt(R2.gpa - over);
          case 'r2top':
            return BigInt(R2.gpa + R2.size - len + over);
        }
      }
    }
    return null;
  }

  /** Writes the chain into guest memory and the ring (not yet published). Null when out of resources. */
  private materialize(spec: ChainSpec): number | null {
    const rng = this.rng;
    const guest = this.s.guest;
    const n = spec.descs.length;
    const addrs: bigint[] = [];
    for (const d of spec.descs) {
      const a = this.addressFor(d);
      if (a === null) return null;
      addrs.push(a);
    }
    // The readable stream: header, then DISCARD segments or random payload.
    // The readable stream: header, then DISCARD segments, then payload bytes taken from the random pool at a
    // random offset (copied, not generated, so large payloads stay cheap).
    const prefixLength = 16 + (spec.segments?.length ?? 0) * 16;
    const prefix = new Uint8Array(prefixLength);
    const view = new DataView(prefix.buffer);
    view.setUint32(0, spec.type >>> 0, true);
    view.setUint32(4, spec.ioprio >>> 0, true);
    view.setBigUint64(8, BigInt.asUintN(64, spec.sector), true);
    spec.segments?.forEach((seg, i) => {
      view.setBigUint64(16 + i * 16, BigInt.asUintN(64, seg.sector), true);
      view.setUint32(16 + i * 16 + 8, seg.num >>> 0, true);
      view.setUint32(16 + i * 16 + 12, seg.flags >>> 0, true);
    });
    const poolBase = rng.int(0, this.s.pool.length - 1);
    let at = 0;
    spec.descs.forEach((d, i) => {
      const addr = addrs[i] as bigint;
      if (d.write) guest.fillMapped(addr, d.len, 0xee);
      else {
        guest.writeStream(addr, d.len, at, prefix, this.s.pool, poolBase);
        at += d.len;
      }
    });

    const entries: DescriptorInput[] = spec.descs.map((d, i) => ({
      addr: addrs[i] as bigint,
      len: d.len,
      flags: (d.write ? DescFlag.WRITE : 0) | (i + 1 < n ? DescFlag.NEXT : 0),
      next: i + 1,
    }));
    const applyNext = (list: DescriptorInput[], position: (p: number) => number): void => {
      list.forEach((e, i) => (e.next = i + 1 < list.length ? position(i + 1) : 0));
      const next = spec.next;
      if (next.kind === 'loop') {
        const lastEntry = list[list.length - 1] as DescriptorInput;
        lastEntry.flags |= DescFlag.NEXT;
        lastEntry.next = position(Math.min(next.to, list.length - 1));
      } else if (next.kind === 'outOfRange') {
        const lastEntry = list[list.length - 1] as DescriptorInput;
        lastEntry.flags |= DescFlag.NEXT;
        lastEntry.next = next.value;
      } else if (next.kind === 'truncate' && next.at < list.length) {
        (list[next.at] as DescriptorInput).flags &= ~DescFlag.NEXT;
      }
    };

    const ring = this.queue.ring;
    if (spec.layout === 'direct') {
      const ids = this.takeDescriptors(n);
      if (ids === null) return null;
      applyNext(entries, (p) => ids[p] as number);
      entries.forEach((e, i) => ring.writeDescriptor(ids[i] as number, e));
      return spec.headOutOfRange ?? (ids[0] as number);
    }

    // Indirect ('mixed': the first descriptors stay in the ring, the last ring descriptor points at the table).
    const split = spec.layout === 'mixed' ? Math.min(spec.mixedSplit, n - 1) : 0;
    const inRing = entries.slice(0, split);
    const inTable = entries.slice(split);
    const ids = this.takeDescriptors(split + 1);
    if (ids === null) return null;
    const mode = spec.indirectMode;
    if (mode === 'loop' || mode === 'nextOutOfRange')
      spec.next = mode === 'loop' ? { kind: 'loop', to: 0 } : { kind: 'outOfRange', value: inTable.length + rng.int(0, 5) };
    applyNext(inTable, (p) => p);
    if (mode === 'nested' && inTable.length > 0) {
      const inner = this.arenaAlloc(32);
      if (inner === null) return null;
      const status = this.arenaAlloc(1);
      if (status === null) return null;
      writeDescriptorTable(this.s.fe.memory, inner, [
        { addr: status, len: 1, flags: DescFlag.WRITE, next: 0 },
        { addr: 0, len: 0, flags: 0, next: 0 },
      ]);
      const victim = inTable[rng.int(0, inTable.length - 1)] as DescriptorInput;
      victim.addr = inner;
      victim.len = rng.chance(0.8) ? 16 : 32;
      victim.flags = DescFlag.INDIRECT | (victim.flags & DescFlag.NEXT);
    }
    const extra = mode === 'extraLen' ? rng.int(1, 4) : 0;
    const tableEntries = inTable.length + extra;
    const table = this.arenaAlloc(tableEntries * 16, 16);
    if (table === null) return null;
    const garbage: DescriptorInput[] = Array.from({ length: extra }, () => ({
      addr: BigInt(rng.u32()),
      len: rng.u32(),
      flags: rng.int(0, 7),
      next: rng.int(0, 0xffff),
    }));
    writeDescriptorTable(this.s.fe.memory, table, [...inTable, ...garbage]);
    let tableAddr: bigint = BigInt(table);
    let tableLen = tableEntries * 16;
    let flags: number = DescFlag.INDIRECT | (rng.chance(0.1) ? DescFlag.WRITE : 0);
    switch (mode) {
      case 'badLen':
        tableLen = Math.max(0, tableLen + rng.pick([-15, -8, -1, 1, 8])) || 8;
        break;
      case 'zeroLen':
        tableLen = 0;
        break;
      case 'withNext':
        flags |= DescFlag.NEXT;
        break;
      case 'outside':
        tableAddr = rng.pick([BigInt(GiB), BigInt(R2.gpa + R2.size), 1n << 60n, (1n << 64n) - 16n]);
        break;
      default:
        break;
    }
    inRing.forEach((e, i) => {
      e.flags |= DescFlag.NEXT;
      e.next = ids[i + 1] as number;
      ring.writeDescriptor(ids[i] as number, e);
    });
    ring.writeDescriptor(ids[split] as number, { addr: tableAddr, len: tableLen, flags, next: 0 });
    return spec.headOutOfRange ?? (ids[0] as number);
  }

  // --- batches

  private modelMemory(): ModelMemory {
    const guest = this.s.guest;
    const ring = this.queue.ring;
    return {
      mapped: (a, l) => guest.mapped(a, l),
      withinOneRegion: (a, l) => guest.withinOneRegion(a, l),
      read: (a, l) => guest.read(a, l),
      descriptor: (i) => ring.readDescriptor(i),
    };
  }

  private static rangesOf(verdict: Verdict, queue: number): Lock[] {
    if (verdict.kind !== 'complete' || verdict.status !== Status.OK || verdict.effect === null) return [];
    const e = verdict.effect;
    switch (e.op) {
      case 'read':
        return [{ start: e.range.offset, end: e.range.offset + e.range.length, write: false, queue }];
      case 'write':
        return [{ start: e.range.offset, end: e.range.offset + e.range.length, write: true, queue }];
      case 'zero':
      case 'discard':
        return e.ranges.map((r) => ({ start: r.offset, end: r.offset + r.length, write: true, queue }));
      default:
        return [];
    }
  }

  private conflicts(ranges: readonly Lock[]): boolean {
    for (const r of ranges) {
      for (const l of this.s.locks) if (r.start < l.end && l.start < r.end && (r.write || l.write)) return true;
    }
    return false;
  }

  /** Builds, evaluates and publishes up to BATCH_CHAINS chains plus a GET_ID sentinel; kicks once. */
  buildBatch(maxChains: number): number {
    this.batchNumber++;
    this.half ^= 1;
    this.descCursor = 0;
    this.arenaCursor = 0;
    this.batch = [];
    this.previousByHead = this.byHead;
    this.byHead = new Map();
    this.batchPoisons = false;
    const memory = this.modelMemory();
    const sentinelIds = this.takeDescriptors(3) as number[];
    const sentinelBuffer = this.arenaAlloc(64) as number;
    for (let position = 0; position < Math.min(BATCH_CHAINS, maxChains) && !this.batchPoisons; position++) {
      let accepted: ChainRecord | null = null;
      for (let attempt = 0; attempt < 4 && accepted === null; attempt++) {
        const mark = { arena: this.arenaCursor, desc: this.descCursor, zones: this.claimedZones.length };
        const spec = this.spec();
        const head = this.materialize(spec);
        if (head === null) {
          this.rollback(mark);
          break;
        }
        const verdict = evaluateChain(head, memory, this.limits);
        const ranges = QueueFuzzer.rangesOf(verdict, this.index);
        // One chain per head (an out-of-range head or a reused one would be ambiguous), no conflicting I/O.
        if (this.byHead.has(head) || this.conflicts(ranges)) {
          this.rollback(mark);
          continue;
        }
        accepted = { position, head, verdict, spec, ranges, done: false };
      }
      if (accepted === null) break;
      this.batch.push(accepted);
      this.byHead.set(accepted.head, accepted);
      this.s.locks.push(...accepted.ranges);
      this.queue.publish(accepted.head);
      if (accepted.verdict.kind === 'poison') this.batchPoisons = true;
    }
    if (!this.batchPoisons) {
      // Sentinel: a plain GET_ID after the batch; once it is back, every chain before it was handled.
      const header = sentinelBuffer;
      const data = sentinelBuffer + 16;
      const status = sentinelBuffer + 48;
      const hdr = new Uint8Array(16);
      new DataView(hdr.buffer).setUint32(0, ReqType.GET_ID, true);
      this.s.fe.memory.write(header, hdr);
      this.s.fe.memory.fill(data, 20, 0xee);
      this.s.fe.memory.fill(status, 1, 0xee);
      const ring = this.queue.ring;
      const [a, b, c] = sentinelIds as [number, number, number];
      ring.writeDescriptor(a, { addr: header, len: 16, flags: DescFlag.NEXT, next: b });
      ring.writeDescriptor(b, { addr: data, len: 20, flags: DescFlag.WRITE | DescFlag.NEXT, next: c });
      ring.writeDescriptor(c, { addr: status, len: 1, flags: DescFlag.WRITE, next: 0 });
      const sentinelSpec: ChainSpec = {
        type: ReqType.GET_ID,
        sector: 0n,
        ioprio: 0,
        descs: [],
        segments: null,
        layout: 'direct',
        mixedSplit: 0,
        indirectMode: 'valid',
        next: { kind: 'none' },
        headOutOfRange: null,
        mutations: ['sentinel'],
      };
      const verdict = evaluateChain(a, memory, this.limits);
      const record: ChainRecord = { position: this.batch.length, head: a, verdict, spec: sentinelSpec, ranges: [], done: false };
      this.batch.push(record);
      this.byHead.set(a, record);
      this.queue.publish(a);
    }
    this.queue.kick({ force: true });
    return this.batch.filter((r) => r.spec.mutations[0] !== 'sentinel').length;
  }

  private rollback(mark: { arena: number; desc: number; zones: number }): void {
    this.arenaCursor = mark.arena;
    this.descCursor = mark.desc;
    for (const zone of this.claimedZones.splice(mark.zones)) this.s.zoneOwner.delete(zone);
  }

  private describe(record: ChainRecord): string {
    const s = record.spec;
    const v = record.verdict;
    const verdict = v.kind === 'complete' ? `complete status ${v.status} (${v.reason}), used len ${v.usedLen}` : `${v.kind} (${v.reason})`;
    return (
      `seed ${SEED}, queue ${this.index}, batch ${this.batchNumber}, chain #${record.position}, head ${record.head}: model says ${verdict}; ` +
      `type ${s.type} sector ${s.sector} layout ${s.layout}/${s.indirectMode} mutations [${s.mutations.join(', ')}] ` +
      `descriptors ${JSON.stringify(s.descs.map((d) => [d.len, d.write ? 'W' : 'R', d.place.kind === 'arena' ? 'a' : d.place.kind === 'zone' ? `${d.place.zone}${d.place.over ? '+' : ''}` : d.place.which]))}`
    );
  }

  /** Waits for the batch's completions (and its poison, if any); verifies every used element. */
  async finishBatch(): Promise<void> {
    const wanted = this.batch.filter((r) => r.verdict.kind === 'complete');
    let received = 0;
    while (received < wanted.length) {
      let elements: Awaited<ReturnType<typeof this.queue.waitUsed>>;
      const waitStart = performance.now();
      try {
        elements = await this.queue.waitUsed({ min: 1, timeoutMs: WAIT_MS });
      } catch (error) {
        if (!(error instanceof FrontendTimeoutError)) throw error;
        const missing = wanted.filter((r) => !r.done).map((r) => this.describe(r));
        throw new Error(`${error.message}\n${missing.length} completions missing, e.g.:\n${missing.slice(0, 5).join('\n')}`);
      }
      const verifyStart = performance.now();
      this.s.stats.waitMs += verifyStart - waitStart;
      for (const element of elements) {
        this.verify(element.id, element.len);
        received++;
      }
      this.s.stats.verifyMs += performance.now() - verifyStart;
    }
    if (this.batchPoisons) {
      const deadline = Date.now() + WAIT_MS;
      let signals = this.queue.errorSignals();
      while (signals === 0 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 5));
        signals = this.queue.errorSignals();
      }
      const poison = this.batch[this.batch.length - 1] as ChainRecord;
      if (signals !== 1)
        throw new Error(`expected exactly one err eventfd signal for the poisoned queue, got ${signals}: ${this.describe(poison)}`);
      if (((await this.s.fe.getStatus()) & DeviceStatus.NEEDS_RESET) === 0)
        throw new Error(`GET_STATUS lacks NEEDS_RESET after: ${this.describe(poison)}`);
      await this.restart();
      this.s.stats.poisoned++;
    }
    for (const r of this.batch) {
      if (r.verdict.kind === 'drop') this.dropsSinceRestart++;
      countVerdict(r.verdict, this.expected);
      const key = `${r.verdict.kind === 'complete' ? (['ok', 'ioerr', 'unsupp'][r.verdict.status] ?? '?') : r.verdict.kind}: ${r.verdict.reason.replace(/\d+/g, 'N')}`;
      this.s.stats.verdicts.set(key, (this.s.stats.verdicts.get(key) ?? 0) + 1);
    }
    this.s.stats.chains += this.batch.length;
    // Release this batch's claims.
    this.s.locks = this.s.locks.filter((l) => l.queue !== this.index);
    for (const zone of this.claimedZones.splice(0)) this.s.zoneOwner.delete(zone);
    if (this.dropsSinceRestart > DROPS_BEFORE_RESTART) await this.restart();
  }

  private async restart(): Promise<void> {
    await restartQueue(this.s.fe, this.index);
    this.dropsSinceRestart = 0;
    this.s.stats.restarts++;
  }

  private verify(id: number, len: number): void {
    const record = this.byHead.get(id);
    if (record === undefined) {
      const late = this.previousByHead.get(id);
      throw new Error(
        `queue ${this.index}: used element for head ${id}, which is not in the current batch${late ? `; late completion of: ${this.describe(late)}` : ''}`,
      );
    }
    const v = record.verdict;
    if (v.kind !== 'complete') throw new Error(`daemon completed a chain the model ${v.kind}s (used len ${len}): ${this.describe(record)}`);
    if (record.done) throw new Error(`daemon completed a chain twice: ${this.describe(record)}`);
    record.done = true;
    const guest = this.s.guest;
    const status = guest.read(v.statusAddr, 1)[0];
    if (status !== v.status) throw new Error(`status byte ${status} (used len ${len}): ${this.describe(record)}`);
    if (len !== v.usedLen) throw new Error(`used len ${len}: ${this.describe(record)}`);
    this.s.stats.completed++;
    if (v.status === Status.OK) this.s.stats.ok++;
    else if (v.status === Status.IOERR) this.s.stats.ioerr++;
    else this.s.stats.unsupp++;
    const e = v.effect;
    if (e === null) return;
    const gather = (pieces: readonly { addr: bigint; len: number }[], total: number): Uint8Array => {
      const out = new Uint8Array(total);
      let at = 0;
      for (const p of pieces) {
        const take = Math.min(p.len, total - at);
        if (take <= 0) break;
        out.set(guest.read(p.addr, take), at);
        at += take;
      }
      return out;
    };
    switch (e.op) {
      case 'read': {
        const problem = this.s.image.check(e.range.offset, gather(e.pieces, e.range.length));
        if (problem !== null) throw new Error(`read returned wrong data (${problem}): ${this.describe(record)}`);
        break;
      }
      case 'write':
        this.s.image.write(e.range.offset, gather(e.pieces, e.range.length));
        break;
      case 'getId': {
        const got = gather(e.pieces, e.length);
        if (Buffer.compare(got, this.s.serial.subarray(0, e.length)) !== 0)
          throw new Error(`GET_ID returned ${Buffer.from(got).toString('hex')}: ${this.describe(record)}`);
        break;
      }
      case 'zero':
        for (const r of e.ranges) this.s.image.zero(r);
        break;
      case 'discard':
        for (const r of e.ranges) this.s.image.discard(r);
        break;
      case 'flush':
        break;
    }
  }
}

function splitLength(rng: Prng, total: number, pieces: number): number[] {
  if (pieces <= 1 || total <= 1) return [total];
  const cuts = new Set<number>();
  while (cuts.size < Math.min(pieces - 1, total - 1)) cuts.add(rng.int(1, total - 1));
  const sorted = [...cuts].sort((a, b) => a - b);
  const out: number[] = [];
  let prev = 0;
  for (const c of [...sorted, total]) {
    out.push(c - prev);
    prev = c;
  }
  return out;
}

/** Splits a multiple of 512 into `pieces` multiples of 512 (each at most `max`, more pieces if needed). */
function splitSectors(rng: Prng, total: number, pieces: number, max = Infinity): number[] {
  const sectors = total / 512;
  const out = splitLength(rng, sectors, Math.max(1, Math.min(pieces, sectors))).map((s) => s * 512);
  const bounded: number[] = [];
  for (const len of out) {
    let left = len;
    while (left > max) {
      bounded.push(max);
      left -= max;
    }
    bounded.push(left);
  }
  return bounded;
}

// ------------------------------------------------------------------------------------------- the test

/** The guest-visible bytes of the image (a qcow2 through `qemu-img convert -U`: the daemon holds its lock). */
function imageContents(image: string): Buffer {
  if (FORMAT !== 'qcow2') return readFileSync(image);
  const raw = `${image}.raw`;
  execFileSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
  const bytes = readFileSync(raw);
  rmSync(raw, { force: true });
  return bytes;
}

let daemon: DaemonProcess;
let metrics: QueueMetrics;

let imageDir: string | null = null;

beforeAll(async () => {
  const args = ['--num-queues', String(QUEUES), '--serial', SERIAL, '--cache', CACHE, ...METRICS_ARGS];
  if (CACHE === 'none' || FORMAT === 'qcow2') {
    const base = CACHE === 'none' ? directIoDir() : tmpdir();
    if (base === null) throw new Error('VUBLK_FUZZ_CACHE=none needs a file system that accepts O_DIRECT (set VUBLK_DIRECT_DIR)');
    imageDir = mkdtempSync(path.join(base, 'vublk-fuzz-'));
    const socket = path.join(imageDir, 'vublk.sock');
    const image = path.join(imageDir, FORMAT === 'qcow2' ? 'disk.qcow2' : 'disk.img');
    if (FORMAT === 'qcow2') execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, image, '32M']);
    const imageArgs = FORMAT === 'qcow2' ? ['--format', 'qcow2'] : ['--size', '32M'];
    daemon = await startDaemon({ rawArgs: ['serve', '--socket', socket, '--image', image, ...imageArgs, ...args], waitForSocket: false });
    await waitForSocketFile(daemon, socket);
    daemon = { ...daemon, socketPath: socket, imagePath: image };
  } else {
    daemon = await startDaemon({ size: '32M', args });
  }
  metrics = new QueueMetrics(await metricsUrl(daemon));
});

afterAll(async () => {
  await daemon?.stop();
  if (imageDir !== null) rmSync(imageDir, { recursive: true, force: true });
});

describe('random-chain fuzzer', () => {
  it(`${CHAINS} seeded random chains: the daemon does what the model says, and the image and counters match`, {
    timeout: Math.max(120_000, CHAINS * 2),
  }, async () => {
    console.log(`[fuzz] seed ${SEED} (replay with VUBLK_FUZZ_SEED=${SEED}), ${CHAINS} chains`);
    const memory = GuestMemory.create(REGIONS.map((r, i) => ({ gpa: r.gpa, size: r.size, name: `fuzz-${i}` })));
    const fe = await VhostUserFrontend.connect(daemon.socketPath, {
      numQueues: QUEUES,
      queueSize: QUEUE_SIZE,
      memory,
      protocol: { status: true },
      ringPlacement: { region: 0 },
      timeoutMs: WAIT_MS,
    });
    const started = performance.now();
    try {
      const config = fe.blkConfig;
      if (config === null) throw new Error('no config space');
      expect(config.capacity * 512).toBe(CAPACITY);
      // Keep the edge zones away from anything the front-end allocates.
      fe.memory.alloc(ZONE_BYTES, { region: 0, fromEnd: true, align: 4096 });
      fe.memory.alloc(R1.size, { region: 1 });
      fe.memory.alloc(R2.size, { region: 2 });
      const serial = new Uint8Array(20);
      serial.set(Buffer.from(SERIAL, 'latin1'));
      const rng = new Prng(SEED);
      const pool = new Uint8Array(8 * MiB + 4096);
      rng.fill(pool);
      const shared: Shared = {
        rng,
        pool,
        fe,
        guest: new Guest(fe.memory),
        image: new ImageModel(),
        serial,
        limits: {
          queueSize: QUEUE_SIZE,
          segMax: config.segMax,
          sizeMax: config.sizeMax,
          capacityBytes: BigInt(CAPACITY),
          logicalBlockSize: config.blkSize,
          readOnly: false,
          maxDiscardSeg: config.maxDiscardSeg,
          maxDiscardSectors: config.maxDiscardSectors,
          maxWriteZeroesSeg: config.maxWriteZeroesSeg,
          maxWriteZeroesSectors: config.maxWriteZeroesSectors,
        },
        locks: [],
        zoneOwner: new Map(),
        stats: {
          chains: 0,
          completed: 0,
          poisoned: 0,
          restarts: 0,
          ok: 0,
          ioerr: 0,
          unsupp: 0,
          verdicts: new Map(),
          buildMs: 0,
          waitMs: 0,
          verifyMs: 0,
        },
      };
      const before = await metrics.all(QUEUES);
      const fuzzers = Array.from({ length: QUEUES }, (_, q) => new QueueFuzzer(q, shared));

      // Lockstep rounds: generate a batch per queue (deterministic), let both workers run, verify in order.
      let generated = 0;
      try {
        while (generated < CHAINS) {
          const buildStart = performance.now();
          for (const f of fuzzers) generated += f.buildBatch(CHAINS - generated);
          shared.stats.buildMs += performance.now() - buildStart;
          for (const f of fuzzers) await f.finishBatch();
          if (!daemon.running()) throw new Error(`daemon exited:\n${daemon.output().slice(-4000)}`);
        }
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error);
        if (process.env['VUBLK_FUZZ_DEBUG']) console.log(daemon.output().slice(-6000));
        throw new Error(`[fuzz seed ${SEED}] ${message}`, { cause: error });
      }
      const seconds = (performance.now() - started) / 1000;

      // Counters: exactly what the model counted, per queue.
      for (const f of fuzzers) {
        const e = f.expected;
        const want = (c: QueueCounts): boolean => {
          const d = countsDelta(before[f.index] as QueueCounts, c);
          return d.ioErrors === e.ioErrors && d.reads === e.reads && d.writes === e.writes && d.getIds === e.getIds;
        };
        const after = countsDelta(before[f.index] as QueueCounts, await metrics.waitFor(f.index, want, 5_000));
        expect({ seed: SEED, queue: f.index, ...after }).toEqual({
          seed: SEED,
          queue: f.index,
          ...e,
          throttled: 0,
          throttlePending: 0,
          invalidAvailIdx: 0,
          poisoned: 0,
        });
      }

      // The image file holds what the model holds (discarded sectors: the model's bytes or zeroes).
      const file = imageContents(daemon.imagePath);
      expect(file.length).toBe(CAPACITY);
      const problem = shared.image.check(0, file);
      expect(problem, `seed ${SEED}: image file differs from the model`).toBeNull();
      expect(daemon.running()).toBe(true);
      const errors = daemon.logs().filter((l) => l.level >= 50);
      expect(errors, `seed ${SEED}: error log lines`).toEqual([]);

      const st = shared.stats;
      const verdicts = [...st.verdicts.entries()].sort((a, b) => b[1] - a[1]);
      console.log(
        `[fuzz] seed ${SEED}: ${st.chains} chains (incl. sentinels) in ${seconds.toFixed(1)} s (${Math.round(st.chains / seconds)}/s): ` +
          `${st.completed} completed (${st.ok} OK, ${st.ioerr} IOERR, ${st.unsupp} UNSUPP), ${st.chains - st.completed - st.poisoned} dropped, ` +
          `${st.poisoned} poisoned, ${st.restarts} ring restarts; ms building ${Math.round(st.buildMs)}, waiting ${Math.round(st.waitMs)}, checking ${Math.round(st.verifyMs)}\n` +
          verdicts.map(([k, n]) => `  ${String(n).padStart(7)}  ${k}`).join('\n'),
      );
      expect(st.chains).toBeGreaterThanOrEqual(CHAINS);
    } finally {
      fe.close();
      memory.close();
    }
  });
});
