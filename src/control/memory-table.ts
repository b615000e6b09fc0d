/**
 * The guest memory table on the control plane: maps each region's fd (MAP_SHARED) and hands workers the
 * resulting layout. Unmapping happens only after every worker has acknowledged the new table, because a
 * worker's views do not keep a mapping alive.
 *
 * Invariant: no byte is mapped beyond its file's end at mapping time, and memfds are sealed against shrinking
 * (F_SEAL_SHRINK) before they are mapped, so a front-end cannot make a guest access fault the daemon (SIGBUS).
 * Files that cannot be sealed (tmpfs/hugetlbfs files, memfds with F_SEAL_SEAL) are accepted with a warning:
 * the front-end must not shrink them (docs/operations.md, "Guest memory fds").
 */
import type { MemoryRegion } from '../../protocol/vhost-user.js';
import { mapShared, quarantine, unmap } from '../sys/memory-map.js';
import { closeFd } from '../sys/fd.js';
import { describeFd, guardAgainstShrink, isOpenReadWrite, type ShrinkGuard } from '../sys/file-seals.js';
import { MAX_GUEST_ADDRESS, type RegionLayout } from '../dataplane/memory-regions.js';
import { SessionLimits } from './limits.js';
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
  /** How the fd is kept from shrinking under the mapping. */
  shrinkGuard: ShrinkGuard;
  /**
   * A ring left requests in flight that may still use this mapping, so it is not unmapped when the session
   * lets it go: 'quarantine' replaces it by placeholder memory (for back-ends that only write into guest
   * memory late: librbd copies write data at submission, NBD requests end with their connection); 'keep'
   * leaves the guest's own mapping (a late reader, such as a kernel worker finishing a buffered write, must
   * still see the guest's data, not zeroes).
   */
  held?: 'quarantine' | 'keep';
}

/** Regions are page-granular on every front-end vublk serves. */
const PAGE_SIZE = 4096;

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
    // Front-ends (QEMU, cloud-hypervisor) map whole pages; an unaligned region would turn aligned ring
    // addresses into unaligned host addresses, which the data plane's ring views cannot use.
    if (guestPhysAddr % PAGE_SIZE !== 0 || userAddr % PAGE_SIZE !== 0 || mmapOffset % PAGE_SIZE !== 0) {
      throw new MemoryTableError(`region guest address, user address and mmap offset must be multiples of ${PAGE_SIZE}`);
    }
    if (guestPhysAddr + size > MAX_GUEST_ADDRESS || userAddr + size > MAX_GUEST_ADDRESS)
      throw new MemoryTableError('region end beyond 2^53');
    const mapLength = mmapOffset + size;
    if (mapLength > SessionLimits.mappedBytes) {
      throw new MemoryTableError(
        `region of ${mapLength} bytes exceeds the ${SessionLimits.mappedBytes}-byte limit of mapped guest memory per session`,
      );
    }
    const info = describeFd(fd);
    if (info.kind !== 'file') {
      throw new MemoryTableError(`region fd is a ${info.kind}; guest memory must be a memfd, hugetlbfs or shared-memory (tmpfs) file`);
    }
    // Seal first, then check the size: once sealed it cannot shrink below what we checked.
    const shrinkGuard = guardAgainstShrink(fd);
    const fileSize = describeFd(fd).size;
    if (fileSize < mapLength) {
      throw new MemoryTableError(
        `region needs ${mapLength} bytes of its fd (mmap_offset ${mmapOffset} + size ${size}) but the file has only ${fileSize}`,
      );
    }
    if (!isOpenReadWrite(fd))
      throw new MemoryTableError('region fd is not open for reading and writing (O_RDWR): the device writes guest memory');
    let mapAddress: number;
    try {
      mapAddress = mapShared(fd, mapLength, 0);
    } catch (error) {
      // What the kernel refuses here (ENODEV, EACCES, ENOMEM, EINVAL) is a property of what the front-end sent.
      throw new MemoryTableError(error instanceof Error ? error.message : String(error));
    }
    return { layout: { guestPhysAddr, size, userAddr, hostAddr: mapAddress + mmapOffset }, mapAddress, mapLength, shrinkGuard };
  } finally {
    closeFd(fd);
  }
}

/** Unmaps a region the session lets go of; a held one (MappedRegion.held) is quarantined instead. */
export function unmapRegion(region: MappedRegion): void {
  if (region.held === undefined) {
    unmap(region.mapAddress, region.mapLength);
    return;
  }
  if (region.held === 'keep') return;
  try {
    quarantine(region.mapAddress, region.mapLength);
  } catch {
    // No placeholder could be made (the kernel's mapping limit): keeping the guest's own mapping is just as
    // safe for a late write, and costs its memory until the daemon restarts.
  }
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

/** Item 6: bounds the regions and total mapped bytes a session may hold. */
export function assertWithinLimits(regions: readonly MappedRegion[]): void {
  if (regions.length > SessionLimits.memoryRegions) {
    throw new MemoryTableError(`${regions.length} regions exceed the limit of ${SessionLimits.memoryRegions}`);
  }
  const total = regions.reduce((sum, region) => sum + region.mapLength, 0);
  if (total > SessionLimits.mappedBytes) {
    throw new MemoryTableError(`${total} bytes of guest memory exceed the limit of ${SessionLimits.mappedBytes} bytes mapped per session`);
  }
}

export function layoutsOf(regions: readonly MappedRegion[]): RegionLayout[] {
  return regions.map((region) => region.layout);
}
