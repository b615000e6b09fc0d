// vhost-user session against the real daemon, driven by the TypeScript front-end (QEMU's role): the QEMU 7.2
// handshake with and without REPLY_ACK, what GET_FEATURES / GET_PROTOCOL_FEATURES / GET_QUEUE_NUM / GET_CONFIG
// announce, read-only exports, SET_STATUS / GET_STATUS, RESET_DEVICE and a re-handshake, and the write cache
// switch through SET_CONFIG. Run `npm run build` first (the daemon is dist/src/cli.js).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BackendNackError, MissingCompletionError } from '../../bench/src/frontend/index.js';
import { FrontendRequest, MAX_MEM_SLOTS, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES } from '../../protocol/vhost-user.js';
import { DeviceStatus, VirtioFeature } from '../../protocol/virtio.js';
import { BlkConfigOffset, BlkFeature, BlkRequestType, BlkStatus, SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import {
  DEFAULT_MAX_DISCARD_SECTORS,
  DEFAULT_MAX_DISCARD_SEG,
  DEFAULT_MAX_WRITE_ZEROES_SEG,
  DEFAULT_SEG_MAX,
  DEFAULT_SIZE_MAX,
} from '../../src/dataplane/device-limits.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { MiB, connect, pattern, sectorBytes, useCleanups, stopCleanly } from '../support/session-harness.js';

const NUM_QUEUES = 4;
const SERIAL = 'vublk-session';
const defer = useCleanups();

let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ args: ['--num-queues', String(NUM_QUEUES), '--serial', SERIAL, '--metrics-listen', 'off'] });
});

afterAll(async () => {
  await stopCleanly(daemon);
});

const EXPECTED_FEATURES = [
  ['VERSION_1', VirtioFeature.VERSION_1],
  ['RING_EVENT_IDX', VirtioFeature.RING_EVENT_IDX],
  ['RING_INDIRECT_DESC', VirtioFeature.RING_INDIRECT_DESC],
  ['PROTOCOL_FEATURES (bit 30)', VHOST_USER_F_PROTOCOL_FEATURES],
  ['BLK_FLUSH', BlkFeature.FLUSH],
  ['BLK_MQ', BlkFeature.MQ],
  ['BLK_CONFIG_WCE', BlkFeature.CONFIG_WCE],
  ['BLK_DISCARD', BlkFeature.DISCARD],
  ['BLK_WRITE_ZEROES', BlkFeature.WRITE_ZEROES],
  ['BLK_SIZE_MAX', BlkFeature.SIZE_MAX],
  ['BLK_SEG_MAX', BlkFeature.SEG_MAX],
  ['BLK_BLK_SIZE', BlkFeature.BLK_SIZE],
] as const;

const EXPECTED_PROTOCOL_FEATURES = [
  ['MQ', ProtocolFeature.MQ],
  ['REPLY_ACK', ProtocolFeature.REPLY_ACK],
  ['CONFIG', ProtocolFeature.CONFIG],
  ['BACKEND_REQ', ProtocolFeature.BACKEND_REQ],
  ['CONFIGURE_MEM_SLOTS', ProtocolFeature.CONFIGURE_MEM_SLOTS],
  ['RESET_DEVICE', ProtocolFeature.RESET_DEVICE],
  ['STATUS', ProtocolFeature.STATUS],
] as const;

function bit(features: bigint, n: number): boolean {
  return (features & (1n << BigInt(n))) !== 0n;
}

