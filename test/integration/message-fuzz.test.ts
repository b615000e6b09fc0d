// A seeded vhost-user MESSAGE fuzzer against the real daemon (issue 10 item 4; `npm run build` first).
// Random and mutated messages on a live session: wrong sizes, unknown requests, flag bits, truncated payloads,
// fds where none are expected and missing where required, memory tables with overlapping, zero-sized, huge or
// unaligned regions and non-memfd fds (pipes, /dev/null, directories, sockets, unsealable memfds, regions
// larger than their memfd), SET_VRING_NUM 0 / 65536 / not a power of two, ring addresses outside memory, kicks
// before memory, GET_VRING_BASE on rings never started, SET_LOG_BASE with a short fd, SET_INFLIGHT_FD with
// bogus sizes, blocking eventfds at counter max, oversized and wrong-version headers, interleaved with valid
// traffic (a valid memory table and ring setup, kicks on running rings).
//
// Judged by: the daemon never crashes or hangs (every answer has a deadline); every message sent with
// NEED_REPLY (or a request that always replies) is answered, or the session is closed with a log line; every
// refusal has its log line; a fresh valid front-end (full QEMU handshake, a write and a read-back) is served
// after every batch; the fd count, thread count and RSS return to the baseline.
//
//   VUBLK_MSGFUZZ_MESSAGES=1000000 VUBLK_MSGFUZZ_SEED=1234 npx vitest run test/integration/message-fuzz.test.ts
//
// The seed is printed at the start and in every failure; the same seed replays the same messages.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  FrontendRequest,
  HeaderFlag,
  HEADER_SIZE,
  ProtocolFeature,
  encodeConfigMessage,
  encodeInflight,
  encodeMemoryTable,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddress,
  encodeVringFdRequest,
  encodeVringState,
  type MemoryRegion,
} from '../../protocol/vhost-user.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { RawVhostClient } from '../support/raw-vhost-client.js';
import { Prng, seedFromEnv } from '../support/prng.js';
import { createEventFd, signalEventFd } from '../../src/sys/eventfd.js';
import { closeFd } from '../../src/sys/fd.js';
import { createMemfd } from '../../src/sys/memory-map.js';
import { sys, addressOf, AF_UNIX, EFD_CLOEXEC, MFD_CLOEXEC, SOCK_CLOEXEC, SOCK_STREAM } from '../../src/sys/libc.js';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';

const MESSAGES = Number(process.env['VUBLK_MSGFUZZ_MESSAGES'] ?? 100_000);
const SEED = seedFromEnv('VUBLK_MSGFUZZ_SEED');
const BATCH = 2_000;
const REPLY_TIMEOUT_MS = 5_000;
const V = HeaderFlag.VERSION;
const NEED_REPLY = HeaderFlag.NEED_REPLY;
const R = FrontendRequest;
const MiB = 1024 * 1024;
/** Where the fuzz client claims its valid region lives in its own address space. */
const USER_BASE = 0x7f00_0000_0000n;
const VALID_SIZE = MiB;

/** Requests whose reply is part of the request (REPLY_ACK does not apply). */
const REPLYING = new Set<number>([
  R.GET_FEATURES,
  R.GET_PROTOCOL_FEATURES,
  R.GET_VRING_BASE,
  R.GET_QUEUE_NUM,
  R.GET_CONFIG,
  R.GET_INFLIGHT_FD,
  R.GET_MAX_MEM_SLOTS,
  R.GET_STATUS,
]);

interface FdPool {
  eventfd: number;
  blockingAtMax: number;
  validMemfd: number;
  smallMemfd: number;
  unsealableMemfd: number;
  pipeRead: number;
  pipeWrite: number;
  devNull: number;
  directory: number;
  readOnlyFile: number;
  socket: number;
  all: number[];
}

