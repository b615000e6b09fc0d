/**
 * Field-level access to one split virtqueue's three areas in guest memory (layout in protocol/split-ring.ts).
 * No bookkeeping and no validation of values: hostile tests use it to write anything a broken or malicious
 * guest could, and the well-behaved driver is built on top of it.
 */
import {
  AvailOffset,
  DESCRIPTOR_SIZE,
  UsedOffset,
  USED_ELEMENT_SIZE,
  availEventOffset,
  availRingBytes,
  descriptorTableBytes,
  usedEventOffset,
  usedRingBytes,
} from '../../../protocol/split-ring.js';
import type { GuestMemory } from './guest-memory.js';

export interface Descriptor {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** What callers may pass: guest addresses as Number (usual) or bigint (anything up to 2^64-1). */
export interface DescriptorInput {
  addr: number | bigint;
  len: number;
  flags: number;
  next: number;
}

function dataViewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

export function encodeDescriptorInto(view: DataView, offset: number, descriptor: DescriptorInput): void {
  view.setBigUint64(offset, BigInt.asUintN(64, BigInt(descriptor.addr)), true);
  view.setUint32(offset + 8, descriptor.len >>> 0, true);
  view.setUint16(offset + 12, descriptor.flags & 0xffff, true);
  view.setUint16(offset + 14, descriptor.next & 0xffff, true);
}

/** Writes a descriptor table (e.g. an indirect one) at any guest address. */
export function writeDescriptorTable(memory: GuestMemory, gpa: number, descriptors: readonly DescriptorInput[]): void {
  const view = dataViewOf(memory.view(gpa, descriptors.length * DESCRIPTOR_SIZE));
  descriptors.forEach((descriptor, i) => encodeDescriptorInto(view, i * DESCRIPTOR_SIZE, descriptor));
}

export class RingMemory {
  private readonly desc: DataView;
  private readonly avail: DataView;
  private readonly used: DataView;

  constructor(
    memory: GuestMemory,
    readonly size: number,
    readonly descGpa: number,
    readonly availGpa: number,
    readonly usedGpa: number,
  ) {
    this.desc = dataViewOf(memory.view(descGpa, descriptorTableBytes(size)));
    this.avail = dataViewOf(memory.view(availGpa, availRingBytes(size)));
    this.used = dataViewOf(memory.view(usedGpa, usedRingBytes(size)));
  }

  /** Zeroes all three areas (a fresh ring, as after device reset). */
  clear(): void {
    for (const view of [this.desc, this.avail, this.used]) new Uint8Array(view.buffer, view.byteOffset, view.byteLength).fill(0);
  }

  readDescriptor(index: number): Descriptor {
    const at = this.descOffset(index);
    return {
      addr: this.desc.getBigUint64(at, true),
      len: this.desc.getUint32(at + 8, true),
      flags: this.desc.getUint16(at + 12, true),
      next: this.desc.getUint16(at + 14, true),
    };
  }

  writeDescriptor(index: number, descriptor: DescriptorInput): void {
    encodeDescriptorInto(this.desc, this.descOffset(index), descriptor);
  }

  get availFlags(): number {
    return this.avail.getUint16(AvailOffset.flags, true);
  }

  set availFlags(value: number) {
    this.avail.setUint16(AvailOffset.flags, value & 0xffff, true);
  }

  get availIdx(): number {
    return this.avail.getUint16(AvailOffset.idx, true);
  }

  set availIdx(value: number) {
    this.avail.setUint16(AvailOffset.idx, value & 0xffff, true);
  }

  availRing(slot: number): number {
    return this.avail.getUint16(AvailOffset.ring + 2 * this.slot(slot), true);
  }

  setAvailRing(slot: number, head: number): void {
    this.avail.setUint16(AvailOffset.ring + 2 * this.slot(slot), head & 0xffff, true);
  }

  /** EVENT_IDX: "interrupt me once used.idx passes this". */
  get usedEvent(): number {
    return this.avail.getUint16(usedEventOffset(this.size), true);
  }

  set usedEvent(value: number) {
    this.avail.setUint16(usedEventOffset(this.size), value & 0xffff, true);
  }

  get usedFlags(): number {
    return this.used.getUint16(UsedOffset.flags, true);
  }

  get usedIdx(): number {
    return this.used.getUint16(UsedOffset.idx, true);
  }

  /** Device-side fields are writable too, to fake a state (e.g. a used.idx from a previous connection). */
  set usedIdx(value: number) {
    this.used.setUint16(UsedOffset.idx, value & 0xffff, true);
  }

  usedElement(slot: number): { id: number; len: number } {
    const at = UsedOffset.ring + USED_ELEMENT_SIZE * this.slot(slot);
    return { id: this.used.getUint32(at, true), len: this.used.getUint32(at + 4, true) };
  }

  /** EVENT_IDX: "kick me once avail.idx passes this". */
  get availEvent(): number {
    return this.used.getUint16(availEventOffset(this.size), true);
  }

  private descOffset(index: number): number {
    if (!Number.isInteger(index) || index < 0 || index >= this.size) {
      throw new RangeError(`descriptor index ${index} is outside the table of ${this.size}; write guest memory directly to go beyond`);
    }
    return index * DESCRIPTOR_SIZE;
  }

  private slot(slot: number): number {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.size) throw new RangeError(`ring slot ${slot} is outside 0..${this.size - 1}`);
    return slot;
  }
}
