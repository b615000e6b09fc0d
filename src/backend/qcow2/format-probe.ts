/**
 * Format selection and backing-file naming, the safe way (CVE-2008-2004: a guest that writes a qcow2 header
 * into a raw disk must not make the host open a file it names):
 * - an explicit format is always honoured;
 * - probing happens only when no format is given, and logs a warning;
 * - a probed image's backing file is followed only when the image records the backing format.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { hasQcow2Magic } from '../../../protocol/qcow2.js';
import { Qcow2Error } from './errors.js';

export type ImageFormat = 'raw' | 'qcow2';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['raw', 'qcow2'];

export function parseImageFormat(text: string, what: string): ImageFormat {
  if (text === 'raw' || text === 'qcow2') return text;
  throw new Qcow2Error('QCOW2_UNSUPPORTED', `${what}: format '${text}' is not supported (raw, qcow2)`);
}

/** Looks at the first bytes of an open file: qcow2 magic → qcow2, anything else → raw. */
export function probeFormat(fd: number): ImageFormat {
  const head = Buffer.alloc(4);
  const n = fs.readSync(fd, head, 0, 4, 0);
  return n === 4 && hasQcow2Magic(head) ? 'qcow2' : 'raw';
}

/**
 * Resolves a backing file name as QEMU does for plain files: absolute names as they are, relative names
 * relative to the directory of the image that names them. Protocol prefixes (nbd:, json:, ...) are refused.
 */
export function resolveBackingPath(imagePath: string, backingName: string): string {
  if (backingName.length === 0 || backingName.includes('\0')) throw new Qcow2Error('QCOW2_INVALID', 'empty or malformed backing file name');
  if (/^[A-Za-z0-9+.-]+:/.test(backingName) && !backingName.startsWith('./') && !path.isAbsolute(backingName)) {
    throw new Qcow2Error('QCOW2_UNSUPPORTED', `backing file '${backingName}' uses a protocol prefix; only local files are supported`);
  }
  return path.isAbsolute(backingName) ? backingName : path.join(path.dirname(imagePath), backingName);
}
