/**
 * Two real worker threads write and read one qcow2 image at once through attach(): each owns interleaved
 * 16 KiB stripes, so both allocate the same clusters concurrently (allocation lock, in-flight clusters,
 * RETRY), and whole clusters it discards and zeroes (deferred frees, unmap paths). The merged models
 * must equal the image (`qemu-img compare`) and `qemu-img check` must be clean.
 * Runs the compiled module: `npm run build` first.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { openImage } from '../../src/backend/qcow2/index.js';
import { patternFor, qemuImg, qemuImgCheck, qemuImgCompare, qemuImgSkipReason } from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const MiB = 1024 * 1024;
const STRIPE = 16 * 1024;
const WORKERS = 2;
const SEED = Number(process.env['QCOW2_THREAD_SEED'] ?? 1000);
const workerScript = new URL('../support/qcow2-thread-worker.mjs', import.meta.url);
const built = fs.existsSync(new URL('../../dist/src/backend/qcow2/index.js', import.meta.url));
let dir = '';

beforeAll(() => {
  if (!built) throw new Error('dist/src/backend/qcow2 is missing: run npm run build first');
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2thr-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function runWorker(workerData: object): Promise<{ ok: boolean; model?: Uint8Array; error?: string; retries?: number }> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(workerScript, { workerData });
    const timer = setTimeout(() => {
      void worker.terminate();
      reject(new Error('worker did not finish within 50 s'));
    }, 50_000);
    worker.once('message', (message) => {
      clearTimeout(timer);
      resolve(message);
    });
    worker.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

describe.skipIf(skip !== null)('qcow2 shared by two worker threads', () => {
  for (const backing of [false, true]) {
    it(`concurrent writes and reads, 64 KiB clusters, ${backing ? 'with' : 'without'} backing`, async () => {
      const size = 32 * MiB;
      const image = path.join(dir, `threads-${backing}.qcow2`);
      const base = path.join(dir, `threads-${backing}.base.raw`);
      const baseData = backing ? patternFor(4242, size) : Buffer.alloc(size);
      if (backing) {
        fs.writeFileSync(base, baseData);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', base, '-F', 'raw', image, String(size));
      } else {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(size));
      }
      const description = openImage(image, { format: 'qcow2', l2CacheBytes: 4 * 65536, warn: () => {} });
      const results = await Promise.all(
        Array.from({ length: WORKERS }, (_, index) =>
          runWorker({
            description,
            index,
            workers: WORKERS,
            seed: SEED + index + (backing ? 10 : 0),
            ops: 3000,
            stripe: STRIPE,
            initial: backing ? base : null,
          }),
        ),
      );
      for (const r of results) expect(r.error).toBeUndefined();
      // merge: the first half is in 16 KiB stripes, the second in clusters; unit u belongs to worker u % WORKERS,
      // whose model starts from the backing file
      const model = Buffer.alloc(size);
      for (const [base, unit] of [
        [0, STRIPE],
        [size / 2, 65536],
      ] as const) {
        for (let u = 0; u < size / 2 / unit; u++) {
          const owner = results[u % WORKERS]!.model!;
          const at = base + u * unit;
          Buffer.from(owner.buffer, owner.byteOffset + at, unit).copy(model, at);
        }
      }
      const check = qemuImgCheck(image);
      expect(check.output).toContain('No errors were found');
      const raw = `${image}.model.raw`;
      fs.writeFileSync(raw, model);
      expect(qemuImgCompare(image, 'qcow2', raw, 'raw').output).toContain('Images are identical');
      console.log(`retries: ${results.map((r) => r.retries).join(', ')}`);
    });
  }
});
