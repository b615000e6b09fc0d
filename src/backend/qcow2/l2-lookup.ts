/**
 * L1/L2 lookup through the shared L2 cache (4-way set associative, one whole L2 table per slot, tagged by
 * the table's host offset). Lookups of cached tables take no lock: they are validated by the seqlock
 * (shared-state.ts) and retried, then redone under LOCK, which also loads missing tables. The cache is
 * write-through (clean), so a slot can be evicted at any time.
 */
import { standardEntryOffset } from '../../../protocol/qcow2.js';
import { preadFull } from './file-io.js';
import type { MetadataGuard } from './metadata-guard.js';
import { I_CLOCK, I_SEQ, beginPublish, endPublish, type Qcow2Geometry, type SharedViews } from './shared-state.js';

const WAYS = 4;
const FAST_TRIES = 32; // odd-SEQ windows hold only memory copies: spinning beats waiting behind a writer's I/O

export interface LockHolder {
  lock(): void;
  unlock(): void;
}

export class L2Lookup {
  /** Result registers of the last lookup (no allocation per lookup): the L1 entry and the L2 entry. */
  l1Hi = 0;
  l1Lo = 0;
  eHi = 0;
  eLo = 0;
  private readonly cs: number;
  private readonly nSets: number;
  private readonly scratch: Uint8Array;

  constructor(
    private readonly fd: number,
    private readonly views: SharedViews,
    private readonly geometry: Qcow2Geometry,
    slots: number,
    private readonly guard: MetadataGuard,
    private readonly holder: LockHolder,
  ) {
    this.cs = geometry.clusterSize;
    this.nSets = slots / WAYS;
    this.scratch = new Uint8Array(this.cs);
  }

  /** The bytes of a cached L2 table (valid while LOCK is held). */
  tableBytes(slot: number): Uint8Array {
    return this.views.l2Data.subarray(slot * this.cs, (slot + 1) * this.cs);
  }

  findSlot(l2Offset: number): number {
    const base = ((l2Offset / this.cs) % this.nSets) * WAYS;
    const tags = this.views.l2Tags;
    for (let w = 0; w < WAYS; w++) if (tags[base + w] === l2Offset) return base + w;
    return -1;
  }

  /** Lock-free lookup of guest cluster `g` into the registers; false when it must be redone under LOCK. */
  private lookupFast(g: number): boolean {
    const ints = this.views.ints;
    const seq = Atomics.load(ints, I_SEQ);
    if ((seq & 1) !== 0) return false;
    const l2 = this.loadL1Entry(g);
    if (l2 !== 0) {
      const slot = this.findSlot(l2);
      if (slot < 0) return false;
      this.loadL2Entry(slot, g);
      this.views.l2LastUse[slot] = ints[I_CLOCK]!; // approximate LRU: no shared read-modify-write on a hit
    }
    return Atomics.load(ints, I_SEQ) === seq;
  }

  lookup(g: number): void {
    for (let i = 0; i < FAST_TRIES; i++) if (this.lookupFast(g)) return;
    this.holder.lock();
    try {
      this.lookupLocked(g);
    } finally {
      this.holder.unlock();
    }
  }

  /** Lookup with LOCK held: loads the L2 table into the cache when missing. */
  lookupLocked(g: number): void {
    const l2 = this.loadL1Entry(g);
    if (l2 !== 0) this.loadL2Entry(this.slotFor(l2), g);
  }

  /** Loads the L1 entry of guest cluster `g` into the registers; returns its L2 table offset (0: none, entry registers zeroed). */
  private loadL1Entry(g: number): number {
    const l1Index = Math.floor(g / this.geometry.l2Entries);
    this.l1Hi = this.views.l1[l1Index * 2]!;
    this.l1Lo = this.views.l1[l1Index * 2 + 1]!;
    const l2 = standardEntryOffset(this.l1Hi, this.l1Lo);
    if (l2 === 0) {
      this.eHi = 0;
      this.eLo = 0;
    }
    return l2;
  }

  /** Loads the L2 entry of guest cluster `g` from the cached table in `slot` into the registers. */
  private loadL2Entry(slot: number, g: number): void {
    const at = slot * this.cs + (g % this.geometry.l2Entries) * 8;
    this.eHi = this.views.l2DataView.getUint32(at);
    this.eLo = this.views.l2DataView.getUint32(at + 4);
  }

  /** Cache slot holding L2 table `l2Offset`, loading it (LOCK held). */
  slotFor(l2Offset: number): number {
    const found = this.findSlot(l2Offset);
    if (found >= 0) return found;
    this.guard.checkTableTarget(l2Offset, 'L2 table');
    preadFull(this.fd, this.scratch, l2Offset);
    const base = ((l2Offset / this.cs) % this.nSets) * WAYS;
    let victim = base;
    for (let w = 0; w < WAYS; w++) {
      if (this.views.l2Tags[base + w] === 0) {
        victim = base + w;
        break;
      }
      if (this.views.l2LastUse[base + w]! < this.views.l2LastUse[victim]!) victim = base + w;
    }
    beginPublish(this.views.ints);
    this.views.l2Tags[victim] = l2Offset;
    this.views.l2Data.set(this.scratch, victim * this.cs);
    endPublish(this.views.ints);
    this.views.l2LastUse[victim] = Atomics.add(this.views.ints, I_CLOCK, 1);
    return victim;
  }

  dropSlot(l2Offset: number): void {
    const slot = this.findSlot(l2Offset);
    if (slot < 0) return;
    beginPublish(this.views.ints);
    this.views.l2Tags[slot] = 0;
    endPublish(this.views.ints);
  }
}
