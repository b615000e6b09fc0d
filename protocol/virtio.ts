/**
 * Generic virtio constants (virtio 1.2 spec, §2 and §6) shared by every device type.
 */

/** Device-independent feature bit numbers. */
export const VirtioFeature = {
  NOTIFY_ON_EMPTY: 24,
  ANY_LAYOUT: 27,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
} as const;

/** Device status register bits (§2.1). */
export const DeviceStatus = {
  ACKNOWLEDGE: 0x01,
  DRIVER: 0x02,
  DRIVER_OK: 0x04,
  FEATURES_OK: 0x08,
  NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Feature words are 64-bit; bit numbers above 31 make plain `1 << n` wrong, so build them as bigint. */
export function featureMask(...bits: number[]): bigint {
  let mask = 0n;
  for (const bit of bits) mask |= 1n << BigInt(bit);
  return mask;
}

export function hasFeature(features: bigint, bit: number): boolean {
  return (features & (1n << BigInt(bit))) !== 0n;
}

/**
 * Reads a little-endian u64 as a Number without BigInt (two u32 reads). Values of 2^53 and above cannot be
 * represented exactly and come back as Infinity, which every range or address check then rejects.
 */
export function readLe64(view: DataView, offset: number): number {
  const lo = view.getUint32(offset, true);
  const hi = view.getUint32(offset + 4, true);
  return hi >= 0x200000 ? Infinity : hi * 0x1_0000_0000 + lo;
}
