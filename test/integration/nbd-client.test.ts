/**
 * The NBD client back-end against real servers (nbdkit, qemu-nbd) and a deliberately broken one. The client is
 * driven the way a worker drives it: its one fd watched for readability, pump() on every wake-up.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { existsSync, writeFileSync, truncateSync, rmSync } from 'node:fs';
import { imageBytes } from '../support/session-harness.js';
import { join } from 'node:path';
import { NbdClient } from '../../src/backend/nbd/nbd-client.js';
import { waitReadable } from '../../src/sys/poll-wait.js';
import { NbdHandshakeError } from '../../src/backend/nbd/handshake.js';
import { NbdProtocolError } from '../../protocol/nbd.js';
import { parseNbdUri } from '../../src/backend/nbd/nbd-uri.js';
import { pattern } from '../support/pattern.js';
import {
  DrivenClient,
  HostBuffer,
  freePort,
  requireTool,
  startNbdkit,
  startQemuNbd,
  tempDir,
  type ServerProcess,
} from '../support/nbd-servers.js';
import { FAKE_DISK_SIZE, fakeDiskByte, startFakeServer, type FakeMode } from '../support/fake-nbd-server.js';

const EIO = 5;
const ENOTSUP = 95;
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function track<T extends { close(): void } | ServerProcess>(thing: T): T {
  cleanups.push(() => ('kill' in thing ? thing.kill() : thing.close()));
  return thing;
}

function scratch(): string {
  const dir = tempDir();
  cleanups.push(dir.remove);
  return dir.dir;
}

/** Writes distinct patterns, reads them back through different scatter lists, checks holes read as zero. */
async function readWriteRoundTrip(driven: DrivenClient): Promise<void> {
  const size = 1 << 20;
  const buffer = new HostBuffer(2 * size);
  pattern(1, size).copy(buffer.bytes, 0);
  expect(await driven.write(size, buffer, 0, size, 4096)).toBe(0);
  buffer.bytes.fill(0xee, size);
  expect(await driven.read(size, buffer, size, size, 512 * 7)).toBe(0);
  expect(buffer.bytes.subarray(size).equals(pattern(1, size))).toBe(true);
  // Never written: zeroes (nbdkit memory and a sparse file answer with holes under structured replies).
  buffer.bytes.fill(0xee, size);
  expect(await driven.read(0, buffer, size, 65536)).toBe(0);
  expect(buffer.bytes.subarray(size, size + 65536).every((b) => b === 0)).toBe(true);
  expect(buffer.bytes[size + 65536]).toBe(0xee);
  expect(await driven.flush()).toBe(0);
}

/** 64 writes in flight at once to scattered blocks, then 64 reads in flight; every block checked. */
async function pipelined(driven: DrivenClient, base: number): Promise<void> {
  const blocks = 64;
  const buffer = new HostBuffer(blocks * 4096);
  const readBack = new HostBuffer(blocks * 4096);
  const cookies: number[] = [];
  for (let i = 0; i < blocks; i++) {
    pattern(100 + i, 4096).copy(buffer.bytes, i * 4096);
    const cookie = driven.cookie();
    driven.client.submitWrite(cookie, base + ((i * 37) % blocks) * 8192, buffer.segments(i * 4096, 4096));
    cookies.push(cookie);
  }
  expect(await driven.settle(cookies)).toEqual(new Array(blocks).fill(0));
  cookies.length = 0;
  for (let i = 0; i < blocks; i++) {
    const cookie = driven.cookie();
    driven.client.submitRead(cookie, base + ((i * 37) % blocks) * 8192, readBack.segments(i * 4096, 4096, 1024));
    cookies.push(cookie);
  }
  expect(await driven.settle(cookies)).toEqual(new Array(blocks).fill(0));
  expect(readBack.bytes.equals(buffer.bytes)).toBe(true);
}

