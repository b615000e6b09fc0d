/** What the request engine must know about the disk to validate a request. Structured-cloneable. */
export interface DeviceLimits {
  /** Maximum bytes of any one data segment (config size_max). */
  sizeMax: number;
  /** Maximum data segments per request (config seg_max); chains may hold seg_max + 2 descriptors. */
  segMax: number;
  /** Logical block size in bytes (512 or 4096): IN/OUT offsets and lengths must be multiples of it. */
  logicalBlockSize: number;
  readOnly: boolean;
  /** GET_ID answer, exactly 20 bytes (zero-padded). */
  serial: Uint8Array;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
}

export const DEFAULT_SEG_MAX = 126;
export const DEFAULT_SIZE_MAX = 1 << 20;
export const DEFAULT_MAX_DISCARD_SECTORS = 0x3fffff;
/**
 * Ranges per DISCARD / WRITE_ZEROES request: 1 for both, like QEMU's virtio-blk device and
 * qemu-storage-daemon (no userspace API submits several ranges in one call, and QEMU's vhost-user-blk
 * tests expect a 2-range WRITE_ZEROES to be UNSUPP). Disk options max-discard-seg / max-write-zeroes-seg.
 */
export const DEFAULT_MAX_DISCARD_SEG = 1;
export const DEFAULT_MAX_WRITE_ZEROES_SEG = 1;
/** Upper bound of those options: the ranges are read into one buffer per request. */
export const MAX_RANGE_SEG = 256;
