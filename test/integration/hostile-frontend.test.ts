// Reproducers of the defects a first message-fuzzing pass found (issue 10), each against the real daemon over
// a real socket: a memory table larger than its memfd (SIGBUS), a blocking eventfd at counter max as call fd
// (daemon or worker blocked for good), an unwritable call fd leaking the previous one, EMFILE reported as
// "more than 16 fds", ADD_MEM_REG regions far larger than their memfds, and the per-session mapping limit.
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  FrontendRequest,
  HeaderFlag,
  ProtocolFeature,
  encodeMemoryTable,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddress,
  encodeVringFdRequest,
  encodeVringState,
} from '../../protocol/vhost-user.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { RawVhostClient, expectServing } from '../support/raw-vhost-client.js';
import { createEventFd, signalEventFd } from '../../src/sys/eventfd.js';
import { closeFd } from '../../src/sys/fd.js';
import { createMemfd } from '../../src/sys/memory-map.js';
import { sys, addressOf, F_GET_SEALS, F_SEAL_SHRINK, EFD_CLOEXEC, POLLOUT } from '../../src/sys/libc.js';
import { VhostUserFrontend } from '../../bench/src/frontend/index.js';

const V = HeaderFlag.VERSION;
const NEED_REPLY = HeaderFlag.NEED_REPLY;
const MiB = 1024 * 1024;

let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ args: ['--num-queues', '4', '--metrics-listen', 'off'] });
});

afterAll(async () => {
  await daemon?.stop();
});

function ackingClient(socketPath = daemon.socketPath): RawVhostClient {
  const client = new RawVhostClient(socketPath);
  client.send(FrontendRequest.GET_FEATURES, V);
  const features = client.receive()!.payload.readBigUInt64LE(0);
  client.send(FrontendRequest.SET_FEATURES, V, encodeU64(features));
  client.send(FrontendRequest.SET_PROTOCOL_FEATURES, V, encodeU64(1n << BigInt(ProtocolFeature.REPLY_ACK)));
  return client;
}

/** Sends a request with NEED_REPLY and returns the ack value (0 = done, 1 = refused). */
function acked(client: RawVhostClient, request: number, payload: Uint8Array, fds: number[] = [], timeoutMs = 5_000): bigint {
  client.send(request, V | NEED_REPLY, payload, fds);
  const reply = client.receive(timeoutMs);
  expect(reply, `daemon closed the session instead of answering; daemon output:\n${daemon.output().slice(-3000)}`).not.toBeNull();
  expect(reply!.header.request, `reply to the wrong request; daemon output:\n${daemon.output().slice(-3000)}`).toBe(request);
  return reply!.payload.readBigUInt64LE(0);
}

