/**
 * The guest memory table on the control plane: maps each region's fd (MAP_SHARED) and hands workers the
 * resulting layout. Unmapping happens only after every worker has acknowledged the new table, because a
 * worker's views do not keep a mapping alive.
 */
import type { MemoryRegion } from '../../protocol/vhost-user.js';
import { mapShared, unmap } from '../sys/memory-map.js';
import { closeFd } from '../sys/fd.js';
import { MAX_GUEST_ADDRESS, type RegionLayout } from '../dataplane/memory-regions.js';
import { VublkError } from '../errors.js';

export class MemoryTableError extends VublkError {
  constructor(detail: string) {
    super('VUBLK_ERR_MEMORY_TABLE', `memory table rejected: ${detail}`, { peerFault: true });
  }
}

export interface MappedRegion {
  layout: RegionLayout;
  mapAddress: number;
  mapLength: number;
}


function toNumber(value: bigint, what: string): number {
  if (value > BigInt(MAX_GUEST_ADDRESS)) throw new MemoryTableError(`${what} 0x${value.toString(16)} is beyond 2^53`);
  return Number(value);
}

/**
 * Maps one region from its fd. The fd is always consumed (closed): the mapping keeps the memory alive.
 * Maps from file offset 0 through mmap_offset + size, like libvhost-user, so hugetlbfs alignment holds.
 */
export function mapRegion(region: MemoryRegion, fd: number): MappedRegion {
  try {
    const size = toNumber(region.memorySize, 'region size');
    const mmapOffset = toNumber(region.mmapOffset, 'mmap offset');
    const guestPhysAddr = toNumber(region.guestPhysAddr, 'guest address');
    const userAddr = toNumber(region.userAddr, 'user address');
    if (size === 0) throw new MemoryTableError('region of size 0');
    if (guestPhysAddr + size > MAX_GUEST_ADDRESS || userAddr + size > MAX_GUEST_ADDRESS) throw new MemoryTableError('region end beyond 2^53');
    const mapLength = mmapOffset + size;
    const mapAddress = mapShared(fd, mapLength, 0);
    return { layout: { guestPhysAddr, size, userAddr, hostAddr: mapAddress + mmapOffset }, mapAddress, mapLength };
  } finally {
    closeFd(fd);
  }
}

export function unmapRegion(region: MappedRegion): void {
  unmap(region.mapAddress, region.mapLength);
}

/** Overlapping guest ranges would make translation ambiguous. */
export function assertNoOverlap(regions: readonly MappedRegion[]): void {
  const sorted = [...regions].sort((a, b) => a.layout.guestPhysAddr - b.layout.guestPhysAddr);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!.layout;
    const cur = sorted[i]!.layout;
    if (prev.guestPhysAddr + prev.size > cur.guestPhysAddr) {
      throw new MemoryTableError(`regions at 0x${prev.guestPhysAddr.toString(16)} and 0x${cur.guestPhysAddr.toString(16)} overlap`);
    }
  }
}

export function layoutsOf(regions: readonly MappedRegion[]): RegionLayout[] {
  return regions.map((region) => region.layout);
}
