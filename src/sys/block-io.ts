/**
 * What direct and block-device I/O need from the kernel: open flags (O_DIRECT, O_DSYNC), statx with
 * STATX_DIOALIGN (the O_DIRECT alignment, kernel >= 6.1), and the block-device ioctls (size, logical block
 * size, discard, zero-out). Constants are those of x86-64 and aarch64 (asm-generic differs only for O_DIRECT
 * on aarch64, handled below).
 */
import { libc, addressOf, type Fn } from './libc.js';
import { lastErrno, SyscallError } from './errors.js';

const statxCall = libc.func('int statx(int dirfd, const char *path, int flags, unsigned int mask, uintptr_t buf)') as Fn<
  [number, string, number, number, number],
  number
>;
const ioctlCall = libc.func('int ioctl(int fd, unsigned long request, uintptr_t arg)') as Fn<[number, number, number], number>;
const openCall = libc.func('int open(const char *path, int flags, unsigned int mode)') as Fn<[string, number, number], number>;

export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_CLOEXEC = 0o2000000;
export const O_DSYNC = 0o10000;
/** O_DIRECT is 0o40000 on x86-64, 0o200000 on aarch64 / arm. */
export const O_DIRECT = process.arch === 'arm64' || process.arch === 'arm' ? 0o200000 : 0o40000;

const AT_EMPTY_PATH = 0x1000;
const STATX_TYPE = 0x1;
const STATX_SIZE = 0x200;
const STATX_DIOALIGN = 0x2000;
const S_IFMT = 0o170000;
const S_IFBLK = 0o060000;
const STATX_BYTES = 256;

const BLKSSZGET = 0x1268;
const BLKDISCARD = 0x1277;
const BLKZEROOUT = 0x127f;
const BLKGETSIZE64 = 0x80081272;

/** Opens `path` with raw open(2) flags; throws SyscallError. */
export function openFlags(path: string, flags: number, mode = 0o600): number {
  const fd = openCall(path, flags | O_CLOEXEC, mode);
  if (fd < 0) throw new SyscallError('open', lastErrno(), path);
  return fd;
}

export interface FdStat {
  blockDevice: boolean;
  /** st_size (0 for a block device). */
  size: number;
  /** O_DIRECT alignment of user memory and of file offsets; 0 when the kernel does not say. */
  dioMemAlign: number;
  dioOffsetAlign: number;
}

export function statFd(fd: number): FdStat {
  const buf = Buffer.alloc(STATX_BYTES);
  if (statxCall(fd, '', AT_EMPTY_PATH, STATX_TYPE | STATX_SIZE | STATX_DIOALIGN, addressOf(buf)) < 0) {
    throw new SyscallError('statx', lastErrno());
  }
  const mask = buf.readUInt32LE(0);
  const mode = buf.readUInt16LE(28);
  const dio = (mask & STATX_DIOALIGN) !== 0;
  return {
    blockDevice: (mode & S_IFMT) === S_IFBLK,
    size: Number(buf.readBigUInt64LE(40)),
    dioMemAlign: dio ? buf.readUInt32LE(152) : 0,
    dioOffsetAlign: dio ? buf.readUInt32LE(156) : 0,
  };
}

/** BLKGETSIZE64: the size of a block device in bytes. */
export function blockDeviceBytes(fd: number): number {
  const buf = Buffer.alloc(8);
  if (ioctlCall(fd, BLKGETSIZE64, addressOf(buf)) < 0) throw new SyscallError('ioctl(BLKGETSIZE64)', lastErrno());
  return Number(buf.readBigUInt64LE(0));
}

/** BLKSSZGET: the logical block size of a block device. */
export function blockDeviceSectorSize(fd: number): number {
  const buf = Buffer.alloc(4);
  if (ioctlCall(fd, BLKSSZGET, addressOf(buf)) < 0) throw new SyscallError('ioctl(BLKSSZGET)', lastErrno());
  return buf.readInt32LE(0);
}

const rangeBuf = Buffer.alloc(16);
const rangeAddress = addressOf(rangeBuf);

/** BLKDISCARD / BLKZEROOUT over [offset, offset+length); returns 0 or -1 (errno via lastErrno). */
export function blockDeviceRange(fd: number, zero: boolean, offset: number, length: number): number {
  rangeBuf.writeBigUInt64LE(BigInt(offset), 0);
  rangeBuf.writeBigUInt64LE(BigInt(length), 8);
  return ioctlCall(fd, zero ? BLKZEROOUT : BLKDISCARD, rangeAddress);
}