function makePool(dir: string): FdPool {
  const eventfd = createEventFd();
  const blockingAtMax = createEventFd(EFD_CLOEXEC);
  const max = Buffer.alloc(8);
  max.writeBigUInt64LE(0xffff_ffff_ffff_fffen);
  sys.write(blockingAtMax, addressOf(max), 8);
  const validMemfd = createMemfd('fuzz-valid', VALID_SIZE);
  const smallMemfd = createMemfd('fuzz-small', 4096);
  const unsealableMemfd = sys.memfdCreate('fuzz-unsealable', MFD_CLOEXEC);
  sys.ftruncate(unsealableMemfd, VALID_SIZE);
  const fifo = path.join(dir, 'fuzz-fifo');
  if (!fs.existsSync(fifo)) execFileSync('mkfifo', [fifo]);
  const pipeRead = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const pipeWrite = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  const devNull = fs.openSync('/dev/null', 'r+');
  const directory = fs.openSync(dir, 'r');
  const file = path.join(dir, 'fuzz-read-only');
  fs.writeFileSync(file, Buffer.alloc(8192));
  const readOnlyFile = fs.openSync(file, 'r');
  const socket = sys.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); // an unconnected socket
  const fds = {
    eventfd,
    blockingAtMax,
    validMemfd,
    smallMemfd,
    unsealableMemfd,
    pipeRead,
    pipeWrite,
    devNull,
    directory,
    readOnlyFile,
    socket,
  };
  return { ...fds, all: Object.values(fds) };
}

/** One message to send and what must come back. */
interface FuzzMessage {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number[];
  /** Send only a header claiming this payload size (oversized: the stream is no longer framed). */
  claimedSize?: number;
  kind: string;
}

class MessageGenerator {
  constructor(
    private readonly rng: Prng,
    private readonly pool: FdPool,
  ) {}

  private anyFd(): number {
    return this.rng.pick(this.pool.all);
  }

  private fds(max: number): number[] {
    return Array.from({ length: this.rng.int(0, max) }, () => this.anyFd());
  }

  /** Interesting 64-bit values: region edges, 2^53, 2^64-1, small, random. */
  private u64(): bigint {
    const r = this.rng;
    return r.weighted<() => bigint>([
      [3, () => 0n],
      [2, () => BigInt(r.int(1, 4096))],
      [3, () => USER_BASE + BigInt(r.int(0, VALID_SIZE / 4096)) * 4096n],
      [2, () => USER_BASE + BigInt(VALID_SIZE - r.int(0, 64))],
      [1, () => 0xf_ffff_ffff_ffffn + BigInt(r.int(0, 2))],
      [1, () => 0xffff_ffff_ffff_ffffn - BigInt(r.int(0, 4096))],
      [1, () => 1n << 40n],
      [2, () => (BigInt(r.u32()) << 32n) | BigInt(r.u32())],
    ])();
  }

  private region(): MemoryRegion {
    const r = this.rng;
    return r.weighted<() => MemoryRegion>([
      [4, () => ({ guestPhysAddr: 0n, memorySize: BigInt(VALID_SIZE), userAddr: USER_BASE, mmapOffset: 0n })],
      [1, () => ({ guestPhysAddr: 0n, memorySize: 0n, userAddr: USER_BASE, mmapOffset: 0n })],
      [1, () => ({ guestPhysAddr: 0n, memorySize: 16n * BigInt(MiB), userAddr: USER_BASE, mmapOffset: 0n })],
      [
        1,
        () => ({
          guestPhysAddr: BigInt(r.int(0, 4096)),
          memorySize: BigInt(r.int(1, VALID_SIZE)),
          userAddr: USER_BASE + BigInt(r.int(0, 4096)),
          mmapOffset: BigInt(r.int(0, 8192)),
        }),
      ],
      [1, () => ({ guestPhysAddr: 1n << 40n, memorySize: 1n << 41n, userAddr: 1n << 41n, mmapOffset: 0n })],
      [2, () => ({ guestPhysAddr: this.u64(), memorySize: this.u64(), userAddr: this.u64(), mmapOffset: this.u64() })],
    ])();
  }

