/**
 * One thread's handle on a qcow2 image: its own fd, views over the shared state, and the operations the
 * data plane calls. Several handles (one per worker thread) may serve the same image at once.
 *
 * Invariants:
 * - Reads and in-place overwrites of allocated clusters (COPIED, not compressed, not zero) take no lock:
 *   the L1/L2 lookup is validated by the seqlock (shared-state.ts) and retried, then done under LOCK.
 * - Everything that changes metadata holds LOCK for its whole (synchronous) duration.
 * - An allocating write is two steps: prepareWrite allocates + copies partial clusters and returns where
 *   the data goes; commitWrite (after the data write completed) points L2 at the new clusters. Between the
 *   two, the guest clusters are "in flight": other allocating writes, discards and write-zeroes on them
 *   answer RETRY instead of waiting (the holder may be this same thread, waiting for its completion).
 * - Metadata is written through (pwrite) in an order that keeps the image consistent after a crash
 *   (refcounts.ts); flush() is one fdatasync.
 */
import * as fs from 'node:fs';
import {
  ENTRY_COMPRESSED_HI,
  ENTRY_COPIED_HI,
  L2_ZERO_LO,
  MAX_L1_BYTES,
  decodeCompressedEntry,
  offsetHi,
  offsetLo,
  standardEntryOffset,
} from '../../../protocol/qcow2.js';
import { inflateCluster } from './compressed.js';
import { Qcow2Error } from './errors.js';
import {
  NO_COMMIT,
  RETRY,
  pushReadExtent,
  pushWriteExtent,
  type CompressedExtent,
  type CompressedSource,
  type ReadExtent,
  type WriteExtent,
} from './extents.js';
import { preadFull, pwriteFull, syncData } from './file-io.js';
import { RawLayer, type ReadLayer } from './raw-layer.js';
import { L2Lookup } from './l2-lookup.js';
import { MetadataGuard } from './metadata-guard.js';
import { RefcountAllocator } from './refcounts.js';
import {
  F_FILE_CLUSTERS,
  F_L1_OFFSET,
  F_L1_SIZE,
  F_SIZE,
  INFLIGHT_SLOTS,
  I_HANDLES,
  DEFERRED_FREES,
  I_DEFERRED,
  WRITER_BUCKETS,
  I_META_GEN,
  publishMetadataCluster,
  acquireLock,
  beginPublish,
  endPublish,
  releaseLock,
  viewsOf,
  type LayerDescription,
  type Qcow2Geometry,
  type Qcow2SharedState,
  type SharedViews,
} from './shared-state.js';

const HEADER_SIZE_FIELD = 24;
const HEADER_L1_FIELDS = 36; // l1_size (u32) then l1_table_offset (u64)

/** A cluster allocated by prepareWrite, published by commitWrite. */
interface PendingCluster {
  readonly guestCluster: number;
  readonly hostCluster: number;
  /** The L2 entry it replaces (its clusters are freed after the commit). */
  readonly oldHi: number;
  readonly oldLo: number;
  /** The cluster was already this image's (a zero-flagged allocation): never freed by an abort. */
  readonly reused: boolean;
}

/** Reads a guest range of any layer synchronously (copy-on-write from the backing file). */
function readLayerInto(layer: ReadLayer, offset: number, into: Uint8Array): void {
  const extents: ReadExtent[] = [];
  layer.mapRead(offset, into.length, extents);
  let at = 0;
  for (const e of extents) {
    const part = into.subarray(at, at + e.length);
    if (e.kind === 'zero') part.fill(0);
    else if (e.kind === 'data') preadFull(e.fd, part, e.hostOffset);
    else e.source.readCompressed(e, part);
    at += e.length;
  }
}

/** Opens a handle (or raw layer) on any layer description: what a worker calls for each image. */
export function attachLayer(description: LayerDescription): Qcow2Handle | RawLayer {
  return description.format === 'raw' ? new RawLayer(description.path) : Qcow2Handle.attach(description);
}

export class Qcow2Handle implements ReadLayer, CompressedSource {
  readonly fd: number;
  readonly readOnly: boolean;
  readonly geometry: Qcow2Geometry;
  private readonly views: SharedViews;
  private readonly backing: ReadLayer | null;
  private readonly allocator: RefcountAllocator;
  private readonly cs: number;
  private readonly map: L2Lookup;
  private readonly guard: MetadataGuard;
  private lockDepth = 0;
  private nextTicket = 1;
  private readonly tickets = new Map<number, { slot: number; pending: PendingCluster[]; first: number; last: number }>();
  private readonly cowBuffer: Uint8Array;
  private readonly zeroes: Uint8Array;
  private inflatedAt = -1;
  private readonly inflated: Uint8Array;
  private closed = false;

