/**
 * Walks one descriptor chain (direct, or through one indirect table) into a reusable scratch list.
 *
 * Outcomes follow the blast radius of the fault:
 * - `Poison`: the descriptor TABLE itself is broken (head or next index out of range, a loop in the main
 *   table). Every later chain may be affected, so the queue stops.
 * - `Drop`: this chain cannot be completed safely (more than `capacity` descriptors, or a bad indirect table),
 *   because its true status byte is unknown. No used entry; the guest sees the request time out.
 * - `Ok`: the scratch holds the chain's descriptors in order.
 */
import { DESCRIPTOR_SIZE, DescFlag, MAX_QUEUE_SIZE } from '../../protocol/split-ring.js';
import type { GuestMemory } from './guest-memory.js';
import { readLe64 } from '../../protocol/virtio.js';

export const ChainOutcome = {
  Ok: 0,
  Drop: 1,
  Poison: 2,
} as const;
export type ChainOutcomeCode = (typeof ChainOutcome)[keyof typeof ChainOutcome];

/** Reusable per-queue storage for one chain: parallel arrays, no allocation per request. */
export class ChainScratch {
  readonly addr: Float64Array;
  readonly len: Uint32Array;
  readonly writable: Uint8Array;
  count = 0;
  /** Why the last walk did not return Ok. */
  reason = '';

  constructor(readonly capacity: number) {
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
    this.writable = new Uint8Array(capacity);
  }
}

/**
 * Fills `scratch` with the chain starting at `head` of a table of `queueSize` entries at
 * (`descView`, `descBase`). Returns a ChainOutcome; on Drop/Poison `scratch.reason` says why.
 */
export function walkChain(
  memory: GuestMemory,
  descView: DataView,
  descBase: number,
  queueSize: number,
  head: number,
  scratch: ChainScratch,
): ChainOutcomeCode {
  scratch.count = 0;
  let view = descView;
  let base = descBase;
  let tableSize = queueSize;
  let inIndirect = false;
  let index = head;
  let visited = 0;
  let total = 0;

  for (;;) {
    if (index >= tableSize) {
      scratch.reason = `descriptor index ${index} out of range (table of ${tableSize})`;
      return inIndirect ? ChainOutcome.Drop : ChainOutcome.Poison;
    }
    // A chain can visit each entry of its table at most once; more means a loop.
    if (++visited > tableSize) {
      scratch.reason = `descriptor loop in ${inIndirect ? 'indirect table' : 'descriptor table'}`;
      return inIndirect ? ChainOutcome.Drop : ChainOutcome.Poison;
    }
    const at = base + index * DESCRIPTOR_SIZE;
    // Addresses at or above 2^53 read as Infinity and fail every translation.
    const addr = readLe64(view, at);
    const len = view.getUint32(at + 8, true);
    const flags = view.getUint16(at + 12, true);
    const next = view.getUint16(at + 14, true);

    if (flags & DescFlag.INDIRECT) {
      if (inIndirect) {
        scratch.reason = 'nested indirect descriptor';
        return ChainOutcome.Drop;
      }
      if (flags & DescFlag.NEXT) {
        scratch.reason = 'indirect descriptor with NEXT set';
        return ChainOutcome.Drop;
      }
      if (len === 0 || len % DESCRIPTOR_SIZE !== 0 || len / DESCRIPTOR_SIZE > MAX_QUEUE_SIZE) {
        scratch.reason = `indirect table length ${len} is not a non-zero multiple of ${DESCRIPTOR_SIZE} up to ${MAX_QUEUE_SIZE} entries`;
        return ChainOutcome.Drop;
      }
      const table = memory.slice(addr, len);
      if (table === null || addr % 8 !== 0) {
        scratch.reason = `indirect table at 0x${addr.toString(16)} (+${len}) is not in guest memory or misaligned`;
        return ChainOutcome.Drop;
      }
      view = table.view;
      base = table.offset;
      tableSize = len / DESCRIPTOR_SIZE;
      inIndirect = true;
      index = 0;
      visited = 0;
      continue;
    }

    // Past capacity we only count (and keep checking for loops): the chain will be dropped anyway.
    if (total < scratch.capacity) {
      scratch.addr[total] = addr;
      scratch.len[total] = len;
      scratch.writable[total] = flags & DescFlag.WRITE ? 1 : 0;
    }
    total++;
    if (!(flags & DescFlag.NEXT)) break;
    index = next;
  }

  if (total > scratch.capacity) {
    scratch.reason = `chain of ${total} descriptors exceeds the limit of ${scratch.capacity} (seg_max + 2)`;
    return ChainOutcome.Drop;
  }
  scratch.count = total;
  return ChainOutcome.Ok;
}
