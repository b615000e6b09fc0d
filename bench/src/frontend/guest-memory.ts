/**
 * The "guest RAM" of the test front-end: memfd-backed regions mapped MAP_SHARED here and handed to the back-end
 * by fd, exactly as QEMU does with memory-backend-memfd. Regions may be huge and sparse (a 6 GiB memfd costs
 * nothing until touched). Node 20 crashes on a koffi.view over 4 GiB, so memory is only ever seen through
 * windows of at most WINDOW_BYTES (cached) or ad-hoc views of at most MAX_VIEW_BYTES.
 */
import koffi from 'koffi';
import { createMemfd, mapShared, unmap } from '../../../src/sys/memory-map.js';
import { closeFd } from '../../../src/sys/fd.js';
import type { MemoryRegion } from '../../../protocol/vhost-user.js';
import { RangeAllocator, type AllocOptions } from './range-allocator.js';
import { FrontendClosedError, GuestMemoryError, OutOfGuestMemoryError } from './errors.js';

const PAGE_SIZE = 4096;
/** Cached windows are this large: rings and request buffers almost always fall inside one. */
export const WINDOW_BYTES = 256 * 1024 * 1024;
/** Largest single view handed out (well under the 4 GiB koffi.view crash). */
export const MAX_VIEW_BYTES = 1024 * 1024 * 1024;

export interface GuestRegionSpec {
  /** Guest-physical base address. */
  gpa: number;
  size: number;
  /** Offset of the region inside its memfd (sent as mmap_offset); must be page-aligned. Default 0. */
  fdOffset?: number;
  /** The "QEMU virtual address" announced for the region; defaults to where it is really mapped here. */
  userAddr?: bigint;
  name?: string;
}

export class GuestRegion {
  readonly allocator: RangeAllocator;
  private readonly windows = new Map<number, Uint8Array>();

  constructor(
    readonly index: number,
    readonly gpa: number,
    readonly size: number,
    readonly fd: number,
    /** Where the region is mapped in this process. */
    readonly hostAddress: number,
    readonly userAddr: bigint,
    readonly fdOffset: number,
  ) {
    this.allocator = new RangeAllocator(gpa, size);
  }

  get end(): number {
    return this.gpa + this.size;
  }

  contains(gpa: number, len: number): boolean {
    return gpa >= this.gpa && len >= 0 && gpa + len <= this.end;
  }

  /** Zero-copy bytes of [offset, offset+len) inside the region. */
  bytesAt(offset: number, len: number): Uint8Array {
    const windowIndex = Math.floor(offset / WINDOW_BYTES);
    const windowStart = windowIndex * WINDOW_BYTES;
    if (offset + len <= windowStart + WINDOW_BYTES) {
      return this.window(windowIndex).subarray(offset - windowStart, offset - windowStart + len);
    }
    if (len > MAX_VIEW_BYTES) throw new GuestMemoryError(`a single view is limited to ${MAX_VIEW_BYTES} bytes, asked for ${len}`);
    return new Uint8Array(koffi.view(this.hostAddress + offset, len));
  }

  forgetViews(): void {
    this.windows.clear();
  }

  private window(windowIndex: number): Uint8Array {
    let window = this.windows.get(windowIndex);
    if (window === undefined) {
      const start = windowIndex * WINDOW_BYTES;
      window = new Uint8Array(koffi.view(this.hostAddress + start, Math.min(WINDOW_BYTES, this.size - start)));
      this.windows.set(windowIndex, window);
    }
    return window;
  }
}

export interface GuestAllocOptions extends AllocOptions {
  /** Allocate in this region (index); default: the first region with room. */
  region?: number;
}

export class GuestMemory {
  private closed = false;

  private constructor(readonly regions: readonly GuestRegion[]) {}