  static attach(description: LayerDescription & { format: 'qcow2' }): Qcow2Handle {
    let fd: number;
    try {
      fd = fs.openSync(description.path, description.readOnly ? 'r' : 'r+');
    } catch (error) {
      throw new Qcow2Error('QCOW2_IO', `cannot open image ${description.path}: ${(error as Error).message}`);
    }
    let backing: ReadLayer | null = null;
    try {
      if (description.shared.backing !== null) backing = attachLayer(description.shared.backing);
      return new Qcow2Handle(fd, description.readOnly, description.shared, backing);
    } catch (error) {
      backing?.close();
      fs.closeSync(fd);
      throw error;
    }
  }

  private constructor(fd: number, readOnly: boolean, shared: Qcow2SharedState, backing: ReadLayer | null) {
    this.fd = fd;
    this.readOnly = readOnly;
    this.geometry = shared.geometry;
    this.views = viewsOf(shared);
    this.backing = backing;
    this.cs = shared.geometry.clusterSize;
    this.allocator = new RefcountAllocator(fd, this.views, this.geometry);
    this.guard = new MetadataGuard(this.views, this.geometry);
    this.map = new L2Lookup(fd, this.views, this.geometry, shared.l2Slots, this.guard, this);
    this.cowBuffer = new Uint8Array(this.cs);
    this.zeroes = new Uint8Array(this.cs);
    this.inflated = new Uint8Array(this.cs);
    Atomics.add(this.views.ints, I_HANDLES, 1);
  }

  get size(): number {
    return this.views.floats[F_SIZE]!;
  }

  get hasBacking(): boolean {
    return this.backing !== null;
  }

  // ---- locking ----

  lock(): void {
    if (this.lockDepth++ === 0) acquireLock(this.views.ints);
  }

  unlock(): void {
    if (--this.lockDepth === 0) releaseLock(this.views.ints);
  }

  private isZeroEntry(lo: number, hi: number): boolean {
    if ((lo & L2_ZERO_LO) === 0 || (hi & ENTRY_COMPRESSED_HI) !== 0) return false;
    if (this.geometry.version === 2) throw new Qcow2Error('QCOW2_INVALID', 'a version 2 image has a zero-flagged L2 entry');
    return true;
  }

  /** The registers describe a cluster that may be overwritten in place. */
  private inPlace(): boolean {
    return (
      (this.map.l1Hi & ENTRY_COPIED_HI) !== 0 &&
      (this.map.eHi & ENTRY_COPIED_HI) !== 0 &&
      (this.map.eHi & ENTRY_COMPRESSED_HI) === 0 &&
      (this.map.eLo & L2_ZERO_LO) === 0 &&
      standardEntryOffset(this.map.eHi, this.map.eLo) !== 0
    );
  }

