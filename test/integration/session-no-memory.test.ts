// A front-end whose guest RAM is not shared memory (QEMU without memory-backend-memfd,share=on) sets up and
// enables the rings but never sends a memory table: the real daemon warns once, naming the likely cause.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { connect, stopCleanly, useCleanups } from '../support/session-harness.js';

const defer = useCleanups();
let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ size: '16M', args: ['--metrics-listen', 'off'] });
});

afterAll(async () => {
  await stopCleanly(daemon);
});

const NO_MEMORY = (msg: string): boolean => /has sent no guest memory table/.test(msg);

describe('a front-end that never sends guest memory', () => {
  it('gets a warning naming shared guest RAM when it enables a ring, once per session', async () => {
    const since = daemon.logs().length;
    const { frontend } = await connect(daemon, defer, { handshake: false });
    await frontend.negotiate();
    await frontend.setOwner();
    await frontend.setFeatures(frontend.ackedFeatures);
    frontend.createQueues(1);
    await frontend.startQueue(0);
    await frontend.setVringEnable(0, true);
    const warning = await daemon.waitForLog((l) => NO_MEMORY(l.msg), 10_000, since);
    expect(warning).toMatchObject({ level: 40, queue: 0 });
    expect(String(warning['hint'])).toMatch(/memory-backend-memfd,.*share=on.*-numa node,memdev=mem.*-machine memory-backend=mem/);
    // The same session enabling again says nothing new.
    await frontend.setVringEnable(0, false);
    await frontend.setVringEnable(0, true);
    await frontend.getFeatures(); // a round trip: everything before it has been handled
    expect(
      daemon
        .logs()
        .slice(since)
        .filter((l) => NO_MEMORY(l.msg)),
    ).toHaveLength(1);
  });

  it('says nothing when the memory table comes first (the normal QEMU order)', async () => {
    const since = daemon.logs().length;
    const { frontend } = await connect(daemon, defer);
    await frontend.handshake();
    await frontend.getFeatures();
    expect(
      daemon
        .logs()
        .slice(since)
        .filter((l) => NO_MEMORY(l.msg)),
    ).toEqual([]);
  });

  it('logs features negotiated once per session; a different set later (firmware, then kernel) is a renegotiation', async () => {
    const since = daemon.logs().length;
    const { frontend } = await connect(daemon, defer);
    const full = frontend.ackedFeatures;
    await frontend.setFeatures(full); // the same set again: debug only
    const firmware = full & ((1n << 32n) | (1n << 30n) | 0x46n); // VERSION_1, PROTOCOL_FEATURES, SIZE_MAX, SEG_MAX, BLK_SIZE
    await frontend.setFeatures(firmware);
    await frontend.getFeatures();
    // The daemon's log reaches us through its stdout, which may lag the socket's reply on a loaded host.
    await daemon.waitForLog((l) => l.msg === 'features renegotiated', 10_000, since);
    const logs = daemon.logs().slice(since);
    expect(logs.filter((l) => l.msg === 'features negotiated')).toHaveLength(1);
    const renegotiated = logs.filter((l) => l.msg === 'features renegotiated');
    expect(renegotiated).toHaveLength(1);
    expect(renegotiated[0]).toMatchObject({ features: `0x${firmware.toString(16)}`, previous: `0x${full.toString(16)}` });
  });
});
