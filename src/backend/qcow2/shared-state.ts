/**
 * The qcow2 state every thread serving one image shares, in SharedArrayBuffers (JS objects cannot cross
 * threads). Invariants:
 * - Every change of shared metadata (header fields, L1, refcount table, L2 cache slots, allocation fields,
 *   in-flight table) happens while holding LOCK.
 * - Changes that lock-free readers look at (L1, L2 cache slots) are additionally bracketed by SEQ becoming
 *   odd then even again (a seqlock): a reader that saw the same even SEQ before and after its lookup read a
 *   consistent state; otherwise it retries or takes LOCK.
 * - I/O is never done while SEQ is odd (readers would spin).
 */
import { Qcow2Error } from './errors.js';

/** Immutable image parameters (plain data, copied to each thread). */
export interface Qcow2Geometry {
  readonly version: 2 | 3;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly l2Entries: number;
  readonly refcountOrder: number;
  readonly refcountBlockEntries: number;
  readonly headerClusterEnd: number; // clusters [0, headerClusterEnd) are header (+ extensions)
  readonly snapshotsOffset: number;
  readonly nbSnapshots: number;
}

/** Description of a layer of the chain, structured-clonable (postMessage to workers). */
export type LayerDescription =
  | { readonly format: 'raw'; readonly path: string; readonly readOnly: boolean; readonly size: number }
  | { readonly format: 'qcow2'; readonly path: string; readonly readOnly: boolean; readonly shared: Qcow2SharedState };

export interface Qcow2SharedState {
  readonly geometry: Qcow2Geometry;
  readonly l1Capacity: number;
  readonly refcountTableCapacity: number;
  readonly l2Slots: number;
  readonly meta: SharedArrayBuffer;
  readonly l1: SharedArrayBuffer;
  readonly refcountTable: SharedArrayBuffer;
  readonly l2Tags: SharedArrayBuffer;
  readonly l2Data: SharedArrayBuffer;
  readonly inflight: SharedArrayBuffer;
  readonly metaAdds: SharedArrayBuffer;
  readonly writers: SharedArrayBuffer;
  readonly deferred: SharedArrayBuffer;
  readonly backing: LayerDescription | null;
}

/** Int32 words of `meta`. */
export const I_LOCK = 0;
export const I_SEQ = 1;
export const I_META_GEN = 2; // bumped when the set of metadata clusters changes (L2 tables, refcount blocks, L1/RT moves)
export const I_CLOCK = 3; // LRU clock of the L2 cache
export const I_HANDLES = 4; // open handles (the last one to close returns the unused reserve)
export const I_DEFERRED = 6; // entries in the deferred-free list
export const I_META_ADDS = 5; // metadata clusters added so far (the last METADATA_RING of them are in metaAdds)
const INT_WORDS = 16;
/** Float64 words of `meta` (after the Int32 words). */
export const F_SIZE = 0; // virtual disk size
export const F_L1_OFFSET = 1;
export const F_L1_SIZE = 2;
export const F_RT_OFFSET = 3;
export const F_RT_ENTRIES = 4;
export const F_RESERVE_NEXT = 5; // clusters [next, end) have refcount 1 on disk and are not referenced yet
export const F_RESERVE_END = 6;
export const F_RESERVE_FRESH = 7; // 1 when the reserve lies past the old end of file (reads as zeroes)
export const F_FREE_HINT = 8; // no free cluster below this index (allocation search start)
export const F_FILE_CLUSTERS = 9; // clusters covered by the file's length
const FLOAT_WORDS = 16;

/** Allocating writes in flight at once per image (each holds one guest cluster range). */
export const INFLIGHT_SLOTS = 128;
/** Recently added metadata clusters (new L2 tables, refcount blocks), so handles update their sets incrementally. */
export const METADATA_RING = 1024;
/**
 * In-place writes in flight, counted per guest cluster hash bucket. A writer counts itself before its
 * lock-free lookup; DISCARD/WRITE_ZEROES publish the new L2 entries first and then look at the counters, so
 * a cluster that a writer may still be writing to is not freed (and reused for another guest cluster):
 * its free is deferred until the bucket drains.
 */
export const WRITER_BUCKETS = 4096;
export const DEFERRED_FREES = 4096;