  private memoryFd(): number {
    const p = this.pool;
    return this.rng.weighted([
      [5, p.validMemfd],
      [1, p.smallMemfd],
      [1, p.unsealableMemfd],
      [1, p.pipeRead],
      [1, p.devNull],
      [1, p.directory],
      [1, p.readOnlyFile],
      [1, p.eventfd],
      [1, p.socket],
    ]);
  }

  private notifyFd(): number {
    const p = this.pool;
    return this.rng.weighted([
      [6, p.eventfd],
      [1, p.blockingAtMax],
      [1, p.pipeWrite],
      [1, p.readOnlyFile],
      [1, p.devNull],
      [1, p.validMemfd],
    ]);
  }

  private queueIndex(): number {
    return this.rng.weighted([
      [8, this.rng.int(0, 1)],
      [1, this.rng.int(2, 255)],
    ]);
  }

  private vringNum(): number {
    return this.rng.weighted([
      [4, this.rng.pick([16, 64, 256])],
      [1, 0],
      [1, 65536],
      [1, this.rng.int(1, 1000) | 1],
      [1, this.rng.u32()],
    ]);
  }

  /** A well-formed message of a random type with plausible or boundary values. */
  private structured(): FuzzMessage {
    const r = this.rng;
    const request = r.weighted<number>([
      [3, R.GET_FEATURES],
      [3, R.SET_FEATURES],
      [2, R.GET_PROTOCOL_FEATURES],
      [2, R.SET_PROTOCOL_FEATURES],
      [1, R.SET_OWNER],
      [1, R.RESET_OWNER],
      [1, R.RESET_DEVICE],
      [6, R.SET_MEM_TABLE],
      [3, R.ADD_MEM_REG],
      [2, R.REM_MEM_REG],
      [4, R.SET_VRING_NUM],
      [4, R.SET_VRING_ADDR],
      [3, R.SET_VRING_BASE],
      [3, R.GET_VRING_BASE],
      [5, R.SET_VRING_KICK],
      [5, R.SET_VRING_CALL],
      [3, R.SET_VRING_ERR],
      [4, R.SET_VRING_ENABLE],
      [2, R.GET_CONFIG],
      [2, R.SET_CONFIG],
      [1, R.SET_BACKEND_REQ_FD],
      [1, R.SET_STATUS],
      [1, R.GET_STATUS],
      [1, R.GET_QUEUE_NUM],
      [1, R.GET_MAX_MEM_SLOTS],
      [2, R.SET_LOG_BASE],
      [1, R.SET_LOG_FD],
      [2, R.SET_INFLIGHT_FD],
      [1, R.GET_INFLIGHT_FD],
      [1, R.VRING_KICK],
    ]);
    let payload: Uint8Array = new Uint8Array(0);
    let fds: number[] = [];
    switch (request) {
      case R.SET_FEATURES:
      case R.SET_STATUS:
        payload = encodeU64(r.chance(0.7) ? 0x1_7000_0000n | BigInt(r.u32()) : this.u64());
        break;
      case R.SET_PROTOCOL_FEATURES:
        // REPLY_ACK always stays on, so every message with NEED_REPLY owes an answer.
        payload = encodeU64(this.u64() | (1n << BigInt(ProtocolFeature.REPLY_ACK)));
        break;
      case R.SET_MEM_TABLE: {
        const count = r.weighted([
          [6, 1],
          [2, 2],
          [1, 0],
          [1, r.int(3, 8)],
          [1, r.int(9, 40)],
        ]);
        const regions = Array.from({ length: Math.min(count, 64) }, () => this.region());
        payload = encodeMemoryTable(regions);
        if (count > 8) new DataView(payload.buffer).setUint32(0, count, true);
        fds = Array.from({ length: r.chance(0.85) ? Math.min(count, 8) : r.int(0, 8) }, () => this.memoryFd());
        break;
      }
      case R.ADD_MEM_REG:
      case R.REM_MEM_REG:
        payload = encodeSingleRegion(this.region());
        fds = r.chance(0.85) ? [this.memoryFd()] : this.fds(2);
        break;
      case R.SET_VRING_NUM:
      case R.SET_VRING_BASE:
      case R.GET_VRING_BASE:
      case R.SET_VRING_ENABLE:
        payload = encodeVringState({
          index: this.queueIndex(),
          num:
            request === R.SET_VRING_NUM
              ? this.vringNum()
              : r.weighted([
                  [4, r.int(0, 1)],
                  [1, r.u32()],
                ]),
        });
        break;
      case R.SET_VRING_ADDR: {
        const inside = (): bigint => USER_BASE + BigInt(r.int(0, VALID_SIZE / 4096 - 4)) * 4096n;
        const address = (): bigint => (r.chance(0.7) ? inside() : this.u64());
        payload = encodeVringAddress({
          index: this.queueIndex(),
          flags: r.chance(0.9) ? 0 : r.u32(),
          descUserAddr: address(),
          availUserAddr: address(),
          usedUserAddr: address(),
          logGuestAddr: this.u64(),
        });
        break;
      }
      case R.SET_VRING_KICK:
      case R.SET_VRING_CALL:
      case R.SET_VRING_ERR: {
        const noFd = r.chance(0.1);
        payload = encodeVringFdRequest({ index: this.queueIndex(), noFd });
        if (r.chance(0.05)) payload = encodeU64(this.u64());
        fds = noFd ? (r.chance(0.2) ? [this.notifyFd()] : []) : r.chance(0.9) ? [this.notifyFd()] : this.fds(3);
        break;
      }
      case R.GET_CONFIG:
      case R.SET_CONFIG: {
        const data = new Uint8Array(
          r.weighted([
            [3, 1],
            [2, 60],
            [1, r.int(0, 300)],
          ]),
        );
        r.fill(data);
        payload = encodeConfigMessage({
          offset: r.weighted([
            [3, 0],
            [2, 32],
            [1, r.int(0, 300)],
          ]),
          flags: r.int(0, 1),
          data,
        });
        break;
      }
      case R.SET_BACKEND_REQ_FD:
      case R.SET_LOG_FD:
        fds = this.fds(2);
        break;
      case R.SET_LOG_BASE: {
        payload = new Uint8Array(16);
        new DataView(payload.buffer).setBigUint64(0, this.u64(), true);
        new DataView(payload.buffer).setBigUint64(8, this.u64(), true);
        fds = r.chance(0.8) ? [this.rng.pick([this.pool.smallMemfd, this.pool.validMemfd, this.pool.pipeRead])] : [];
        break;
      }
      case R.SET_INFLIGHT_FD:
      case R.GET_INFLIGHT_FD:
        payload = encodeInflight({
          mmapSize: this.u64(),
          mmapOffset: this.u64(),
          numQueues: r.int(0, 0xffff),
          queueSize: r.int(0, 0xffff),
        });
        fds = request === R.SET_INFLIGHT_FD ? this.fds(2) : [];
        break;
      case R.VRING_KICK:
        payload = encodeVringState({ index: this.queueIndex(), num: 0 });
        break;
      default:
        fds = r.chance(0.05) ? this.fds(3) : [];
    }
    return { request, flags: V | NEED_REPLY, payload, fds, kind: 'structured' };
  }

