/** Runs the bench CLI (bench/src/cli) as a child process, for the tests that check vublk with its verifier. */
import { execFile } from 'node:child_process';
import { BENCH_CLI } from '../../bench/src/paths.js';

export interface BenchResult {
  /** Exit code; null when killed (the timeout). */
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `bench run ARGS…`, killed after `timeoutMs`; never rejects (the exit code says how it went). */
export function runBench(args: string[], timeoutMs: number): Promise<BenchResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BENCH_CLI, 'run', ...args], { timeout: timeoutMs }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : null;
      resolve({ code, stdout, stderr });
    });
  });
}

/** A verify run: write the pattern and read it back (`only`: read and check what an earlier run wrote). */
export function verifyArgs(
  socket: string,
  run: { size: string; bs: string; queues?: number; iodepth?: number; seed: number; only?: boolean },
): string[] {
  const args = ['--socket', socket, run.only === true ? '--verify-only' : '--verify', '--size', run.size, '--bs', run.bs];
  if (run.queues !== undefined) args.push('--queues', String(run.queues));
  if (run.iodepth !== undefined) args.push('--iodepth', String(run.iodepth));
  args.push('--seed', String(run.seed));
  return args;
}
