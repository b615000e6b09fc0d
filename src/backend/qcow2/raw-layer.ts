/** A raw file in a backing chain: guest offset = file offset; bytes past its size read as zeroes. */
import * as fs from 'node:fs';
import { Qcow2Error } from './errors.js';
import { pushReadExtent, type ReadExtent } from './extents.js';

export interface ReadLayer {
  /** Current virtual size in bytes. */
  readonly size: number;
  /** Appends the extents of [offset, offset+length) to `out`; bytes past `size` map to zeroes. */
  mapRead(offset: number, length: number, out: ReadExtent[]): void;
  close(): void;
}

export class RawLayer implements ReadLayer {
  readonly fd: number;
  readonly size: number;

  constructor(readonly path: string) {
    try {
      this.fd = fs.openSync(path, 'r');
      this.size = fs.fstatSync(this.fd).size;
    } catch (error) {
      throw new Qcow2Error('QCOW2_IO', `cannot open backing file ${path}: ${(error as Error).message}`);
    }
  }

  mapRead(offset: number, length: number, out: ReadExtent[]): void {
    const inside = Math.max(0, Math.min(length, this.size - offset));
    if (inside > 0) pushReadExtent(out, { kind: 'data', fd: this.fd, hostOffset: offset, length: inside });
    if (inside < length) pushReadExtent(out, { kind: 'zero', length: length - inside });
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