  /** Creates and maps the regions; they must not overlap in guest-physical space. */
  static create(specs: readonly GuestRegionSpec[]): GuestMemory {
    if (specs.length === 0) throw new GuestMemoryError('at least one region is needed');
    const sorted = [...specs].sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < sorted.length; i++) {
      const previous = sorted[i - 1] as GuestRegionSpec;
      const current = sorted[i] as GuestRegionSpec;
      if (previous.gpa + previous.size > current.gpa) {
        throw new GuestMemoryError(`regions at 0x${previous.gpa.toString(16)} and 0x${current.gpa.toString(16)} overlap`);
      }
    }
    const regions: GuestRegion[] = [];
    try {
      specs.forEach((spec, index) => regions.push(GuestMemory.mapRegion(spec, index)));
    } catch (error) {
      for (const region of regions) GuestMemory.unmapRegion(region);
      throw error;
    }
    return new GuestMemory(regions);
  }

  private static mapRegion(spec: GuestRegionSpec, index: number): GuestRegion {
    const fdOffset = spec.fdOffset ?? 0;
    if (!Number.isSafeInteger(spec.gpa) || spec.gpa < 0) throw new GuestMemoryError(`region ${index}: bad gpa ${spec.gpa}`);
    if (!Number.isSafeInteger(spec.size) || spec.size <= 0) throw new GuestMemoryError(`region ${index}: bad size ${spec.size}`);
    if (fdOffset % PAGE_SIZE !== 0) throw new GuestMemoryError(`region ${index}: fdOffset ${fdOffset} is not page-aligned`);
    const fd = createMemfd(spec.name ?? `vublk-guest-${index}`, fdOffset + spec.size);
    try {
      const hostAddress = mapShared(fd, spec.size, fdOffset);
      return new GuestRegion(index, spec.gpa, spec.size, fd, hostAddress, spec.userAddr ?? BigInt(hostAddress), fdOffset);
    } catch (error) {
      closeFd(fd);
      throw error;
    }
  }

  private static unmapRegion(region: GuestRegion): void {
    region.forgetViews();
    unmap(region.hostAddress, region.size);
    closeFd(region.fd);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** The region covering all of [gpa, gpa+len), if any. */
  findRegion(gpa: number, len = 1): GuestRegion | undefined {
    return this.regions.find((region) => region.contains(gpa, len));
  }

  regionFor(gpa: number, len = 1): GuestRegion {
    this.assertOpen();
    const region = this.findRegion(gpa, len);
    if (region === undefined) {
      throw new GuestMemoryError(`[0x${gpa.toString(16)}, +${len}) is not inside a single region (${this.describe()})`);
    }
    return region;
  }

  /** Zero-copy view of a guest range (inside one region, at most MAX_VIEW_BYTES). Invalid after close(). */
  view(gpa: number, len: number): Uint8Array {
    const region = this.regionFor(gpa, len);
    return region.bytesAt(gpa - region.gpa, len);
  }

  read(gpa: number, len: number): Buffer {
    const out = Buffer.alloc(len);
    this.forEachChunk(gpa, len, (bytes, at) => out.set(bytes, at));
    return out;
  }

  write(gpa: number, data: Uint8Array): void {
    this.forEachChunk(gpa, data.length, (bytes, at) => bytes.set(data.subarray(at, at + bytes.length)));
  }

  fill(gpa: number, len: number, value: number): void {
    this.forEachChunk(gpa, len, (bytes) => bytes.fill(value));
  }

  /** The address the back-end knows a guest address by in SET_VRING_ADDR (QEMU's virtual address). */
  toUserAddr(gpa: number): bigint {
    const region = this.regionFor(gpa);
    return region.userAddr + BigInt(gpa - region.gpa);
  }

  /** Regions as the SET_MEM_TABLE / ADD_MEM_REG codecs want them, in `regions` order (fds alongside). */
  wireRegions(): MemoryRegion[] {
    return this.regions.map((region) => ({
      guestPhysAddr: BigInt(region.gpa),
      memorySize: BigInt(region.size),
      userAddr: region.userAddr,
      mmapOffset: BigInt(region.fdOffset),
    }));
  }

  get fds(): number[] {
    return this.regions.map((region) => region.fd);
  }

  /** Allocates a guest buffer; `minAddress`/`fromEnd` place it e.g. above 4 GiB or flush against a region's end. */
  alloc(size: number, options: GuestAllocOptions = {}): number {
    this.assertOpen();
    const candidates = options.region === undefined ? this.regions : [this.regions[options.region]];
    for (const region of candidates) {
      if (region === undefined) throw new GuestMemoryError(`no region ${options.region}; there are ${this.regions.length}`);
      const gpa = region.allocator.alloc(size, options);
      if (gpa !== null) return gpa;
    }
    throw new OutOfGuestMemoryError(size, options.region === undefined ? 'any region' : `region ${options.region}`);
  }

  free(gpa: number): void {
    this.regionFor(gpa).allocator.release(gpa);
  }

  /** Unmaps all regions and closes their memfds. Views handed out earlier must not be touched afterwards. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const region of this.regions) GuestMemory.unmapRegion(region);
  }

  describe(): string {
    return this.regions.map((r) => `[0x${r.gpa.toString(16)}, 0x${r.end.toString(16)})`).join(' ');
  }

  private forEachChunk(gpa: number, len: number, visit: (bytes: Uint8Array, at: number) => void): void {
    const region = this.regionFor(gpa, len);
    let at = 0;
    while (at < len) {
      const offset = gpa - region.gpa + at;
      const windowEnd = (Math.floor(offset / WINDOW_BYTES) + 1) * WINDOW_BYTES;
      const chunk = Math.min(len - at, windowEnd - offset);
      visit(region.bytesAt(offset, chunk), at);
      at += chunk;
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new FrontendClosedError('guest memory');
  }
}
