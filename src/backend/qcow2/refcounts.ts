/**
 * Refcount maintenance and cluster allocation. Every method is called with the image's LOCK held.
 * Ordering rules (crash consistency, see docs/qcow2.md):
 * - A new refcount block is durable before the refcount table entry that points at it.
 * - Clusters are given refcount 1 and made durable (the caller's fdatasync) before anything references them.
 * - A refcount is decremented only after the references to the cluster are durably gone (the caller syncs).
 * So a crash can leak clusters (refcount 1, no reference) but never leave a reference to a free cluster.
 */
import { MAX_REFCOUNT_TABLE_BYTES, maxRefcount, offsetHi, offsetLo, readRefcount, writeRefcount } from '../../../protocol/qcow2.js';
import { Qcow2Error } from './errors.js';
import { preadFull, punchHole, pwriteFull, syncData, truncateFile } from './file-io.js';
import {
  F_FILE_CLUSTERS,
  F_FREE_HINT,
  F_RESERVE_END,
  F_RESERVE_FRESH,
  F_RESERVE_NEXT,
  F_RT_ENTRIES,
  F_RT_OFFSET,
  F_SIZE,
  I_META_GEN,
  publishMetadataCluster,
  type Qcow2Geometry,
  type SharedViews,
} from './shared-state.js';

const HEADER_RT_OFFSET = 48; // refcount_table_offset (u64) followed by refcount_table_clusters (u32)

export class RefcountAllocator {
  private readonly block: Uint8Array;
  private readonly max: number;
  /** Clusters taken per reserve refill (64 MiB worth): amortizes the fdatasync that makes new refcounts durable. */
  private readonly reserveTarget: number;

  constructor(
    private readonly fd: number,
    private readonly views: SharedViews,
    private readonly geometry: Qcow2Geometry,
  ) {
    this.block = new Uint8Array(geometry.clusterSize);
    this.max = maxRefcount(geometry.refcountOrder);
    // 64 MiB worth, but at most a 16th of the disk so a crash of a small disk does not leak much more than it holds
    const bytes = Math.min(64 * 1024 * 1024, views.floats[F_SIZE]! / 16);
    this.reserveTarget = Math.min(4096, Math.max(4, Math.floor(bytes / geometry.clusterSize)));
  }

  private get clusterSize(): number {
    return this.geometry.clusterSize;
  }

  private blockOffset(blockIndex: number): number {
    if (blockIndex >= this.views.floats[F_RT_ENTRIES]!) return 0;
    return this.views.refcountTable[blockIndex]!;
  }

  refcount(cluster: number): number {
    const n = this.geometry.refcountBlockEntries;
    const offset = this.blockOffset(Math.floor(cluster / n));
    if (offset === 0) return 0;
    preadFull(this.fd, this.block, offset);
    return readRefcount(this.block, cluster % n, this.geometry.refcountOrder);
  }

  /** Adds `delta` to the refcounts of [start, start+count). Blocks must exist when delta > 0. */
  adjust(start: number, count: number, delta: number): void {
    const n = this.geometry.refcountBlockEntries;
    const order = this.geometry.refcountOrder;
    let cluster = start;
    const end = start + count;
    const freed: number[] = [];
    while (cluster < end) {
      const blockIndex = Math.floor(cluster / n);
      const first = cluster % n;
      const last = Math.min(n, first + (end - cluster)); // exclusive
      const offset = this.blockOffset(blockIndex);
      if (offset === 0) {
        if (delta > 0) throw new Qcow2Error('QCOW2_INVALID', `no refcount block for cluster ${cluster}`);
        throw new Qcow2Error('QCOW2_INVALID', `refcount underflow: cluster ${cluster} has no refcount block`);
      }
      preadFull(this.fd, this.block, offset);
      for (let i = first; i < last; i++) {
        const value = readRefcount(this.block, i, order) + delta;
        if (value < 0) throw new Qcow2Error('QCOW2_INVALID', `refcount underflow at cluster ${blockIndex * n + i}`);
        if (value > this.max) throw new Qcow2Error('QCOW2_INVALID', `refcount overflow at cluster ${blockIndex * n + i}`);
        writeRefcount(this.block, i, order, value);
        if (value === 0 && blockIndex * n + i < this.views.floats[F_FREE_HINT]!) this.views.floats[F_FREE_HINT] = blockIndex * n + i;
        if (value === 0 && delta < 0) freed.push(blockIndex * n + i);
      }
      const bits = 1 << order;
      const byteStart = Math.floor((first * bits) / 8);
      const byteEnd = Math.ceil((last * bits) / 8);
      pwriteFull(this.fd, this.block.subarray(byteStart, byteEnd), offset + byteStart);
      cluster = blockIndex * n + last;
    }
    // Free clusters are unreferenced (the caller synced the unlink first): their blocks can go, in runs.
    const fileClusters = this.views.floats[F_FILE_CLUSTERS]!;
    for (let i = 0; i < freed.length; ) {
      let j = i + 1;
      while (j < freed.length && freed[j] === freed[j - 1]! + 1) j++;
      if (freed[i]! < fileClusters) punchHole(this.fd, freed[i]! * this.clusterSize, (j - i) * this.clusterSize);
      i = j;
    }
  }

