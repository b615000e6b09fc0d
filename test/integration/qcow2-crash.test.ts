/**
 * Crash consistency: a child process runs a write-heavy loop (writes, whole-cluster discards, flushes)
 * on one qcow2 image and is killed with SIGKILL at a random moment, 20 times in a row on the same image.
 * After each kill `qemu-img check` must show no corruption (leaked clusters are allowed), and every
 * 4 KiB block must hold what the last operation acknowledged before the last completed flush wrote, or
 * what a later operation wrote. Runs the compiled module: `npm run build` first.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Qcow2Handle, attachLayer, openImage } from '../../src/backend/qcow2/index.js';
import { Prng, seedFromEnv } from '../support/prng.js';
import { qemuImg, qemuImgCheck, qemuImgSkipReason, readThrough } from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const MiB = 1024 * 1024;
const BLOCK = 4096;
const ITERATIONS = 20;
const childScript = new URL('../support/qcow2-crash-child.mjs', import.meta.url).pathname;
const SEED = seedFromEnv('QCOW2_CRASH_SEED');
let dir = '';

beforeAll(() => {
  if (!fs.existsSync(new URL('../../dist/src/backend/qcow2/index.js', import.meta.url))) throw new Error('run npm run build first');
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2crash-'));
  console.log(`qcow2 crash seed ${SEED} (replay with QCOW2_CRASH_SEED=${SEED})`);
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Runs the child until it has printed READY, then kills it after `delayMs`; returns its output. */
function runAndKill(image: string, seed: number, firstOp: number, delayMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [childScript, image, String(seed), String(firstOp)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let killTimer: NodeJS.Timeout | undefined;
    const deadline = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.stdout.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      if (killTimer === undefined && out.includes('READY')) killTimer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(deadline);
      if (killTimer) clearTimeout(killTimer);
      if (signal !== 'SIGKILL') reject(new Error(`child exited with ${code}: ${err}`));
      else resolve(out);
    });
  });
}

describe.skipIf(skip !== null)('qcow2 crash consistency (SIGKILL during writes)', () => {
  const configs = [
    { name: '64 KiB clusters', cluster: 65536, backing: false, iterations: ITERATIONS },
    { name: '4 KiB clusters over a raw backing file', cluster: 4096, backing: true, iterations: 6 },
  ];
  for (const config of configs)
    it(`${config.name}: ${config.iterations} kills, no corruption, flushed writes survive`, async () => {
      const size = 16 * MiB;
      const image = path.join(dir, `crash-${config.cluster}.qcow2`);
      const blocks = size / BLOCK;
      // op id each block holds (0: zeroes; 1: the backing file's block, written in the same self-describing format)
      let baseline = new Float64Array(blocks);
      if (config.backing) {
        const base = `${image}.base.raw`;
        const data = Buffer.alloc(size);
        for (let b = 0; b < blocks; b++) {
          const words = new Uint32Array(data.buffer, data.byteOffset + b * BLOCK, BLOCK / 4);
          words.fill((1 * 2654435761 + b) >>> 0);
          words[0] = 1;
          words[1] = b;
        }
        fs.writeFileSync(base, data);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${config.cluster}`, '-b', base, '-F', 'raw', image, String(size));
        baseline.fill(1);
      } else {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${config.cluster}`, image, String(size));
      }
      const rng = new Prng(SEED);
      let firstOp = 1; // op ids start at 2: 1 marks backing-file content
      let leaks = 0;
      for (let iteration = 0; iteration < config.iterations; iteration++) {
        const t0 = Date.now();
        const output = await runAndKill(image, rng.u32(), firstOp, rng.int(30, 300));
        // What each block may hold: the last writer acknowledged before the last flush, or any later writer.
        const lines = output.split('\n').filter((l) => /^[WDZF] /.test(l));
        let flushed = 0;
        for (const line of lines) if (line.startsWith('F ')) flushed = Number(line.split(' ')[1]);
        const allowed: Array<Set<number>> = Array.from({ length: blocks }, (_, b) => new Set([baseline[b]!]));
        for (const line of lines) {
          const [kind, opText, firstText, countText] = line.split(' ');
          if (kind === 'F') continue;
          const opId = Number(opText);
          const value = kind === 'W' ? opId : 0;
          for (let b = Number(firstText); b < Number(firstText) + Number(countText); b++) {
            if (opId < flushed)
              allowed[b] = new Set([value]); // acknowledged and flushed: older values are gone
            else allowed[b]!.add(value);
          }
          firstOp = Math.max(firstOp, opId);
        }
        firstOp += 1;

        const t1 = Date.now();
        const check = qemuImgCheck(image);
        expect(check.status === 0 || check.status === 3, `iteration ${iteration}: qemu-img check\n${check.output}`).toBe(true);
        expect(check.output).not.toMatch(/ERROR|corruption/);
        const leaked = /(\d+) leaked clusters/.exec(check.output);
        leaks = leaked ? Number(leaked[1]) : 0;

        const layer = attachLayer(openImage(image, { format: 'qcow2', readOnly: true, warn: () => {} }));
        if (!(layer instanceof Qcow2Handle)) throw new Error('not qcow2');
        const content = readThrough(layer, 0, size);
        layer.close();
        const next = new Float64Array(blocks);
        for (let b = 0; b < blocks; b++) {
          const words = new Uint32Array(content.buffer, content.byteOffset + b * BLOCK, BLOCK / 4);
          let value = 0;
          if (words[0] !== 0 || words[1] !== 0 || words[2] !== 0) {
            value = words[0]!;
            const fill = (value * 2654435761 + b) >>> 0;
            let consistent = words[1] === b;
            for (let w = 2; w < words.length && consistent; w++) consistent = words[w] === fill;
            expect(consistent, `iteration ${iteration}: block ${b} holds a torn or misplaced block (op ${value})`).toBe(true);
          }
          if (!allowed[b]!.has(value)) {
            throw new Error(
              `iteration ${iteration}: block ${b} holds op ${value}, allowed ${[...allowed[b]!].join(',')} (flushed up to ${flushed})`,
            );
          }
          next[b] = value;
        }
        baseline = next;
        if (process.env['QCOW2_CRASH_TIMING']) console.log(`iteration ${iteration}: run ${t1 - t0} ms, verify ${Date.now() - t1} ms`);
      }
      console.log(
        `${config.name}: ${config.iterations} SIGKILL iterations, image consistent; ${leaks} leaked clusters at the end (allowed)`,
      );
    });
});
