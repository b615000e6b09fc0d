/**
 * Where O_DIRECT can be tested: a directory on a disk file system (tmpfs refuses O_DIRECT). Tries
 * $VUBLK_DIRECT_DIR, /var/tmp, the working tree's .cache, then os.tmpdir(); null when none supports it.
 */
import { closeSync, constants, mkdirSync, mkdtempSync, openSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const TMPFS_MAGIC = 0x01021994;
const ROOT = fileURLToPath(new URL('../..', import.meta.url));

function supportsDirect(dir: string): boolean {
  try {
    if (statfsSync(dir).type === TMPFS_MAGIC) return false;
    const probe = mkdtempSync(path.join(dir, 'vublk-odirect-'));
    try {
      const file = path.join(probe, 'probe');
      writeFileSync(file, Buffer.alloc(4096));
      closeSync(openSync(file, constants.O_RDWR | constants.O_DIRECT));
      return true;
    } finally {
      rmSync(probe, { recursive: true, force: true });
    }
  } catch {
    return false;
  }
}

let cached: string | null | undefined;

/** A directory whose file system accepts O_DIRECT, or null. */
export function directIoDir(): string | null {
  if (cached !== undefined) return cached;
  const candidates = [process.env['VUBLK_DIRECT_DIR'], '/var/tmp', path.join(ROOT, '.cache'), os.tmpdir()];
  cached = null;
  for (const dir of candidates) {
    if (dir === undefined) continue;
    try {
      mkdirSync(dir, { recursive: true });
    } catch {
      continue;
    }
    if (supportsDirect(dir)) {
      cached = dir;
      break;
    }
  }
  return cached;
}