  /** A structured message with its bytes damaged: truncated, extended, bit-flipped, or fds added/removed. */
  private mutated(): FuzzMessage {
    const r = this.rng;
    const message = this.structured();
    const mutation = r.int(0, 5);
    let payload = message.payload;
    if (mutation === 0) payload = payload.subarray(0, r.int(0, Math.max(0, payload.length - 1)));
    else if (mutation === 1) {
      const longer = new Uint8Array(payload.length + r.int(1, 64));
      longer.set(payload);
      r.fill(longer.subarray(payload.length));
      payload = longer;
    } else if (mutation === 2 && payload.length > 0) {
      payload = Uint8Array.from(payload);
      for (let i = r.int(1, 4); i > 0; i--) payload[r.int(0, payload.length - 1)]! ^= 1 << r.int(0, 7);
    } else if (mutation === 3) message.fds = [...message.fds, ...this.fds(4)].slice(0, 16);
    else if (mutation === 4) message.fds = [];
    else message.flags = V | NEED_REPLY | (r.u32() & ~HeaderFlag.VERSION_MASK);
    return { ...message, payload, kind: `mutated-${mutation}` };
  }

  /** Random request code, flags and bytes. */
  private random(): FuzzMessage {
    const r = this.rng;
    const payload = new Uint8Array(
      r.weighted([
        [3, r.int(0, 16)],
        [2, r.int(17, 300)],
        [1, r.int(301, 4096)],
      ]),
    );
    r.fill(payload);
    const request = r.weighted([
      [3, r.int(0, 45)],
      [1, r.int(46, 0xffff)],
      [1, r.u32()],
    ]);
    return {
      request,
      flags: V | NEED_REPLY | (r.u32() & 0xfffffff0 & (r.chance(0.5) ? 0 : 0xffffffff)),
      payload,
      fds: r.chance(0.2) ? this.fds(4) : [],
      kind: 'random',
    };
  }

