/**
 * Checks offsets found in the image before they are used: a data cluster must be aligned, inside the file
 * and not metadata (header, L1, refcount table and blocks, L2 tables), so a hostile L2 entry can make
 * neither a read leak metadata nor a write overwrite it. Each thread keeps its own set of metadata
 * clusters, updated from the shared ring of additions, rebuilt when a table moves.
 */
import { L2_RESERVED_HI, L2_RESERVED_LO, standardEntryOffset } from '../../../protocol/qcow2.js';
import { Qcow2Error } from './errors.js';
import {
  F_FILE_CLUSTERS,
  F_L1_OFFSET,
  F_L1_SIZE,
  F_RT_ENTRIES,
  F_RT_OFFSET,
  I_META_ADDS,
  I_META_GEN,
  METADATA_RING,
  type Qcow2Geometry,
  type SharedViews,
} from './shared-state.js';

export class MetadataGuard {
  private metaGen = -1;
  private metaAddsSeen = 0;
  private readonly metadataClusters = new Set<number>();
  private readonly cs: number;

  constructor(
    private readonly views: SharedViews,
    private readonly geometry: Qcow2Geometry,
  ) {
    this.cs = geometry.clusterSize;
  }

  /**
   * Keeps this thread's set of metadata clusters current: new L2 tables and refcount blocks arrive through
   * the shared ring; a moved table (or falling more than the ring behind) means a full rebuild.
   */
  private refreshMetadataClusters(): void {
    const gen = Atomics.load(this.views.ints, I_META_GEN);
    const adds = Atomics.load(this.views.ints, I_META_ADDS);
    if (gen === this.metaGen && adds === this.metaAddsSeen) return;
    if (gen === this.metaGen && adds - this.metaAddsSeen <= METADATA_RING) {
      for (let i = this.metaAddsSeen; i < adds; i++) this.metadataClusters.add(this.views.metaAdds[i % METADATA_RING]!);
      if (Atomics.load(this.views.ints, I_META_ADDS) - this.metaAddsSeen <= METADATA_RING) {
        this.metaAddsSeen = adds;
        return;
      }
    }
    this.metaGen = gen;
    this.metaAddsSeen = adds;
    const set = this.metadataClusters;
    set.clear();
    const f = this.views.floats;
    for (let c = 0; c < this.geometry.headerClusterEnd; c++) set.add(c);
    const l1Clusters = Math.ceil((f[F_L1_SIZE]! * 8) / this.cs);
    for (let c = 0; c < l1Clusters; c++) set.add(f[F_L1_OFFSET]! / this.cs + c);
    const rtClusters = Math.ceil((f[F_RT_ENTRIES]! * 8) / this.cs);
    for (let c = 0; c < rtClusters; c++) set.add(f[F_RT_OFFSET]! / this.cs + c);
    for (let i = 0; i < f[F_RT_ENTRIES]!; i++) {
      const block = this.views.refcountTable[i]!;
      if (block !== 0) set.add(block / this.cs);
    }
    for (let i = 0; i < f[F_L1_SIZE]!; i++) {
      const l2 = standardEntryOffset(this.views.l1[i * 2]!, this.views.l1[i * 2 + 1]!);
      if (l2 !== 0) set.add(l2 / this.cs);
    }
  }

  /** An L2 table offset read from L1 must be a cluster in the file that is not other metadata. */
  checkTableTarget(offset: number, what: string): void {
    if (offset % this.cs !== 0) throw new Qcow2Error('QCOW2_INVALID', `${what} offset ${offset} is not cluster aligned`);
    if (offset / this.cs >= this.views.floats[F_FILE_CLUSTERS]!)
      throw new Qcow2Error('QCOW2_INVALID', `${what} at ${offset} lies past the end of the file`);
  }

  /** The host cluster of a standard L2 entry, validated: aligned, inside the file, not metadata. */
  dataCluster(g: number, hi: number, lo: number): number {
    if ((hi & L2_RESERVED_HI) !== 0 || (lo & L2_RESERVED_LO) !== 0) {
      throw new Qcow2Error('QCOW2_INVALID', `L2 entry of guest cluster ${g} has reserved bits set`);
    }
    const offset = standardEntryOffset(hi, lo);
    if (offset % this.cs !== 0) throw new Qcow2Error('QCOW2_INVALID', `L2 entry of guest cluster ${g} is not cluster aligned`);
    const cluster = offset / this.cs;
    if (cluster >= this.views.floats[F_FILE_CLUSTERS]!)
      throw new Qcow2Error('QCOW2_INVALID', `L2 entry of guest cluster ${g} points past the end of the file`);
    this.refreshMetadataClusters();
    if (this.metadataClusters.has(cluster)) throw new Qcow2Error('QCOW2_INVALID', `L2 entry of guest cluster ${g} points into metadata`);
    return cluster;
  }
}