  /** Makes the file cover `clusters` clusters (sparse: the new tail reads as zeroes). */
  private coverFile(clusters: number): void {
    if (clusters <= this.views.floats[F_FILE_CLUSTERS]!) return;
    truncateFile(this.fd, clusters * this.clusterSize);
    this.views.floats[F_FILE_CLUSTERS] = clusters;
  }

  /** First run of free clusters at or after `from`, at most `max` long, never crossing a refcount block. */
  private findFreeRun(from: number, max: number): { start: number; count: number; blockMissing: boolean } {
    const n = this.geometry.refcountBlockEntries;
    const order = this.geometry.refcountOrder;
    let cluster = from;
    const limitBlocks = this.views.floats[F_RT_ENTRIES]! + 2;
    for (let guard = 0; guard <= limitBlocks; guard++) {
      const blockIndex = Math.floor(cluster / n);
      const offset = this.blockOffset(blockIndex);
      if (offset === 0) return { start: cluster, count: Math.min(max, n - (cluster % n)), blockMissing: true };
      preadFull(this.fd, this.block, offset);
      for (let i = cluster % n; i < n; i++) {
        if (readRefcount(this.block, i, order) !== 0) continue;
        let j = i + 1;
        while (j < n && j - i < max && readRefcount(this.block, j, order) === 0) j++;
        return { start: blockIndex * n + i, count: j - i, blockMissing: false };
      }
      cluster = (blockIndex + 1) * n;
    }
    throw new Qcow2Error('QCOW2_NOSPC', 'no free cluster found in the refcount structures');
  }

  /**
   * Creates refcount block `blockIndex` in the first cluster of the range it covers (free by definition:
   * clusters without a block have refcount 0), growing the refcount table when it has no entry for it.
   * Returns the first cluster after what it used.
   */
  private createBlock(blockIndex: number): number {
    const n = this.geometry.refcountBlockEntries;
    const cs = this.clusterSize;
    const home = blockIndex * n;
    const oldEntries = this.views.floats[F_RT_ENTRIES]!;
    let tableClusters = 0;
    let newEntries = oldEntries;
    if (blockIndex >= oldEntries) {
      newEntries = Math.max(oldEntries * 2, blockIndex + 1);
      tableClusters = Math.ceil((newEntries * 8) / cs);
      newEntries = (tableClusters * cs) / 8;
      if (tableClusters * cs > MAX_REFCOUNT_TABLE_BYTES || newEntries > this.views.refcountTable.length || 1 + tableClusters > n) {
        throw new Qcow2Error('QCOW2_NOSPC', 'the refcount table cannot grow further');
      }
    }
    const block = new Uint8Array(cs);
    for (let i = 0; i < 1 + tableClusters; i++) writeRefcount(block, i, this.geometry.refcountOrder, 1);
    this.coverFile(home + 1 + tableClusters);
    pwriteFull(this.fd, block, home * cs);
    if (tableClusters === 0) {
      syncData(this.fd); // the block is durable before the table points at it
      const entry = new Uint8Array(8);
      const view = new DataView(entry.buffer);
      view.setUint32(0, offsetHi(home * cs));
      view.setUint32(4, offsetLo(home * cs));
      pwriteFull(this.fd, entry, this.views.floats[F_RT_OFFSET]! + blockIndex * 8);
      this.views.refcountTable[blockIndex] = home * cs;
    } else {
      const table = new Uint8Array(tableClusters * cs);
      const view = new DataView(table.buffer);
      for (let i = 0; i < oldEntries; i++) {
        const value = this.views.refcountTable[i]!;
        view.setUint32(i * 8, offsetHi(value));
        view.setUint32(i * 8 + 4, offsetLo(value));
      }
      view.setUint32(blockIndex * 8, offsetHi(home * cs));
      view.setUint32(blockIndex * 8 + 4, offsetLo(home * cs));
      pwriteFull(this.fd, table, (home + 1) * cs);
      syncData(this.fd); // block and new table durable before the header switches to them
      const header = new Uint8Array(12);
      const hv = new DataView(header.buffer);
      hv.setUint32(0, offsetHi((home + 1) * cs));
      hv.setUint32(4, offsetLo((home + 1) * cs));
      hv.setUint32(8, tableClusters);
      pwriteFull(this.fd, header, HEADER_RT_OFFSET);
      syncData(this.fd); // the old table is unreferenced before it is freed
      const oldOffset = this.views.floats[F_RT_OFFSET]!;
      const oldClusters = Math.ceil((oldEntries * 8) / cs);
      this.views.refcountTable[blockIndex] = home * cs;
      this.views.floats[F_RT_OFFSET] = (home + 1) * cs;
      this.views.floats[F_RT_ENTRIES] = newEntries;
      this.adjust(oldOffset / cs, oldClusters, -1);
    }
    if (tableClusters > 0)
      Atomics.add(this.views.ints, I_META_GEN, 1); // the table moved: full rebuild
    else publishMetadataCluster(this.views, home);
    return home + 1 + tableClusters;
  }

