/**
 * One queue's inflight region on its worker (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): which descriptor heads
 * were popped and not yet returned in the used ring, with the order they were popped in. The front-end keeps
 * the region across back-end restarts, so a back-end that died (kill -9) leaves behind exactly what its
 * successor must resubmit.
 *
 * Protocol (vhost-user spec, split ring; libvhost-user vu_queue_inflight_get / pre_put / post_put):
 * - pop:      desc[h].counter = counter++; desc[h].inflight = 1            (before the request has any effect)
 * - publish:  desc[h].next = last_batch_head; last_batch_head = h           (pre-put)
 *             used element + used.idx                                       (SplitQueue.pushUsed)
 *             desc[h].inflight = 0; used_idx = used.idx                     (post-put)
 *   A crash between used.idx and the post-put leaves used_idx behind used.idx: recovery clears the last batch.
 * - resume:   fix the last batch, then every entry still marked is resubmitted in counter order, and the next
 *             avail entry to pop is used.idx + (entries in flight) — every popped entry is either used or
 *             still marked, which is why dropped chains stay marked (they were popped and never used).
 *
 * Invariants: the region is the front-end's memory: every value read from it is checked (flag 0/1, heads and
 * batch links below the ring size, walks bounded); a region that fails a check is refused (InflightRegionError)
 * and the caller starts afresh. Flags and indices are written with Atomics.store so the stores land in program
 * order — what a process killed at any instruction leaves behind is a prefix of the protocol above.
 */
import koffi from 'koffi';
import { VublkError } from '../errors.js';
import {
  DESC_STATE_BYTES,
  DescStateOffset,
  INFLIGHT_VERSION,
  QUEUE_HEADER_BYTES,
  QueueHeaderOffset,
  type InflightQueueMapping,
} from './inflight-layout.js';

export class InflightRegionError extends VublkError {
  constructor(detail: string) {
    super('VUBLK_ERR_INFLIGHT_REGION', `inflight region refused: ${detail}`, { peerFault: true });
  }
}

/** What a resumed queue continues with. */
export interface InflightResume {
  /** The next avail index to pop: used.idx + entries in flight. */
  lastAvailIdx: number;
  /** Heads to resubmit, oldest first. */
  resubmit: number[];
  /** Entries of the last batch whose clear had not landed (crash between used.idx and the post-put). */
  batchFixed: number;
}

const TWO_32 = 0x1_0000_0000;

export class InflightQueue {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private readonly descNum: number;
  private counter = 0;
  /** Heads left by a previous back-end, oldest first, not yet resubmitted (from `resubmitNext`). */
  private resubmits: number[] = [];
  private resubmitNext = 0;

  constructor(mapping: InflightQueueMapping) {
    const needed = QUEUE_HEADER_BYTES + DESC_STATE_BYTES * mapping.descNum;
    if (mapping.bytes < needed)
      throw new InflightRegionError(
        `queue region of ${mapping.bytes} bytes is smaller than the ${needed} bytes ${mapping.descNum} descriptors need`,
      );
    if (mapping.hostAddr % 8 !== 0) throw new InflightRegionError('queue region is not 8-byte aligned');
    const buffer = koffi.view(mapping.hostAddr, needed);
    this.u8 = new Uint8Array(buffer);
    this.u16 = new Uint16Array(buffer);
    this.u32 = new Uint32Array(buffer);
    this.descNum = mapping.descNum;
  }

  private flagIndex(head: number): number {
    return QUEUE_HEADER_BYTES + DESC_STATE_BYTES * head + DescStateOffset.inflight;
  }

  private header16(offset: number): number {
    return Atomics.load(this.u16, offset >> 1);
  }

  private setHeader16(offset: number, value: number): void {
    Atomics.store(this.u16, offset >> 1, value);
  }

  private next(head: number): number {
    return Atomics.load(this.u16, (QUEUE_HEADER_BYTES + DESC_STATE_BYTES * head + DescStateOffset.next) >> 1);
  }

  private readCounter(head: number): number {
    const word = (QUEUE_HEADER_BYTES + DESC_STATE_BYTES * head + DescStateOffset.counter) >> 2;
    return (this.u32[word] ?? 0) + (this.u32[word + 1] ?? 0) * TWO_32;
  }

