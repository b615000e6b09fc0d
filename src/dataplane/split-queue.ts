/**
 * The device side of one split virtqueue living in guest memory: reading avail entries, publishing used
 * entries, and the notification-suppression protocol (plain flags or EVENT_IDX). Ring memory is resolved
 * once per start (and again after a memory-table change) into typed arrays over guest memory.
 */
import {
  AVAIL_F_NO_INTERRUPT,
  USED_F_NO_NOTIFY,
  availRingBytes,
  descriptorTableBytes,
  needsEvent,
  ringDistance,
  usedRingBytes,
} from '../../protocol/split-ring.js';
import type { GuestMemory } from './guest-memory.js';
import { VublkError } from '../errors.js';
import type { RingDirtyLog } from './dirty-log.js';

/** Guest-physical ring addresses as configured by SET_VRING_NUM/ADDR. */
export interface RingLayout {
  size: number;
  descGpa: number;
  availGpa: number;
  usedGpa: number;
}

export class RingMappingError extends VublkError {
  constructor(detail: string) {
    super('VUBLK_ERR_RING_MAPPING', `ring not usable: ${detail}`, { peerFault: true });
  }
}

export class SplitQueue {
  /** Descriptor table as a DataView plus the byte offset of entry 0. */
  readonly descView: DataView;
  readonly descBase: number;
  private readonly avail: Uint16Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  readonly size: number;
  private readonly mask: number;
  /** Next avail ring position the device will consume (free-running, mod 2^16). */
  lastAvailIdx: number;
  /** Next used ring position the device will fill (free-running, mod 2^16). */
  usedIdx: number;
  /** Live migration: every write to the used ring is marked here (after the write). */
  dirtyLog: RingDirtyLog | null = null;

  constructor(
    memory: GuestMemory,
    layout: RingLayout,
    readonly eventIdx: boolean,
    lastAvailIdx: number,
  ) {
    const { size, descGpa, availGpa, usedGpa } = layout;
    if (descGpa % 16 !== 0 || availGpa % 2 !== 0 || usedGpa % 4 !== 0) {
      throw new RingMappingError(
        `misaligned ring (desc 0x${descGpa.toString(16)}, avail 0x${availGpa.toString(16)}, used 0x${usedGpa.toString(16)})`,
      );
    }
    const desc = memory.slice(descGpa, descriptorTableBytes(size));
    const avail = memory.slice(availGpa, availRingBytes(size));
    const used = memory.slice(usedGpa, usedRingBytes(size));
    if (desc === null) throw new RingMappingError(`descriptor table at 0x${descGpa.toString(16)} is outside guest memory`);
    if (avail === null) throw new RingMappingError(`avail ring at 0x${availGpa.toString(16)} is outside guest memory`);
    if (used === null) throw new RingMappingError(`used ring at 0x${usedGpa.toString(16)} is outside guest memory`);
    this.descView = desc.view;
    this.descBase = desc.offset;
    // Windows start at page-aligned host addresses, so guest alignment carries over to the typed arrays.
    this.avail = new Uint16Array(avail.bytes.buffer, avail.offset, 3 + size);
    this.used16 = new Uint16Array(used.bytes.buffer, used.offset, 3 + size * 4);
    this.used32 = new Uint32Array(used.bytes.buffer, used.offset, 1 + size * 2);
    this.size = size;
    this.mask = size - 1;
    this.lastAvailIdx = lastAvailIdx & 0xffff;
    this.usedIdx = Atomics.load(this.used16, 1);
  }

  /** avail.idx, with acquire ordering relative to the ring entries read after it. */
  availIdx(): number {
    return Atomics.load(this.avail, 1);
  }

  /** Entries published by the driver and not consumed yet; may exceed size if the driver is broken. */
  pending(): number {
    return ringDistance(this.availIdx(), this.lastAvailIdx);
  }

  /** Head descriptor index at the next avail position; advances lastAvailIdx. */
  popHead(): number {
    const head = this.avail[2 + (this.lastAvailIdx & this.mask)] ?? 0;
    this.lastAvailIdx = (this.lastAvailIdx + 1) & 0xffff;
    return head;
  }

  /** Puts the last popped head back (throttle stall): it will be popped again, so order is kept. */
  unpop(): void {
    this.lastAvailIdx = (this.lastAvailIdx - 1) & 0xffff;
  }

  /** Writes a used element and publishes used.idx (a full barrier, so the element is visible first). */
  pushUsed(head: number, length: number): void {
    const slot = 1 + 2 * (this.usedIdx & this.mask);
    this.used32[slot] = head;
    this.used32[slot + 1] = length;
    this.dirtyLog?.markUsed(slot * 4, 8);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    Atomics.store(this.used16, 1, this.usedIdx);
    this.dirtyLog?.markUsed(2, 2);
  }

  /** Asks the driver not to kick while we drain (no-op under EVENT_IDX: we simply don't move avail_event). */
  suppressKicks(): void {
    if (!this.eventIdx) {
      Atomics.store(this.used16, 0, USED_F_NO_NOTIFY);
      this.dirtyLog?.markUsed(0, 2);
    }
  }

  /**
   * Re-arms kicks and reports whether entries arrived meanwhile (then the caller drains again, so no request
   * is stranded between its last pop and the re-arm).
   */
  rearmKicks(): boolean {
    if (this.eventIdx) {
      Atomics.store(this.used16, 2 + 4 * this.size, this.lastAvailIdx);
      this.dirtyLog?.markUsed(4 + 8 * this.size, 2);
    } else {
      Atomics.store(this.used16, 0, 0);
      this.dirtyLog?.markUsed(0, 2);
    }
    return this.availIdx() !== this.lastAvailIdx;
  }

  /** Whether the driver wants an interrupt for used entries published since `usedIdxBefore`. */
  shouldInterrupt(usedIdxBefore: number): boolean {
    if (this.usedIdx === usedIdxBefore) return false;
    if (this.eventIdx) {
      const usedEvent = Atomics.load(this.avail, 2 + this.size);
      return needsEvent(usedEvent, this.usedIdx, usedIdxBefore);
    }
    return (Atomics.load(this.avail, 0) & AVAIL_F_NO_INTERRUPT) === 0;
  }
}
