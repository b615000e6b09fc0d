/**
 * The control side of the raw back-end: opening an image file or block device with its cache mode, and
 * what the workers need to know about it (`ImageIoInfo`, structured-cloneable). Block devices: size from
 * BLKGETSIZE64, logical block size from BLKSSZGET. O_DIRECT alignment from statx (STATX_DIOALIGN), else
 * the device's logical block size, else 512.
 */
import { blockDeviceBytes, blockDeviceSectorSize, openFlags, statFd, O_DIRECT, O_DSYNC, O_RDONLY, O_RDWR } from '../sys/block-io.js';
import { SyscallError } from '../sys/errors.js';
import { VublkError } from '../errors.js';
import { sys } from '../sys/libc.js';
import { cachePolicy, type CacheMode, type EngineOptions } from './request-executor.js';

export interface ImageIoInfo {
  cache: CacheMode;
  /** O_DIRECT: host buffer addresses and lengths must be multiples of this (1 when buffered). */
  memAlign: number;
  /** O_DIRECT: file offsets must be multiples of this (1 when buffered). */
  offsetAlign: number;
  blockDevice: boolean;
}

export interface OpenedImage {
  fd: number;
  /** File size, or the block device's size. */
  sizeBytes: number;
  /** The block device's logical block size; 0 for a file. */
  deviceBlockSize: number;
  io: ImageIoInfo;
}

/** The image cannot be opened the way its cache mode asks (O_DIRECT refused). */
export class ImageOpenError extends VublkError {
  constructor(message: string) {
    super('VUBLK_ERR_IMAGE_OPEN', message, { peerFault: true, fatal: true });
  }
}

/**
 * Opens an existing image with the flags of `cache`. `bufferAlign` raises the memory alignment O_DIRECT
 * needs above what the kernel reports (kernels before 6.1 report none; the fallback may be too little).
 */
export function openRawImage(path: string, readOnly: boolean, cache: CacheMode, bufferAlign = 1): OpenedImage {
  const policy = cachePolicy(cache);
  const flags = (readOnly ? O_RDONLY : O_RDWR) | (policy.direct ? O_DIRECT : 0) | (policy.dsync ? O_DSYNC : 0);
  let fd: number;
  try {
    fd = openFlags(path, flags);
  } catch (error) {
    if (policy.direct && error instanceof SyscallError && error.errnoName === 'EINVAL') {
      throw new ImageOpenError(
        `cache=${cache} opens ${path} with O_DIRECT, which its file system refuses (tmpfs does); use cache=writeback or put the image on a disk file system`,
      );
    }
    throw error;
  }
  try {
    const stat = statFd(fd);
    const deviceBlockSize = stat.blockDevice ? blockDeviceSectorSize(fd) : 0;
    const sizeBytes = stat.blockDevice ? blockDeviceBytes(fd) : stat.size;
    const fallback = deviceBlockSize > 0 ? deviceBlockSize : 512;
    const memAlign = policy.direct ? Math.max(stat.dioMemAlign || fallback, bufferAlign) : 1;
    const offsetAlign = policy.direct ? stat.dioOffsetAlign || fallback : 1;
    return { fd, sizeBytes, deviceBlockSize, io: { cache, memAlign, offsetAlign, blockDevice: stat.blockDevice } };
  } catch (error) {
    sys.close(fd);
    throw error;
  }
}

/** Engine options for an image as opened. */
export function engineOptions(io: ImageIoInfo | undefined): EngineOptions {
  if (io === undefined) return {};
  const policy = cachePolicy(io.cache);
  return { memAlign: io.memAlign, dsync: policy.dsync, ignoreFlush: policy.ignoreFlush, blockDevice: io.blockDevice };
}
