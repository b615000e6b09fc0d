/**
 * The driver's 16-bit ring indices and the two notification decisions built on them (virtio 1.2 §2.7.7–2.7.10).
 * Pure: callers read the device-written fields from guest memory and pass them in.
 */
import { needsEvent, ringDistance, wrapIndex, USED_F_NO_NOTIFY } from '../../../protocol/split-ring.js';

export class RingIndices {
  /** Next avail.idx value the driver will publish (free-running mod 2^16). */
  availIdx: number;
  /** avail.idx at the last kick decision: the chains after it have not been notified yet. */
  lastKickAvailIdx: number;
  /** used.idx up to which entries have been reaped. */
  lastUsedIdx: number;
  /** used.idx up to which completions are known to have come with an interrupt (or were legitimately suppressed). */
  coveredUsedIdx: number;

  constructor(
    readonly queueSize: number,
    startIdx = 0,
  ) {
    this.availIdx = this.lastKickAvailIdx = this.lastUsedIdx = this.coveredUsedIdx = wrapIndex(startIdx);
  }

  /** Back to an empty ring whose indices start at `startIdx` (the SET_VRING_BASE value). */
  reset(startIdx = 0): void {
    this.availIdx = this.lastKickAvailIdx = this.lastUsedIdx = this.coveredUsedIdx = wrapIndex(startIdx);
  }

  /** Slot of the avail ring the next published head goes to; advances availIdx. */
  publish(): number {
    const slot = this.availIdx % this.queueSize;
    this.availIdx = wrapIndex(this.availIdx + 1);
    return slot;
  }

  /** Chains published but not yet seen in the used ring. */
  get outstanding(): number {
    return ringDistance(this.availIdx, this.lastUsedIdx);
  }

  /** Chains published since the last kick decision. */
  get unkicked(): number {
    return ringDistance(this.availIdx, this.lastKickAvailIdx);
  }

  /**
   * Must the driver kick now? Under EVENT_IDX the device's avail_event decides, otherwise used.flags NO_NOTIFY.
   * Either way the decision consumes the unkicked chains, as Linux's virtqueue_kick_prepare does.
   */
  decideKick(eventIdx: boolean, usedFlags: number, availEvent: number): boolean {
    const old = this.lastKickAvailIdx;
    this.lastKickAvailIdx = this.availIdx;
    if (old === this.availIdx) return false;
    if (eventIdx) return needsEvent(availEvent, this.availIdx, old);
    return (usedFlags & USED_F_NO_NOTIFY) === 0;
  }

  /** A forced kick also covers the unkicked chains. */
  markKicked(): void {
    this.lastKickAvailIdx = this.availIdx;
  }

  /**
   * How many new used entries `usedIdx` announces; throws RangeError when it runs ahead of what was published
   * (a back-end bug a test must see, not silently absorb).
   */
  newUsedCount(usedIdx: number): number {
    const count = ringDistance(usedIdx, this.lastUsedIdx);
    if (count > this.outstanding) {
      throw new RangeError(
        `used.idx ${usedIdx} is ${count} past the last reaped ${this.lastUsedIdx}, but only ${this.outstanding} chains are outstanding`,
      );
    }
    return count;
  }

  /** Slot of the used ring holding the next entry to reap; advances lastUsedIdx. */
  consumeUsed(): number {
    const slot = this.lastUsedIdx % this.queueSize;
    this.lastUsedIdx = wrapIndex(this.lastUsedIdx + 1);
    return slot;
  }

  /** An interrupt was observed while used.idx read `usedIdx`: every entry up to it is accounted for. */
  coverUpTo(usedIdx: number): void {
    this.coveredUsedIdx = wrapIndex(usedIdx);
  }

  /** Entries reaped but not (yet) covered by an interrupt; 0 when coverage is ahead of reaping. */
  get uncoveredReaped(): number {
    const behind = ringDistance(this.lastUsedIdx, this.coveredUsedIdx);
    return behind <= this.queueSize ? behind : 0;
  }
}
