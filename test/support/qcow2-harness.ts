/**
 * Drives a qcow2 handle the way the data plane will: map a range to host extents, move the bytes with
 * pread/pwrite per extent, commit. Also: qemu-img helpers and a seeded workload with an in-memory model
 * of what the disk must contain.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { RETRY, type Qcow2Handle, type ReadExtent, type WriteExtent } from '../../src/backend/qcow2/index.js';
import { Prng } from './prng.js';

export function hasQemuImg(): boolean {
  return spawnSync('qemu-img', ['--version']).status === 0;
}

/** Skip reason when qemu-img is missing; tests fail instead when VUBLK_E2E_REQUIRED=1. */
export function qemuImgSkipReason(): string | null {
  if (hasQemuImg()) return null;
  if (process.env['VUBLK_E2E_REQUIRED'] === '1') throw new Error('qemu-img is required (VUBLK_E2E_REQUIRED=1)');
  return 'qemu-img not installed';
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', timeout: 60_000 });
}

/** `qemu-img check` exit status and output (0 clean, 2 corruption, 3 leaks only). */
export function qemuImgCheck(path: string): { status: number; output: string } {
  const result = spawnSync('qemu-img', ['check', '-f', 'qcow2', path], { encoding: 'utf8', timeout: 60_000 });
  return { status: result.status ?? -1, output: `${result.stdout}${result.stderr}` };
}

export function qemuImgCompare(a: string, aFormat: string, b: string, bFormat: string): { status: number; output: string } {
  const result = spawnSync('qemu-img', ['compare', '-f', aFormat, '-F', bFormat, a, b], { encoding: 'utf8', timeout: 60_000 });
  return { status: result.status ?? -1, output: `${result.stdout}${result.stderr}` };
}

/** Writes `data` at guest `offset` through prepare → pwrite per extent → commit. */
export function writeThrough(handle: Qcow2Handle, offset: number, data: Uint8Array): void {
  const extents: WriteExtent[] = [];
  let ticket = RETRY;
  for (let tries = 0; tries < 10_000 && ticket === RETRY; tries++) ticket = handle.prepareWrite(offset, data.length, extents);
  if (ticket === RETRY) throw new Error(`write at ${offset} stayed RETRY`);
  let at = 0;
  for (const e of extents) {
    fs.writeSync(e.fd, data, at, e.length, e.hostOffset);
    at += e.length;
  }
  if (at !== data.length) throw new Error(`extents cover ${at} of ${data.length} bytes`);
  handle.commitWrite(ticket);
}

/** Reads guest [offset, offset+length) through mapRead → pread / zero fill / readCompressed. */
export function readThrough(handle: Qcow2Handle, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  const extents: ReadExtent[] = [];
  handle.mapRead(offset, length, extents);
  let at = 0;
  for (const e of extents) {
    const part = out.subarray(at, at + e.length);
    if (e.kind === 'data') {
      let done = 0;
      while (done < e.length) {
        const n = fs.readSync(e.fd, part, done, e.length - done, e.hostOffset + done);
        if (n === 0) break; // past EOF of a sparse file: zeroes already
        done += n;
      }
    } else if (e.kind === 'compressed') handle.readCompressed(e, part);
    at += e.length;
  }
  if (at !== length) throw new Error(`extents cover ${at} of ${length} bytes`);
  return out;
}

/** Retries an operation that answers RETRY (only happens with concurrent writers). */
export function untilDone(op: () => number): void {
  for (let tries = 0; tries < 100_000; tries++) if (op() !== RETRY) return;
  throw new Error('operation stayed RETRY');
}

export type WorkloadOp =
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'flush' }
  | { kind: 'read'; offset: number; length: number };

/** A seeded mix of writes of random sizes/offsets, discards, write-zeroes, flushes and read checks. */
export function makeWorkload(seed: number, diskBytes: number, clusterSize: number, count: number): WorkloadOp[] {
  const rng = new Prng(seed);
  const ops: WorkloadOp[] = [];
  const sectors = diskBytes / 512;
  for (let i = 0; i < count; i++) {
    const kind = rng.weighted([
      [60, 'write'],
      [8, 'discard'],
      [8, 'zero'],
      [6, 'flush'],
      [18, 'read'],
    ] as const);
    if (kind === 'flush') {
      ops.push({ kind });
      continue;
    }
    const big = kind === 'discard' || kind === 'zero' ? Math.max(clusterSize * 3, 256 * 1024) : 256 * 1024;
    const lengthSectors = rng.chance(0.3) ? rng.int(1, 16) : rng.int(1, big / 512);
    // bias offsets towards cluster boundaries so partial/whole cluster cases both occur
    let startSector = rng.int(0, sectors - 1);
    if (rng.chance(0.3)) startSector = Math.floor((startSector * 512) / clusterSize) * (clusterSize / 512);
    const length = Math.min(lengthSectors, sectors - startSector) * 512;
    if (kind === 'write') ops.push({ kind, offset: startSector * 512, length, seed: rng.u32() });
    else if (kind === 'zero') ops.push({ kind, offset: startSector * 512, length, unmap: rng.chance(0.5) });
    else ops.push({ kind, offset: startSector * 512, length });
  }
  return ops;
}

export function patternFor(seed: number, length: number): Buffer {
  const data = Buffer.alloc(length);
  new Prng(seed).fill(data);
  return data;
}

/**
 * Applies `ops` to the handle and to `model` (the expected disk content). Discarded whole clusters read
 * as zeroes (v3 zero flag or deallocation without backing) or, for v2 with a backing file, as the backing
 * file (`discardShows`); partial-cluster discards change nothing.
 */
export function runWorkload(
  handle: Qcow2Handle,
  model: Buffer,
  ops: readonly WorkloadOp[],
  clusterSize: number,
  /** v2 with a backing file: a discarded cluster shows the backing file's bytes again */
  discardShows?: Buffer,
): void {
  for (const [index, op] of ops.entries()) {
    switch (op.kind) {
      case 'write': {
        const data = patternFor(op.seed, op.length);
        writeThrough(handle, op.offset, data);
        data.copy(model, op.offset);
        break;
      }
      case 'discard': {
        untilDone(() => handle.discard(op.offset, op.length));
        const first = Math.ceil(op.offset / clusterSize) * clusterSize;
        const last = Math.floor((op.offset + op.length) / clusterSize) * clusterSize;
        if (first < last && discardShows !== undefined) discardShows.copy(model, first, first, last);
        else if (first < last) model.fill(0, first, last);
        break;
      }
      case 'zero':
        untilDone(() => handle.writeZeroes(op.offset, op.length, op.unmap));
        model.fill(0, op.offset, op.offset + op.length);
        break;
      case 'flush':
        handle.flush();
        break;
      case 'read': {
        const got = readThrough(handle, op.offset, op.length);
        if (!got.equals(model.subarray(op.offset, op.offset + op.length))) {
          throw new Error(`op ${index}: read ${op.offset}+${op.length} differs from the model`);
        }
        break;
      }
    }
  }
}
