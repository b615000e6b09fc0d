/**
 * Split virtqueue layout (virtio 1.2 §2.7) and its 16-bit index arithmetic. Pure: offsets and math only.
 *
 *   descriptor table: size × { le64 addr; le32 len; le16 flags; le16 next }
 *   avail ring:       le16 flags; le16 idx; le16 ring[size]; le16 used_event
 *   used ring:        le16 flags; le16 idx; { le32 id; le32 len }[size]; le16 avail_event
 */

export const DESCRIPTOR_SIZE = 16;
export const USED_ELEMENT_SIZE = 8;
/** The largest queue size a split ring may have. */
export const MAX_QUEUE_SIZE = 32768;

export const DescFlag = {
  NEXT: 0x1,
  WRITE: 0x2,
  INDIRECT: 0x4,
} as const;

/** Set by the device in used.flags: "don't kick me" (ignored by drivers under EVENT_IDX). */
export const USED_F_NO_NOTIFY = 0x1;
/** Set by the driver in avail.flags: "don't interrupt me" (ignored under EVENT_IDX). */
export const AVAIL_F_NO_INTERRUPT = 0x1;

export const AvailOffset = {
  flags: 0,
  idx: 2,
  ring: 4,
} as const;

export const UsedOffset = {
  flags: 0,
  idx: 2,
  ring: 4,
} as const;

export function descriptorTableBytes(queueSize: number): number {
  return DESCRIPTOR_SIZE * queueSize;
}

/** Includes used_event: the trailer exists whether or not EVENT_IDX was negotiated. */
export function availRingBytes(queueSize: number): number {
  return 6 + 2 * queueSize;
}

/** Includes avail_event. */
export function usedRingBytes(queueSize: number): number {
  return 6 + USED_ELEMENT_SIZE * queueSize;
}

export function usedEventOffset(queueSize: number): number {
  return 4 + 2 * queueSize;
}

export function availEventOffset(queueSize: number): number {
  return 4 + USED_ELEMENT_SIZE * queueSize;
}

export function isValidQueueSize(size: number): boolean {
  return Number.isInteger(size) && size > 0 && size <= MAX_QUEUE_SIZE && (size & (size - 1)) === 0;
}

/** How many entries the driver has made available that the device has not consumed yet (mod 2^16). */
export function ringDistance(newer: number, older: number): number {
  return (newer - older) & 0xffff;
}

export function wrapIndex(idx: number): number {
  return idx & 0xffff;
}

/**
 * EVENT_IDX (§2.7.10): must the device notify the driver after moving used.idx from `oldIdx` to `newIdx`,
 * given the driver asked to be told once the used index passes `eventIdx`?
 */
export function needsEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
