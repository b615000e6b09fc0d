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

const NO_WINDOW: Window = { view: new DataView(new ArrayBuffer(0)), bytes: new Uint8Array(0) };
/** Copies up to this many bytes with a loop: cheaper than a subarray (an allocation) plus set. */
const SMALL_COPY = 64;

export class GuestMemory {
  private readonly regions: MappedRegion[];
  /** The window `locate` found last (hot paths use it instead of allocating a WindowSlice). */
  private hit: Window = NO_WINDOW;
  private lastRegion: MappedRegion | undefined;

  constructor(layouts: readonly RegionLayout[]) {
    this.regions = layouts.map((layout) => new MappedRegion(layout));
  }

  private regionOf(gpa: number): MappedRegion | undefined {
    // Most accesses of a burst (ring, headers, status bytes) fall in the region of the one before.
    const last = this.lastRegion;
    if (last !== undefined && gpa >= last.layout.guestPhysAddr && gpa < last.guestEnd) return last;
    for (const region of this.regions) {
      if (gpa >= region.layout.guestPhysAddr && gpa < region.guestEnd) {
        this.lastRegion = region;
        return region;
      }
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
    const offset = this.locate(gpa, length);
    return offset < 0 ? null : { view: this.hit.view, bytes: this.hit.bytes, offset };
  }

  /**
   * Offset of [gpa, gpa+length) in the window `hitView` / `hitBytes` now show (valid until the next call), or
   * -1 if outside the table. Length ≤ WINDOW_OVERLAP (larger: -1). Allocates nothing, unlike `slice`: it
   * runs for every request header and status byte.
   */
  locate(gpa: number, length: number): number {
    if (length > WINDOW_OVERLAP) return -1;
    const region = this.regionOf(gpa);
    if (region === undefined || length > region.guestEnd - gpa) return -1;
    const offset = gpa - region.layout.guestPhysAddr;
    const index = Math.floor(offset / WINDOW_STRIDE);
    this.hit = region.window(index);
    return offset - index * WINDOW_STRIDE;
  }

  /** The window of the last successful `locate`. */
  get hitView(): DataView {
    return this.hit.view;
  }

  /**
   * Copies `length` guest bytes at `gpa` into target[at, at+length) (may span regions); false if any byte is
   * unmapped. Allocation-free for small copies (request headers).
   */
  readInto(gpa: number, target: Uint8Array, at: number, length: number): boolean {
    if (length > SMALL_COPY) return this.read(gpa, target.subarray(at, at + length));
    let done = 0;
    while (done < length) {
      const region = this.regionOf(gpa + done);
      if (region === undefined) return false;
      const take = Math.min(length - done, region.guestEnd - (gpa + done));
      const from = this.locate(gpa + done, take);
      if (from < 0) return false;
      const bytes = this.hit.bytes;
      for (let i = 0; i < take; i++) target[at + done + i] = bytes[from + i]!;
      done += take;
    }
    return true;
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
    const at = this.locate(gpa, 1);
    if (at < 0) return false;
    this.hit.bytes[at] = value;
    return true;
  }
}
