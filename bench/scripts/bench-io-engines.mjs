#!/usr/bin/env node
// Compares the request engines of the daemon (--io-engine sync vs io_uring) with the built-in load
// generator (`vublk-bench run`): 4 KiB random reads at depth 32 on one queue by default, from a warm page cache.
// With --strace, a second, shorter run per engine is made with `strace -c -f` attached to the daemon to
// count syscalls per request (strace slows the daemon a lot: its IOPS are not comparable).
//
//   npm run build && node bench/scripts/bench-io-engines.mjs [--runtime 10] [--rw randread] [--bs 4k]
//                                                     [--iodepth 32] [--queues 1] [--strace] [--engines sync,io_uring]
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, writeSync, closeSync, rmSync, readFileSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('../../dist/src/cli.js', import.meta.url));
const BENCH_CLI = fileURLToPath(new URL('../dist/bench/src/cli.js', import.meta.url));
for (const file of [CLI, BENCH_CLI]) if (!existsSync(file)) throw new Error(`${file} is missing: run npm run build first`);

const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
};
const runtime = flag('runtime', '10');
const rw = flag('rw', 'randread');
const bs = flag('bs', '4k');
const iodepth = flag('iodepth', '32');
const queues = flag('queues', '1');
const engines = flag('engines', 'sync,io_uring').split(',');
const withStrace = args.includes('--strace');
const IMAGE_BYTES = 256 * 1024 * 1024;

const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-bench-engines-'));
const image = path.join(dir, 'disk.img');
{
  // Real data (not holes), written once so every engine reads from the same warm page cache.
  const fd = openSync(image, 'w');
  const chunk = Buffer.alloc(4 * 1024 * 1024);
  for (let at = 0; at < IMAGE_BYTES; at += chunk.length) writeSync(fd, randomFillSync(chunk));
  closeSync(fd);
  readFileSync(image);
}

function startDaemon(engine) {
  const socket = path.join(dir, `${engine}.sock`);
  rmSync(socket, { force: true });
  const child = spawn(
    process.execPath,
    [
      CLI,
      'serve',
      '--socket',
      socket,
      '--image',
      image,
      '--io-engine',
      engine,
      '--num-queues',
      queues,
      '--metrics-listen',
      'off',
      '--log-level',
      'warn',
    ],
    { stdio: ['ignore', 'inherit', 'inherit'] },
  );
  return { child, socket };
}

async function waitFor(predicate, what, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function bench(socket, seconds, ramp = 1) {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      [
        BENCH_CLI,
        'run',
        '--socket',
        socket,
        '--rw',
        rw,
        '--bs',
        bs,
        '--iodepth',
        iodepth,
        '--queues',
        queues,
        '--runtime',
        String(seconds),
        '--ramp',
        String(ramp),
        '--json',
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (text) => (out += text));
    child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`bench exited ${code}: ${out}`))));
  });
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
}

/** CPU seconds (user + system, all threads) the daemon has used so far. */
function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in USER_HZ (100)
}

function summary(result) {
  const t = result.result.total;
  return { requests: t.requests, iops: t.iops, mibps: t.mibps, meanUs: t.latency.meanUs, p50Us: t.latency.p50Us, p99Us: t.latency.p99Us };
}

async function strace(engine) {
  const { child, socket } = startDaemon(engine);
  try {
    await waitFor(() => existsSync(socket), 'the socket');
    // The queue workers start with the first session; attach after a short warm-up session.
    await bench(socket, 0.2);
    const out = path.join(dir, `strace-${engine}.txt`);
    const tracer = spawn('strace', ['-c', '-f', '-o', out, '-p', String(child.pid)], { stdio: 'ignore' });
    await new Promise((resolve) => setTimeout(resolve, 500));
    const result = await bench(socket, 3, 0);
    tracer.kill('SIGINT');
    await new Promise((resolve) => tracer.once('exit', resolve));
    return { result, table: readFileSync(out, 'utf8') };
  } finally {
    await stop(child);
  }
}

function syscallRows(table) {
  const rows = {};
  for (const line of table.split('\n')) {
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$/.exec(line);
    if (m && m[3] !== 'total') rows[m[3]] = Number(m[1]);
  }
  return rows;
}

try {
  try {
    execFileSync('strace', ['-V'], { stdio: 'ignore' });
  } catch {
    if (withStrace) throw new Error('strace is not installed (apt-get install -y strace)');
  }
  const results = [];
  for (const engine of engines) {
    const { child, socket } = startDaemon(engine);
    try {
      await waitFor(() => existsSync(socket), 'the socket');
      // Warm-up session (starts the queue workers), then a measured one; the daemon's CPU time is sampled
      // around the whole measured bench (its handshake included).
      await bench(socket, 0.5, 0);
      const cpuBefore = cpuSeconds(child.pid);
      const result = await bench(socket, Number(runtime), 0);
      const cpu = cpuSeconds(child.pid) - cpuBefore;
      const s = summary(result);
      s.daemonCpuUsPerRequest = Number(((cpu * 1e6) / s.requests).toFixed(2));
      s.daemonCpuCores = Number((cpu / Number(runtime)).toFixed(2));
      results.push({ engine, s });
      process.stderr.write(`${engine}: ${JSON.stringify(s)}\n`);
    } finally {
      await stop(child);
    }
  }
  console.log(`\n${rw} bs=${bs} iodepth=${iodepth} queues=${queues} runtime=${runtime}s, ${os.cpus().length} CPUs, kernel ${os.release()}`);
  for (const { engine, s } of results) console.log(`${engine.padEnd(9)} ${JSON.stringify(s)}`);
  if (withStrace) {
    for (const engine of engines) {
      const { result, table } = await strace(engine);
      const r = summary(result);
      const requests = r.requests;
      const rows = syscallRows(table);
      const total = Object.values(rows).reduce((a, b) => a + b, 0);
      console.log(`\nstrace -c -f (${engine}), ${JSON.stringify(r)}`);
      console.log(table.trim());
      if (Number.isFinite(requests) && requests > 0) {
        const top = Object.entries(rows)
          .sort((a, b) => b[1] - a[1])
          .slice(0, 6)
          .map(([name, calls]) => `${name} ${(calls / requests).toFixed(3)}`)
          .join(', ');
        console.log(`syscalls per request: ${(total / requests).toFixed(3)} (${top})`);
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