describe('handshake as QEMU 7.2 does it', () => {
  it('with REPLY_ACK: offers the expected features, protocol features, queue count and config space', async () => {
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 'max', memoryMessages: 'add-mem-reg' });
    for (const [name, n] of EXPECTED_FEATURES) expect(bit(frontend.offeredFeatures, n), `GET_FEATURES offers ${name}`).toBe(true);
    expect(bit(frontend.offeredFeatures, BlkFeature.RO), 'RO is not offered on a writable disk').toBe(false);
    expect(bit(frontend.offeredFeatures, VirtioFeature.RING_PACKED), 'packed rings are not offered').toBe(false);
    for (const [name, n] of EXPECTED_PROTOCOL_FEATURES) {
      expect(bit(frontend.offeredProtocolFeatures, n), `GET_PROTOCOL_FEATURES offers ${name}`).toBe(true);
    }
    // Every set-type message of the handshake carried NEED_REPLY and was acked with 0 (set() checks each ack).
    expect(frontend.replyAck).toBe(true);
    expect(frontend.maxQueues).toBe(NUM_QUEUES);
    expect(frontend.queues).toHaveLength(NUM_QUEUES);
    expect(frontend.maxMemSlots).toBe(MAX_MEM_SLOTS);

    const config = frontend.blkConfig;
    expect(config).not.toBeNull();
    expect(config).toMatchObject({
      capacity: (64 * MiB) / SECTOR_SIZE,
      sizeMax: DEFAULT_SIZE_MAX,
      segMax: DEFAULT_SEG_MAX,
      blkSize: 512,
      numQueues: NUM_QUEUES,
      writeback: 1,
      maxDiscardSectors: DEFAULT_MAX_DISCARD_SECTORS,
      maxDiscardSeg: DEFAULT_MAX_DISCARD_SEG,
      discardSectorAlignment: 1,
      maxWriteZeroesSectors: DEFAULT_MAX_DISCARD_SECTORS,
      maxWriteZeroesSeg: DEFAULT_MAX_WRITE_ZEROES_SEG,
      writeZeroesMayUnmap: 1,
    });
    // A partial GET_CONFIG (QEMU reads single fields too) answers the same bytes.
    const numQueuesField = await frontend.getConfig(BlkConfigOffset.numQueues, 2);
    expect(numQueuesField.readUInt16LE(0)).toBe(NUM_QUEUES);

    // The answers are also available one by one, on the same session.
    expect(await frontend.getQueueNum()).toBe(NUM_QUEUES);
    expect(await frontend.getFeatures()).toBe(frontend.offeredFeatures);
    expect(await frontend.getProtocolFeatures()).toBe(frontend.offeredProtocolFeatures);

    // The rings really run: GET_ID on every queue.
    for (let q = 0; q < NUM_QUEUES; q++) {
      const id = await blk.getId({ queue: q });
      expect(id, `queue ${q}`).toMatchObject({ status: BlkStatus.OK, id: SERIAL });
    }
  });

  it('without REPLY_ACK: no acks are sent (replies stay in step) and the rings run', async () => {
    const { frontend, blk } = await connect(daemon, defer, { numQueues: NUM_QUEUES, protocol: { replyAck: false } });
    expect(frontend.replyAck).toBe(false);
    expect(bit(frontend.ackedProtocolFeatures, ProtocolFeature.REPLY_ACK)).toBe(false);
    // Had the daemon acked any set-type message, this reply would be that stray ack instead.
    expect(await frontend.getQueueNum()).toBe(NUM_QUEUES);
    expect(await frontend.getFeatures()).toBe(frontend.offeredFeatures);
    const data = pattern(1, 8 * 1024);
    for (let q = 0; q < NUM_QUEUES; q++) {
      await blk.write(64 + q * 16, data, { queue: q });
      expect((await blk.read(64 + q * 16, data.length, { queue: (q + 1) % NUM_QUEUES })).equals(data)).toBe(true);
    }
    // A set-type message without NEED_REPLY, then a request with a reply: still in step.
    await frontend.setVringEnable(0, true);
    expect((await frontend.getConfig()).length).toBe(60);
  });

  it('without protocol features at all: rings start enabled on their kick', async () => {
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2, protocol: { enabled: false } });
    expect(bit(frontend.ackedFeatures, VHOST_USER_F_PROTOCOL_FEATURES)).toBe(false);
    expect(frontend.config).toBeNull();
    const data = pattern(2, 4096);
    await blk.write(200, data, { queue: 1 });
    expect((await blk.read(200, 4096, { queue: 0 })).equals(data)).toBe(true);
  });

  it('SET_STATUS / GET_STATUS round trip; NEEDS_RESET cannot be set by the front-end', async () => {
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2, protocol: { status: true } });
    expect(frontend.hasProtocolFeature(ProtocolFeature.STATUS)).toBe(true);
    const running = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK;
    expect(await frontend.getStatus()).toBe(running);
    await frontend.setStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
    expect(await frontend.getStatus()).toBe(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
    await frontend.setStatus(running | DeviceStatus.NEEDS_RESET);
    expect(await frontend.getStatus()).toBe(running);
    // Status is only recorded: the rings keep running whatever it says.
    expect((await blk.getId({ queue: 1 })).status).toBe(BlkStatus.OK);
    await frontend.setStatus(0);
    expect(await frontend.getStatus()).toBe(0);
  });

  it('RESET_DEVICE, then a full re-handshake on the same connection works', async () => {
    const { frontend, blk } = await connect(daemon, defer, { numQueues: NUM_QUEUES, protocol: { status: true } });
    const before = pattern(3, 16 * 1024);
    await blk.write(300, before, { queue: 2 });
    await frontend.resetDevice();
    expect(await frontend.getStatus()).toBe(0);
    // After the reset the rings are gone: a kick on the old ring is not served.
    const orphan = blk.submit({ type: BlkRequestType.IN, sector: 300, inLength: 512 }, { queue: 1, kick: 'force' });
    await expect(blk.wait(orphan, 300)).rejects.toBeInstanceOf(MissingCompletionError);
    await frontend.handshake();
    expect(await frontend.getStatus()).toBe(
      DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK,
    );
    for (let q = 0; q < NUM_QUEUES; q++) {
      expect((await blk.read(300, before.length, { queue: q })).equals(before), `queue ${q} after reset`).toBe(true);
      const after = pattern(30 + q, 4096);
      await blk.write(400 + q * 8, after, { queue: q });
      expect(sectorBytes(daemon.imagePath, 400 + q * 8, 4096).equals(after)).toBe(true);
    }
  });

  it('SET_CONFIG of the writeback byte switches to write-through and back; writes stay correct', async () => {
    const { frontend, blk } = await connect(daemon, defer, { numQueues: 2 });
    expect(frontend.blkConfig?.writeback).toBe(1);
    await frontend.setConfig(BlkConfigOffset.writeback, Uint8Array.of(0));
    expect((await frontend.getConfig()).readUInt8(BlkConfigOffset.writeback)).toBe(0);
    expect(frontend.blkConfig?.writeback).toBe(0);
    await daemon.waitForLog((l) => l.msg === 'guest changed the write cache mode' && l['writeback'] === false);
    for (let i = 0; i < 8; i++) {
      const data = pattern(40 + i, 4096 * (i + 1));
      await blk.write(1000 + i * 64, data, { queue: i % 2 });
      expect(sectorBytes(daemon.imagePath, 1000 + i * 64, data.length).equals(data), `write ${i} in write-through mode`).toBe(true);
      expect((await blk.read(1000 + i * 64, data.length, { queue: (i + 1) % 2 })).equals(data)).toBe(true);
    }
    expect(await blk.flush()).toBe(BlkStatus.OK);
    // Only the writeback byte is writable: anything else is refused (nacked), the config is unchanged.
    await expect(frontend.setConfig(BlkConfigOffset.capacity, new Uint8Array(8))).rejects.toBeInstanceOf(BackendNackError);
    expect((await frontend.getConfig()).readUInt8(BlkConfigOffset.writeback)).toBe(0);
    await frontend.setConfig(BlkConfigOffset.writeback, Uint8Array.of(1));
    expect((await frontend.getConfig()).readUInt8(BlkConfigOffset.writeback)).toBe(1);
    const data = pattern(49, 8192);
    await blk.write(2000, data);
    expect(await blk.flush()).toBe(BlkStatus.OK);
    expect(sectorBytes(daemon.imagePath, 2000, data.length).equals(data)).toBe(true);
  });

  it('GET_CONFIG of a daemon started with --writethrough says writeback=0', async () => {
    const wt = await startDaemon({ args: ['--writethrough', '--metrics-listen', 'off'] });
    defer(() => wt.stop());
    const { frontend, blk } = await connect(wt, defer);
    expect(frontend.blkConfig?.writeback).toBe(0);
    const data = pattern(50, 4096);
    await blk.write(8, data);
    expect(sectorBytes(wt.imagePath, 8, 4096).equals(data)).toBe(true);
  });

  it('answers GET_MAX_MEM_SLOTS and refuses an unknown request with a failed ack', async () => {
    const { frontend } = await connect(daemon, defer, { numQueues: 1 });
    expect(await frontend.getMaxMemSlots()).toBe(MAX_MEM_SLOTS);
    await expect(frontend.set(FrontendRequest.SET_LOG_BASE, new Uint8Array(16))).rejects.toBeInstanceOf(BackendNackError);
    expect(await frontend.getQueueNum()).toBe(NUM_QUEUES);
  });
});

