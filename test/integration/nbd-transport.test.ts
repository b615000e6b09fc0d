/**
 * A worker's NBD transport with several connections (multi-conn) against nbdkit, behind a proxy that decides
 * which connection the server takes: requests that wait on a connection that is down must move to one that
 * is up, at ring start (a connection the server turns away) and after a connection is lost under I/O.
 * The transport is driven from the test's event loop: its one fd watched with libuv, poll() on every wake-up,
 * as the worker's epoll drives it.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { NbdClient } from '../../src/backend/nbd/nbd-client.js';
import { NbdTransport } from '../../src/dataplane/backend-channel.js';
import { pollFd } from '../../src/sys/fd-poll.js';
import { pattern } from '../support/pattern.js';
import { DrivenClient, HostBuffer, requireTool, startNbdkit, tempDir } from '../support/nbd-servers.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/**
 * Accepts on `path` and pipes each connection to `target`, in accept order (which is the order the
 * transport's connections connect in): the first `refuseFirst` are closed at once, and so is any that
 * would make more than `limit` live.
 */
class Gatekeeper {
  limit: number;
  private refuseLeft: number;
  readonly live: Array<{ client: Socket; upstream: Socket }> = [];
  refused = 0;
  private readonly server: Server;

  private constructor(path: string, target: string, refuseFirst: number, limit: number) {
    this.limit = limit;
    this.refuseLeft = refuseFirst;
    this.server = createServer((client) => {
      if (this.refuseLeft > 0 || this.live.length >= this.limit) {
        if (this.refuseLeft > 0) this.refuseLeft--;
        this.refused++;
        client.destroy();
        return;
      }
      const upstream = connect(target);
      const pair = { client, upstream };
      this.live.push(pair);
      const end = (): void => {
        const at = this.live.indexOf(pair);
        if (at >= 0) this.live.splice(at, 1);
        client.destroy();
        upstream.destroy();
      };
      client.on('error', end).on('close', end);
      upstream.on('error', end).on('close', end);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    this.server.listen(path);
  }

  static async start(path: string, target: string, refuseFirst: number, limit: number): Promise<Gatekeeper> {
    const gate = new Gatekeeper(path, target, refuseFirst, limit);
    await new Promise<void>((resolve, reject) => gate.server.once('listening', resolve).once('error', reject));
    return gate;
  }

  /** Stops passing the server's replies on the live connection accepted `index`-th: its requests stay on the wire. */
  hold(index: number): void {
    const pair = this.live[index]!;
    pair.upstream.unpipe(pair.client);
    pair.upstream.pause();
  }

  /** Cuts the live connection that was accepted `index`-th among those still live. */
  cut(index: number): void {
    const pair = this.live[index]!;
    pair.client.destroy();
    pair.upstream.destroy();
  }

  stop(): Promise<void> {
    for (const pair of this.live.splice(0)) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** The transport plus the completions it delivered, driven by libuv watching its fd. */
class DrivenTransport {
  readonly results = new Map<number, number>();
  private readonly poll;
  constructor(readonly transport: NbdTransport) {
    const deliver = (tag: number, errno: number): void => void this.results.set(tag, errno);
    this.poll = pollFd(transport.fd, { readable: true }, () => {
      transport.ready();
      transport.poll(deliver);
    });
  }

  async until(predicate: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(this.transport.connections())}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  close(): void {
    this.poll.close();
    this.transport.close();
  }
}

const BLOCK = 4096;
const WRITES = 12;
/** Far longer than either test takes to complete its writes: a write left waiting for a lost connection fails at it. */
const RECONNECT_TIMEOUT_MS = 5000;

async function setUp(
  context: Parameters<typeof requireTool>[0],
  refuseFirst: number,
  limit: number,
): Promise<{ gate: Gatekeeper; driven: DrivenTransport; nbdSocket: string }> {
  requireTool(context, 'nbdkit');
  const work = tempDir();
  cleanups.push(work.remove);
  const nbdSocket = join(work.dir, 'nbd.sock');
  const server = await startNbdkit({ unix: nbdSocket }, ['memory', '16M']);
  cleanups.push(() => server.kill());
  const gate = await Gatekeeper.start(join(work.dir, 'gate.sock'), nbdSocket, refuseFirst, limit);
  cleanups.push(() => gate.stop());
  // The probe the control thread makes at start: the export's facts, on a connection of its own.
  const probe = NbdClient.open({ endpoint: { kind: 'unix', path: nbdSocket }, exportName: '' }, () => {});
  const info = probe.info;
  probe.close();
  expect(info.canMultiConn).toBe(true);
  const transport = new NbdTransport({
    kind: 'nbd',
    key: 'test',
    mergeMaxBytes: 0,
    endpoint: { kind: 'unix', path: join(work.dir, 'gate.sock') },
    exportName: '',
    info,
    connectTimeoutMs: 2000,
    reconnectTimeoutMs: RECONNECT_TIMEOUT_MS,
    requestTimeoutMs: 30_000,
    connections: 3,
  });
  const driven = new DrivenTransport(transport);
  cleanups.push(() => driven.close());
  return { gate, driven, nbdSocket };
}

/** WRITES distinct 4 KiB blocks, tags 1..WRITES; the buffer stays referenced until they complete. */
function submitWrites(transport: NbdTransport, seed: number): HostBuffer {
  const buffer = new HostBuffer(WRITES * BLOCK);
  pattern(seed, WRITES * BLOCK).copy(buffer.bytes);
  for (let i = 0; i < WRITES; i++) transport.write(i + 1, i * BLOCK, buffer.segments(i * BLOCK, BLOCK), false);
  transport.kick();
  return buffer;
}

/** Reads the blocks back on a connection of its own, straight to nbdkit. */
async function expectOnServer(nbdSocket: string, seed: number): Promise<void> {
  const reader = DrivenClient.open({ endpoint: { kind: 'unix', path: nbdSocket }, exportName: '' });
  try {
    const back = new HostBuffer(WRITES * BLOCK);
    expect(await reader.read(0, back, 0, WRITES * BLOCK)).toBe(0);
    expect(back.bytes.equals(pattern(seed, WRITES * BLOCK))).toBe(true);
  } finally {
    reader.close();
  }
}

const allTags = Array.from({ length: WRITES }, (_, i) => i + 1);

describe('NBD transport with several connections', () => {
  it('at start, requests waiting on a connection the server turns away move to one that comes up', async (context) => {
    // The first connection is refused and every retry of it finds two live ones (the limit): it never comes up.
    const { gate, driven, nbdSocket } = await setUp(context, 1, 2);
    // Submitted before any handshake has finished: spread over all three (a third on the first).
    const buffer = submitWrites(driven.transport, 41);
    const started = Date.now();
    await driven.until(() => allTags.every((tag) => driven.results.has(tag)), 10_000, 'the writes');
    expect(allTags.map((tag) => driven.results.get(tag))).toEqual(new Array(WRITES).fill(0));
    // Long before the refused connection's reconnect timeout would have failed its share.
    expect(Date.now() - started).toBeLessThan(4000);
    const [first, second, third] = driven.transport.connections();
    expect(first!.state).not.toBe('connected');
    expect(first!.counters.handedOver).toBe(WRITES / 3);
    // The other two may also have handed theirs to each other, if one finished its handshake first.
    expect(second!.counters.handedOver + third!.counters.handedOver).toBeLessThanOrEqual(WRITES / 3);
    expect(gate.refused).toBeGreaterThanOrEqual(1);
    expect(buffer.bytes.length).toBe(WRITES * BLOCK);
    await expectOnServer(nbdSocket, 41);
  });

  it('a connection lost under I/O: what was on its wire is resent on the others, not held for its reconnect', async (context) => {
    const { gate, driven, nbdSocket } = await setUp(context, 0, 3);
    await driven.until(() => driven.transport.connections().every((c) => c.state === 'connected'), 10_000, 'three connections');
    gate.limit = 2; // the cut connection's reconnects are turned away
    // The first connection's replies are held back, so its requests are still on its wire when it is cut.
    gate.hold(0);
    const buffer = submitWrites(driven.transport, 42);
    await driven.until(() => driven.results.size === (WRITES * 2) / 3, 10_000, 'the writes of the other two');
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(driven.results.size).toBe((WRITES * 2) / 3);
    const started = Date.now();
    gate.cut(0);
    await driven.until(() => allTags.every((tag) => driven.results.has(tag)), 10_000, 'the writes');
    expect(allTags.map((tag) => driven.results.get(tag))).toEqual(new Array(WRITES).fill(0));
    expect(Date.now() - started).toBeLessThan(4000);
    const [first, second, third] = driven.transport.connections();
    expect(first!.state).not.toBe('connected');
    expect(first!.counters.connectionsLost).toBe(1);
    // Least busy first: each connection had a third of the writes.
    expect(first!.counters.handedOver).toBe(WRITES / 3);
    expect(second!.counters.handedOver + third!.counters.handedOver).toBe(0);
    expect(buffer.bytes.length).toBe(WRITES * BLOCK);
    await expectOnServer(nbdSocket, 42);
  });
});
