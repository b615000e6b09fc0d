/**
 * The DRIVER side of one split virtqueue, as a well-behaved guest runs it: build descriptor chains (direct or
 * indirect), publish them, kick (honouring the device's suppression unless told otherwise), and reap used
 * entries while checking that each one came with an interrupt. `ring` gives raw access for hostile tests.
 */
import {
  DescFlag,
  DESCRIPTOR_SIZE,
  availRingBytes,
  descriptorTableBytes,
  isValidQueueSize,
  usedRingBytes,
} from '../../../protocol/split-ring.js';
import { createEventFd, drainEventFd, signalEventFd } from '../../../src/sys/eventfd.js';
import { closeFd } from '../../../src/sys/fd.js';
import type { GuestAllocOptions, GuestMemory } from './guest-memory.js';
import { RingMemory, writeDescriptorTable, type DescriptorInput } from './ring-memory.js';
import { RingIndices } from './ring-indices.js';
import { DescriptorFreeList } from './descriptor-free-list.js';
import { memoryFence } from './memory-fence.js';
import { FdWatcher, NOT_YET } from './fd-watcher.js';
import type { UsedElement } from './used-element.js';
import {
  FrontendClosedError,
  FrontendError,
  FrontendTimeoutError,
  MissingCompletionError,
  MissingInterruptError,
  RingFullError,
  UsedRingError,
} from './errors.js';

/** One buffer of a chain. `gpa` may be a bigint to describe addresses no region covers (hostile tests). */
export interface BufferSpec {
  gpa: number | bigint;
  len: number;
  writable: boolean;
}

export interface ChainOptions {
  /** Put the buffers in an indirect table; the ring gets a single INDIRECT descriptor. */
  indirect?: boolean;
  /** Returned with the used element. */
  token?: unknown;
}

export type KickPolicy = 'honour' | 'always';

export interface VirtqueueOptions {
  index: number;
  size: number;
  /** VIRTIO_RING_F_EVENT_IDX was negotiated: use used_event / avail_event instead of the flags. */
  eventIdx: boolean;
  /** 'honour' skips kicks the device suppressed (NO_NOTIFY / avail_event); 'always' kicks after every batch. */
  kickPolicy?: KickPolicy;
  /** Give the back-end a call eventfd (else it gets VRING_NOFD and the driver polls the used ring). */
  useCallFd?: boolean;
  /** Default for waitUsed: a completion without an interrupt is an error. */
  requireInterrupts?: boolean;
  timeoutMs?: number;
  /** How often a wait re-reads used.idx when no interrupt comes. */
  recheckMs?: number;
  /** Where ring areas and indirect tables are allocated. */
  placement?: GuestAllocOptions;
}

export interface WaitUsedOptions {
  /** Return once at least this many entries were reaped. Default 1. */
  min?: number;
  timeoutMs?: number;
  requireInterrupt?: boolean;
}

export interface VirtqueueStats {
  kicks: number;
  suppressedKicks: number;
  interrupts: number;
  completions: number;
}

const RING_ALIGN = 4096;

export class VirtqueueDriver {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly ring: RingMemory;
  readonly kickFd: number;
  /** -1 when the ring runs without a call eventfd. */
  readonly callFd: number;
  readonly errFd: number;
  readonly indices: RingIndices;
  readonly descriptors: DescriptorFreeList;
  readonly stats: VirtqueueStats = { kicks: 0, suppressedKicks: 0, interrupts: 0, completions: 0 };
  kickPolicy: KickPolicy;
  requireInterrupts: boolean;
  /** When false, used ids that are not in-flight heads are returned (token undefined) instead of throwing. */
  strictUsed = true;
  timeoutMs: number;
  private readonly recheckMs: number;
  private readonly placement: GuestAllocOptions;
  private readonly watcher: FdWatcher;
  /** Reaped but not yet handed to a waiter (e.g. still waiting for their interrupt). */
  private pending: UsedElement[] = [];
  private readonly ringAllocations: number[];
  private closed = false;

