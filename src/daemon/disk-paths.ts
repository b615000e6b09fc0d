/**
 * Checks, before a disk's image or socket is created, that the folders they live in exist: a missing
 * folder is the usual first-run mistake, and the raw errno text (`ENOENT ... open '…'`) names neither
 * the disk nor what to do.
 */
import fs from 'node:fs';
import path from 'node:path';
import { VublkError } from '../errors.js';
import type { DiskSpec } from './disk-spec.js';

export class DiskPathError extends VublkError {
  constructor(
    readonly disk: string,
    readonly path: string,
    detail: string,
  ) {
    super('VUBLK_ERR_DISK_PATH', `disk ${disk}: ${detail}`, { peerFault: true, fatal: true });
  }
}

function checkFolder(disk: string, what: 'image' | 'socket', file: string): void {
  const folder = path.dirname(file);
  let stat: fs.Stats;
  try {
    stat = fs.statSync(folder);
  } catch {
    throw new DiskPathError(
      disk,
      file,
      `the folder of the ${what} ${file} does not exist: create ${folder} (mkdir -p) or give ${what === 'image' ? 'an image' : 'a socket'} path in an existing folder`,
    );
  }
  if (!stat.isDirectory()) throw new DiskPathError(disk, file, `${folder}, the folder of the ${what} ${file}, is not a directory`);
}

/** Throws DiskPathError naming the disk, the path and the fix. Touches nothing. */
export function checkDiskPaths(spec: DiskSpec): void {
  const { name, imagePath } = spec.options;
  if (!fs.existsSync(imagePath)) checkFolder(name, 'image', imagePath);
  if (spec.listen.kind === 'path') checkFolder(name, 'socket', spec.listen.path);
}