function fdCount(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

function region(size: number, guestPhysAddr = 0n, userAddr = 0x7f00_0000_0000n) {
  return { guestPhysAddr, memorySize: BigInt(size), userAddr, mmapOffset: 0n };
}

function blockingEventFdAtMax(): number {
  const fd = createEventFd(EFD_CLOEXEC); // blocking
  const max = Buffer.alloc(8);
  max.writeBigUInt64LE(0xffff_ffff_ffff_fffen);
  expect(sys.write(fd, addressOf(max), 8)).toBe(8);
  return fd;
}

describe('a memory region larger than its fd (was SIGBUS, exit 135)', () => {
  it('refuses a 16 MiB region backed by a 1 MiB memfd, and a kick on rings past its end does not kill the daemon', async () => {
    const since = daemon.logs().length;
    const client = ackingClient();
    const memfd = createMemfd('small', MiB);
    expect(acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([region(16 * MiB)]), [memfd])).toBe(1n);
    await daemon.waitForLog((l) => String(l['err']).includes('the file has only 1048576'), 5_000, since);
    // A valid 1 MiB table, then rings placed past the memfd's end: they lie outside every region.
    expect(acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([region(MiB)]), [memfd])).toBe(0n);
    const past = 0x7f00_0000_0000n + BigInt(2 * MiB);
    expect(acked(client, FrontendRequest.SET_VRING_NUM, encodeVringState({ index: 0, num: 256 }))).toBe(0n);
    acked(
      client,
      FrontendRequest.SET_VRING_ADDR,
      encodeVringAddress({
        index: 0,
        flags: 0,
        descUserAddr: past,
        usedUserAddr: past + 8192n,
        availUserAddr: past + 4096n,
        logGuestAddr: 0n,
      }),
    );
    const kick = createEventFd();
    expect(acked(client, FrontendRequest.SET_VRING_KICK, encodeVringFdRequest({ index: 0, noFd: false }), [kick])).toBe(0n);
    acked(client, FrontendRequest.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
    signalEventFd(kick);
    client.send(FrontendRequest.GET_QUEUE_NUM, V);
    expect(client.receive()?.payload.readBigUInt64LE(0)).toBe(4n);
    client.close();
    closeFd(kick);
    closeFd(memfd);
    expectServing(daemon);
  });

  it('seals a sealable memfd against shrinking before mapping it', () => {
    const client = ackingClient();
    const memfd = createMemfd('sealable', MiB);
    expect(acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([region(MiB)]), [memfd])).toBe(0n);
    expect(sys.fcntl(memfd, F_GET_SEALS, 0) & F_SEAL_SHRINK).toBe(F_SEAL_SHRINK);
    // The front-end can no longer shrink what the daemon maps.
    expect(sys.ftruncate(memfd, 4096)).toBe(-1);
    client.close();
    closeFd(memfd);
    expectServing(daemon);
  });

  it('refuses pipes, /dev/null and directories as guest memory with a clear error', async () => {
    const client = ackingClient();
    const pipe = execFileSync('true') && (await import('node:fs')).openSync('/dev/null', 'r+');
    const dir = fs.openSync(daemon.dir, 'r');
    const fifoPath = path.join(daemon.dir, 'fifo');
    execFileSync('mkfifo', [fifoPath]);
    const fifo = fs.openSync(fifoPath, fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
    for (const [fd, kind] of [
      [pipe, 'char-device'],
      [dir, 'directory'],
      [fifo, 'pipe'],
    ] as const) {
      const since = daemon.logs().length;
      expect(acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([region(MiB)]), [fd])).toBe(1n);
      await daemon.waitForLog((l) => String(l['err']).includes(`region fd is a ${kind}`), 5_000, since);
      closeFd(fd);
    }
    client.close();
    expectServing(daemon);
  });

  it('refuses ADD_MEM_REG regions declared far larger than their 4 KiB memfds', async () => {
    const client = ackingClient();
    const before = fdCount(daemon.child.pid!);
    for (let i = 0; i < 40; i++) {
      const memfd = createMemfd('tiny', 4096);
      expect(
        acked(client, FrontendRequest.ADD_MEM_REG, encodeSingleRegion(region(1024 * 1024 * MiB, BigInt(i) << 40n, BigInt(i + 1) << 40n)), [
          memfd,
        ]),
      ).toBe(1n);
      closeFd(memfd);
    }
    expect(fdCount(daemon.child.pid!)).toBeLessThanOrEqual(before + 1);
    client.close();
    expectServing(daemon);
  });

  it('refuses a table that would map more than 1 TiB in one session', async () => {
    const since = daemon.logs().length;
    const client = ackingClient();
    const memfd = createMemfd('huge-sparse', 2 ** 40 + 4096);
    expect(acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([region(2 ** 40 + 4096)]), [memfd])).toBe(1n);
    await daemon.waitForLog((l) => String(l['err']).includes('limit of mapped guest memory'), 5_000, since);
    closeFd(memfd);
    client.close();
    expectServing(daemon);
  });
});