export interface SharedViews {
  readonly ints: Int32Array;
  readonly floats: Float64Array;
  /** L1 entries as [hi, lo] 32-bit pairs (host order). */
  readonly l1: Uint32Array;
  readonly refcountTable: Float64Array;
  readonly l2Tags: Float64Array;
  readonly l2LastUse: Int32Array;
  readonly l2Data: Uint8Array;
  readonly l2DataView: DataView;
  /** Guest cluster ranges [start, end) with an allocation in flight, as pairs (start -1: free slot). */
  readonly inflight: Float64Array;
  readonly metaAdds: Float64Array;
  readonly writers: Int32Array;
  /** Deferred frees as [host cluster, guest cluster] pairs (LOCK held). */
  readonly deferred: Float64Array;
}

export function createSharedState(
  geometry: Qcow2Geometry,
  l1Capacity: number,
  refcountTableCapacity: number,
  l2Slots: number,
  backing: LayerDescription | null,
): Qcow2SharedState {
  const inflight = new SharedArrayBuffer(INFLIGHT_SLOTS * 2 * 8);
  new Float64Array(inflight).fill(-1);
  return {
    geometry,
    l1Capacity,
    refcountTableCapacity,
    l2Slots,
    meta: new SharedArrayBuffer(INT_WORDS * 4 + FLOAT_WORDS * 8),
    l1: new SharedArrayBuffer(l1Capacity * 8),
    refcountTable: new SharedArrayBuffer(refcountTableCapacity * 8),
    l2Tags: new SharedArrayBuffer(l2Slots * 8 + l2Slots * 4),
    l2Data: new SharedArrayBuffer(l2Slots * geometry.clusterSize),
    inflight,
    metaAdds: new SharedArrayBuffer(METADATA_RING * 8),
    writers: new SharedArrayBuffer(WRITER_BUCKETS * 4),
    deferred: new SharedArrayBuffer(DEFERRED_FREES * 2 * 8),
    backing,
  };
}

export function viewsOf(state: Qcow2SharedState): SharedViews {
  return {
    ints: new Int32Array(state.meta, 0, INT_WORDS),
    floats: new Float64Array(state.meta, INT_WORDS * 4, FLOAT_WORDS),
    l1: new Uint32Array(state.l1),
    refcountTable: new Float64Array(state.refcountTable),
    l2Tags: new Float64Array(state.l2Tags, 0, state.l2Slots),
    l2LastUse: new Int32Array(state.l2Tags, state.l2Slots * 8, state.l2Slots),
    l2Data: new Uint8Array(state.l2Data),
    l2DataView: new DataView(state.l2Data),
    inflight: new Float64Array(state.inflight),
    metaAdds: new Float64Array(state.metaAdds),
    writers: new Int32Array(state.writers),
    deferred: new Float64Array(state.deferred),
  };
}

const LOCK_WAIT_MS = 50;
const LOCK_DEADLINE_MS = 60_000;

/**
 * The allocation lock: a futex word (0 free, 1 held). Held only for synchronous work (allocation, COW
 * copies, metadata writes), never across a return to the event loop, so a waiter always makes progress;
 * the deadline turns a bug into an error instead of a hang.
 */
export function acquireLock(ints: Int32Array): void {
  if (Atomics.compareExchange(ints, I_LOCK, 0, 1) === 0) return;
  const deadline = Date.now() + LOCK_DEADLINE_MS;
  while (Atomics.compareExchange(ints, I_LOCK, 0, 1) !== 0) {
    Atomics.wait(ints, I_LOCK, 1, LOCK_WAIT_MS);
    if (Date.now() > deadline) throw new Qcow2Error('QCOW2_IO', 'qcow2 metadata lock not released within 60 s');
  }
}

export function releaseLock(ints: Int32Array): void {
  Atomics.store(ints, I_LOCK, 0);
  Atomics.notify(ints, I_LOCK, 1);
}

export function beginPublish(ints: Int32Array): void {
  Atomics.add(ints, I_SEQ, 1);
}

export function endPublish(ints: Int32Array): void {
  Atomics.add(ints, I_SEQ, 1);
}

/** Records a new metadata cluster (LOCK held): slot first, then the count readers go by. */
export function publishMetadataCluster(views: SharedViews, cluster: number): void {
  const count = Atomics.load(views.ints, I_META_ADDS);
  views.metaAdds[count % METADATA_RING] = cluster;
  Atomics.add(views.ints, I_META_ADDS, 1);
}
