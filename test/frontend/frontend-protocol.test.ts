/**
 * The front-end's control plane against a scripted back-end living in this process (which also proves the
 * front-end never blocks the event loop): the QEMU 7.2 message sequence, REPLY_ACK handling, STATUS, and the
 * typed errors for NACKs, wrong replies, silence and hang-ups.
 */
import { describe, it, expect, afterEach } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { listenUnix, acceptConnection, recvWithFds, sendWithFds } from '../../src/sys/unix-socket.js';
import { closeAll, closeFd } from '../../src/sys/fd.js';
import {
  FrontendRequest,
  HeaderFlag,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  decodeHeader,
  encodeReply,
  encodeU64,
  encodeConfigMessage,
  decodeConfigMessage,
  decodeU64,
  decodeMemoryTable,
  decodeVringAddress,
  requestName,
  HEADER_SIZE,
} from '../../protocol/vhost-user.js';
import { VirtioFeature, DeviceStatus, featureMask } from '../../protocol/virtio.js';
import { BlkFeature, encodeBlkConfig } from '../../protocol/virtio-blk.js';
import {
  VhostUserFrontend,
  BackendNackError,
  BackendDisconnectedError,
  FrontendTimeoutError,
  UnexpectedReplyError,
  NegotiationError,
} from '../../bench/src/frontend/index.js';

interface Recorded {
  name: string;
  flags: number;
  payload: Buffer;
  fdCount: number;
}

interface Script {
  features?: bigint;
  protocolFeatures?: bigint;
  /** Requests answered with a non-zero ack. */
  nack?: number[];
  /** Requests never answered. */
  silent?: number[];
  /** Requests answered with a reply for a different request. */
  misreply?: number[];
  /** Close the connection when this request arrives. */
  hangUpOn?: number;
}

const OFFERED = featureMask(
  VirtioFeature.VERSION_1,
  VirtioFeature.RING_EVENT_IDX,
  VirtioFeature.RING_INDIRECT_DESC,
  BlkFeature.FLUSH,
  BlkFeature.MQ,
  VHOST_USER_F_PROTOCOL_FEATURES,
);
const OFFERED_PROTOCOL = featureMask(
  ProtocolFeature.MQ,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.CONFIG,
  ProtocolFeature.STATUS,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
);

/** A vhost-user back-end that records every message and answers from a script; no data plane. */
class ScriptedBackend {
  readonly messages: Recorded[] = [];
  private readonly listenFd: number;
  private conn = -1;
  private status = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(
    readonly path: string,
    private readonly script: Script = {},
  ) {
    this.listenFd = listenUnix(path);
    this.timer = setInterval(() => this.pump(), 1);
  }

  names(): string[] {
    return this.messages.map((m) => m.name);
  }

  close(): void {
    clearInterval(this.timer);
    closeFd(this.conn);
    closeFd(this.listenFd);
  }

  private pump(): void {
    if (this.conn < 0) {
      const fd = acceptConnection(this.listenFd);
      if (fd === null) return;
      this.conn = fd;
    }
    for (;;) {
      const header = Buffer.alloc(HEADER_SIZE);
      const got = recvWithFds(this.conn, header, 0, HEADER_SIZE);
      if (got === null || got.bytes === 0) return;
      const { request, flags, size } = decodeHeader(header);
      const payload = Buffer.alloc(size);
      if (size > 0) recvWithFds(this.conn, payload, 0, size);
      closeAll(got.fds);
      this.messages.push({ name: requestName(request), flags, payload, fdCount: got.fds.length });
      if (request === this.script.hangUpOn) {
        closeFd(this.conn);
        this.conn = -2;
        clearInterval(this.timer);
        return;
      }
      if (this.script.silent?.includes(request)) continue;
      const reply = this.answer(request, payload);
      const needReply = (flags & HeaderFlag.NEED_REPLY) !== 0;
      const code = this.script.misreply?.includes(request) ? FrontendRequest.GET_QUEUE_NUM : request;
      if (reply !== null) sendWithFds(this.conn, encodeReply(code, reply), 0);
      else if (needReply) sendWithFds(this.conn, encodeReply(code, encodeU64(this.script.nack?.includes(request) ? 1 : 0)), 0);
    }
  }

