// The per-queue counter blocks (src/dataplane/counters.ts): what a writer publishes is what a reader sees,
// queues do not bleed into each other, a ring that moves to a new writer continues the totals, and a reader
// racing a writer on another thread only ever sees whole publishes (the seqlock).
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { COUNTERS_PER_QUEUE, Counter, CounterReader, LatencyOp, QueueCounters, createCounterBuffer } from '../../src/dataplane/counters.js';

describe('queue counters', () => {
  it('publishes adds, gauges and latencies per queue at flush, not before', () => {
    const buffer = createCounterBuffer(3);
    const reader = new CounterReader(buffer);
    const q1 = new QueueCounters(buffer, 1);
    q1.add(Counter.reads);
    q1.add(Counter.bytesRead, 4096);
    q1.add(Counter.bytesRead, 512);
    q1.observeLatency(LatencyOp.read, 30_000); // 30 µs: the 50 µs bucket
    expect(reader.read(1, 'reads'), 'nothing before the flush').toBe(0);
    q1.flush();
    expect(reader.read(1, 'reads')).toBe(1);
    expect(reader.read(1, 'bytesRead')).toBe(4608);
    expect(reader.read(0, 'reads') + reader.read(2, 'reads'), 'other queues untouched').toBe(0);
    const latency = reader.latency(1, 'read');
    expect(latency.count).toBe(1);
    expect(latency.buckets[2]).toBe(1);
    expect(latency.sumSeconds).toBeCloseTo(30e-6, 12);
    expect(reader.latency(1, 'write').count).toBe(0);

    q1.setGauge(Counter.poisoned, 1);
    expect(reader.read(1, 'poisoned'), 'gauges are published at once').toBe(1);
    q1.setGauge(Counter.poisoned, 0);
    expect(reader.read(1, 'poisoned')).toBe(0);

    // The ring moves to another worker: a new writer adds to the same totals.
    const moved = new QueueCounters(buffer, 1);
    moved.add(Counter.reads, 2);
    moved.flush();
    expect(reader.read(1, 'reads')).toBe(3);
    expect(reader.total('reads')).toBe(3);
    // A flush with nothing pending changes nothing.
    moved.flush();
    expect(reader.read(1, 'bytesRead')).toBe(4608);
  });

  it('keeps totals exact past 2^32 and 2^48 (bytes of a long-lived disk)', () => {
    const buffer = createCounterBuffer(1);
    const writer = new QueueCounters(buffer, 0);
    for (let i = 0; i < 3; i++) {
      writer.add(Counter.bytesWritten, 2 ** 48 + 1);
      writer.flush();
    }
    expect(new CounterReader(buffer).read(0, 'bytesWritten')).toBe(3 * (2 ** 48 + 1));
  });

  it('a writer stopped mid-publish: reads end with the last values, then read the next whole publish', () => {
    const buffer = createCounterBuffer(2);
    const writer = new QueueCounters(buffer, 1);
    writer.add(Counter.reads, 3);
    writer.flush();
    // The sequence word of queue 1 left odd, as by a writer that died between its two sequence stores.
    const seq = new Int32Array(buffer);
    const seqIndex = (COUNTERS_PER_QUEUE + 1) * 2;
    const published = Atomics.load(seq, seqIndex);
    Atomics.store(seq, seqIndex, published + 1);
    const reader = new CounterReader(buffer);
    expect(reader.read(1, 'reads')).toBe(3);
    expect(reader.read(1, 'reads')).toBe(3);
    expect(reader.read(0, 'reads')).toBe(0);
    // The writer finishes (a preempted one, not a dead one): its next publish is read whole.
    Atomics.store(seq, seqIndex, published);
    writer.add(Counter.reads, 2);
    writer.observeLatency(LatencyOp.read, 1000);
    writer.flush();
    expect(reader.read(1, 'reads')).toBe(5);
    expect(reader.latency(1, 'read')).toMatchObject({ count: 1, sumSeconds: 1e-6 });
  });

  it('a reader on another thread never sees half a publish', async () => {
    const buffer = createCounterBuffer(2);
    // The writer publishes, in each flush, one read of exactly 1 µs: in every whole snapshot of the histogram
    // the latency sum is the count times 1 µs, however the reads interleave with the writes (a snapshot torn
    // between two publishes would pair one publish's buckets with the next one's sum).
    const source = `
      const { workerData, parentPort } = require('node:worker_threads');
      import(workerData.module).then(({ QueueCounters, Counter, LatencyOp }) => {
        const writer = new QueueCounters(workerData.buffer, 1);
        const stop = new Int32Array(workerData.stop);
        let flushes = 0;
        while (Atomics.load(stop, 0) === 0) {
          writer.add(Counter.reads);
          writer.add(Counter.bytesRead, 4096);
          writer.observeLatency(LatencyOp.read, 1000);
          writer.flush();
          flushes++;
          // A pause as between two drains (a worker publishes once per drain; here ~7 µs apart). With busy
          // CPUs this thread is also preempted in the middle of a publish: the reader must wait it out.
          for (let k = 0; k < 1000; k++) Atomics.load(stop, 0);
        }
        parentPort.postMessage(flushes);
      });
    `;
    const stop = new SharedArrayBuffer(4);
    // The worker runs the compiled module (npm test builds first), the same code as this file imports.
    const compiled = new URL('../../dist/src/dataplane/counters.js', import.meta.url).href;
    const worker = new Worker(source, { eval: true, workerData: { buffer, stop, module: compiled } });
    const reader = new CounterReader(buffer);
    let checked = 0;
    let last = 0;
    const deadline = Date.now() + 1500;
    while (Date.now() < deadline) {
      const latency = reader.latency(1, 'read');
      const reads = reader.read(1, 'reads');
      // A snapshot is whole: its sum is its count's; reads, read later, can only be ahead of it.
      if (Math.round(latency.sumSeconds * 1e9) !== latency.count * 1000) {
        expect.fail(`torn snapshot: count ${latency.count}, sum ${latency.sumSeconds * 1e9} ns`);
      }
      expect(reads).toBeGreaterThanOrEqual(latency.count);
      expect(reads).toBeGreaterThanOrEqual(last);
      last = reads;
      checked++;
    }
    Atomics.store(new Int32Array(stop), 0, 1);
    const flushes = await new Promise<number>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await worker.terminate();
    expect(reader.read(1, 'reads')).toBe(flushes);
    expect(reader.read(1, 'bytesRead')).toBe(flushes * 4096);
    expect(reader.latency(1, 'read').count).toBe(flushes);
    expect(flushes, 'the writer ran').toBeGreaterThan(1000);
    expect(checked, 'the reader ran').toBeGreaterThan(1000);
  }, 20_000);
});