  private checkRange(offset: number, length: number): void {
    if (this.closed) throw new Qcow2Error('QCOW2_IO', 'handle is closed');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new Qcow2Error('QCOW2_RANGE', `range ${offset}+${length} is outside the ${this.size}-byte disk`);
    }
  }

  private checkWritable(): void {
    if (this.readOnly) throw new Qcow2Error('QCOW2_READONLY', 'image is read-only');
  }

  // ---- reads ----

  /** Appends the extents of guest range [offset, offset+length) to `out`. Bytes past `size` read as zeroes. */
  mapRead(offset: number, length: number, out: ReadExtent[]): void {
    const size = this.size;
    const inside = Math.max(0, Math.min(length, size - offset));
    let at = offset;
    const end = offset + inside;
    while (at < end) {
      const g = Math.floor(at / this.cs);
      const inCluster = at - g * this.cs;
      const n = Math.min(end - at, this.cs - inCluster);
      this.map.lookup(g);
      this.mapCluster(g, at, inCluster, n, out);
      at += n;
    }
    if (inside < length) pushReadExtent(out, { kind: 'zero', length: length - inside });
  }

  private mapCluster(g: number, at: number, inCluster: number, n: number, out: ReadExtent[]): void {
    const hi = this.map.eHi;
    const lo = this.map.eLo;
    if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
      const d = decodeCompressedEntry(hi, lo, this.geometry.clusterBits);
      out.push({
        kind: 'compressed',
        source: this,
        hostOffset: d.hostOffset,
        maxLength: d.maxLength,
        offsetInCluster: inCluster,
        length: n,
      });
      return;
    }
    if (this.isZeroEntry(lo, hi)) {
      pushReadExtent(out, { kind: 'zero', length: n });
      return;
    }
    const host = standardEntryOffset(hi, lo);
    if (host === 0) {
      if (this.backing !== null) this.backing.mapRead(at, n, out);
      else pushReadExtent(out, { kind: 'zero', length: n });
      return;
    }
    const cluster = this.guard.dataCluster(g, hi, lo);
    pushReadExtent(out, { kind: 'data', fd: this.fd, hostOffset: cluster * this.cs + inCluster, length: n });
  }

  /** Copies the bytes of a compressed extent (from this image or one of its backing files) into `into`. */
  readCompressed(extent: CompressedExtent, into: Uint8Array): void {
    if (extent.source !== this) {
      extent.source.readCompressed(extent, into);
      return;
    }
    if (this.inflatedAt !== extent.hostOffset) {
      this.inflatedAt = -1;
      inflateCluster(this.fd, extent.hostOffset, extent.maxLength, this.views.floats[F_FILE_CLUSTERS]! * this.cs, this.inflated);
      this.inflatedAt = extent.hostOffset;
    }
    into.set(this.inflated.subarray(extent.offsetInCluster, extent.offsetInCluster + extent.length));
  }

  /** Reads a guest range of this layer into `into` with synchronous preads (tests, tools). */
  readInto(offset: number, into: Uint8Array): void {
    readLayerInto(this, offset, into);
  }

  // ---- writes ----

  /**
   * Maps guest range [offset, offset+length) for writing. Returns NO_COMMIT when every cluster is
   * allocated and writable in place; a ticket (> 0) that must be passed to commitWrite after the data
   * write completed (or abortWrite if it failed); or RETRY when a cluster is in flight in another write
   * (retry after this thread's completions or a short timer). `out` receives the host extents.
   */
  prepareWrite(offset: number, length: number, out: WriteExtent[]): number {
    this.checkRange(offset, length);
    this.checkWritable();
    out.length = 0;
    if (length === 0) return NO_COMMIT;
    const end = offset + length;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((end - 1) / this.cs);
    this.countWriters(first, last, +1); // before the lookup: see shared-state.ts WRITER_BUCKETS
    let ticket = RETRY;
    try {
      let at = offset;
      while (at < end) {
        const g = Math.floor(at / this.cs);
        const inCluster = at - g * this.cs;
        const n = Math.min(end - at, this.cs - inCluster);
        this.map.lookup(g);
        if (!this.inPlace()) break;
        const cluster = this.guard.dataCluster(g, this.map.eHi, this.map.eLo);
        pushWriteExtent(out, { fd: this.fd, hostOffset: cluster * this.cs + inCluster, length: n });
        at += n;
      }
      if (at >= end) {
        ticket = this.nextTicket++;
        this.tickets.set(ticket, { slot: -1, pending: [], first, last });
        return ticket;
      }
      out.length = 0;
      this.lock();
      try {
        ticket = this.prepareAllocatingWrite(offset, length, out);
        return ticket;
      } finally {
        this.unlock();
      }
    } finally {
      if (ticket === RETRY) this.countWriters(first, last, -1); // RETRY or an exception
    }
  }

  private countWriters(first: number, last: number, delta: number): void {
    const writers = this.views.writers;
    const count = Math.min(last - first + 1, WRITER_BUCKETS);
    for (let i = 0; i < count; i++) Atomics.add(writers, (first + i) % WRITER_BUCKETS, delta);
  }

  private hasWriters(guestCluster: number): boolean {
    return Atomics.load(this.views.writers, guestCluster % WRITER_BUCKETS) !== 0;
  }

  /** True when guest clusters [first, end) overlap an allocating write in flight (LOCK held). */
  private inflightOverlaps(first: number, end: number): boolean {
    const table = this.views.inflight;
    for (let i = 0; i < INFLIGHT_SLOTS; i++) {
      const start = table[i * 2]!;
      if (start >= 0 && start < end && first < table[i * 2 + 1]!) return true;
    }
    return false;
  }

  private inflightClaim(first: number, end: number): number {
    const table = this.views.inflight;
    for (let i = 0; i < INFLIGHT_SLOTS; i++) {
      if (table[i * 2]! < 0) {
        table[i * 2] = first;
        table[i * 2 + 1] = end;
        return i;
      }
    }
    return -1;
  }

  private inflightRelease(slot: number): void {
    this.views.inflight[slot * 2] = -1;
    this.views.inflight[slot * 2 + 1] = -1;
  }

  private prepareAllocatingWrite(offset: number, length: number, out: WriteExtent[]): number {
    const end = offset + length;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((end - 1) / this.cs);
    if (this.inflightOverlaps(first, last + 1)) return RETRY;
    const slot = this.inflightClaim(first, last + 1);
    if (slot < 0) return RETRY;
    const pending: PendingCluster[] = [];
    const ticket = this.nextTicket++;
    try {
      for (let g = first; g <= last; g++) {
        const start = Math.max(offset, g * this.cs) - g * this.cs;
        const stop = Math.min(end, (g + 1) * this.cs) - g * this.cs;
        this.map.lookupLocked(g);
        if (this.inPlace()) {
          const cluster = this.guard.dataCluster(g, this.map.eHi, this.map.eLo);
          pushWriteExtent(out, { fd: this.fd, hostOffset: cluster * this.cs + start, length: stop - start });
          continue;
        }
        this.ensureL2(g);
        this.map.lookupLocked(g);
        const oldHi = this.map.eHi;
        const oldLo = this.map.eLo;
        // A zero-flagged cluster this image owns (WRITE_ZEROES without UNMAP) is reused in place.
        const reuse =
          (oldHi & ENTRY_COPIED_HI) !== 0 &&
          (oldHi & ENTRY_COMPRESSED_HI) === 0 &&
          (oldLo & L2_ZERO_LO) !== 0 &&
          standardEntryOffset(oldHi, oldLo) !== 0;
        const { cluster, fresh } = reuse
          ? { cluster: this.guard.dataCluster(g, oldHi, oldLo), fresh: false }
          : this.allocator.takeCluster();
        pending.push({ guestCluster: g, hostCluster: cluster, oldHi, oldLo, reused: reuse });
        this.copyOnWrite(g, oldHi, oldLo, cluster, fresh, start, stop);
        pushWriteExtent(out, { fd: this.fd, hostOffset: cluster * this.cs + start, length: stop - start });
      }
    } catch (error) {
      // Clusters taken so far keep refcount 1 without a reference: a leak, never a corruption.
      this.inflightRelease(slot);
      throw error;
    }
    this.tickets.set(ticket, { slot, pending, first, last });
    return ticket;
  }

  /**
   * Fills the parts of new cluster `cluster` outside [start, stop) with what guest cluster g held:
   * the old cluster, the inflated compressed cluster, the backing file, or zeroes.
   */
  private copyOnWrite(g: number, oldHi: number, oldLo: number, cluster: number, fresh: boolean, start: number, stop: number): void {
    if (start === 0 && stop === this.cs) return;
    const host = cluster * this.cs;
    const pieces: Array<[number, number]> = [];
    if (start > 0) pieces.push([0, start]);
    if (stop < this.cs) pieces.push([stop, this.cs]);
    let source: 'zero' | 'old' | 'compressed' | 'backing';
    if ((oldHi & ENTRY_COMPRESSED_HI) !== 0) source = 'compressed';
    else if (this.isZeroEntry(oldLo, oldHi)) source = 'zero';
    else if (standardEntryOffset(oldHi, oldLo) !== 0) source = 'old';
    else source = this.backing !== null ? 'backing' : 'zero';
    if (source === 'zero' && fresh) return; // a cluster past the old end of file already reads as zeroes
    if (source === 'compressed') {
      const d = decodeCompressedEntry(oldHi, oldLo, this.geometry.clusterBits);
      inflateCluster(this.fd, d.hostOffset, d.maxLength, this.views.floats[F_FILE_CLUSTERS]! * this.cs, this.cowBuffer);
    }
    for (const [from, to] of pieces) {
      const part = this.cowBuffer.subarray(from, to);
      if (source === 'zero') part.fill(0);
      else if (source === 'old') preadFull(this.fd, part, this.guard.dataCluster(g, oldHi, oldLo) * this.cs + from);
      else if (source === 'backing') readLayerInto(this.backing as ReadLayer, g * this.cs + from, part);
      pwriteFull(this.fd, part, host + from);
    }
  }

  /**
   * Makes sure guest cluster g has an L2 table of its own (COPIED): allocates a new one, or copies a table
   * shared with an internal snapshot. The new table is durable before L1 points at it (LOCK held).
   */
  private ensureL2(g: number): number {
    const l1Index = Math.floor(g / this.geometry.l2Entries);
    const hi = this.views.l1[l1Index * 2]!;
    const lo = this.views.l1[l1Index * 2 + 1]!;
    const old = standardEntryOffset(hi, lo);
    if (old !== 0 && (hi & ENTRY_COPIED_HI) !== 0) return old;
    const { cluster, fresh } = this.allocator.takeCluster();
    const table = cluster * this.cs;
    this.map.dropSlot(table);
    if (old !== 0) {
      const slot = this.map.slotFor(old);
      pwriteFull(this.fd, this.map.tableBytes(slot), table);
    } else if (!fresh) {
      pwriteFull(this.fd, this.zeroes, table);
    }
    syncData(this.fd); // the table's content is durable before L1 references it
    this.setL1(l1Index, table);
    if (old !== 0) {
      syncData(this.fd); // L1 no longer references the shared table before its refcount drops
      this.allocator.adjust(old / this.cs, 1, -1);
    }
    return table;
  }

  private setL1(l1Index: number, table: number): void {
    const entry = new Uint8Array(8);
    const view = new DataView(entry.buffer);
    const hi = (ENTRY_COPIED_HI | offsetHi(table)) >>> 0;
    const lo = offsetLo(table);
    view.setUint32(0, hi);
    view.setUint32(4, lo);
    pwriteFull(this.fd, entry, this.views.floats[F_L1_OFFSET]! + l1Index * 8);
    beginPublish(this.views.ints);
    this.views.l1[l1Index * 2] = hi;
    this.views.l1[l1Index * 2 + 1] = lo;
    endPublish(this.views.ints);
    publishMetadataCluster(this.views, table / this.cs);
  }

  /** Writes L2 entries of guest clusters [g, g+count) (same L2 table, LOCK held) on disk and in the cache. */
  private setL2Entries(g: number, entries: Uint32Array): void {
    const count = entries.length / 2;
    const l1Index = Math.floor(g / this.geometry.l2Entries);
    const table = standardEntryOffset(this.views.l1[l1Index * 2]!, this.views.l1[l1Index * 2 + 1]!);
    if (table === 0 || (this.views.l1[l1Index * 2]! & ENTRY_COPIED_HI) === 0) {
      throw new Qcow2Error('QCOW2_INVALID', `L2 table of guest cluster ${g} is not writable`);
    }
    const bytes = new Uint8Array(count * 8);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < count; i++) {
      view.setUint32(i * 8, entries[i * 2]!);
      view.setUint32(i * 8 + 4, entries[i * 2 + 1]!);
    }
    const index = g % this.geometry.l2Entries;
    pwriteFull(this.fd, bytes, table + index * 8);
    const slot = this.map.findSlot(table);
    if (slot >= 0) {
      beginPublish(this.views.ints);
      this.views.l2Data.set(bytes, slot * this.cs + index * 8);
      endPublish(this.views.ints);
    }
  }

  /** Publishes the clusters of a ticket after their data was written. */
  commitWrite(ticket: number): void {
    if (ticket === NO_COMMIT) return;
    const entry = this.tickets.get(ticket);
    if (entry === undefined) throw new Qcow2Error('QCOW2_IO', `unknown write ticket ${ticket}`);
    this.tickets.delete(ticket);
    if (entry.slot < 0) {
      this.countWriters(entry.first, entry.last, -1); // an in-place overwrite: nothing to publish
      return;
    }
    const pending = entry.pending;
    this.lock();
    try {
      const frees: Array<[number, number]> = [];
      for (let i = 0; i < pending.length; ) {
        // one pwrite per run of consecutive clusters in one L2 table
        let j = i + 1;
        const l2Of = (p: PendingCluster): number => Math.floor(p.guestCluster / this.geometry.l2Entries);
        while (
          j < pending.length &&
          pending[j]!.guestCluster === pending[j - 1]!.guestCluster + 1 &&
          l2Of(pending[j]!) === l2Of(pending[i]!)
        )
          j++;
        const entries = new Uint32Array((j - i) * 2);
        for (let k = i; k < j; k++) {
          const host = pending[k]!.hostCluster * this.cs;
          entries[(k - i) * 2] = (ENTRY_COPIED_HI | offsetHi(host)) >>> 0;
          entries[(k - i) * 2 + 1] = offsetLo(host);
        }
        this.setL2Entries(pending[i]!.guestCluster, entries);
        for (let k = i; k < j; k++) {
          const p = pending[k]!;
          if (standardEntryOffset(p.oldHi, p.oldLo) !== p.hostCluster * this.cs || (p.oldHi & ENTRY_COMPRESSED_HI) !== 0)
            frees.push([p.oldHi, p.oldLo]);
        }
        i = j;
      }
      this.freeEntries(frees.map(([hi, lo]) => [hi, lo, -1]));
    } finally {
      this.inflightRelease(entry.slot); // even after an error: a stuck range would RETRY forever
      this.countWriters(entry.first, entry.last, -1);
      this.unlock();
    }
  }

  /** Gives back the clusters of a ticket whose data write failed (they were never referenced). */
  abortWrite(ticket: number): void {
    if (ticket === NO_COMMIT) return;
    const entry = this.tickets.get(ticket);
    if (entry === undefined) return;
    this.tickets.delete(ticket);
    if (entry.slot < 0) {
      this.countWriters(entry.first, entry.last, -1);
      return;
    }
    this.lock();
    try {
      this.inflightRelease(entry.slot);
      for (const p of entry.pending) if (!p.reused) this.allocator.adjust(p.hostCluster, 1, -1);
    } finally {
      this.countWriters(entry.first, entry.last, -1);
      this.unlock();
    }
  }

  /**
   * Drops the references of replaced L2 entries: after a sync (the new L2 entries are durable), each host
   * cluster they held loses one refcount (LOCK held).
   */
  private freeEntries(entries: Array<[number, number, number]>): void {
    const clusters: Array<[number, number]> = [];
    for (const [hi, lo, guest] of entries) {
      if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
        const d = decodeCompressedEntry(hi, lo, this.geometry.clusterBits);
        const from = Math.floor((d.hostOffset - (d.hostOffset % 512)) / this.cs);
        const to = Math.floor((d.hostOffset + d.maxLength - 1) / this.cs);
        for (let c = from; c <= to; c++) clusters.push([c, -1]);
      } else {
        const host = standardEntryOffset(hi, lo);
        if (host !== 0) clusters.push([host / this.cs, (hi & ENTRY_COPIED_HI) !== 0 ? guest : -1]);
      }
    }
    if (clusters.length === 0) return;
    syncData(this.fd);
    const deferred = this.views.deferred;
    for (const [cluster, guest] of clusters) {
      // A COPIED cluster may still be the target of an in-place write that looked it up before the unmap.
      const count = Atomics.load(this.views.ints, I_DEFERRED);
      if (guest >= 0 && this.hasWriters(guest) && count < DEFERRED_FREES) {
        deferred[count * 2] = cluster;
        deferred[count * 2 + 1] = guest;
        Atomics.store(this.views.ints, I_DEFERRED, count + 1);
      } else {
        this.allocator.adjust(cluster, 1, -1);
      }
    }
  }

  /** Frees deferred clusters whose writers have drained (all of them when `all`), LOCK held. */
  private processDeferred(all: boolean): void {
    const deferred = this.views.deferred;
    let count = Atomics.load(this.views.ints, I_DEFERRED);
    for (let i = 0; i < count; ) {
      if (all || !this.hasWriters(deferred[i * 2 + 1]!)) {
        const cluster = deferred[i * 2]!;
        count--;
        deferred[i * 2] = deferred[count * 2]!;
        deferred[i * 2 + 1] = deferred[count * 2 + 1]!;
        Atomics.store(this.views.ints, I_DEFERRED, count);
        this.allocator.adjust(cluster, 1, -1);
      } else {
        i++;
      }
    }
  }

  /** DISCARD: whole clusters are deallocated (zero-flagged when a backing file would show through). */
  discard(offset: number, length: number): number {
    this.checkRange(offset, length);
    this.checkWritable();
    return this.unmapClusters(offset, length, 'discard');
  }

  /**
   * WRITE_ZEROES: whole clusters become zero clusters (v3; with `unmap` false, clusters this image owns stay
   * allocated under the zero flag) or are deallocated (v2 without backing); partial clusters, v2 images
   * with a backing file and v2 without `unmap` get zeroes written. RETRY as for prepareWrite.
   */
  writeZeroes(offset: number, length: number, unmap = true): number {
    this.checkRange(offset, length);
    this.checkWritable();
    const end = offset + length;
    const firstWhole = Math.ceil(offset / this.cs) * this.cs;
    const lastWhole = Math.floor(end / this.cs) * this.cs;
    const explicit = this.geometry.version === 2 && (this.backing !== null || !unmap);
    if (explicit || firstWhole >= lastWhole) return this.writeZeroData(offset, length);
    if (offset < firstWhole && this.writeZeroData(offset, firstWhole - offset) === RETRY) return RETRY;
    if (lastWhole < end && this.writeZeroData(lastWhole, end - lastWhole) === RETRY) return RETRY;
    return this.unmapClusters(firstWhole, lastWhole - firstWhole, 'zero', unmap);
  }

  private writeZeroData(offset: number, length: number): number {
    for (let at = offset; at < offset + length; ) {
      const n = Math.min(offset + length - at, 16 * this.cs);
      const extents: WriteExtent[] = [];
      const ticket = this.prepareWrite(at, n, extents);
      if (ticket === RETRY) return RETRY;
      try {
        for (const e of extents) {
          for (let done = 0; done < e.length; ) {
            const chunk = Math.min(e.length - done, this.zeroes.length);
            pwriteFull(e.fd, this.zeroes.subarray(0, chunk), e.hostOffset + done);
            done += chunk;
          }
        }
      } catch (error) {
        this.abortWrite(ticket);
        throw error;
      }
      this.commitWrite(ticket);
      at += n;
    }
    return 0;
  }

  private unmapClusters(offset: number, length: number, mode: 'discard' | 'zero', unmap = true): number {
    const first = Math.ceil(offset / this.cs);
    const end = Math.floor((offset + length) / this.cs);
    if (first >= end) return 0; // discard of partial clusters is advisory: nothing to do
    const v3 = this.geometry.version === 3;
    const zeroFlag = v3 && (mode === 'zero' || this.backing !== null);
    const emptyLo = zeroFlag ? L2_ZERO_LO : 0;
    // WRITE_ZEROES without UNMAP keeps a cluster this image owns allocated (offset | COPIED | zero flag)
    const keepsCluster = (hi: number, lo: number): boolean =>
      mode === 'zero' &&
      !unmap &&
      v3 &&
      (hi & ENTRY_COPIED_HI) !== 0 &&
      (hi & ENTRY_COMPRESSED_HI) === 0 &&
      standardEntryOffset(hi, lo) !== 0;
    this.lock();
    try {
      if (this.inflightOverlaps(first, end)) return RETRY;
      const frees: Array<[number, number, number]> = [];
      this.processDeferred(false);
      for (let g = first; g < end; ) {
        const l2Index = Math.floor(g / this.geometry.l2Entries);
        const stop = Math.min(end, (l2Index + 1) * this.geometry.l2Entries);
        // Only touch (and only create) an L2 table when some entry does not already read as wanted.
        let changed = false;
        for (let k = g; k < stop && !changed; k++) {
          this.map.lookupLocked(k);
          if (keepsCluster(this.map.eHi, this.map.eLo)) changed = (this.map.eLo & L2_ZERO_LO) === 0;
          else
            changed =
              !(this.map.eHi === 0 && this.map.eLo === emptyLo) && !(this.map.eHi === 0 && this.map.eLo === 0 && this.backing === null);
        }
        if (!changed) {
          g = stop;
          continue;
        }
        this.ensureL2(g);
        const entries = new Uint32Array((stop - g) * 2);
        for (let k = g; k < stop; k++) {
          this.map.lookupLocked(k);
          if (keepsCluster(this.map.eHi, this.map.eLo)) {
            this.guard.dataCluster(k, this.map.eHi, this.map.eLo);
            entries[(k - g) * 2] = this.map.eHi;
            entries[(k - g) * 2 + 1] = (this.map.eLo | L2_ZERO_LO) >>> 0;
          } else {
            frees.push([this.map.eHi, this.map.eLo, k]);
            entries[(k - g) * 2] = 0;
            entries[(k - g) * 2 + 1] = emptyLo;
          }
        }
        this.setL2Entries(g, entries);
        g = stop;
      }
      this.freeEntries(frees);
      return 0;
    } finally {
      this.unlock();
    }
  }

  /** FLUSH: data and metadata were written through, so one fdatasync makes every completed write durable. */
  flush(): void {
    syncData(this.fd);
    if (Atomics.load(this.views.ints, I_DEFERRED) === 0 || this.readOnly) return;
    this.lock();
    try {
      this.processDeferred(false);
    } finally {
      this.unlock();
    }
  }

  /** Live resize: grows the virtual size (and the L1 table when needed). Shrinking is refused. */
  resize(newSize: number): void {
    this.checkWritable();
    if (!Number.isSafeInteger(newSize) || newSize % 512 !== 0)
      throw new Qcow2Error('QCOW2_RANGE', `size ${newSize} is not a multiple of 512`);
    this.lock();
    try {
      const f = this.views.floats;
      if (newSize < f[F_SIZE]!) throw new Qcow2Error('QCOW2_UNSUPPORTED', 'shrinking a qcow2 image is not supported');
      const perL1 = this.cs * this.geometry.l2Entries;
      const neededL1 = Math.ceil(newSize / perL1);
      if (neededL1 > this.views.l1.length / 2 || neededL1 * 8 > MAX_L1_BYTES) {
        throw new Qcow2Error('QCOW2_NOSPC', `size ${newSize} exceeds the L1 capacity reserved at open`);
      }
      const oldL1Size = f[F_L1_SIZE]!;
      const oldOffset = f[F_L1_OFFSET]!;
      const oldClusters = Math.ceil((oldL1Size * 8) / this.cs);
      if (neededL1 > (oldClusters * this.cs) / 8) {
        const clusters = Math.ceil((neededL1 * 8) / this.cs);
        const start = this.allocator.allocateContiguous(clusters);
        const table = new Uint8Array(clusters * this.cs);
        const view = new DataView(table.buffer);
        for (let i = 0; i < oldL1Size; i++) {
          view.setUint32(i * 8, this.views.l1[i * 2]!);
          view.setUint32(i * 8 + 4, this.views.l1[i * 2 + 1]!);
        }
        pwriteFull(this.fd, table, start * this.cs);
        syncData(this.fd); // the new table is durable before the header points at it
        const fields = new Uint8Array(12);
        const fv = new DataView(fields.buffer);
        fv.setUint32(0, neededL1);
        fv.setUint32(4, offsetHi(start * this.cs));
        fv.setUint32(8, offsetLo(start * this.cs));
        pwriteFull(this.fd, fields, HEADER_L1_FIELDS);
        syncData(this.fd);
        beginPublish(this.views.ints);
        f[F_L1_OFFSET] = start * this.cs;
        f[F_L1_SIZE] = neededL1;
        endPublish(this.views.ints);
        if (oldClusters > 0) this.allocator.adjust(oldOffset / this.cs, oldClusters, -1);
      } else if (neededL1 > oldL1Size) {
        const fields = new Uint8Array(4);
        new DataView(fields.buffer).setUint32(0, neededL1);
        pwriteFull(this.fd, fields, HEADER_L1_FIELDS);
        f[F_L1_SIZE] = neededL1;
      }
      const sizeField = new Uint8Array(8);
      const sv = new DataView(sizeField.buffer);
      sv.setUint32(0, offsetHi(newSize));
      sv.setUint32(4, offsetLo(newSize));
      pwriteFull(this.fd, sizeField, HEADER_SIZE_FIELD);
      syncData(this.fd);
      f[F_SIZE] = newSize;
      Atomics.add(this.views.ints, I_META_GEN, 1);
    } finally {
      this.unlock();
    }
  }

  /**
   * Closes this thread's handle. Pending tickets are aborted; the last handle of a writable image returns
   * the unused cluster reserve so a cleanly closed image has no leaked clusters.
   */
  close(): void {
    if (this.closed) return;
    for (const ticket of [...this.tickets.keys()]) this.abortWrite(ticket);
    this.closed = true;
    try {
      if (Atomics.sub(this.views.ints, I_HANDLES, 1) === 1 && !this.readOnly) {
        this.lock();
        try {
          this.processDeferred(true); // no handle is left, so no writer either
          this.allocator.releaseReserve();
          syncData(this.fd);
        } finally {
          this.unlock();
        }
      }
    } finally {
      this.backing?.close();
      fs.closeSync(this.fd);
    }
  }
}