describe('a blocking call eventfd at counter max (was a hung daemon)', () => {
  it('does not block the control thread when a stopped ring gets it', () => {
    const client = ackingClient();
    const fd = blockingEventFdAtMax();
    expect(acked(client, FrontendRequest.SET_VRING_CALL, encodeVringFdRequest({ index: 1, noFd: false }), [fd], 5_000)).toBe(0n);
    client.close();
    closeFd(fd);
    expectServing(daemon);
  });

  it('does not block the worker of a running ring: the ring still stops and restarts', async () => {
    const frontend = await VhostUserFrontend.connect(daemon.socketPath, { numQueues: 1, timeoutMs: 5_000 });
    try {
      const fd = blockingEventFdAtMax();
      await frontend.setVringCall(0, fd);
      closeFd(fd);
      // GET_VRING_BASE needs the worker's acknowledgement: a blocked worker would time out here.
      await frontend.stopQueue(0);
      await frontend.startQueue(0);
      await frontend.setVringEnable(0, true);
    } finally {
      frontend.close();
    }
    expectServing(daemon);
  });
});

describe('fd ownership', () => {
  it('does not leak the previous call fd when an unwritable fd replaces it', async () => {
    const since = daemon.logs().length;
    const pid = daemon.child.pid!;
    const client = ackingClient();
    const readOnly = path.join(daemon.dir, 'read-only');
    fs.writeFileSync(readOnly, 'x');
    const baseline = fdCount(pid);
    for (let i = 0; i < 500; i++) {
      const efd = createEventFd();
      expect(acked(client, FrontendRequest.SET_VRING_CALL, encodeVringFdRequest({ index: 0, noFd: false }), [efd])).toBe(0n);
      closeFd(efd);
      const file = fs.openSync(readOnly, 'r');
      expect(acked(client, FrontendRequest.SET_VRING_CALL, encodeVringFdRequest({ index: 0, noFd: false }), [file])).toBe(1n);
      closeFd(file);
    }
    expect(fdCount(pid)).toBeLessThanOrEqual(baseline + 2);
    await daemon.waitForLog((l) => String(l['err']).includes('not an eventfd'), 5_000, since);
    client.close();
    expectServing(daemon);
  });

  it('reports fd exhaustion as EMFILE, not as "more than 16 fds", and recovers when fds are freed', async () => {
    const own = await startDaemon({ args: ['--num-queues', '16', '--metrics-listen', 'off'] });
    try {
      const pid = own.child.pid!;
      const holder = ackingClient(own.socketPath);
      const limit = fdCount(pid) + 12;
      execFileSync('prlimit', ['--pid', String(pid), `--nofile=${limit}:`]);
      const since = own.logs().length;
      // Each queue keeps kick, call and err: 48 fds would be needed, only ~12 are free.
      let refused = 0;
      for (let q = 0; q < 16; q++) {
        for (const request of [FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_ERR]) {
          const efd = createEventFd();
          holder.send(request, V | NEED_REPLY, encodeVringFdRequest({ index: q, noFd: false }), [efd]);
          closeFd(efd);
          let reply: ReturnType<RawVhostClient['receive']>;
          try {
            reply = holder.receive();
          } catch {
            reply = null; // ECONNRESET: the daemon closed the session with our unread message
          }
          if (reply === null) {
            refused++;
            break;
          }
          if (reply.payload.readBigUInt64LE(0) !== 0n) refused++;
        }
        if (refused > 0) break;
      }
      expect(refused).toBeGreaterThan(0);
      await own.waitForLog((l) => JSON.stringify(l).includes('EMFILE'), 5_000, since);
      expect(
        own
          .logs()
          .slice(since)
          .some((l) => JSON.stringify(l).includes('more than 16 fds')),
      ).toBe(false);
      holder.close();
      execFileSync('prlimit', ['--pid', String(pid), '--nofile=4096:']);
      // A fresh front-end is served once fds are free again.
      const deadline = Date.now() + 5_000;
      for (;;) {
        try {
          const client = new RawVhostClient(own.socketPath);
          client.send(FrontendRequest.GET_FEATURES, V);
          const reply = client.receive(2_000);
          client.close();
          if (reply?.payload.length === 8) break;
        } catch (error) {
          if (Date.now() > deadline) throw error;
        }
        if (Date.now() > deadline) throw new Error('daemon did not serve a fresh front-end after fds were freed');
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      expect(own.running()).toBe(true);
    } finally {
      await own.stop();
    }
  });
});

describe('a front-end that never reads its replies', () => {
  it('cannot make the daemon queue replies without bound: its own socket fills up', () => {
    const client = new RawVhostClient(daemon.socketPath);
    const getConfig = new Uint8Array(12 + 60);
    new DataView(getConfig.buffer).setUint32(4, 60, true);
    const limit = 100_000;
    let sent = 0;
    let stalled = false;
    while (sent < limit && !stalled) {
      try {
        client.send(FrontendRequest.GET_CONFIG, V, getConfig);
        sent++;
      } catch (error) {
        expect(String(error)).toMatch(/socket full/);
        // Full: wait for the daemon to read more. With back-pressure it stops reading once its replies back up.
        stalled = !waitWritable(client.fd, 2_000);
      }
    }
    // Without back-pressure the daemon would read all 100,000 requests (and queue 7 MB of replies).
    expect(stalled).toBe(true);
    expect(sent).toBeLessThan(limit);
    // The session is still healthy: every reply arrives, in order, once the client reads.
    for (let i = 0; i < sent; i++) expect(client.receive()?.header.request).toBe(FrontendRequest.GET_CONFIG);
    client.send(FrontendRequest.GET_QUEUE_NUM, V);
    expect(client.receive()?.payload.readBigUInt64LE(0)).toBe(4n);
    client.close();
    expectServing(daemon);
  });
});

/** poll(POLLOUT) with a deadline: true once the socket can take more bytes. */
function waitWritable(fd: number, timeoutMs: number): boolean {
  const pollfd = Buffer.alloc(8);
  pollfd.writeInt32LE(fd, 0);
  pollfd.writeInt16LE(POLLOUT, 4);
  return sys.poll(addressOf(pollfd), 1, timeoutMs) > 0;
}

describe('ring addresses', () => {
  it('refuses unaligned ring addresses (found by the message fuzzer: the worker failed to start the ring)', async () => {
    const since = daemon.logs().length;
    const client = ackingClient();
    const base = 0x7f00_0000_0000n;
    const address = (desc: bigint, avail: bigint, used: bigint) =>
      encodeVringAddress({ index: 0, flags: 0, descUserAddr: desc, availUserAddr: avail, usedUserAddr: used, logGuestAddr: 0n });
    expect(acked(client, FrontendRequest.SET_VRING_ADDR, address(base + 8n, base + 4096n, base + 8192n))).toBe(1n);
    expect(acked(client, FrontendRequest.SET_VRING_ADDR, address(base, base + 4097n, base + 8192n))).toBe(1n);
    expect(acked(client, FrontendRequest.SET_VRING_ADDR, address(base, base + 4096n, base + 8194n))).toBe(1n);
    expect(acked(client, FrontendRequest.SET_VRING_ADDR, address(base, base + 4096n, base + 8192n))).toBe(0n);
    await daemon.waitForLog((l) => String(l['err']).includes('must be aligned'), 5_000, since);
    client.close();
    expectServing(daemon);
  });

  it('refuses memory regions that are not page-aligned (an aligned ring would map to an unaligned host address)', async () => {
    const since = daemon.logs().length;
    const client = ackingClient();
    const memfd = createMemfd('unaligned', 2 * MiB);
    const shifted = { guestPhysAddr: 0n, memorySize: BigInt(MiB), userAddr: 0x7f00_0000_0008n, mmapOffset: 0n };
    expect(acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([shifted]), [memfd])).toBe(1n);
    expect(
      acked(client, FrontendRequest.SET_MEM_TABLE, encodeMemoryTable([{ ...shifted, userAddr: 0x7f00_0000_0000n, mmapOffset: 24n }]), [
        memfd,
      ]),
    ).toBe(1n);
    await daemon.waitForLog((l) => String(l['err']).includes('must be multiples of 4096'), 5_000, since);
    closeFd(memfd);
    client.close();
    expectServing(daemon);
  });
});