  /** A header the stream cannot continue after: wrong version or a payload larger than any message. */
  private corrupt(): FuzzMessage {
    const r = this.rng;
    if (r.chance(0.5))
      return { request: R.GET_FEATURES, flags: r.pick([0, 2, 3]), payload: new Uint8Array(0), fds: [], kind: 'bad-version' };
    return {
      request: R.SET_FEATURES,
      flags: V,
      payload: new Uint8Array(0),
      fds: [],
      claimedSize: r.int(4097, 0x7fff_ffff),
      kind: 'oversized',
    };
  }

  next(): FuzzMessage {
    return this.rng.weighted<() => FuzzMessage>([
      [50, () => this.structured()],
      [30, () => this.mutated()],
      [18, () => this.random()],
      [0.3, () => this.corrupt()],
    ])();
  }
}

interface Figures {
  messages: number;
  answered: number;
  refused: number;
  sessions: number;
  closedByDaemon: number;
  unexpectedCloses: number;
  freshClients: number;
}

function procStatus(pid: number): { threads: number; rssKiB: number; fds: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN);
  return { threads: field('Threads'), rssKiB: field('VmRSS'), fds: fs.readdirSync(`/proc/${pid}/fd`).length };
}

let daemon: DaemonProcess;
let pool: FdPool;

beforeAll(async () => {
  daemon = await startDaemon({
    size: '16M',
    args: ['--num-queues', '2', '--metrics-listen', 'off', '--admin-socket', 'off', '--log-level', 'warn'],
  });
  pool = makePool(daemon.dir);
});

afterAll(async () => {
  pool?.all.forEach(closeFd);
  await daemon?.stop();
});

/** A fuzz session: REPLY_ACK negotiated, so every set-type request can be answered. */
function fuzzSession(): RawVhostClient {
  const client = new RawVhostClient(daemon.socketPath);
  client.send(R.SET_PROTOCOL_FEATURES, V, encodeU64(1n << BigInt(ProtocolFeature.REPLY_ACK)));
  return client;
}

