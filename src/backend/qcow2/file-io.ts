/**
 * Synchronous, exact positional I/O on an image fd (metadata, copy-on-write). Short reads past the end of
 * the file yield zeroes, as a sparse tail would; errors become Qcow2Error('QCOW2_IO').
 * node:fs sync calls work on worker threads and need no event loop turn.
 */
import * as fs from 'node:fs';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, sys } from '../../sys/libc.js';
import { Qcow2Error } from './errors.js';

const MAX_ROUNDS = 1024; // a short read/write loop that makes no progress this often is an error, not a hang

export function preadFull(fd: number, into: Uint8Array, position: number): void {
  let done = 0;
  for (let round = 0; done < into.length; round++) {
    if (round >= MAX_ROUNDS) throw new Qcow2Error('QCOW2_IO', `pread at ${position} made no progress`);
    let n: number;
    try {
      n = fs.readSync(fd, into, done, into.length - done, position + done);
    } catch (error) {
      throw new Qcow2Error('QCOW2_IO', `pread of ${into.length} bytes at ${position} failed: ${(error as Error).message}`);
    }
    if (n === 0) {
      into.fill(0, done); // beyond end of file
      return;
    }
    done += n;
  }
}

export function pwriteFull(fd: number, from: Uint8Array, position: number): void {
  let done = 0;
  for (let round = 0; done < from.length; round++) {
    if (round >= MAX_ROUNDS) throw new Qcow2Error('QCOW2_IO', `pwrite at ${position} made no progress`);
    try {
      done += fs.writeSync(fd, from, done, from.length - done, position + done);
    } catch (error) {
      throw new Qcow2Error('QCOW2_IO', `pwrite of ${from.length} bytes at ${position} failed: ${(error as Error).message}`);
    }
  }
}

export function syncData(fd: number): void {
  try {
    fs.fdatasyncSync(fd);
  } catch (error) {
    throw new Qcow2Error('QCOW2_IO', `fdatasync failed: ${(error as Error).message}`);
  }
}

export function fileSize(fd: number): number {
  try {
    return fs.fstatSync(fd).size;
  } catch (error) {
    throw new Qcow2Error('QCOW2_IO', `fstat failed: ${(error as Error).message}`);
  }
}

export function truncateFile(fd: number, length: number): void {
  try {
    fs.ftruncateSync(fd, length);
  } catch (error) {
    throw new Qcow2Error('QCOW2_IO', `ftruncate to ${length} failed: ${(error as Error).message}`);
  }
}

/**
 * Gives the blocks of a freed range back to the file system (thin provisioning: what DISCARD is for).
 * Best effort: a file system without hole punching keeps the blocks, which is only a space cost.
 */
export function punchHole(fd: number, offset: number, length: number): void {
  sys.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}