describe('NBD client against nbdkit', () => {
  it('memory plugin with structured replies: export info, round trip, pipelining, trim, write-zeroes', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['memory', '64M']));
    const driven = track(DrivenClient.open(parseNbdUri(`nbd+unix:///?socket=${socket}`)));
    const info = driven.client.info;
    expect(info).toMatchObject({
      size: 64 << 20,
      structuredReplies: true,
      canFlush: true,
      canTrim: true,
      canWriteZeroes: true,
      readOnly: false,
    });
    await readWriteRoundTrip(driven);
    await pipelined(driven, 8 << 20);

    const buffer = new HostBuffer(65536);
    pattern(7, 65536).copy(buffer.bytes);
    expect(await driven.write(16 << 20, buffer, 0, 65536)).toBe(0);
    const zero = driven.cookie();
    driven.client.submitWriteZeroes(zero, 16 << 20, 32768);
    const trim = driven.cookie();
    driven.client.submitTrim(trim, (16 << 20) + 32768, 32768);
    expect(await driven.settle([zero, trim])).toEqual([0, 0]);
    buffer.bytes.fill(0xee);
    expect(await driven.read(16 << 20, buffer, 0, 65536)).toBe(0);
    expect(buffer.bytes.subarray(0, 32768).every((b) => b === 0)).toBe(true);
    expect(driven.client.counters).toMatchObject({ connects: 1, connectionsLost: 0, protocolErrors: 0, serverErrors: 0 });
  });

  it('readyHints: once a read found the socket empty, pumps read again only after socketReady()', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['memory', '1M']));
    const done = new Map<number, number>();
    const gated = track(NbdClient.open({ ...parseNbdUri(`nbd+unix:///?socket=${socket}`), readyHints: true }, (c, e) => done.set(c, e)));
    const buffer = new HostBuffer(4096);
    gated.pump(); // nothing in flight: the read finds the socket empty
    gated.submitRead(1, 0, buffer.segments(0, 4096));
    gated.flush();
    expect(waitReadable(gated.fd, 10_000), 'the reply arrives').toBe(true);
    gated.pump();
    expect(done.has(1), 'no read syscall before the caller reports the fd ready').toBe(false);
    // The reply may arrive in pieces: each pump reads what is there; the next waits for the fd to be reported.
    for (let i = 0; i < 100 && !done.has(1); i++) {
      gated.socketReady();
      gated.pump();
      if (!done.has(1)) waitReadable(gated.fd, 100);
    }
    expect(done.get(1)).toBe(0);

    // Without readyHints (the default) every pump reads.
    const plain = track(NbdClient.open(parseNbdUri(`nbd+unix:///?socket=${socket}`), (c, e) => done.set(c + 100, e)));
    plain.pump();
    plain.submitRead(1, 0, buffer.segments(0, 4096));
    plain.flush();
    expect(waitReadable(plain.fd, 10_000)).toBe(true);
    for (let i = 0; i < 100 && !done.has(101); i++) {
      plain.pump();
      if (!done.has(101)) waitReadable(plain.fd, 100);
    }
    expect(done.get(101)).toBe(0);
  });

  it('memory plugin without structured replies (--no-sr): simple replies carry the read data', async (context) => {
    requireTool(context, 'nbdkit');
    const port = await freePort();
    track(await startNbdkit({ port }, ['memory', '16M'], ['--no-sr']));
    const driven = track(DrivenClient.open(parseNbdUri(`nbd://127.0.0.1:${port}/`)));
    expect(driven.client.info.structuredReplies).toBe(false);
    await readWriteRoundTrip(driven);
    await pipelined(driven, 4 << 20);
  });

  it('splits a request larger than the advertised maximum payload and honours the minimum block size', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(
      await startNbdkit({ unix: socket }, [
        '--filter=blocksize-policy',
        'memory',
        '16M',
        'blocksize-minimum=4096',
        'blocksize-preferred=4096',
        'blocksize-maximum=65536',
        'blocksize-error-policy=error',
      ]),
    );
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }));
    expect(driven.client.info).toMatchObject({ minimumBlockSize: 4096, maximumPayload: 65536 });
    const size = 1 << 20;
    const buffer = new HostBuffer(2 * size);
    pattern(3, size).copy(buffer.bytes);
    const before = driven.client.counters.requests;
    expect(await driven.write(0, buffer, 0, size, 12288)).toBe(0);
    expect(driven.client.counters.requests - before).toBe(16);
    expect(await driven.read(0, buffer, size, size, 5 * 4096)).toBe(0);
    expect(buffer.bytes.subarray(size).equals(pattern(3, size))).toBe(true);
    // Misaligned for a 4 KiB export: refused locally with EINVAL, never sent.
    expect(await driven.read(512, buffer, 0, 4096)).toBe(22);
  });

  it('more iovecs than IOV_MAX, and close() completing what is pending with EIO', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['memory', '16M']));
    const driven = DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' });
    cleanups.push(() => driven.client.state !== 'closed' && driven.close());
    const size = 1 << 20;
    const buffer = new HostBuffer(2 * size);
    pattern(21, size).copy(buffer.bytes);
    expect(await driven.write(0, buffer, 0, size, 512)).toBe(0); // 2048 segments
    expect(await driven.read(0, buffer, size, size, 512)).toBe(0);
    expect(buffer.bytes.subarray(size).equals(pattern(21, size))).toBe(true);

    const pending = [driven.cookie(), driven.cookie()];
    driven.client.submitRead(pending[0] as number, 0, buffer.segments(0, 4096));
    driven.client.submitFlush(pending[1] as number);
    driven.close();
    expect(pending.map((c) => driven.results.get(c))).toEqual([EIO, EIO]);
    expect(() => driven.client.submitFlush(driven.cookie())).toThrow(/closed/);
  });

  it('delay filter: replies arrive late and out of order; every request completes with the right data', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['--filter=delay', 'memory', '16M', 'rdelay=200ms', 'wdelay=100ms']));
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }));
    await pipelined(driven, 0);
  });

  it('error filter: injected EIO completes the request with EIO and the connection stays up', async (context) => {
    requireTool(context, 'nbdkit');
    const dir = scratch();
    const socket = join(dir, 'nbd.sock');
    const trigger = join(dir, 'inject');
    track(
      await startNbdkit({ unix: socket }, [
        '--filter=error',
        'memory',
        '16M',
        'error=EIO',
        'error-pread-rate=100%',
        `error-pread-file=${trigger}`,
        'error-pwrite=ENOSPC',
        'error-pwrite-rate=100%',
        `error-pwrite-file=${trigger}`,
      ]),
    );
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }));
    const buffer = new HostBuffer(8192);
    pattern(9, 4096).copy(buffer.bytes);
    expect(await driven.write(0, buffer, 0, 4096)).toBe(0);
    writeFileSync(trigger, '');
    expect(await driven.read(0, buffer, 4096, 4096)).toBe(EIO);
    expect(await driven.write(0, buffer, 0, 4096)).toBe(28); // ENOSPC passes through as itself
    rmSync(trigger);
    expect(await driven.read(0, buffer, 4096, 4096)).toBe(0);
    expect(buffer.bytes.subarray(4096).equals(pattern(9, 4096))).toBe(true);
    expect(driven.client.counters).toMatchObject({ serverErrors: 2, connectionsLost: 0, protocolErrors: 0, connects: 1 });
    expect(driven.client.state).toBe('connected');
  });

  it('a read-only export refuses writes locally (EPERM) and reads and flushes; an unsupported command is ENOTSUP', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['--filter=nozero', 'memory', '16M', 'zeromode=none'], ['-r']));
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }));
    expect(driven.client.info.readOnly).toBe(true);
    const buffer = new HostBuffer(4096);
    expect(await driven.write(0, buffer, 0, 4096)).toBe(1); // EPERM
    const zero = driven.cookie();
    driven.client.submitWriteZeroes(zero, 0, 4096);
    expect(await driven.settle([zero])).toEqual([1]);
    expect(await driven.read(0, buffer, 0, 4096)).toBe(0);
    expect(await driven.flush()).toBe(0);
    expect(driven.client.info.canWriteZeroes).toBe(false);

    const writable = join(scratch(), 'rw.sock');
    track(await startNbdkit({ unix: writable }, ['--filter=nozero', 'memory', '16M', 'zeromode=none']));
    const rw = track(DrivenClient.open({ endpoint: { kind: 'unix', path: writable }, exportName: '' }));
    const unsupported = rw.cookie();
    rw.client.submitWriteZeroes(unsupported, 0, 4096);
    expect(await rw.settle([unsupported])).toEqual([ENOTSUP]);
  });

  it('an unknown export name fails the open with a clear, permanent error', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['--filter=exportname', 'memory', '16M', 'exportname=only', 'exportname-strict=true']));
    let caught: unknown;
    try {
      NbdClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: 'other' }, () => undefined);
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(NbdHandshakeError);
    expect((caught as NbdHandshakeError).code).toBe('NBD_UNKNOWN_EXPORT');
  });
});

