// vublk driven by the TypeScript front-end (QEMU's role): basic round trips on every queue.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';

let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startDaemon({ args: ['--num-queues', '2', '--serial', 'vublk-smoke'] });
});

afterAll(async () => {
  await daemon?.stop();
});

describe('front-end round trips', () => {
  it('writes, flushes and reads back on both queues; the image holds the bytes', async () => {
    const fe = await VhostUserFrontend.connect(daemon.socketPath, { numQueues: 2 });
    try {
      const blk = new VirtioBlkDriver(fe);
      const data = Buffer.alloc(64 * 1024);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
      await blk.write(16, data, { queue: 0 });
      expect(await blk.flush({ queue: 0 })).toBe(0);
      const back = await blk.read(16, data.length, { queue: 1 });
      expect(Buffer.compare(Buffer.from(back), data)).toBe(0);
      const image = readFileSync(daemon.imagePath);
      expect(Buffer.compare(image.subarray(16 * 512, 16 * 512 + data.length), data)).toBe(0);
      const id = await blk.getId({ queue: 1 });
      expect(id.status).toBe(0);
      expect(id.id).toBe('vublk-smoke');
    } finally {
      fe.close();
    }
  });
});