  constructor(
    private readonly memory: GuestMemory,
    options: VirtqueueOptions,
  ) {
    if (!isValidQueueSize(options.size)) throw new FrontendError(`queue size ${options.size} is not a power of two in 1..32768`);
    this.index = options.index;
    this.size = options.size;
    this.eventIdx = options.eventIdx;
    this.kickPolicy = options.kickPolicy ?? 'honour';
    this.timeoutMs = options.timeoutMs ?? 5000;
    this.recheckMs = options.recheckMs ?? 10;
    this.placement = options.placement ?? {};
    const useCallFd = options.useCallFd ?? true;
    this.requireInterrupts = useCallFd && (options.requireInterrupts ?? true);

    const ringOptions = { ...this.placement, align: RING_ALIGN };
    const descGpa = memory.alloc(descriptorTableBytes(this.size), ringOptions);
    const availGpa = memory.alloc(availRingBytes(this.size), ringOptions);
    const usedGpa = memory.alloc(usedRingBytes(this.size), ringOptions);
    this.ringAllocations = [descGpa, availGpa, usedGpa];
    this.ring = new RingMemory(memory, this.size, descGpa, availGpa, usedGpa);
    this.ring.clear();
    this.indices = new RingIndices(this.size);
    this.descriptors = new DescriptorFreeList(this.size);

    this.kickFd = createEventFd();
    this.callFd = useCallFd ? createEventFd() : -1;
    this.errFd = createEventFd();
    this.watcher = new FdWatcher(this.callFd);
  }

  get descGpa(): number {
    return this.ring.descGpa;
  }

  get availGpa(): number {
    return this.ring.availGpa;
  }

  get usedGpa(): number {
    return this.ring.usedGpa;
  }

  get freeDescriptors(): number {
    return this.descriptors.freeCount;
  }

  /** Chains made available and not yet reaped. */
  get inflight(): number {
    return this.descriptors.inflightCount;
  }

  /** Writes the chain's descriptors (not yet visible to the device) and returns its head index. */
  addChain(buffers: readonly BufferSpec[], options: ChainOptions = {}): number {
    this.assertOpen();
    if (buffers.length === 0) throw new FrontendError(`queue ${this.index}: a chain needs at least one buffer`);
    const table: DescriptorInput[] = buffers.map((buffer, i) => ({
      addr: buffer.gpa,
      len: buffer.len,
      flags: (buffer.writable ? DescFlag.WRITE : 0) | (i < buffers.length - 1 ? DescFlag.NEXT : 0),
      next: i + 1,
    }));
    if (options.indirect) {
      const ids = this.takeDescriptors(1);
      const head = ids[0] as number;
      let tableGpa: number;
      try {
        tableGpa = this.memory.alloc(table.length * DESCRIPTOR_SIZE, { ...this.placement, align: DESCRIPTOR_SIZE });
      } catch (error) {
        this.descriptors.giveBack(ids);
        throw error;
      }
      writeDescriptorTable(this.memory, tableGpa, table);
      this.ring.writeDescriptor(head, { addr: tableGpa, len: table.length * DESCRIPTOR_SIZE, flags: DescFlag.INDIRECT, next: 0 });
      this.descriptors.track({ head, descriptors: ids, indirectTable: tableGpa, token: options.token });
      return head;
    }
    const ids = this.takeDescriptors(table.length);
    table.forEach((descriptor, i) => this.ring.writeDescriptor(ids[i] as number, { ...descriptor, next: ids[i + 1] ?? 0 }));
    const head = ids[0] as number;
    this.descriptors.track({ head, descriptors: ids, indirectTable: null, token: options.token });
    return head;
  }

