/**
 * Runs qemu-storage-daemon (QEMU's reference vhost-user-blk back-end) for tests, or skips them with a reason
 * when it is not installed — unless VUBLK_E2E_REQUIRED=1, which turns the skip into a failure.
 */
export { pattern } from '../support/pattern.js';
import type { TestContext } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { imageBytes } from '../support/session-harness.js';
import { QemuStorageDaemon, findQemuStorageDaemon, type QsdOptions } from '../../bench/src/frontend/index.js';

export const QSD_BINARY = findQemuStorageDaemon();
export const QSD_MISSING =
  'qemu-storage-daemon is not installed (Debian/Ubuntu: apt-get install qemu-system-common; or set VUBLK_QSD=/path/to/it)';

/** Call first in every test that needs the daemon. */
export function requireQsd(context: TestContext): void {
  if (QSD_BINARY !== null) return;
  if (process.env['VUBLK_E2E_REQUIRED'] === '1') throw new Error(`VUBLK_E2E_REQUIRED=1 but ${QSD_MISSING}`);
  context.skip(QSD_MISSING);
}

export interface QsdFixture {
  dir: string;
  image: string;
  socketPath: string;
  daemon: QemuStorageDaemon;
  /** Reads the image file on the host, bypassing the back-end. */
  imageBytes(offset: number, length: number): Buffer;
  close(): Promise<void>;
}

/** A sparse raw image of `sizeBytes` exported over a fresh socket in a temp dir. */
export async function startQsd(options: { sizeBytes?: number } & Partial<QsdOptions> = {}): Promise<QsdFixture> {
  const dir = mkdtempSync(join(tmpdir(), 'vublk-qsd-'));
  const image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, options.sizeBytes ?? 64 * 1024 * 1024);
  const socketPath = join(dir, 'vhost.sock');
  let daemon: QemuStorageDaemon;
  try {
    daemon = await QemuStorageDaemon.start({ image, socketPath, numQueues: 2, ...options });
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  return {
    dir,
    image,
    socketPath,
    daemon,
    imageBytes(offset, length) {
      return imageBytes(image, offset, length);
    },
    async close() {
      await daemon.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