/** A fresh, valid front-end: QEMU 7.2 handshake, then a write and a read-back on queue 1. */
async function freshClientServed(round: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  let frontend: VhostUserFrontend | undefined;
  for (;;) {
    try {
      frontend = await VhostUserFrontend.connect(daemon.socketPath, { numQueues: 2, timeoutMs: 10_000 });
      break;
    } catch (error) {
      // The previous session may still be tearing down (the listener holds a newcomer up to 1 s).
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  try {
    const blk = new VirtioBlkDriver(frontend);
    const data = Buffer.alloc(4096, round & 0xff);
    await blk.write(8 * (round % 64), data, { queue: 1 });
    expect(await blk.read(8 * (round % 64), 4096, { queue: 1 })).toEqual(data);
  } finally {
    frontend.close();
  }
}

function sendMessage(client: RawVhostClient, message: FuzzMessage): void {
  if (message.claimedSize !== undefined) {
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32LE(message.request >>> 0, 0);
    header.writeUInt32LE(message.flags >>> 0, 4);
    header.writeUInt32LE(message.claimedSize >>> 0, 8);
    client.sendBytes(header);
    return;
  }
  const bytes = Buffer.alloc(HEADER_SIZE + message.payload.length);
  bytes.writeUInt32LE(message.request >>> 0, 0);
  bytes.writeUInt32LE(message.flags >>> 0, 4);
  bytes.writeUInt32LE(message.payload.length, 8);
  bytes.set(message.payload, HEADER_SIZE);
  client.sendBytes(bytes, message.fds);
}

/** Reads the answer owed, or null when the daemon closed the session (ECONNRESET counts as closed). */
function receiveOrClosed(client: RawVhostClient): ReturnType<RawVhostClient['receive']> {
  try {
    return client.receive(REPLY_TIMEOUT_MS);
  } catch (error) {
    if (/ECONNRESET|EPIPE/.test(String(error))) return null;
    throw error;
  }
}

describe('vhost-user message fuzzer', () => {
  it(`survives ${MESSAGES} random and mutated messages (seed ${SEED})`, { timeout: 600_000 }, async () => {
    console.log(`message fuzzer: VUBLK_MSGFUZZ_SEED=${SEED} VUBLK_MSGFUZZ_MESSAGES=${MESSAGES}`);
    const pid = daemon.child.pid!;
    const rng = new Prng(SEED);
    const generator = new MessageGenerator(rng, pool);
    const figures: Figures = { messages: 0, answered: 0, refused: 0, sessions: 0, closedByDaemon: 0, unexpectedCloses: 0, freshClients: 0 };
    // Warm up (workers exist, the first mapping was made), then take the baseline.
    await freshClientServed(0);
    await new Promise((resolve) => setTimeout(resolve, 200));
    const baseline = procStatus(pid);
    const context = (): string => `seed ${SEED}, message ${figures.messages}`;

    for (let round = 1; figures.messages < MESSAGES; round++) {
      let client = fuzzSession();
      let replyAck = true;
      let logShmfd = false;
      figures.sessions++;
      const batchEnd = Math.min(MESSAGES, figures.messages + BATCH);
      while (figures.messages < batchEnd) {
        const message = generator.next();
        figures.messages++;
        const logMark = daemon.logs().length;
        try {
          sendMessage(client, message);
        } catch (error) {
          // The daemon closed the session on an earlier message while we were still sending.
          if (!/EPIPE|ECONNRESET/.test(String(error))) throw new Error(`${context()}: send failed: ${String(error)}`);
        }
        const stream = message.claimedSize !== undefined || (message.flags & HeaderFlag.VERSION_MASK) !== V;
        // The daemon acks only while REPLY_ACK is negotiated (as it was when the message arrived); a mutated
        // SET_PROTOCOL_FEATURES may switch it off or on again for the messages after it.
        // Under LOG_SHMFD, SET_LOG_BASE is always answered (vhost-user "Communication").
        const owed =
          stream ||
          ((message.flags & NEED_REPLY) !== 0 && replyAck) ||
          REPLYING.has(message.request >>> 0) ||
          (message.request === R.SET_LOG_BASE && logShmfd);
        if (!stream && message.request === R.SET_PROTOCOL_FEATURES && message.payload.length === 8) {
          replyAck = (Buffer.from(message.payload).readBigUInt64LE(0) & (1n << BigInt(ProtocolFeature.REPLY_ACK))) !== 0n;
          logShmfd = (Buffer.from(message.payload).readBigUInt64LE(0) & (1n << BigInt(ProtocolFeature.LOG_SHMFD))) !== 0n;
        }
        if (owed) {
          let reply: ReturnType<RawVhostClient['receive']>;
          try {
            reply = receiveOrClosed(client);
          } catch (error) {
            const fdKinds = message.fds.map((fd) => fs.readlinkSync(`/proc/self/fd/${fd}`)).join(', ');
            throw new Error(
              `${context()}: no answer to ${message.kind} request ${message.request} flags 0x${(message.flags >>> 0).toString(16)} ` +
                `payload ${Buffer.from(message.payload).toString('hex')} fds [${fdKinds}]: ${String(error)}\ndaemon log tail:\n${daemon.output().slice(-3000)}`,
            );
          }
          if (reply === null) {
            if (!stream) figures.unexpectedCloses++;
            figures.closedByDaemon++;
            await daemon
              .waitForLog((l) => l.msg === 'front-end disconnected', 10_000, logMark)
              .catch(() => {
                throw new Error(`${context()}: session closed without a log line`);
              });
            client.close();
            client = fuzzSession();
            replyAck = true;
            logShmfd = false;
            figures.sessions++;
          } else {
            if (stream) throw new Error(`${context()}: a ${message.kind} message was answered instead of closing the session`);
            expect(reply.header.request, context()).toBe(message.request >>> 0);
            figures.answered++;
            if (!REPLYING.has(message.request) && reply.payload.length === 8 && reply.payload.readBigUInt64LE(0) !== 0n) figures.refused++;
          }
        }
        // Now and then a kick on the shared eventfd: rings that run on fuzzed addresses get to work.
        if (rng.chance(0.02)) signalEventFd(pool.eventfd);
        if (!daemon.running())
          throw new Error(
            `${context()}: the daemon died (${daemon.child.exitCode ?? daemon.child.signalCode})\n${daemon.output().slice(-3000)}`,
          );
      }
      client.close();
      await freshClientServed(round);
      figures.freshClients++;
    }

    // Every refusal left a log line (rejections log at warn, unexpected failures at error).
    const rejectedLines = daemon.logs().filter((l) => l.msg === 'vhost-user request rejected').length;
    expect(rejectedLines, `refusals ${figures.refused} vs log lines ${rejectedLines}`).toBeGreaterThanOrEqual(figures.refused);

    // Resources return to the baseline once the last session has ended.
    const deadline = Date.now() + 10_000;
    let now = procStatus(pid);
    while ((now.fds > baseline.fds || now.threads > baseline.threads) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      now = procStatus(pid);
    }
    const errors = daemon.logs().filter((l) => l.level >= 50);
    const kinds = new Map<string, number>();
    for (const line of errors) {
      const key = `${line.msg}: ${String(line['request'] ?? '')} ${String(line['err'] ?? '')
        .replace(/0x[0-9a-f]+|\d+/g, 'N')
        .slice(0, 140)}`;
      kinds.set(key, (kinds.get(key) ?? 0) + 1);
    }
    if (kinds.size > 0) console.log(`error-level log lines by kind:\n${[...kinds].map(([k, n]) => `  ${n} × ${k}`).join('\n')}`);
    console.log(
      `message fuzzer: ${figures.messages} messages, ${figures.answered} answered (${figures.refused} refused), ` +
        `${figures.sessions} sessions, ${figures.closedByDaemon} closed by the daemon (${figures.unexpectedCloses} not on a corrupt header), ` +
        `${figures.freshClients} fresh clients served, crashes 0, error-level log lines ${errors.length}; ` +
        `fds ${baseline.fds} → ${now.fds}, threads ${baseline.threads} → ${now.threads}, RSS ${baseline.rssKiB} → ${now.rssKiB} KiB`,
    );
    expect(daemon.running()).toBe(true);
    expect(now.fds, `fd leak (${context()})`).toBeLessThanOrEqual(baseline.fds);
    expect(now.threads, 'thread leak').toBeLessThanOrEqual(baseline.threads);
    // The V8 heap may keep some of what 100k messages allocated; a leak per message would be far larger.
    expect(now.rssKiB - baseline.rssKiB, 'RSS growth in KiB').toBeLessThan(96 * 1024);
    expect(figures.unexpectedCloses, 'sessions closed on a framed message').toBe(0);
    // Bad input is logged as a warning; error level is kept for faults of the daemon itself.
    expect(errors.length, 'error-level log lines').toBe(0);
  });
});
