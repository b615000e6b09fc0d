// Malformed vhost-user input: every case is answered with an error or a clean session close plus a log
// line, and the daemon keeps serving the next front-end.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FrontendRequest, HeaderFlag, ProtocolFeature, encodeU64, encodeVringFdRequest } from '../../protocol/vhost-user.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { RawVhostClient, expectServing } from '../support/raw-vhost-client.js';
import { createEventFd } from '../../src/sys/eventfd.js';
import { closeFd } from '../../src/sys/fd.js';

const V = HeaderFlag.VERSION;
const NEED_REPLY = HeaderFlag.NEED_REPLY;

let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ args: ['--num-queues', '2'] });
});

afterAll(async () => {
  await daemon?.stop();
});

/** A client that negotiated REPLY_ACK, so every set-type request can be answered with an ack. */
function ackingClient(): RawVhostClient {
  const client = new RawVhostClient(daemon.socketPath);
  client.send(FrontendRequest.GET_PROTOCOL_FEATURES, V);
  const offered = client.receive()!.payload.readBigUInt64LE(0);
  expect(offered & (1n << BigInt(ProtocolFeature.REPLY_ACK))).not.toBe(0n);
  client.send(FrontendRequest.SET_PROTOCOL_FEATURES, V, encodeU64(1n << BigInt(ProtocolFeature.REPLY_ACK)));
  return client;
}

function ack(client: RawVhostClient, request: number): bigint {
  const reply = client.receive();
  expect(reply, 'daemon closed the session instead of answering').not.toBeNull();
  expect(reply!.header.request).toBe(request);
  expect(reply!.header.flags & HeaderFlag.REPLY).toBe(HeaderFlag.REPLY);
  return reply!.payload.readBigUInt64LE(0);
}

describe('malformed requests are refused, the session stays up', () => {
  it('answers an unknown request with a failed ack and keeps the session', async () => {
    const client = ackingClient();
    client.send(200, V | NEED_REPLY);
    expect(ack(client, 200)).toBe(1n);
    client.send(FrontendRequest.GET_QUEUE_NUM, V);
    expect(client.receive()!.payload.readBigUInt64LE(0)).toBe(2n);
    client.close();
    await daemon.waitForLog((l) => l.msg === 'vhost-user request rejected' && l['request'] === 'UNKNOWN(200)');
  });

  it('refuses a payload of the wrong size', async () => {
    const client = ackingClient();
    client.send(FrontendRequest.SET_VRING_NUM, V | NEED_REPLY, new Uint8Array(4));
    expect(ack(client, FrontendRequest.SET_VRING_NUM)).toBe(1n);
    client.send(FrontendRequest.SET_FEATURES, V | NEED_REPLY, new Uint8Array(3));
    expect(ack(client, FrontendRequest.SET_FEATURES)).toBe(1n);
    client.close();
    await daemon.waitForLog((l) => l.msg === 'vhost-user request rejected' && String(l['err']).includes('expected 8'));
  });

  it('refuses a kick or call without an fd when the no-fd flag is clear', () => {
    const client = ackingClient();
    client.send(FrontendRequest.SET_VRING_KICK, V | NEED_REPLY, encodeVringFdRequest({ index: 0, noFd: false }));
    expect(ack(client, FrontendRequest.SET_VRING_KICK)).toBe(1n);
    client.send(FrontendRequest.SET_VRING_CALL, V | NEED_REPLY, encodeVringFdRequest({ index: 0, noFd: false }));
    expect(ack(client, FrontendRequest.SET_VRING_CALL)).toBe(1n);
    client.close();
  });

  it('refuses a queue index that does not exist', () => {
    const client = ackingClient();
    const efd = createEventFd();
    client.send(FrontendRequest.SET_VRING_CALL, V | NEED_REPLY, encodeVringFdRequest({ index: 7, noFd: false }), [efd]);
    closeFd(efd);
    expect(ack(client, FrontendRequest.SET_VRING_CALL)).toBe(1n);
    client.close();
  });

  it('refuses a memory table whose fd count does not match, closing the stray fds', () => {
    const client = ackingClient();
    const table = new Uint8Array(8 + 32 * 2);
    const view = new DataView(table.buffer);
    view.setUint32(0, 2, true);
    view.setBigUint64(8 + 8, 4096n, true);
    view.setBigUint64(40 + 8, 4096n, true);
    const efd = createEventFd();
    client.send(FrontendRequest.SET_MEM_TABLE, V | NEED_REPLY, table, [efd]);
    closeFd(efd);
    expect(ack(client, FrontendRequest.SET_MEM_TABLE)).toBe(1n);
    client.close();
  });

  it('answers a GET_CONFIG with an impossible range with an empty reply', () => {
    const client = ackingClient();
    const payload = new Uint8Array(12);
    new DataView(payload.buffer).setUint32(4, 4096, true);
    client.send(FrontendRequest.GET_CONFIG, V, payload);
    const reply = client.receive();
    expect(reply?.header.request).toBe(FrontendRequest.GET_CONFIG);
    expect(reply?.payload.length).toBe(0);
    client.close();
  });
});

describe('a corrupt stream closes the session cleanly', () => {
  it('closes on a payload size larger than any message', async () => {
    const since = daemon.logs().length;
    const client = new RawVhostClient(daemon.socketPath);
    const header = Buffer.alloc(12);
    header.writeUInt32LE(FrontendRequest.SET_FEATURES, 0);
    header.writeUInt32LE(V, 4);
    header.writeUInt32LE(1_000_000, 8);
    client.sendBytes(header);
    expect(client.closedByPeer()).toBe(true);
    client.close();
    await daemon.waitForLog((l) => l.msg === 'front-end disconnected' && String(l['detail']).includes('exceeds'), 10_000, since);
    expectServing(daemon);
  });

  it('closes on a wrong protocol version', async () => {
    const since = daemon.logs().length;
    const client = new RawVhostClient(daemon.socketPath);
    client.send(FrontendRequest.GET_FEATURES, 0x2);
    expect(client.closedByPeer()).toBe(true);
    client.close();
    await daemon.waitForLog((l) => l.msg === 'front-end disconnected' && String(l['detail']).includes('version'), 10_000, since);
    expectServing(daemon);
  });

  it('tears down after a truncated message and serves the next front-end', async () => {
    const since = daemon.logs().length;
    const client = new RawVhostClient(daemon.socketPath);
    const header = Buffer.alloc(12 + 4);
    header.writeUInt32LE(FrontendRequest.SET_FEATURES, 0);
    header.writeUInt32LE(V, 4);
    header.writeUInt32LE(8, 8);
    client.sendBytes(header);
    client.close();
    await daemon.waitForLog((l) => l.msg === 'front-end disconnected' && l['reason'] === 'peer-closed', 10_000, since);
    expectServing(daemon);
  });

  it('refuses a second front-end while one is connected, with a log line', async () => {
    const first = new RawVhostClient(daemon.socketPath);
    first.send(FrontendRequest.GET_FEATURES, V);
    expect(first.receive()).not.toBeNull();
    const second = new RawVhostClient(daemon.socketPath);
    // Held for the reconnect grace period (1 s), then refused because the first session is still alive.
    expect(second.closedByPeer(5_000)).toBe(true);
    first.send(FrontendRequest.GET_QUEUE_NUM, V);
    expect(first.receive()).not.toBeNull();
    second.close();
    await daemon.waitForLog((l) => String(l.msg).includes('refused a second front-end'));
    first.close();
  });
});