  /** Makes a head available: ring entry first, then (after a barrier) avail.idx. Does not kick. */
  publish(head: number): void {
    this.assertOpen();
    const slot = this.indices.publish();
    this.ring.setAvailRing(slot, head);
    memoryFence();
    this.ring.availIdx = this.indices.availIdx;
  }

  submit(buffers: readonly BufferSpec[], options: ChainOptions = {}): number {
    const head = this.addChain(buffers, options);
    this.publish(head);
    return head;
  }

  /** Notifies the device of the chains published since the last kick; `force` ignores suppression. True if kicked. */
  kick(options: { force?: boolean } = {}): boolean {
    this.assertOpen();
    memoryFence();
    const wanted = this.indices.decideKick(this.eventIdx, this.ring.usedFlags, this.ring.availEvent);
    if (options.force || this.kickPolicy === 'always' || wanted) {
      signalEventFd(this.kickFd);
      this.stats.kicks++;
      return true;
    }
    this.stats.suppressedKicks++;
    return false;
  }

  /** Drains the call eventfd and reaps every visible used entry (non-blocking). */
  poll(): UsedElement[] {
    this.assertOpen();
    const interrupts = this.callFd >= 0 ? drainEventFd(this.callFd) : 0;
    memoryFence();
    const usedIdx = this.ring.usedIdx;
    if (interrupts > 0) {
      this.stats.interrupts += interrupts;
      this.indices.coverUpTo(usedIdx);
    }
    const reaped = this.reapUpTo(usedIdx);
    if (this.eventIdx) {
      // Re-arm used_event at what was reaped, then re-check, until used.idx stands still (Linux's
      // virtqueue_enable_cb + virtqueue_poll loop). Entries pushed while used_event was stale may legitimately
      // have come without an interrupt, so they count as covered if everything before them was; once the loop
      // ends, used_event equals used.idx and the next completion must interrupt.
      // Exception, when interrupts are required: used_event never moves past an entry still waiting for its
      // interrupt. The device reads used_event after publishing, so an entry reaped (by polling) before its
      // interrupt arrived, with used_event then moved past it, may legitimately get no interrupt at all, and
      // the wait would blame the device. Left at the first uncovered entry, used_event keeps that interrupt owed.
      const fullyCovered = this.indices.uncoveredReaped === 0;
      for (;;) {
        const holdForInterrupt = this.requireInterrupts && this.indices.uncoveredReaped > 0;
        this.ring.usedEvent = holdForInterrupt ? this.indices.coveredUsedIdx : this.indices.lastUsedIdx;
        memoryFence();
        const again = this.ring.usedIdx;
        if (again === this.indices.lastUsedIdx) break;
        reaped.push(...this.reapUpTo(again));
        if (fullyCovered) this.indices.coverUpTo(again);
      }
    }
    this.pending.push(...reaped);
    return reaped;
  }

  /** Takes everything reaped so far (by poll or an earlier wait) without waiting. */
  takeReaped(): UsedElement[] {
    this.poll();
    return this.pending.splice(0);
  }

  /**
   * Waits until at least `min` entries were reaped and — if interrupts are required — every reaped entry was
   * announced through the call eventfd. Distinguishes a missing completion from a missing interrupt.
   */
  async waitUsed(options: WaitUsedOptions = {}): Promise<UsedElement[]> {
    const min = options.min ?? 1;
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const requireInterrupt = this.callFd >= 0 && (options.requireInterrupt ?? this.requireInterrupts);
    const ready = (): boolean => this.pending.length >= min && (!requireInterrupt || this.indices.uncoveredReaped === 0);
    try {
      return await this.watcher.until(
        () => {
          this.poll();
          return ready() ? this.pending.splice(0) : NOT_YET;
        },
        { timeoutMs, recheckMs: this.recheckMs, what: `${min} used entr${min === 1 ? 'y' : 'ies'} on queue ${this.index}` },
      );
    } catch (error) {
      if (!(error instanceof FrontendTimeoutError)) throw error;
      const elements = this.pending.splice(0);
      const what = error.waitedFor;
      if (elements.length >= min) {
        const uncovered = this.indices.uncoveredReaped;
        this.indices.coverUpTo(this.indices.lastUsedIdx);
        throw new MissingInterruptError(
          `an interrupt on queue ${this.index}`,
          timeoutMs,
          `${uncovered} of ${elements.length} completions arrived in the used ring but the call eventfd was never signalled (${this.describe()})`,
          elements,
        );
      }
      throw new MissingCompletionError(what, timeoutMs, `${elements.length} arrived; ${this.describe()}`, elements);
    }
  }

