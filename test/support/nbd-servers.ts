/**
 * Real NBD servers for tests (nbdkit, qemu-nbd) and a driver that runs an NbdClient from the test's own event
 * loop: the client's single fd is watched with libuv (koffi.node.poll), exactly as a worker's epoll would watch
 * it, and every wait has a deadline. Tools that are missing skip the test with the reason, unless
 * VUBLK_E2E_REQUIRED=1.
 */
import type { TestContext } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import koffi from 'koffi';
import { NbdClient, type NbdClientOptions } from '../../src/backend/nbd/nbd-client.js';
import { pollFd } from '../../src/sys/fd-poll.js';

function hasTool(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
}

const TOOLS: Record<string, boolean> = {};
export function requireTool(context: TestContext, name: 'nbdkit' | 'qemu-nbd'): void {
  TOOLS[name] ??= hasTool(name);
  if (TOOLS[name]) return;
  const reason = `${name} is not installed (Debian: apt-get install ${name === 'nbdkit' ? 'nbdkit' : 'qemu-utils'})`;
  if (process.env['VUBLK_E2E_REQUIRED'] === '1') throw new Error(`VUBLK_E2E_REQUIRED=1 but ${reason}`);
  context.skip(reason);
}

export function tempDir(): { dir: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'vublk-nbd-'));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function tcpAccepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

export interface ServerProcess {
  readonly child: ChildProcess;
  stderr(): string;
  /** SIGKILL and wait for the exit. */
  kill(): Promise<void>;
}

export type Listen = { unix: string } | { port: number };

/** Starts a server in the foreground and waits until it accepts connections (deadline 10 s). */
export async function startServer(command: string, args: string[], listen: Listen): Promise<ServerProcess> {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let exited = false;
  const exit = new Promise<void>((resolve) =>
    child.once('exit', () => {
      exited = true;
      resolve();
    }),
  );
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (exited) throw new Error(`${command} exited at start: ${stderr}`);
    if ('unix' in listen ? existsSync(listen.unix) : await tcpAccepts(listen.port)) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${command} did not start listening within 10 s: ${stderr}`);
    }
    await sleep(20);
  }
  return {
    child,
    stderr: () => stderr,
    kill: async () => {
      if (!exited) child.kill('SIGKILL');
      await Promise.race([exit, sleep(5000)]);
      if ('unix' in listen) rmSync(listen.unix, { force: true });
    },
  };
}

/** nbdkit in the foreground; `args` are the plugin, its parameters and filters. */
export function startNbdkit(listen: Listen, args: string[], extra: string[] = []): Promise<ServerProcess> {
  const where = 'unix' in listen ? ['-U', listen.unix] : ['-i', '127.0.0.1', '-p', String(listen.port)];
  return startServer('nbdkit', ['-f', '--exit-with-parent', ...where, ...extra, ...args], listen);
}

/** qemu-nbd serving a raw file, persistent (survives client disconnects), shared by up to 8 clients. */
export function startQemuNbd(listen: Listen, image: string, extra: string[] = []): Promise<ServerProcess> {
  const where = 'unix' in listen ? [`--socket=${listen.unix}`] : ['-b', '127.0.0.1', '-p', String(listen.port)];
  return startServer('qemu-nbd', ['-f', 'raw', '--persistent', '--shared=8', '--cache=writeback', ...where, ...extra, image], listen);
}

/** A test buffer standing in for guest memory: its host address is what the client reads into / writes from. */
export class HostBuffer {
  readonly bytes: Buffer;
  readonly address: number;
  constructor(length: number) {
    this.bytes = Buffer.alloc(length);
    this.address = Number(koffi.address(this.bytes));
  }
  /** Segments covering [from, from+length) cut into pieces of `piece` bytes (exercises scatter-gather). */
  segments(from: number, length: number, piece = length): { count: number; addresses: number[]; lengths: number[] } {
    const addresses: number[] = [];
    const lengths: number[] = [];
    for (let at = 0; at < length; at += piece) {
      addresses.push(this.address + from + at);
      lengths.push(Math.min(piece, length - at));
    }
    return { count: addresses.length, addresses, lengths };
  }
}

/** An NbdClient plus the completions it reported, driven by libuv watching its fd. */
export class DrivenClient {
  readonly results = new Map<number, number>();
  private nextCookie = 1;
  private waiters: Array<() => void> = [];
  private readonly poll;

  private constructor(readonly client: NbdClient) {
    this.poll = pollFd(client.fd, { readable: true }, () => {
      client.pump();
      const waiters = this.waiters;
      this.waiters = [];
      for (const wake of waiters) wake();
    });
  }

  static open(options: NbdClientOptions): DrivenClient {
    let driven: DrivenClient | null = null;
    const client = NbdClient.open(options, (cookie, errno) => driven?.results.set(cookie, errno));
    driven = new DrivenClient(client);
    return driven;
  }

  cookie(): number {
    return this.nextCookie++;
  }

  /** Waits until every cookie has completed, or throws after `timeoutMs`; returns their errnos. */
  async settle(cookies: number[], timeoutMs = 15_000): Promise<number[]> {
    this.client.flush();
    const deadline = Date.now() + timeoutMs;
    while (!cookies.every((c) => this.results.has(c))) {
      const left = deadline - Date.now();
      if (left <= 0) {
        const missing = cookies.filter((c) => !this.results.has(c));
        throw new Error(
          `NBD requests ${missing.slice(0, 8).join(',')} did not complete in ${timeoutMs} ms (state ${this.client.state}, ${this.client.lastError})`,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, 100));
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return cookies.map((c) => this.results.get(c) as number);
  }

  async write(offset: number, buffer: HostBuffer, from: number, length: number, piece?: number): Promise<number> {
    const cookie = this.cookie();
    this.client.submitWrite(cookie, offset, buffer.segments(from, length, piece));
    return (await this.settle([cookie]))[0] as number;
  }

  async read(offset: number, buffer: HostBuffer, from: number, length: number, piece?: number): Promise<number> {
    const cookie = this.cookie();
    this.client.submitRead(cookie, offset, buffer.segments(from, length, piece));
    return (await this.settle([cookie]))[0] as number;
  }

  async flush(): Promise<number> {
    const cookie = this.cookie();
    this.client.submitFlush(cookie);
    return (await this.settle([cookie]))[0] as number;
  }

  /** Pumps until `predicate` holds (deadline). */
  async until(predicate: () => boolean, timeoutMs = 15_000, what = 'condition'): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (state ${this.client.state}, ${this.client.lastError})`);
      await sleep(20);
    }
  }

  close(): void {
    this.poll.close();
    this.client.close();
  }
}