describe('NBD client against qemu-nbd', () => {
  it('Unix socket and TCP: data lands in the image file; two clients share the export (multi-conn)', async (context) => {
    requireTool(context, 'qemu-nbd');
    const dir = scratch();
    const image = join(dir, 'disk.raw');
    writeFileSync(image, '');
    truncateSync(image, 32 << 20);
    const socket = join(dir, 'nbd.sock');
    track(await startQemuNbd({ unix: socket }, image));
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }));
    expect(driven.client.info.size).toBe(32 << 20);
    await readWriteRoundTrip(driven);
    expect(imageBytes(image, 1 << 20, 1 << 20).equals(pattern(1, 1 << 20))).toBe(true);
    await pipelined(driven, 4 << 20);

    const port = await freePort();
    const tcpImage = join(dir, 'tcp.raw');
    writeFileSync(tcpImage, '');
    truncateSync(tcpImage, 16 << 20);
    track(await startQemuNbd({ port }, tcpImage));
    const first = track(DrivenClient.open(parseNbdUri(`nbd://127.0.0.1:${port}`)));
    const second = track(DrivenClient.open(parseNbdUri(`nbd://127.0.0.1:${port}`)));
    const buffer = new HostBuffer(8192);
    pattern(5, 4096).copy(buffer.bytes);
    expect(await first.write(4096, buffer, 0, 4096)).toBe(0);
    expect(await first.flush()).toBe(0);
    expect(await second.read(4096, buffer, 4096, 4096)).toBe(0);
    expect(buffer.bytes.subarray(4096).equals(pattern(5, 4096))).toBe(true);
    expect(imageBytes(tcpImage, 4096, 4096).equals(pattern(5, 4096))).toBe(true);
  });
});