  /** How often the back-end signalled the error eventfd since the last call (non-blocking). */
  errorSignals(): number {
    this.assertOpen();
    return drainEventFd(this.errFd);
  }

  /** Ring state for error messages and debugging. */
  describe(): string {
    return (
      `avail.idx ${this.ring.availIdx}, used.idx ${this.ring.usedIdx}, reaped up to ${this.indices.lastUsedIdx}, ` +
      `${this.inflight} in flight, ${this.indices.unkicked} published since the last kick decision, ` +
      `used.flags 0x${this.ring.usedFlags.toString(16)}${this.eventIdx ? `, avail_event ${this.ring.availEvent}` : ''}`
    );
  }

  /**
   * Forgets all in-flight chains and restarts the indices at `startIdx` (the value sent with SET_VRING_BASE).
   * Returns the tokens of the dropped chains so their owners can release buffers.
   */
  reset(startIdx = 0, clearRing = true): unknown[] {
    this.assertOpen();
    const dropped = this.descriptors.reset();
    for (const chain of dropped) if (chain.indirectTable !== null) this.memory.free(chain.indirectTable);
    this.pending = [];
    if (clearRing) this.ring.clear();
    this.indices.reset(startIdx);
    // As if every earlier request had completed: avail.idx = used.idx = base, which is what a back-end
    // resuming at `base` expects to find (libvhost-user rewinds to used.idx otherwise).
    this.ring.availIdx = this.indices.availIdx;
    this.ring.usedIdx = this.indices.availIdx;
    this.ring.usedEvent = this.indices.availIdx;
    if (this.callFd >= 0) drainEventFd(this.callFd);
    return dropped.map((chain) => chain.token);
  }

  /** Closes the eventfds and gives the ring memory back (if the guest memory is still mapped). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    closeFd(this.kickFd);
    closeFd(this.callFd);
    closeFd(this.errFd);
    if (!this.memory.isClosed) {
      for (const chain of this.descriptors.reset()) if (chain.indirectTable !== null) this.memory.free(chain.indirectTable);
      for (const gpa of this.ringAllocations) this.memory.free(gpa);
    }
  }

  private takeDescriptors(count: number): number[] {
    const ids = this.descriptors.take(count);
    if (ids === null) throw new RingFullError(this.index, count, this.descriptors.freeCount);
    return ids;
  }

  private reapUpTo(usedIdx: number): UsedElement[] {
    let count: number;
    try {
      count = this.indices.newUsedCount(usedIdx);
    } catch (error) {
      throw new UsedRingError(this.index, (error as Error).message);
    }
    const reaped: UsedElement[] = [];
    for (let i = 0; i < count; i++) {
      const slot = this.indices.consumeUsed();
      const { id, len } = this.ring.usedElement(slot);
      const chain = id < this.size ? this.descriptors.complete(id) : null;
      if (chain === null && this.strictUsed) {
        throw new UsedRingError(this.index, `used ring slot ${slot} names descriptor ${id}, which is not the head of an in-flight chain`);
      }
      if (chain?.indirectTable != null) this.memory.free(chain.indirectTable);
      reaped.push({ id, len, token: chain?.token });
      this.stats.completions++;
    }
    return reaped;
  }

  private assertOpen(): void {
    if (this.closed) throw new FrontendClosedError(`queue ${this.index}`);
  }
}