describe('read-only export', () => {
  let dir: string;
  let ro: DaemonProcess;
  let imagePath: string;
  const content = pattern(99, 1 * MiB);

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-ro-'));
    imagePath = path.join(dir, 'ro.img');
    const image = Buffer.alloc(16 * MiB);
    content.copy(image, 0);
    writeFileSync(imagePath, image);
    // A later --image overrides the default one (commander keeps the last value).
    ro = await startDaemon({ size: '16M', args: ['--image', imagePath, '--read-only', '--num-queues', '2', '--metrics-listen', 'off'] });
  });

  afterAll(async () => {
    await stopCleanly(ro);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('offers RO and neither DISCARD nor WRITE_ZEROES; reads work, writes fail, FLUSH succeeds', async () => {
    const { frontend, blk } = await connect(ro, defer, { numQueues: 2 });
    expect(bit(frontend.offeredFeatures, BlkFeature.RO)).toBe(true);
    expect(bit(frontend.offeredFeatures, BlkFeature.DISCARD)).toBe(false);
    expect(bit(frontend.offeredFeatures, BlkFeature.WRITE_ZEROES)).toBe(false);
    for (const [name, n] of EXPECTED_FEATURES) {
      if (n === BlkFeature.DISCARD || n === BlkFeature.WRITE_ZEROES) continue;
      expect(bit(frontend.offeredFeatures, n), `read-only GET_FEATURES still offers ${name}`).toBe(true);
    }
    expect(frontend.hasFeature(BlkFeature.RO)).toBe(true);
    expect(frontend.blkConfig?.capacity).toBe((16 * MiB) / SECTOR_SIZE);
    for (let q = 0; q < 2; q++) {
      expect((await blk.read(0, content.length, { queue: q })).equals(content), `read on queue ${q}`).toBe(true);
      const write = await blk.execute({ type: BlkRequestType.OUT, sector: 0, out: pattern(5, 4096) }, { queue: q });
      expect(write.status, 'a write to a read-only disk is IOERR').toBe(BlkStatus.IOERR);
      expect(await blk.flush({ queue: q })).toBe(BlkStatus.OK);
      const zeroes = await blk.execute({ type: BlkRequestType.WRITE_ZEROES, out: Buffer.alloc(16) }, { queue: q });
      expect(zeroes.status).not.toBe(BlkStatus.OK);
    }
    expect(sectorBytes(imagePath, 0, content.length).equals(content), 'the image is untouched').toBe(true);
  });
});
