/**
 * The inflight region on the control plane (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
 *
 * GET_INFLIGHT_FD: a zero-filled memfd of the split-ring layout for num_queues × queue_size, sealed against
 * shrinking; the front-end keeps it for the life of the device, across back-end restarts.
 * SET_INFLIGHT_FD: the front-end hands a region back — ours, or one a previous (possibly killed) daemon
 * created. It is the front-end's memory: sizes, offset, queue geometry and each queue's header are checked
 * before anything is mapped or used, and the fd is sealed (where it allows) so it cannot shrink under the
 * mapping (SIGBUS). The mapping lives until the session replaces it or ends, after its rings stopped;
 * workers receive host addresses per queue, like the memory table.
 */
import type { InflightDescription } from '../../protocol/vhost-user.js';
import { MAX_QUEUE_SIZE, isValidQueueSize } from '../../protocol/split-ring.js';
import { createMemfd, mapShared, unmap } from '../sys/memory-map.js';
import { closeFd } from '../sys/fd.js';
import { describeFd, guardAgainstShrink, isOpenReadWrite } from '../sys/file-seals.js';
import {
  INFLIGHT_VERSION,
  QueueHeaderOffset,
  inflightQueueStride,
  inflightRegionBytes,
  type InflightQueueMapping,
} from '../dataplane/inflight-layout.js';
import { VublkError } from '../errors.js';
import koffi from 'koffi';

export class InflightFdError extends VublkError {
  constructor(detail: string) {
    super('VUBLK_ERR_INFLIGHT_FD', `inflight region refused: ${detail}`, { peerFault: true });
  }
}

/** An offset beyond this is nonsense for a region of at most a few MiB. */
const MAX_MMAP_OFFSET = 1 << 30;

export interface InflightGeometry {
  numQueues: number;
  queueSize: number;
}

/** Checks num_queues / queue_size against what the disk can have. */
export function checkGeometry(geometry: InflightGeometry, maxQueues: number): void {
  const { numQueues, queueSize } = geometry;
  if (numQueues < 1 || numQueues > maxQueues)
    throw new InflightFdError(`num_queues ${numQueues} is not between 1 and the disk's ${maxQueues} queues`);
  if (!isValidQueueSize(queueSize)) throw new InflightFdError(`queue_size ${queueSize} is not a power of two up to ${MAX_QUEUE_SIZE}`);
}

/** GET_INFLIGHT_FD: a new zero-filled region; the caller sends the fd and closes it once sent. */
export function createInflightFd(geometry: InflightGeometry, maxQueues: number): { fd: number; description: InflightDescription } {
  checkGeometry(geometry, maxQueues);
  const bytes = inflightRegionBytes(geometry.numQueues, geometry.queueSize);
  const fd = createMemfd('vublk-inflight', bytes);
  try {
    guardAgainstShrink(fd);
  } catch (error) {
    closeFd(fd);
    throw error;
  }
  return { fd, description: { mmapSize: BigInt(bytes), mmapOffset: 0n, numQueues: geometry.numQueues, queueSize: geometry.queueSize } };
}

export class MappedInflightRegion {
  private unmapped = false;

  constructor(
    private readonly mapAddress: number,
    private readonly mapLength: number,
    /** Host address of queue 0's region. */
    private readonly base: number,
    readonly numQueues: number,
    readonly queueSize: number,
  ) {}

  /** Queue `index`'s part, or undefined when the region does not cover that queue. */
  queue(index: number): InflightQueueMapping | undefined {
    if (index >= this.numQueues || this.unmapped) return undefined;
    const stride = inflightQueueStride(this.queueSize);
    return { hostAddr: this.base + index * stride, bytes: stride, descNum: this.queueSize };
  }

  /** Marks every queue uninitialized (a device reset: no request of the old rings may be resubmitted). */
  clear(): void {
    if (this.unmapped) return;
    new Uint8Array(koffi.view(this.base, this.mapLength - (this.base - this.mapAddress))).fill(0);
  }

  unmap(): void {
    if (this.unmapped) return;
    this.unmapped = true;
    unmap(this.mapAddress, this.mapLength);
  }
}

/**
 * SET_INFLIGHT_FD: validates and maps. The fd is always consumed (closed): the mapping keeps the memory.
 * Only the bytes the queues need are mapped, whatever mmap_size says, but mmap_size must cover them.
 */
export function mapInflightRegion(description: InflightDescription, fd: number, maxQueues: number): MappedInflightRegion {
  try {
    const { numQueues, queueSize } = description;
    checkGeometry({ numQueues, queueSize }, maxQueues);
    const needed = inflightRegionBytes(numQueues, queueSize);
    if (description.mmapSize < BigInt(needed)) {
      throw new InflightFdError(
        `mmap_size ${description.mmapSize} is smaller than the ${needed} bytes ${numQueues} queues of ${queueSize} need`,
      );
    }
    if (description.mmapOffset > BigInt(MAX_MMAP_OFFSET) || description.mmapOffset % 8n !== 0n) {
      throw new InflightFdError(`mmap_offset ${description.mmapOffset} is not a multiple of 8 below ${MAX_MMAP_OFFSET}`);
    }
    const offset = Number(description.mmapOffset);
    const info = describeFd(fd);
    if (info.kind !== 'file') throw new InflightFdError(`the fd is a ${info.kind}; the region must be a memfd or shared-memory file`);
    if (!isOpenReadWrite(fd)) throw new InflightFdError('the fd is not open for reading and writing');
    // Seal first, then check the size: once sealed it cannot shrink below what we checked.
    guardAgainstShrink(fd);
    const fileSize = describeFd(fd).size;
    const mapLength = offset + needed;
    if (fileSize < mapLength)
      throw new InflightFdError(
        `the region needs ${mapLength} bytes of the fd (offset ${offset} + ${needed}) but the file has ${fileSize}`,
      );
    let mapAddress: number;
    try {
      mapAddress = mapShared(fd, mapLength, 0);
    } catch (error) {
      throw new InflightFdError(error instanceof Error ? error.message : String(error));
    }
    const region = new MappedInflightRegion(mapAddress, mapLength, mapAddress + offset, numQueues, queueSize);
    try {
      checkQueueHeaders(mapAddress + offset, numQueues, queueSize);
    } catch (error) {
      region.unmap();
      throw error;
    }
    return region;
  } finally {
    closeFd(fd);
  }
}

/** Each queue's header: uninitialized (version 0) or version 1 with desc_num = queue_size. */
function checkQueueHeaders(base: number, numQueues: number, queueSize: number): void {
  const stride = inflightQueueStride(queueSize);
  for (let q = 0; q < numQueues; q++) {
    const header = new DataView(koffi.view(base + q * stride, 16));
    const version = header.getUint16(QueueHeaderOffset.version, true);
    if (version === 0) continue;
    if (version !== INFLIGHT_VERSION) throw new InflightFdError(`queue ${q}: version ${version} (vublk knows ${INFLIGHT_VERSION})`);
    const descNum = header.getUint16(QueueHeaderOffset.descNum, true);
    if (descNum !== queueSize) throw new InflightFdError(`queue ${q}: desc_num ${descNum} differs from queue_size ${queueSize}`);
  }
}