  /** Payload of a request's own reply, or null for set-type requests. */
  private answer(request: number, payload: Buffer): Uint8Array | null {
    switch (request) {
      case FrontendRequest.GET_FEATURES:
        return encodeU64(this.script.features ?? OFFERED);
      case FrontendRequest.GET_PROTOCOL_FEATURES:
        return encodeU64(this.script.protocolFeatures ?? OFFERED_PROTOCOL);
      case FrontendRequest.GET_QUEUE_NUM:
        return encodeU64(4);
      case FrontendRequest.GET_MAX_MEM_SLOTS:
        return encodeU64(32);
      case FrontendRequest.GET_STATUS:
        return encodeU64(this.status);
      case FrontendRequest.SET_STATUS:
        this.status = Number(decodeU64(request, payload));
        return null;
      case FrontendRequest.GET_CONFIG: {
        const asked = decodeConfigMessage(request, payload);
        const config = encodeBlkConfig({
          capacity: 2048,
          sizeMax: 0,
          segMax: 126,
          blkSize: 512,
          physicalBlockExp: 0,
          alignmentOffset: 0,
          minIoSize: 1,
          optIoSize: 0,
          writeback: 1,
          numQueues: 4,
          maxDiscardSectors: 0,
          maxDiscardSeg: 0,
          discardSectorAlignment: 0,
          maxWriteZeroesSectors: 0,
          maxWriteZeroesSeg: 0,
          writeZeroesMayUnmap: 0,
        });
        return encodeConfigMessage({ offset: asked.offset, flags: 0, data: config.subarray(asked.offset, asked.offset + asked.size) });
      }
      case FrontendRequest.GET_VRING_BASE:
        return payload;
      default:
        return null;
    }
  }
}

let dir: string;
let backend: ScriptedBackend | undefined;
let frontend: VhostUserFrontend | undefined;

function start(script: Script = {}): string {
  dir = mkdtempSync(join(tmpdir(), 'vublk-fe-'));
  const path = join(dir, 'vhost.sock');
  backend = new ScriptedBackend(path, script);
  return path;
}

afterEach(() => {
  frontend?.close();
  frontend = undefined;
  backend?.close();
  backend = undefined;
  rmSync(dir, { recursive: true, force: true });
});

