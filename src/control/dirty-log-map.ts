/**
 * The migration dirty log on the control plane: maps the log fd of SET_LOG_BASE (LOG_SHMFD) and hands
 * workers its address. Like guest memory, an old log is unmapped only after every worker has acknowledged
 * the next one.
 *
 * Invariants:
 * - The log lies inside the fd (fstat) and the fd cannot shrink (F_SEAL_SHRINK present, or added here):
 *   a log that shrank under the mapping would kill the daemon with SIGBUS at the next mark.
 * - The size is bounded (MAX_LOG_BYTES): a front-end cannot make the daemon map without bound.
 */
import fs from 'node:fs';
import type { LogDescription } from '../../protocol/vhost-user.js';
import { mapShared, unmap } from '../sys/memory-map.js';
import { closeFd } from '../sys/fd.js';
import { sys } from '../sys/libc.js';
import { VublkError } from '../errors.js';

/** 256 MiB of log covers 8 TiB of guest-physical address space (one bit per 4 KiB page). */
export const MAX_LOG_BYTES = 256 * 1024 * 1024;

const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;
const F_SEAL_SHRINK = 0x0002;
const PAGE_SIZE = 4096;

/** A log the front-end sent that vublk cannot use safely (its fault: the request is refused). */
export class DirtyLogError extends VublkError {
  constructor(detail: string) {
    super('VUBLK_ERR_DIRTY_LOG', `dirty log rejected: ${detail}`, { peerFault: true });
  }
}

export interface MappedLog {
  /** Address of the log's first byte (the byte of guest page 0). */
  hostAddr: number;
  size: number;
  mapAddress: number;
  mapLength: number;
}

/** Maps the log described by SET_LOG_BASE. The fd is always consumed (closed): the mapping keeps it alive. */
export function mapLog(description: LogDescription, fd: number): MappedLog {
  try {
    const { mmapSize, mmapOffset } = description;
    if (mmapSize === 0n) throw new DirtyLogError('log of size 0');
    if (mmapSize > BigInt(MAX_LOG_BYTES)) throw new DirtyLogError(`log of ${mmapSize} bytes exceeds the ${MAX_LOG_BYTES}-byte limit`);
    if (mmapOffset > BigInt(Number.MAX_SAFE_INTEGER)) throw new DirtyLogError(`offset 0x${mmapOffset.toString(16)} is beyond 2^53`);
    const size = Number(mmapSize);
    const offset = Number(mmapOffset);
    let fileSize: number;
    try {
      const stat = fs.fstatSync(fd);
      if (!stat.isFile()) throw new DirtyLogError('the log fd is not a memfd or regular file');
      fileSize = stat.size;
    } catch (error) {
      if (error instanceof DirtyLogError) throw error;
      throw new DirtyLogError(`fstat of the log fd failed: ${error instanceof Error ? error.message : String(error)}`);
    }
    if (offset + size > fileSize) throw new DirtyLogError(`log [${offset}, +${size}) lies past the end of its ${fileSize}-byte fd`);
    ensureCannotShrink(fd);
    // mmap wants a page-aligned offset: map from the page that holds the log's first byte.
    const mapOffset = offset - (offset % PAGE_SIZE);
    const mapLength = size + (offset - mapOffset);
    const mapAddress = mapShared(fd, mapLength, mapOffset);
    return { hostAddr: mapAddress + (offset - mapOffset), size, mapAddress, mapLength };
  } finally {
    closeFd(fd);
  }
}

/** QEMU seals its log memfd (F_SEAL_SHRINK); an unsealed memfd is sealed here; anything else is refused. */
function ensureCannotShrink(fd: number): void {
  const seals = sys.fcntl(fd, F_GET_SEALS, 0);
  if (seals >= 0 && (seals & F_SEAL_SHRINK) !== 0) return;
  if (seals >= 0 && sys.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) === 0) return;
  throw new DirtyLogError('the log fd can shrink (not a memfd, or sealed against F_SEAL_SHRINK): a shrink would fault the daemon');
}

export function unmapLog(log: MappedLog): void {
  unmap(log.mapAddress, log.mapLength);
}
