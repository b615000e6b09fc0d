#!/usr/bin/env node
/**
 * The `vublk-bench` command: the load generator and the side-by-side benchmark. Not part of the daemon package.
 *
 *   vublk-bench run --socket PATH --rw randread --bs 4k --iodepth 32 --queues 2 --runtime 10 [--json]
 *   vublk-bench run --socket PATH --verify --bs 4k --size 64M
 *   vublk-bench compare            # what `npm run bench` runs: vublk vs qemu-storage-daemon → docs/benchmarks.md
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { parseSize } from '../../src/throttle/size.js';
import type { BenchOptions } from './loadgen/bench.js';
import { RW_MODES, type RwMode } from './loadgen/workload.js';

interface BenchFlags {
  socket: string;
  rw: RwMode;
  bs: string;
  iodepth: string;
  queues: string;
  runtime: string;
  ramp: string;
  size?: string;
  verify?: boolean;
  verifyOnly?: boolean;
  verifyBs?: string;
  json?: boolean;
  seed: string;
  rwmixread: string;
  queueSize?: string;
  indirect?: boolean;
  timeout: string;
  startAt?: string;
}

function integer(name: string, text: string, min: number, max: number): number {
  const value = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new InvalidArgumentError(`${name} must be a whole number in ${min}..${max}, got ${JSON.stringify(text)}`);
  }
  return value;
}

function seconds(name: string, text: string, min: number): number {
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value) || value < min)
    throw new InvalidArgumentError(`${name} must be a number of seconds ≥ ${min}, got ${JSON.stringify(text)}`);
  return value;
}

function size(name: string, text: string): number {
  try {
    return parseSize(text);
  } catch (error) {
    throw new InvalidArgumentError(`${name}: ${(error as Error).message}`);
  }
}

function blockSize(name: string, text: string): number {
  const value = size(name, text);
  if (value <= 0 || value % 512 !== 0)
    throw new InvalidArgumentError(`${name} must be a positive multiple of 512 bytes, got ${JSON.stringify(text)}`);
  return value;
}

function benchOptionsFromFlags(flags: BenchFlags): BenchOptions {
  return {
    socket: flags.socket,
    rw: flags.rw,
    bs: blockSize('--bs', flags.bs),
    iodepth: integer('--iodepth', flags.iodepth, 1, 4096),
    queues: integer('--queues', flags.queues, 1, 256),
    runtimeSec: seconds('--runtime', flags.runtime, 0.01),
    rampSec: seconds('--ramp', flags.ramp, 0),
    size: flags.size === undefined ? null : blockSize('--size', flags.size),
    verify: flags.verify === true || flags.verifyOnly === true,
    verifyOnly: flags.verifyOnly === true,
    verifyBs: flags.verifyBs === undefined ? null : blockSize('--verify-bs', flags.verifyBs),
    seed: integer('--seed', flags.seed, 0, 0xffff_ffff),
    rwmixread: integer('--rwmixread', flags.rwmixread, 0, 100),
    queueSize: flags.queueSize === undefined ? null : integer('--queue-size', flags.queueSize, 1, 32768),
    indirect: flags.indirect === true,
    timeoutMs: integer('--timeout', flags.timeout, 100, 3_600_000),
    startAtMs: flags.startAt === undefined ? null : integer('--start-at', flags.startAt, 0, Number.MAX_SAFE_INTEGER),
  };
}

async function benchAction(flags: BenchFlags): Promise<void> {
  let options: BenchOptions;
  try {
    options = benchOptionsFromFlags(flags);
  } catch (error) {
    process.stderr.write(`vublk-bench: ${(error as Error).message}\n`);
    process.exit(2);
  }
  try {
    // Loaded on use, so `vublk-bench compare` and --help never pay for the load generator's modules.
    const { runBench } = await import('./loadgen/bench.js');
    const { benchDocument, formatHuman } = await import('./loadgen/report.js');
    const doc = benchDocument(await runBench(options));
    process.stdout.write(flags.json ? `${JSON.stringify(doc, null, 2)}\n` : formatHuman(doc));
    if (!doc.ok) process.exitCode = 1;
  } catch (error) {
    process.stderr.write(`vublk-bench: ${(error as Error).message}\n`);
    process.exitCode = error instanceof Error && error.name === 'BenchUsageError' ? 2 : 1;
  }
}

const program = new Command();
program.name('vublk-bench').description('load generator and benchmark for vhost-user-blk back-ends (vublk, qemu-storage-daemon, …)');

program
  .command('run', { isDefault: true })
  .description('load generator for any vhost-user-blk back-end (plays the VM): IOPS, MiB/s, latency percentiles; --verify checks data')
  .requiredOption('--socket <path>', 'vhost-user socket of the back-end')
  .addOption(new Option('--rw <mode>', 'access pattern').choices(RW_MODES).default('randread'))
  .option('--bs <size>', 'request size (multiple of 512: 4k, 128K, 1M)', '4k')
  .option('--iodepth <n>', 'requests in flight per queue', '1')
  .option('--queues <n>', 'virtqueues to drive, each at --iodepth', '1')
  .option('--runtime <seconds>', 'measured time', '10')
  .option('--ramp <seconds>', 'warm-up before measuring (not counted)', '0')
  .option('--size <bytes>', 'use only the first SIZE bytes of the disk (default: all of it)')
  .option(
    '--verify',
    'write a seeded pattern over the region with --bs, flush, read it back with another block size and compare; exit 1 on any mismatch',
  )
  .option(
    '--verify-only',
    'like --verify without the write pass: check data an earlier --verify (same --seed, --size, --bs) left on the disk',
  )
  .option('--verify-bs <size>', 'block size of the verify read pass (default 2×bs if it divides --size and fits size_max, else 4k)')
  .option('--json', 'print the result as JSON')
  .option('--seed <n>', 'seed of offsets and of the verify pattern', '1')
  .option('--rwmixread <percent>', 'share of reads for --rw randrw', '50')
  .option('--queue-size <n>', 'ring size (default: smallest power of two ≥ 128 that holds iodepth requests)')
  .option('--indirect', 'one indirect descriptor per request (default: direct header/data/status chains)')
  .option('--timeout <ms>', 'bound of every handshake wait and of a back-end stall', '10000')
  .option(
    '--start-at <epoch-ms>',
    'connect at once, start the load at this wall-clock time (ms since the epoch): many generators on one daemon at the same moment',
  )
  .action((flags: BenchFlags) => benchAction(flags));

program
  .command('compare')
  .description(
    'benchmark vublk against qemu-storage-daemon (and fio) side by side: O_DIRECT, page-cached, scale; writes docs/benchmarks.md (npm run bench)',
  )
  .option('--rounds <n>', 'A/B rounds per workload', '4')
  .option('--runtime <seconds>', 'measured seconds per run', '2')
  .option('--ramp <seconds>', 'warm-up seconds per run', '0.3')
  .option('--image-size <bytes>', 'size of the test image', '1G')
  .option('--dir <path>', 'where the images and sockets go, on a disk for O_DIRECT (default: a fresh directory under /var/tmp)')
  .option('--out <file>', 'the report to write (default: docs/benchmarks.md of the repository)')
  .option('--json-out <file>', 'also write every raw measurement as JSON')
  .option('--groups <list>', 'only these groups, comma-separated: direct, cached, qcow2, nbd, rbd, scale (default: all)')
  .option('--no-scale', 'skip the many-disks part')
  .option('--scale-disks <n>', 'disks of the serving part of the scale test (2 queues each)', '32')
  .option(
    '--steal-rerun <percent|off>',
    "run a row's round again (all its back-ends, up to twice) when the hypervisor took this share of the CPU during one of its runs",
    '3',
  )
  .action(async (flags: Record<string, string | boolean | undefined>) => {
    const { benchCompare } = await import('./loadgen/compare.js');
    process.exitCode = await benchCompare(flags);
  });

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(`vublk-bench: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
