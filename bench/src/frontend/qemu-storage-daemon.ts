/**
 * Starts QEMU's qemu-storage-daemon as a reference vhost-user-blk back-end: the front-end is validated
 * against it, and benchmarks compare vublk with it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { FrontendError, FrontendTimeoutError } from './errors.js';

export interface QsdOptions {
  /** Disk image to export. */
  image: string;
  /** Where the vhost-user socket is created. */
  socketPath: string;
  /** Image format; default raw. */
  format?: 'raw' | 'qcow2';
  numQueues?: number;
  writable?: boolean;
  logicalBlockSize?: number;
  /** O_DIRECT on the image (cache.direct=on). Default off. */
  cacheDirect?: boolean;
  /** Defaults to $VUBLK_QSD or qemu-storage-daemon on PATH. */
  binary?: string;
  /** Appended to the command line. */
  extraArgs?: readonly string[];
  startTimeoutMs?: number;
}

export class QsdStartError extends FrontendError {
  constructor(detail: string, output: string) {
    super(`qemu-storage-daemon did not start: ${detail}${output ? `\n--- its output ---\n${output.trim()}` : ''}`);
    this.name = 'QsdStartError';
  }
}

/** The binary to run, or null if there is none ($VUBLK_QSD overrides the PATH search). */
export function findQemuStorageDaemon(): string | null {
  const override = process.env['VUBLK_QSD'];
  if (override) return existsSync(override) ? override : null;
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, 'qemu-storage-daemon');
    try {
      if (statSync(candidate).isFile()) return candidate;
    } catch {
      // not in this directory
    }
  }
  return null;
}

/** The command line for an export (exposed so tests and reports can show it). */
export function qsdArguments(options: QsdOptions): string[] {
  const format = options.format ?? 'raw';
  const file = `driver=file,node-name=file0,filename=${options.image}${options.cacheDirect ? ',cache.direct=on' : ''}`;
  const blockdevs =
    format === 'raw' ? ['--blockdev', file] : ['--blockdev', file, '--blockdev', `driver=${format},node-name=fmt0,file=file0`];
  const node = format === 'raw' ? 'file0' : 'fmt0';
  const exportSpec = [
    `type=vhost-user-blk,id=exp0,node-name=${node}`,
    `addr.type=unix,addr.path=${options.socketPath}`,
    `writable=${(options.writable ?? true) ? 'on' : 'off'}`,
    `num-queues=${options.numQueues ?? 1}`,
    ...(options.logicalBlockSize ? [`logical-block-size=${options.logicalBlockSize}`] : []),
  ].join(',');
  return [...blockdevs, '--export', exportSpec, ...(options.extraArgs ?? [])];
}

export class QemuStorageDaemon {
  private collected = '';
  private exitCode: number | null | undefined = undefined;
  private readonly exited: Promise<void>;

  private constructor(
    readonly child: ChildProcess,
    readonly options: QsdOptions,
  ) {
    child.stdout?.on('data', (chunk: Buffer) => (this.collected += chunk.toString()));
    child.stderr?.on('data', (chunk: Buffer) => (this.collected += chunk.toString()));
    this.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        this.exitCode = code ?? (signal ? -1 : null);
        resolve();
      });
      child.on('error', (error) => {
        this.collected += `spawn error: ${error.message}\n`;
        this.exitCode = -1;
        resolve();
      });
    });
  }

  /** Spawns the daemon and waits until its socket exists. */
  static async start(options: QsdOptions): Promise<QemuStorageDaemon> {
    const binary = options.binary ?? findQemuStorageDaemon();
    if (binary === null) throw new QsdStartError('binary not found (install qemu-system-common / qemu-utils or set VUBLK_QSD)', '');
    const daemon = new QemuStorageDaemon(spawn(binary, qsdArguments(options), { stdio: ['ignore', 'pipe', 'pipe'] }), options);
    const timeoutMs = options.startTimeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    while (!existsSync(options.socketPath)) {
      if (daemon.exitCode !== undefined) throw new QsdStartError(`exited with ${daemon.exitCode}`, daemon.output);
      if (Date.now() > deadline) {
        await daemon.stop();
        throw new FrontendTimeoutError(`qemu-storage-daemon to create ${options.socketPath}`, timeoutMs, daemon.output);
      }
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    return daemon;
  }

  /** Everything it printed so far (errors from libvhost-user land here). */
  get output(): string {
    return this.collected;
  }

  /** Waits until its output matches (stderr arrives asynchronously, after e.g. the socket was hung up). */
  async waitForOutput(pattern: RegExp, timeoutMs = 2000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (!pattern.test(this.collected)) {
      if (Date.now() > deadline)
        throw new FrontendTimeoutError(`qemu-storage-daemon output matching ${pattern}`, timeoutMs, this.collected || 'it printed nothing');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    return this.collected;
  }

  get isRunning(): boolean {
    return this.exitCode === undefined;
  }

  /** SIGTERM, then SIGKILL if it lingers. */
  async stop(timeoutMs = 5000): Promise<void> {
    if (this.exitCode !== undefined) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
    await this.exited;
    clearTimeout(timer);
  }
}
