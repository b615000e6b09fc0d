/**
 * Starts the real daemon (`node dist/src/cli.js serve ...`) as a child process for integration tests and
 * collects its JSON log lines. Every wait has a deadline; stop() never hangs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../dist/src/cli.js', import.meta.url));

export interface LogLine {
  level: number;
  msg: string;
  [field: string]: unknown;
}

export interface DaemonProcess {
  dir: string;
  socketPath: string;
  imagePath: string;
  child: ChildProcess;
  running(): boolean;
  output(): string;
  logs(): LogLine[];
  /** Resolves with the first log line at index ≥ `since` matching, or rejects after `timeoutMs`. */
  waitForLog(match: (line: LogLine) => boolean, timeoutMs?: number, since?: number): Promise<LogLine>;
  /** SIGTERM, then SIGKILL after 5 s; resolves with the exit code. */
  stop(): Promise<number | null>;
  /**
   * Resolves with the exit code once the process has exited and its output has been read to the end (the
   * child's 'close': at 'exit' the last lines may still be in the pipe). With `timeoutMs`, rejects with the
   * output when it has not exited by then.
   */
  exited(timeoutMs?: number): Promise<number | null>;
}

export interface StartOptions {
  args?: string[];
  /** Image size for --size (default 64M). */
  size?: string;
  /** Replace the default --socket/--image/--size arguments entirely. */
  rawArgs?: string[];
  env?: NodeJS.ProcessEnv;
  /** Wait for the socket file (default true). */
  waitForSocket?: boolean;
}

export async function startDaemon(options: StartOptions = {}): Promise<DaemonProcess> {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'vublk-it-'));
  const socketPath = path.join(dir, 'vublk.sock');
  const imagePath = path.join(dir, 'disk.img');
  const args = options.rawArgs ?? [
    'serve',
    '--socket',
    socketPath,
    '--image',
    imagePath,
    '--size',
    options.size ?? '64M',
    ...(options.args ?? []),
  ];
  const child = spawn(process.execPath, [CLI, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...options.env },
    cwd: dir,
  });
  let output = '';
  let partial = '';
  const lines: LogLine[] = [];
  const waiters: { match: (line: LogLine) => boolean; resolve: (line: LogLine) => void }[] = [];
  child.stdout?.setEncoding('utf8').on('data', (text: string) => {
    output += text;
    partial += text;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const raw = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      try {
        const line = JSON.parse(raw) as LogLine;
        lines.push(line);
        for (const w of [...waiters]) {
          if (w.match(line)) {
            waiters.splice(waiters.indexOf(w), 1);
            w.resolve(line);
          }
        }
      } catch {
        // not JSON: kept in output() only
      }
    }
  });
  child.stderr?.setEncoding('utf8').on('data', (text: string) => (output += text));
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  const running = (): boolean => child.exitCode === null && child.signalCode === null;

  const daemon: DaemonProcess = {
    dir,
    socketPath,
    imagePath,
    child,
    running,
    output: () => output,
    logs: () => lines,
    waitForLog(match, timeoutMs = 10_000, since = 0) {
      const found = lines.slice(since).find(match);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no matching log line within ${timeoutMs} ms; output:\n${output}`)), timeoutMs);
        waiters.push({
          match,
          resolve: (line) => {
            clearTimeout(timer);
            resolve(line);
          },
        });
      });
    },
    async stop() {
      if (running()) {
        child.kill('SIGTERM');
        const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        const code = await exited;
        clearTimeout(killer);
        await rm(dir, { recursive: true, force: true });
        return code;
      }
      await rm(dir, { recursive: true, force: true });
      return exited;
    },
    exited(timeoutMs) {
      if (timeoutMs === undefined) return exited;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`the daemon did not exit within ${timeoutMs} ms; output:\n${output}`)), timeoutMs);
        void exited.then((code) => {
          clearTimeout(timer);
          resolve(code);
        });
      });
    },
  };

  if (options.waitForSocket ?? true) {
    try {
      await waitForSocketFile(daemon, socketPath);
    } catch (error) {
      await daemon.stop();
      throw error;
    }
  }
  return daemon;
}

/** Waits (15 s at most) until the daemon has created `socket`; throws with its output when it exits first or the time is up. */
export async function waitForSocketFile(
  daemon: Pick<DaemonProcess, 'running' | 'output'>,
  socket: string,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(socket)) {
    if (!daemon.running() || Date.now() > deadline) throw new Error(`daemon did not create ${socket}; output:\n${daemon.output()}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Runs the CLI (`serve ...` that is expected to exit, or a subcommand such as `throttle`) to completion, with a deadline. */
export function runCli(args: string[], timeoutMs = 20_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (t: string) => (stdout += t));
    child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`vublk ${args.join(' ')} did not exit within ${timeoutMs / 1000} s; stderr: ${stderr}`));
    }, timeoutMs);
    // 'close', not 'exit': the output pipes are read to their end by then.
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}