  /**
   * Takes over the region at ring start. An uninitialized region (version 0) is set up and the ring resumes at
   * the front-end's base; otherwise the region decides (see the file comment). Throws InflightRegionError
   * for a region that cannot be trusted.
   */
  resume(usedIdx: number, ringSize: number, frontendBase: number): InflightResume {
    const version = this.header16(QueueHeaderOffset.version);
    if (version === 0) {
      this.reset(usedIdx);
      return { lastAvailIdx: frontendBase & 0xffff, resubmit: [], batchFixed: 0 };
    }
    if (version !== INFLIGHT_VERSION) throw new InflightRegionError(`version ${version} (vublk knows ${INFLIGHT_VERSION})`);
    const descNum = this.header16(QueueHeaderOffset.descNum);
    if (descNum !== this.descNum)
      throw new InflightRegionError(`desc_num ${descNum} differs from the queue size ${this.descNum} of SET_INFLIGHT_FD`);
    if (ringSize > descNum) throw new InflightRegionError(`ring of ${ringSize} descriptors is larger than the region's ${descNum}`);
    // Check everything before changing anything: a refused region is left as it was found.
    const inflight: number[] = [];
    for (let head = 0; head < descNum; head++) {
      const flag = this.u8[this.flagIndex(head)] ?? 0;
      if (flag > 1) throw new InflightRegionError(`descriptor ${head} has inflight flag ${flag}`);
      if (flag === 1) {
        if (head >= ringSize)
          throw new InflightRegionError(`descriptor ${head} is marked in flight but the ring has ${ringSize} descriptors`);
        inflight.push(head);
      }
    }
    const regionUsed = this.header16(QueueHeaderOffset.usedIdx);
    const lastBatch = (usedIdx - regionUsed) & 0xffff;
    const batch: number[] = [];
    if (lastBatch !== 0) {
      if (lastBatch > ringSize)
        throw new InflightRegionError(
          `used_idx ${regionUsed} is ${lastBatch} behind used.idx ${usedIdx}, more than the ring size ${ringSize}`,
        );
      let head = this.header16(QueueHeaderOffset.lastBatchHead);
      for (let k = 0; k < lastBatch; k++) {
        if (head >= ringSize) throw new InflightRegionError(`last batch links to descriptor ${head}, outside the ring`);
        batch.push(head);
        head = this.next(head);
      }
    }
    // Commit the interrupted post-put: the batch reached the used ring.
    for (const head of batch) Atomics.store(this.u8, this.flagIndex(head), 0);
    this.setHeader16(QueueHeaderOffset.usedIdx, usedIdx);
    const pending = inflight.filter((head) => (this.u8[this.flagIndex(head)] ?? 0) === 1);
    if (pending.length > ringSize) throw new InflightRegionError(`${pending.length} entries in flight on a ring of ${ringSize}`);
    const withCounter = pending.map((head) => ({ head, counter: this.readCounter(head) }));
    withCounter.sort((a, b) => a.counter - b.counter || a.head - b.head);
    this.counter = withCounter.length > 0 ? withCounter[withCounter.length - 1]!.counter + 1 : 0;
    this.resubmits = withCounter.map((entry) => entry.head);
    this.resubmitNext = 0;
    return { lastAvailIdx: (usedIdx + pending.length) & 0xffff, resubmit: [...this.resubmits], batchFixed: batch.length };
  }

  /** Forgets everything: no entry in flight, version set, used_idx in step with the ring. */
  reset(usedIdx: number): void {
    this.u8.fill(0);
    this.setHeader16(QueueHeaderOffset.descNum, this.descNum);
    this.setHeader16(QueueHeaderOffset.usedIdx, usedIdx & 0xffff);
    this.setHeader16(QueueHeaderOffset.version, INFLIGHT_VERSION);
    this.counter = 0;
    this.resubmits = [];
    this.resubmitNext = 0;
  }

  /** Requests of a previous back-end still to resubmit. */
  get resubmitsLeft(): number {
    return this.resubmits.length - this.resubmitNext;
  }

  /** The oldest head still to resubmit (it stays marked in flight, with its original counter). */
  takeResubmit(): number {
    return this.resubmits[this.resubmitNext++] ?? 0;
  }

  /** Gives back the head last taken (the back-end had no room): it is resubmitted again first. */
  untakeResubmit(): void {
    if (this.resubmitNext > 0) this.resubmitNext--;
  }

  /** A head was popped from the avail ring: recorded before the request has any effect. */
  popped(head: number): void {
    if (head >= this.descNum) return;
    const word = (QUEUE_HEADER_BYTES + DESC_STATE_BYTES * head + DescStateOffset.counter) >> 2;
    const counter = this.counter++;
    this.u32[word] = counter >>> 0;
    this.u32[word + 1] = Math.floor(counter / TWO_32);
    Atomics.store(this.u8, this.flagIndex(head), 1);
  }

  /** The head popped last was put back into the avail ring (throttle stall, no room): not in flight. */
  unpopped(head: number): void {
    if (head >= this.descNum) return;
    Atomics.store(this.u8, this.flagIndex(head), 0);
    this.counter--;
  }

  /** Pre-put: the head joins the batch about to reach the used ring. */
  beforeUsed(head: number): void {
    if (head >= this.descNum) return;
    const nextIndex = (QUEUE_HEADER_BYTES + DESC_STATE_BYTES * head + DescStateOffset.next) >> 1;
    Atomics.store(this.u16, nextIndex, this.header16(QueueHeaderOffset.lastBatchHead));
    this.setHeader16(QueueHeaderOffset.lastBatchHead, head);
  }

  /** Post-put: the used element and used.idx are published; the head is no longer in flight. */
  afterUsed(head: number, usedIdx: number): void {
    if (head >= this.descNum) return;
    Atomics.store(this.u8, this.flagIndex(head), 0);
    this.setHeader16(QueueHeaderOffset.usedIdx, usedIdx);
  }

  /** Heads currently marked in flight (tests and diagnostics). */
  markedHeads(): number[] {
    const heads: number[] = [];
    for (let head = 0; head < this.descNum; head++) if ((this.u8[this.flagIndex(head)] ?? 0) === 1) heads.push(head);
    return heads;
  }
}