describe('NBD client across server failures', () => {
  it('kill and restart the server under I/O: every acknowledged write survives and I/O resumes', async (context) => {
    requireTool(context, 'qemu-nbd');
    const dir = scratch();
    const image = join(dir, 'disk.raw');
    writeFileSync(image, '');
    truncateSync(image, 16 << 20);
    const socket = join(dir, 'nbd.sock');
    let server = await startQemuNbd({ unix: socket }, image);
    cleanups.push(() => server.kill());
    const driven = track(
      DrivenClient.open({
        endpoint: { kind: 'unix', path: socket },
        exportName: '',
        reconnectTimeoutMs: 20_000,
        initialBackoffMs: 20,
        maxBackoffMs: 200,
      }),
    );

    const blocks = 512;
    const buffer = new HostBuffer(blocks * 4096);
    for (let i = 0; i < blocks; i++) pattern(1000 + i, 4096).copy(buffer.bytes, i * 4096);
    const cookies: number[] = [];
    let killedAt = -1;
    for (let batch = 0; batch < blocks / 32; batch++) {
      for (let i = batch * 32; i < (batch + 1) * 32; i++) {
        const cookie = driven.cookie();
        driven.client.submitWrite(cookie, i * 4096, buffer.segments(i * 4096, 4096));
        cookies.push(cookie);
      }
      if (batch === 4) {
        // Kill with requests on the wire; restart a little later on the same socket path.
        await server.kill();
        killedAt = cookies.length;
        setTimeout(() => void startQemuNbd({ unix: socket }, image).then((s) => (server = s)), 300);
      }
      if (batch % 4 === 3) await driven.settle(cookies.slice(-32));
    }
    const results = await driven.settle(cookies, 30_000);
    expect(killedAt).toBeGreaterThan(0);
    expect(results).toEqual(new Array(blocks).fill(0));
    expect(await driven.flush()).toBe(0);
    expect(driven.client.counters.connectionsLost).toBeGreaterThanOrEqual(1);
    expect(driven.client.counters.connects).toBeGreaterThanOrEqual(2);
    expect(driven.client.counters.resubmitted).toBeGreaterThan(0);
    expect(driven.client.state).toBe('connected');
    // Every write, acknowledged before or after the kill, is in the image.
    expect(imageBytes(image, 0, blocks * 4096).equals(buffer.bytes)).toBe(true);
    const readBack = new HostBuffer(blocks * 4096);
    expect(await driven.read(0, readBack, 0, blocks * 4096, 65536)).toBe(0);
    expect(readBack.bytes.equals(buffer.bytes)).toBe(true);
  });

  it('a server that stays away: requests complete with EIO after the timeout (counted), the disk recovers when it returns', async (context) => {
    requireTool(context, 'nbdkit');
    const dir = scratch();
    const image = join(dir, 'disk.raw');
    writeFileSync(image, '');
    truncateSync(image, 4 << 20);
    const socket = join(dir, 'nbd.sock');
    let server = await startNbdkit({ unix: socket }, ['file', image]);
    cleanups.push(() => server.kill());
    const driven = track(
      DrivenClient.open({
        endpoint: { kind: 'unix', path: socket },
        exportName: '',
        reconnectTimeoutMs: 400,
        initialBackoffMs: 20,
        maxBackoffMs: 100,
      }),
    );
    const buffer = new HostBuffer(8192);
    pattern(11, 4096).copy(buffer.bytes);
    expect(await driven.write(0, buffer, 0, 4096)).toBe(0);
    await server.kill();
    const waiting = [driven.cookie(), driven.cookie()];
    driven.client.submitRead(waiting[0] as number, 0, buffer.segments(4096, 4096));
    driven.client.submitWrite(waiting[1] as number, 4096, buffer.segments(0, 4096));
    expect(await driven.settle(waiting)).toEqual([EIO, EIO]);
    expect(driven.client.counters.timedOutRequests).toBe(2);
    // Still away: new requests fail at once rather than hang.
    expect(await driven.flush()).toBe(EIO);
    expect(existsSync(socket)).toBe(false);
    server = await startNbdkit({ unix: socket }, ['file', image]);
    await driven.until(() => driven.client.state === 'connected', 10_000, 'reconnect');
    expect(await driven.read(0, buffer, 4096, 4096)).toBe(0);
    expect(buffer.bytes.subarray(4096).equals(pattern(11, 4096))).toBe(true);
  });
  it('a stalled server (connected, never answering): reset, resend, then EIO after the timeout; other requests still work', async (context) => {
    requireTool(context, 'nbdkit');
    const socket = join(scratch(), 'nbd.sock');
    track(await startNbdkit({ unix: socket }, ['--filter=delay', 'memory', '16M', 'rdelay=20']));
    const driven = track(
      DrivenClient.open({
        endpoint: { kind: 'unix', path: socket },
        exportName: '',
        requestTimeoutMs: 300,
        reconnectTimeoutMs: 1000,
        initialBackoffMs: 20,
      }),
    );
    const buffer = new HostBuffer(8192);
    buffer.bytes.fill(0xee);
    expect(await driven.read(0, buffer, 0, 4096)).toBe(EIO);
    expect(driven.client.counters.stalls).toBeGreaterThanOrEqual(1);
    expect(driven.client.counters.timedOutRequests).toBe(1);
    expect(buffer.bytes.subarray(4096).every((b) => b === 0xee)).toBe(true);
    // Writes are not delayed: the disk keeps working for them.
    await driven.until(() => driven.client.state === 'connected', 10_000, 'reconnect');
    expect(await driven.write(0, buffer, 4096, 4096)).toBe(0);
  });
});

