/**
 * The split-ring inflight region of the vhost-user specification ("Inflight I/O tracking"), as offsets.
 * Pure: no I/O. Shared by the control plane (sizes, validation at SET_INFLIGHT_FD) and the data plane.
 *
 *   region      = queue 0 region | queue 1 region | ...   (each QUEUE_STRIDE(queue_size) bytes)
 *   queue region: le64 features; le16 version; le16 desc_num; le16 last_batch_head; le16 used_idx;
 *                 DescStateSplit desc[desc_num]
 *   DescStateSplit: u8 inflight; u8 padding[5]; le16 next; le64 counter          (16 bytes)
 *
 * The per-queue stride is libvhost-user's (desc array + 2 bytes, rounded up to 64), so a region written by
 * qemu-storage-daemon can be handed to vublk and back.
 */

export const INFLIGHT_VERSION = 1;
export const INFLIGHT_ALIGNMENT = 64;
export const QUEUE_HEADER_BYTES = 16;
export const DESC_STATE_BYTES = 16;

export const QueueHeaderOffset = {
  features: 0,
  version: 8,
  descNum: 10,
  lastBatchHead: 12,
  usedIdx: 14,
} as const;

export const DescStateOffset = {
  inflight: 0,
  next: 6,
  counter: 8,
} as const;

/** Bytes of one queue's region for a queue of `queueSize` descriptors. */
export function inflightQueueStride(queueSize: number): number {
  const raw = DESC_STATE_BYTES * queueSize + 2;
  const aligned = Math.ceil(raw / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
  // The header must fit too (it does for every size, but say so rather than rely on the rounding).
  return Math.max(aligned, QUEUE_HEADER_BYTES + DESC_STATE_BYTES * queueSize);
}

/** Bytes of the whole region. */
export function inflightRegionBytes(numQueues: number, queueSize: number): number {
  return numQueues * inflightQueueStride(queueSize);
}

/** Offset of descriptor state `head` inside a queue region. */
export function descStateOffset(head: number): number {
  return QUEUE_HEADER_BYTES + DESC_STATE_BYTES * head;
}

/** Where one queue's region lies in the daemon's address space (handed to the worker running the ring). */
export interface InflightQueueMapping {
  hostAddr: number;
  bytes: number;
  /** desc_num the region must have: the queue_size of SET_INFLIGHT_FD. */
  descNum: number;
}
