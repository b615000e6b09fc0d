/**
 * Bounds-checked access to guest memory from a worker thread.
 *
 * koffi.view over more than 4 GiB aborts Node 20, so each region is seen through windows of
 * WINDOW_STRIDE bytes that overlap by WINDOW_OVERLAP. Invariant: any access of at most WINDOW_OVERLAP bytes
 * that lies inside one region lies entirely inside one window — no access ever straddles a window edge,
 * so there is no slow path for rings, headers, descriptors or status bytes. Bulk data never goes through
 * views at all: it moves by iovecs that carry host addresses.
 */
import koffi from 'koffi';
import type { RegionLayout } from './memory-regions.js';

export const WINDOW_STRIDE = 1 << 30;
/** 1 MiB covers the largest split ring (32768 descriptors = 512 KiB) and any indirect table we accept. */
export const WINDOW_OVERLAP = 1 << 20;

interface Window {
  view: DataView;
  bytes: Uint8Array;
}

class MappedRegion {
  private readonly windows: (Window | undefined)[];
  readonly guestEnd: number;
  readonly userEnd: number;

  constructor(readonly layout: RegionLayout) {
    this.guestEnd = layout.guestPhysAddr + layout.size;
    this.userEnd = layout.userAddr + layout.size;
    this.windows = new Array<Window | undefined>(Math.ceil(layout.size / WINDOW_STRIDE)).fill(undefined);
  }

  /** Window containing [offset, offset + WINDOW_OVERLAP) clipped to the region, created on first use. */
  window(index: number): Window {
    let window = this.windows[index];
    if (window === undefined) {
      const start = index * WINDOW_STRIDE;
      const length = Math.min(this.layout.size - start, WINDOW_STRIDE + WINDOW_OVERLAP);
      const buffer = koffi.view(this.layout.hostAddr + start, length);
      window = { view: new DataView(buffer), bytes: new Uint8Array(buffer) };
      this.windows[index] = window;
    }
    return window;
  }
}

/** A window and the offset of the requested address inside it. */
export interface WindowSlice {
  view: DataView;
  bytes: Uint8Array;
  offset: number;
}

export class GuestMemory {
  private readonly regions: MappedRegion[];

  constructor(layouts: readonly RegionLayout[]) {
    this.regions = layouts.map((layout) => new MappedRegion(layout));
  }

  private regionOf(gpa: number): MappedRegion | undefined {
    for (const region of this.regions) {
      if (gpa >= region.layout.guestPhysAddr && gpa < region.guestEnd) return region;
    }
    return undefined;
  }

  /** Host address of [gpa, gpa+length) if it lies inside a single region, else -1. */
  translate(gpa: number, length: number): number {
    const region = this.regionOf(gpa);
    if (region === undefined || length > region.guestEnd - gpa) return -1;
    return region.layout.hostAddr + (gpa - region.layout.guestPhysAddr);
  }

  /** Front-end virtual address → guest-physical address of [uva, uva+length), or -1. */
  userToGuest(uva: number, length: number): number {
    for (const region of this.regions) {
      const { userAddr, guestPhysAddr } = region.layout;
      if (uva >= userAddr && uva < region.userEnd && length <= region.userEnd - uva) return guestPhysAddr + (uva - userAddr);
    }
    return -1;
  }

  /**
   * Splits [gpa, gpa+length) into host-contiguous pieces across adjacent regions, calling `piece` for each.
   * Returns false (having possibly called `piece` for a prefix) if any byte is outside the table.
   */
  forEachHostPiece(gpa: number, length: number, piece: (hostAddr: number, pieceLength: number) => void): boolean {
    let at = gpa;
    let remaining = length;
    while (remaining > 0) {
      const region = this.regionOf(at);
      if (region === undefined) return false;
      const take = Math.min(remaining, region.guestEnd - at);
      piece(region.layout.hostAddr + (at - region.layout.guestPhysAddr), take);
      at += take;
      remaining -= take;
    }
    return true;
  }

  /** Zero-copy view of [gpa, gpa+length) for length ≤ WINDOW_OVERLAP; null if outside the table. */
  slice(gpa: number, length: number): WindowSlice | null {
    if (length > WINDOW_OVERLAP) return null;
    const region = this.regionOf(gpa);
    if (region === undefined || length > region.guestEnd - gpa) return null;
    const offset = gpa - region.layout.guestPhysAddr;
    const index = Math.floor(offset / WINDOW_STRIDE);
    const window = region.window(index);
    return { view: window.view, bytes: window.bytes, offset: offset - index * WINDOW_STRIDE };
  }

  /** Copies guest bytes into `target` (any length, may span regions); false if any byte is unmapped. */
  read(gpa: number, target: Uint8Array): boolean {
    let done = 0;
    while (done < target.length) {
      const chunk = Math.min(target.length - done, WINDOW_OVERLAP);
      const region = this.regionOf(gpa + done);
      if (region === undefined) return false;
      const take = Math.min(chunk, region.guestEnd - (gpa + done));
      const slice = this.slice(gpa + done, take);
      if (slice === null) return false;
      target.set(slice.bytes.subarray(slice.offset, slice.offset + take), done);
      done += take;
    }
    return true;
  }

  /** Copies `source` into guest memory; false if any byte is unmapped (nothing is written then). */
  write(gpa: number, source: Uint8Array): boolean {
    if (!this.forEachHostPiece(gpa, source.length, () => undefined)) return false;
    let done = 0;
    while (done < source.length) {
      const region = this.regionOf(gpa + done);
      if (region === undefined) return false;
      const take = Math.min(source.length - done, WINDOW_OVERLAP, region.guestEnd - (gpa + done));
      const slice = this.slice(gpa + done, take);
      if (slice === null) return false;
      slice.bytes.set(source.subarray(done, done + take), slice.offset);
      done += take;
    }
    return true;
  }

  /** Zero-fills guest bytes (the tail of a read past end of file). */
  fill(gpa: number, length: number, value = 0): boolean {
    let done = 0;
    while (done < length) {
      const region = this.regionOf(gpa + done);
      if (region === undefined) return false;
      const take = Math.min(length - done, WINDOW_OVERLAP, region.guestEnd - (gpa + done));
      const slice = this.slice(gpa + done, take);
      if (slice === null) return false;
      slice.bytes.fill(value, slice.offset, slice.offset + take);
      done += take;
    }
    return true;
  }

  writeU8(gpa: number, value: number): boolean {
    const slice = this.slice(gpa, 1);
    if (slice === null) return false;
    slice.bytes[slice.offset] = value;
    return true;
  }
}