  /**
   * Gives refcount 1 to a run of free clusters (1..max long) and returns its start. Not yet durable:
   * the caller syncs before referencing them. `fresh` tells whether the run lay past the end of file.
   */
  allocateRun(max: number): { start: number; count: number; fresh: boolean } {
    let from = this.views.floats[F_FREE_HINT]!;
    for (let guard = 0; guard < 64; guard++) {
      const run = this.findFreeRun(from, max);
      if (run.blockMissing) {
        const next = this.createBlock(Math.floor(run.start / this.geometry.refcountBlockEntries));
        from = Math.max(next, run.start);
        continue;
      }
      const fresh = run.start >= this.views.floats[F_FILE_CLUSTERS]!;
      this.coverFile(run.start + run.count);
      this.adjust(run.start, run.count, +1);
      this.views.floats[F_FREE_HINT] = run.start + run.count;
      return { start: run.start, count: run.count, fresh };
    }
    throw new Qcow2Error('QCOW2_NOSPC', 'cluster allocation did not converge');
  }

  /**
   * `count` contiguous clusters (for a new L1 table), allocated at the end of the file; durable on return.
   */
  allocateContiguous(count: number): number {
    const n = this.geometry.refcountBlockEntries;
    let start = Math.max(this.views.floats[F_FILE_CLUSTERS]!, this.views.floats[F_RESERVE_END]!);
    for (let guard = 0; guard < 64; guard++) {
      // every block covering the run must exist and every cluster must be free
      let restart = -1;
      for (let c = start; c < start + count && restart < 0; c = (Math.floor(c / n) + 1) * n) {
        if (this.blockOffset(Math.floor(c / n)) === 0) restart = this.createBlock(Math.floor(c / n));
      }
      if (restart >= 0) {
        start = Math.max(start, restart);
        continue;
      }
      let busy = -1;
      for (let c = start; c < start + count; c++) if (this.refcount(c) !== 0) busy = c;
      if (busy >= 0) {
        start = busy + 1;
        continue;
      }
      this.coverFile(start + count);
      this.adjust(start, count, +1);
      syncData(this.fd);
      return start;
    }
    throw new Qcow2Error('QCOW2_NOSPC', 'contiguous allocation did not converge');
  }

  /**
   * One cluster from the shared reserve (refilled in runs, one fdatasync per run). The returned cluster's
   * refcount is durable. `fresh` clusters lie past the old end of file and read as zeroes.
   */
  takeCluster(): { cluster: number; fresh: boolean } {
    const f = this.views.floats;
    if (f[F_RESERVE_NEXT]! >= f[F_RESERVE_END]!) {
      const run = this.allocateRun(this.reserveTarget);
      syncData(this.fd);
      f[F_RESERVE_NEXT] = run.start;
      f[F_RESERVE_END] = run.start + run.count;
      f[F_RESERVE_FRESH] = run.fresh ? 1 : 0;
    }
    const cluster = f[F_RESERVE_NEXT]!;
    f[F_RESERVE_NEXT] = cluster + 1;
    return { cluster, fresh: f[F_RESERVE_FRESH] === 1 };
  }

  /** Returns the unused reserve (clean close) and trims the file when the reserve was its tail. */
  releaseReserve(): void {
    const f = this.views.floats;
    const next = f[F_RESERVE_NEXT]!;
    const end = f[F_RESERVE_END]!;
    f[F_RESERVE_NEXT] = 0;
    f[F_RESERVE_END] = 0;
    if (next >= end) return;
    this.adjust(next, end - next, -1);
    if (end >= f[F_FILE_CLUSTERS]!) {
      truncateFile(this.fd, next * this.clusterSize);
      f[F_FILE_CLUSTERS] = next;
    }
  }
}
