/**
 * MessageStream on a real Unix socket pair: a peer that hangs up while a handler is still running (a device
 * start waiting for an RBD lock) is reported at once, costs no CPU while the handler runs on, and the stream
 * closes once the handler is done, after the messages the peer sent before hanging up.
 */
import { describe, expect, it } from 'vitest';
import { createSocketPair } from '../../bench/src/frontend/socket-pair.js';
import { FrontendRequest, HeaderFlag, encodeMessage } from '../../protocol/vhost-user.js';
import { MessageStream, type CloseReason, type IncomingMessage } from '../../src/control/message-stream.js';
import { closeFd } from '../../src/sys/fd.js';
import { sendWithFds } from '../../src/sys/unix-socket.js';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** CPU time (user + system, ms) this process spends during `ms` of waiting. */
async function cpuDuring(ms: number): Promise<number> {
  const before = process.cpuUsage();
  await sleep(ms);
  const used = process.cpuUsage(before);
  return (used.user + used.system) / 1000;
}

describe('MessageStream: the peer hangs up while a handler runs', () => {
  it('reports the hang-up at once, does not spin meanwhile, handles what was sent before it, then closes', async () => {
    const [daemonEnd, peerEnd] = createSocketPair();
    const handled: number[] = [];
    const events: string[] = [];
    let release!: () => void;
    const blocked = new Promise<void>((resolve) => {
      release = resolve;
    });
    let closed!: (reason: CloseReason) => void;
    const closedWith = new Promise<CloseReason>((resolve) => {
      closed = resolve;
    });
    const stream = new MessageStream(
      daemonEnd,
      async (message: IncomingMessage) => {
        handled.push(message.header.request);
        events.push(`handle ${message.header.request}`);
        // The first message blocks, as a device start waiting for a lock held elsewhere.
        if (handled.length === 1) await blocked;
      },
      (reason) => {
        events.push(`close ${reason.kind}`);
        closed(reason);
      },
      () => events.push('peer gone'),
    );
    try {
      const send = (request: number) => {
        const bytes = encodeMessage(request, HeaderFlag.VERSION);
        expect(sendWithFds(peerEnd, bytes, 0)).toBe(bytes.length);
      };
      send(FrontendRequest.GET_FEATURES);
      await sleep(50);
      expect(events).toEqual([`handle ${FrontendRequest.GET_FEATURES}`]);
      // A second message queued behind the busy handler, then the peer leaves.
      send(FrontendRequest.GET_QUEUE_NUM);
      closeFd(peerEnd);
      await sleep(50);
      expect(events, 'the hang-up is reported while the first handler still runs').toEqual([
        `handle ${FrontendRequest.GET_FEATURES}`,
        'peer gone',
      ]);
      expect(stream.isClosed, 'the stream stays open until the handler is done').toBe(false);
      // A hang-up left armed on the level-triggered poll would be reported on every loop turn: a full CPU.
      const cpuMs = await cpuDuring(500);
      expect(cpuMs, `CPU used in 500 ms while the handler waited after the hang-up`).toBeLessThan(150);
      release();
      expect(await closedWith).toEqual({ kind: 'peer-closed' });
      expect(events).toEqual([
        `handle ${FrontendRequest.GET_FEATURES}`,
        'peer gone',
        `handle ${FrontendRequest.GET_QUEUE_NUM}`,
        'close peer-closed',
      ]);
    } finally {
      release();
      stream.close();
    }
  });

  it('a hang-up between messages closes the stream directly, with no peer-gone report', async () => {
    const [daemonEnd, peerEnd] = createSocketPair();
    const events: string[] = [];
    let closed!: (reason: CloseReason) => void;
    const closedWith = new Promise<CloseReason>((resolve) => {
      closed = resolve;
    });
    const stream = new MessageStream(
      daemonEnd,
      async () => {
        events.push('handle');
      },
      (reason) => {
        events.push(`close ${reason.kind}`);
        closed(reason);
      },
      () => events.push('peer gone'),
    );
    try {
      const bytes = encodeMessage(FrontendRequest.GET_FEATURES, HeaderFlag.VERSION);
      expect(sendWithFds(peerEnd, bytes, 0)).toBe(bytes.length);
      await sleep(50);
      closeFd(peerEnd);
      expect(await closedWith).toEqual({ kind: 'peer-closed' });
      expect(events).toEqual(['handle', 'close peer-closed']);
    } finally {
      stream.close();
    }
  });
});
