/**
 * A back-end daemon (vublk or qemu-storage-daemon) started by the benchmark: output captured, ready when all
 * its sockets exist, stopped with SIGTERM then SIGKILL after 5 s. Every wait has a deadline.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`;
}

export class DaemonProcess {
  output = '';
  private exitCode: number | null | undefined = undefined;
  private readonly exited: Promise<void>;
  readonly child: ChildProcess;

  constructor(
    readonly label: string,
    readonly argv: string[],
    readonly sockets: string[],
  ) {
    this.child = spawn(argv[0] as string, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    // Keep only the tail: a chatty daemon must not grow the benchmark's memory.
    const keep = (chunk: Buffer): void => void (this.output = (this.output + chunk.toString()).slice(-8192));
    this.child.stdout?.on('data', keep);
    this.child.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      this.child.on('exit', (code) => {
        this.exitCode = code;
        resolve();
      });
      this.child.on('error', (error) => {
        this.output += `spawn error: ${error.message}\n`;
        this.exitCode = -1;
        resolve();
      });
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get alive(): boolean {
    return this.exitCode === undefined;
  }

  async ready(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (const socket of this.sockets) {
      while (!existsSync(socket)) {
        if (this.exitCode !== undefined) throw new Error(`${this.label} exited with ${this.exitCode}: ${this.output.trim()}`);
        if (Date.now() > deadline) throw new Error(`${this.label} did not create ${socket} within ${timeoutMs} ms: ${this.output.trim()}`);
        await sleep(20);
      }
    }
    await sleep(200);
  }

  async stop(): Promise<void> {
    if (this.exitCode !== undefined) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}

export interface ChildResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end (killed after timeoutMs). */
export function runChild(argv: string[], timeoutMs: number): Promise<ChildResult> {
  return new Promise((resolve) => {
    const child = spawn(argv[0] as string, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-8192)));
    child.on('error', (error) => {
      clearTimeout(timer);
      resolve({ code: -1, stdout, stderr: `${stderr}spawn error: ${error.message}` });
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}