describe('NBD client against a malicious server', () => {
  const protocolModes: FakeMode[] = [
    'bad-magic',
    'unknown-handle',
    'chunk-outside',
    'overlap',
    'short-done',
    'huge-chunk',
    'data-too-big',
    'simple-read-with-sr',
    'hole-zero',
    'none-without-done',
    'error-message-overflow',
    'block-status-chunk',
  ];

  async function fakeRead(mode: FakeMode): Promise<{ driven: DrivenClient; buffer: HostBuffer; errno: number }> {
    const socket = join(scratch(), 'fake.sock');
    const fake = await startFakeServer(socket, mode);
    cleanups.push(() => fake.stop());
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '', initialBackoffMs: 10 }));
    // The request's buffer sits between two sentinel areas that no reply may touch.
    const buffer = new HostBuffer(3 * 8192);
    buffer.bytes.fill(0xee);
    const errno = await driven.read(65536, buffer, 8192, 8192, 3000);
    expect(buffer.bytes.subarray(0, 8192).every((b) => b === 0xee)).toBe(true);
    expect(buffer.bytes.subarray(16384).every((b) => b === 0xee)).toBe(true);
    return { driven, buffer, errno };
  }

  const expectedData = Buffer.from(Array.from({ length: 8192 }, (_, i) => fakeDiskByte(65536 + i)));

  it('the fake server is correct when it means to be (fragmented, reordered chunks)', async () => {
    const { driven, buffer, errno } = await fakeRead('good');
    expect(errno).toBe(0);
    expect(buffer.bytes.subarray(8192, 16384).equals(expectedData)).toBe(true);
    expect(driven.client.counters.protocolErrors).toBe(0);
    expect(FAKE_DISK_SIZE).toBe(driven.client.info.size);
  });

  it.each(protocolModes)('%s: protocol error, clean reset, the read is resent and succeeds', async (mode) => {
    const { driven, buffer, errno } = await fakeRead(mode);
    expect(errno).toBe(0);
    expect(buffer.bytes.subarray(8192, 16384).equals(expectedData)).toBe(true);
    expect(driven.client.counters).toMatchObject({ protocolErrors: 1, connectionsLost: 1, connects: 2 });
    expect(driven.client.lastError).toBe('');
  });

  it('FUA on a server without NBD_FLAG_SEND_FUA: the write is followed by a FLUSH before it completes', async () => {
    const socket = join(scratch(), 'fake.sock');
    const fake = await startFakeServer(socket, 'good');
    cleanups.push(() => fake.stop());
    const driven = track(DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '' }));
    expect(driven.client.info).toMatchObject({ canFua: false, canFlush: true });
    const buffer = new HostBuffer(4096);
    const before = driven.client.counters.requests;
    const durable = driven.cookie();
    driven.client.submitWrite(durable, 0, buffer.segments(0, 4096), true);
    expect(await driven.settle([durable])).toEqual([0]);
    expect(driven.client.counters.requests - before).toBe(2); // the write, then its FLUSH
  });

  it('a server that breaks every connection: the client backs off instead of spinning, then fails the read with EIO', async () => {
    const socket = join(scratch(), 'fake.sock');
    const fake = await startFakeServer(socket, 'always-bad-magic');
    cleanups.push(() => fake.stop());
    const driven = track(
      DrivenClient.open({
        endpoint: { kind: 'unix', path: socket },
        exportName: '',
        reconnectTimeoutMs: 1500,
        initialBackoffMs: 50,
        maxBackoffMs: 400,
      }),
    );
    const buffer = new HostBuffer(8192);
    expect(await driven.read(0, buffer, 0, 8192)).toBe(EIO);
    // 1.5 s of 50, 100, 200, 400, 400 ms pauses allows about 7 attempts; a client retrying at once would make thousands.
    expect(driven.client.counters.connects).toBeLessThan(20);
    expect(driven.client.counters.protocolErrors).toBe(driven.client.counters.connectionsLost);
    expect(driven.client.counters.timedOutRequests).toBe(1);
  });

  it('thousands of one-byte chunks with gaps: merged and accepted up to 4096 gaps, a protocol error beyond', async () => {
    const socket = join(scratch(), 'fake.sock');
    const fake = await startFakeServer(socket, 'gappy');
    cleanups.push(() => fake.stop());
    const driven = track(
      DrivenClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '', reconnectTimeoutMs: 800, initialBackoffMs: 50 }),
    );
    const buffer = new HostBuffer(3 * 8192);
    expect(await driven.read(65536, buffer, 8192, 8192, 3000)).toBe(0); // 4096 gaps, then all filled
    expect(buffer.bytes.subarray(8192, 16384).equals(expectedData)).toBe(true);
    expect(driven.client.counters.protocolErrors).toBe(0);
    expect(await driven.read(65536, buffer, 0, 16384)).toBe(EIO); // 8192 gaps: hostile, reset until the timeout
    expect(driven.client.counters.protocolErrors).toBeGreaterThanOrEqual(1);
  });

  it('eof in the middle of read data: reconnect and resend', async () => {
    const { driven, buffer, errno } = await fakeRead('eof-mid-data');
    expect(errno).toBe(0);
    expect(buffer.bytes.subarray(8192, 16384).equals(expectedData)).toBe(true);
    expect(driven.client.counters).toMatchObject({ protocolErrors: 0, connectionsLost: 1, connects: 2 });
  });

  it('ESHUTDOWN from the server: reconnect and resend, not an error for the caller', async () => {
    const { driven, errno } = await fakeRead('eshutdown');
    expect(errno).toBe(0);
    expect(driven.client.counters).toMatchObject({ protocolErrors: 0, connectionsLost: 1, connects: 2, serverErrors: 0 });
  });

  it('an error chunk fails only that request', async () => {
    const { driven, errno } = await fakeRead('error-chunk');
    expect(errno).toBe(28);
    expect(driven.client.counters).toMatchObject({ protocolErrors: 0, connectionsLost: 0, serverErrors: 1 });
    expect(driven.client.lastError).toMatch(/ENOSPC: full/);
  });

  it.each([
    ['hs-oldstyle', /oldstyle/],
    ['hs-garbage', /NBDMAGIC/],
    ['hs-unknown-export', /no export named/],
    ['hs-bad-info', /NBD_INFO_EXPORT is 11 bytes/],
    ['hs-close', /closed the connection during the handshake/],
  ] as const)('handshake %s: open fails with a clear error', async (mode, message) => {
    const socket = join(scratch(), 'fake.sock');
    const fake = await startFakeServer(socket, mode);
    cleanups.push(() => fake.stop());
    expect(() =>
      NbdClient.open({ endpoint: { kind: 'unix', path: socket }, exportName: '', connectTimeoutMs: 3000 }, () => undefined),
    ).toThrow(message);
    void NbdProtocolError;
  });
});