describe('front-end control plane (scripted back-end)', () => {
  it('sends the QEMU 7.2 sequence with NEED_REPLY on set-type messages', async () => {
    const path = start();
    frontend = await VhostUserFrontend.connect(path, { numQueues: 2, protocol: { status: true }, timeoutMs: 2000 });
    const b = backend as ScriptedBackend;
    const perQueue = ['SET_VRING_NUM', 'SET_VRING_BASE', 'SET_VRING_ADDR', 'SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'];
    expect(b.names()).toEqual([
      'GET_FEATURES',
      'GET_PROTOCOL_FEATURES',
      'SET_PROTOCOL_FEATURES',
      'GET_QUEUE_NUM',
      'SET_OWNER',
      'GET_CONFIG',
      'SET_FEATURES',
      'GET_STATUS',
      'SET_STATUS',
      'SET_MEM_TABLE',
      ...perQueue,
      ...perQueue,
      'SET_VRING_ENABLE',
      'SET_VRING_ENABLE',
      'GET_STATUS',
      'SET_STATUS',
    ]);
    const byName = (name: string) => b.messages.filter((m) => m.name === name);
    // REPLY_ACK only becomes effective after SET_PROTOCOL_FEATURES; GET-type messages have their own replies.
    expect(byName('SET_PROTOCOL_FEATURES')[0]?.flags).toBe(HeaderFlag.VERSION);
    for (const m of b.messages.filter((m) => m.name.startsWith('SET_') && m.name !== 'SET_PROTOCOL_FEATURES')) {
      expect(m.flags, m.name).toBe(HeaderFlag.VERSION | HeaderFlag.NEED_REPLY);
    }
    for (const m of b.messages.filter((m) => m.name.startsWith('GET_'))) expect(m.flags, m.name).toBe(HeaderFlag.VERSION);
    expect(byName('SET_MEM_TABLE')[0]?.fdCount).toBe(1);
    expect(decodeMemoryTable(FrontendRequest.SET_MEM_TABLE, byName('SET_MEM_TABLE')[0]?.payload as Buffer)[0]?.memorySize).toBe(
      64n * 1024n * 1024n,
    );
    expect(byName('SET_VRING_KICK').map((m) => m.fdCount)).toEqual([1, 1]);
    expect(byName('SET_STATUS').map((m) => Number(decodeU64(FrontendRequest.SET_STATUS, m.payload)))).toEqual([
      DeviceStatus.FEATURES_OK,
      DeviceStatus.FEATURES_OK | DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK,
    ]);
    // Ring addresses are user addresses: inside the region's mapping, not guest-physical.
    const address = decodeVringAddress(FrontendRequest.SET_VRING_ADDR, byName('SET_VRING_ADDR')[0]?.payload as Buffer);
    expect(address.descUserAddr).toBe(frontend.memory.toUserAddr(frontend.queue(0).descGpa));
    expect(address.descUserAddr).not.toBe(BigInt(frontend.queue(0).descGpa));
    expect(frontend.maxQueues).toBe(4);
    expect(frontend.blkConfig?.capacity).toBe(2048);
    expect(frontend.hasProtocolFeature(ProtocolFeature.STATUS)).toBe(true);
    expect(await frontend.getStatus()).toBe(0x0f);
    expect(await frontend.getVringBase(1)).toBe(0);
  });

  it('uses ADD_MEM_REG per region under CONFIGURE_MEM_SLOTS', async () => {
    const path = start();
    frontend = await VhostUserFrontend.connect(path, {
      memoryMessages: 'add-mem-reg',
      memory: [
        { gpa: 0, size: 1 << 20 },
        { gpa: 1 << 30, size: 1 << 20 },
      ],
      timeoutMs: 2000,
    });
    const names = (backend as ScriptedBackend).names();
    expect(names).toContain('GET_MAX_MEM_SLOTS');
    expect(names.filter((n) => n === 'ADD_MEM_REG')).toHaveLength(2);
    expect(names).not.toContain('SET_MEM_TABLE');
    expect(frontend.maxMemSlots).toBe(32);
  });

  it('skips protocol features entirely when disabled (and no SET_VRING_ENABLE)', async () => {
    const path = start();
    frontend = await VhostUserFrontend.connect(path, { protocol: { enabled: false }, timeoutMs: 2000 });
    const names = (backend as ScriptedBackend).names();
    expect(names).not.toContain('GET_PROTOCOL_FEATURES');
    expect(names).not.toContain('SET_VRING_ENABLE');
    expect(names).not.toContain('GET_CONFIG');
    expect((backend as ScriptedBackend).messages.every((m) => m.flags === HeaderFlag.VERSION)).toBe(true);
    expect(frontend.blkConfig).toBeNull();
  });

  it('turns a NACK into BackendNackError naming the request', async () => {
    const path = start({ nack: [FrontendRequest.SET_MEM_TABLE] });
    const error = await VhostUserFrontend.connect(path, { timeoutMs: 2000 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BackendNackError);
    expect((error as BackendNackError).request).toBe('SET_MEM_TABLE');
  });

  it('times out with a typed error naming the reply it waited for', async () => {
    const path = start({ silent: [FrontendRequest.GET_CONFIG] });
    const started = Date.now();
    const error = await VhostUserFrontend.connect(path, { timeoutMs: 200 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(FrontendTimeoutError);
    expect((error as FrontendTimeoutError).waitedFor).toBe('the reply to GET_CONFIG');
    expect(Date.now() - started).toBeLessThan(2000);
  });

  it('rejects a reply for the wrong request', async () => {
    const path = start({ misreply: [FrontendRequest.GET_FEATURES] });
    await expect(VhostUserFrontend.connect(path, { timeoutMs: 2000 })).rejects.toThrow(UnexpectedReplyError);
  });

  it('reports a hang-up as BackendDisconnectedError', async () => {
    const path = start({ hangUpOn: FrontendRequest.SET_OWNER });
    const error = await VhostUserFrontend.connect(path, { timeoutMs: 2000 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BackendDisconnectedError);
  });

  it('refuses more queues than GET_QUEUE_NUM allows', async () => {
    const path = start();
    await expect(VhostUserFrontend.connect(path, { numQueues: 5, timeoutMs: 2000 })).rejects.toThrow(NegotiationError);
  });

  it('sends raw messages and bytes exactly as given', async () => {
    const path = start({ silent: [77] });
    frontend = await VhostUserFrontend.connect(path, { handshake: false, timeoutMs: 2000 });
    const [fd] = frontend.memory.fds;
    await frontend.sendMessage(77, { flags: 0xdead, payload: Buffer.from('hostile'), fds: [fd as number, fd as number] });
    const reply = await frontend.call(FrontendRequest.GET_FEATURES);
    expect(decodeU64(FrontendRequest.GET_FEATURES, reply)).toBe(OFFERED);
    const raw = (backend as ScriptedBackend).messages[0] as Recorded;
    expect(raw).toMatchObject({ name: 'UNKNOWN(77)', flags: 0xdead, fdCount: 2 });
    expect(raw.payload.toString()).toBe('hostile');
  });
});
