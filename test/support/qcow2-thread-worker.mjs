// A worker thread of the two-thread qcow2 test: attaches its own handle to the shared image state and
// writes/reads the 16 KiB stripes it owns (stripe % workers === index), so both threads allocate the same
// clusters concurrently. Uses the compiled module (npm run build).
import { parentPort, workerData } from 'node:worker_threads';
import * as fs from 'node:fs';
import { attachLayer, RETRY } from '../../dist/src/backend/qcow2/index.js';
import { mulberry32 } from './mulberry32.mjs';

const { description, index, workers, seed, ops, stripe, initial } = workerData;
const handle = attachLayer(description);
const size = handle.size;
const model = Buffer.alloc(size);
if (initial) fs.readFileSync(initial).copy(model); // what the backing file shows before any write
const sleeper = new Int32Array(new SharedArrayBuffer(4));
const u32 = mulberry32(seed);
let retries = 0;
function retrying(op) {
  for (let i = 0; i < 20000; i++) {
    const result = op();
    if (result !== RETRY) return result;
    retries++;
    Atomics.wait(sleeper, 0, 0, 1);
  }
  throw new Error('stayed RETRY');
}
// Like an engine at queue depth 8: up to 8 prepared writes wait for "completion" before being committed.
// A RETRY (a cluster in flight, possibly in this same thread) first completes everything pending here.
const pending = [];
function completeAll() {
  for (const p of pending.splice(0)) {
    let at = 0;
    for (const e of p.extents) {
      fs.writeSync(e.fd, p.data, at, e.length, e.hostOffset);
      at += e.length;
    }
    handle.commitWrite(p.ticket);
  }
}
function write(offset, data) {
  const extents = [];
  const ticket = retrying(() => {
    const t = handle.prepareWrite(offset, data.length, extents);
    if (t === RETRY) completeAll();
    return t;
  });
  pending.push({ ticket, extents, data });
  if (pending.length >= 8) completeAll();
}
function read(offset, length) {
  const out = Buffer.alloc(length);
  const extents = [];
  handle.mapRead(offset, length, extents);
  let at = 0;
  for (const e of extents) {
    const part = out.subarray(at, at + e.length);
    if (e.kind === 'data') fs.readSync(e.fd, part, 0, e.length, e.hostOffset);
    else if (e.kind === 'compressed') handle.readCompressed(e, part);
    at += e.length;
  }
  return out;
}
try {
  // First half: 16 KiB stripes (clusters shared by both threads). Second half: whole clusters owned by one
  // thread, which also discards them and zeroes them whole (the unmap paths run concurrently).
  const half = size / 2;
  const cluster = handle.geometry.clusterSize;
  for (let i = 0; i < ops; i++) {
    const whole = u32() % 2 === 1;
    const unit = whole ? cluster : stripe;
    const base = whole ? half : 0;
    const units = half / unit;
    let s = u32() % units;
    s -= s % workers;
    s += index;
    if (s >= units) s -= workers;
    const unitStart = base + s * unit;
    const first = (u32() % (unit / 512)) * 512;
    const length = (1 + (u32() % ((unit - first) / 512))) * 512;
    const offset = unitStart + first;
    const kind = u32() % 10;
    if (kind < 6) {
      const data = Buffer.alloc(length);
      for (let b = 0; b < length; b += 4) data.writeUInt32LE(u32(), b);
      write(offset, data);
      data.copy(model, offset);
    } else if (kind < 7) {
      completeAll();
      const unmap = u32() % 2 === 0;
      if (whole && u32() % 2 === 0) {
        retrying(() => handle.writeZeroes(unitStart, unit, unmap));
        model.fill(0, unitStart, unitStart + unit);
      } else {
        retrying(() => handle.writeZeroes(offset, length, unmap));
        model.fill(0, offset, offset + length);
      }
    } else if (kind < 8) {
      completeAll();
      if (whole) {
        retrying(() => handle.discard(unitStart, unit));
        model.fill(0, unitStart, unitStart + unit);
      } else {
        handle.flush();
      }
    } else {
      completeAll();
      const got = read(unitStart, unit);
      if (!got.equals(model.subarray(unitStart, unitStart + unit)))
        throw new Error(`worker ${index}: ${unit}-byte unit at ${unitStart} read back wrong at op ${i}`);
    }
  }
  completeAll();
  handle.close();
  parentPort.postMessage({ ok: true, model, retries });
} catch (error) {
  try {
    handle.close();
  } catch {}
  parentPort.postMessage({ ok: false, error: String(error?.stack || error) });
}
