/**
 * Hand-written descriptor chains on a front-end queue, for tests of malformed requests. Descriptor indices
 * are taken from (and tracked in) the queue's own free list, so hand-written chains and VirtioBlkDriver
 * requests can share a queue: a completed chain is reaped like any other, and a chain the back-end drops is
 * forgotten explicitly with `forget()` once the test has seen that no used element came for it.
 */
import { DescFlag, DESCRIPTOR_SIZE } from '../../protocol/split-ring.js';
import { encodeRequestHeader } from '../../protocol/virtio-blk.js';
import {
  MissingCompletionError,
  writeDescriptorTable,
  type DescriptorInput,
  type GuestAllocOptions,
  type UsedElement,
  type VhostUserFrontend,
  type VirtqueueDriver,
} from '../../bench/src/frontend/index.js';

export interface RawDescriptor {
  addr: number | bigint;
  len: number;
  /** Device-writable (VIRTQ_DESC_F_WRITE). */
  write?: boolean;
  /** Extra flag bits ORed into the computed ones (e.g. DescFlag.INDIRECT). */
  flags?: number;
  /** The exact flags (NEXT is then not computed). */
  rawFlags?: number;
  /** `next` as a position in this chain (e.g. 0 for a loop back to the head) or { index } as a raw table index. */
  next?: number | { index: number };
}

export interface RawChainOptions {
  /** Put the descriptors in an indirect table; the ring gets one INDIRECT descriptor. */
  indirect?: boolean;
  /** Length written into the INDIRECT descriptor (default: the table's size). */
  indirectLen?: number;
  /** Extra flags on the INDIRECT descriptor (e.g. NEXT). */
  indirectFlags?: number;
  /** Publish without kicking. */
  kick?: boolean;
}

export interface RawChain {
  head: number;
  /** Guest address of the indirect table, if any. */
  table: number | null;
}

/** Status pre-filled into status buffers, so an unwritten status byte is visible. */
export const STATUS_UNSET = 0xff;

export class ChainBuilder {
  private readonly allocations: number[] = [];

  constructor(
    readonly frontend: VhostUserFrontend,
    readonly queueIndex = 0,
  ) {}

  get queue(): VirtqueueDriver {
    return this.frontend.queue(this.queueIndex);
  }

  /** A guest buffer of `len` bytes (at least 1 is allocated), filled with `fill` (a byte or the content). */
  alloc(len: number, fill: number | Uint8Array = 0, options: GuestAllocOptions = {}): number {
    const memory = this.frontend.memory;
    const gpa = memory.alloc(Math.max(len, 1), { align: 16, ...options });
    this.allocations.push(gpa);
    if (typeof fill === 'number') memory.fill(gpa, Math.max(len, 1), fill);
    else memory.write(gpa, fill);
    return gpa;
  }

  /** A 16-byte request header. */
  header(type: number, sector = 0, ioprio = 0): number {
    return this.alloc(16, encodeRequestHeader({ type, sector, ioprio }));
  }

  /** A status buffer of `len` bytes pre-filled with STATUS_UNSET; the status is its last byte. */
  status(len = 1): number {
    return this.alloc(len, STATUS_UNSET);
  }

  readByte(gpa: number): number {
    return this.frontend.memory.read(gpa, 1)[0] as number;
  }

  read(gpa: number, len: number): Buffer {
    return this.frontend.memory.read(gpa, len);
  }

  /** Writes the chain into the descriptor table (or an indirect table), publishes its head and kicks. */
  submit(descriptors: readonly RawDescriptor[], options: RawChainOptions = {}): RawChain {
    const queue = this.queue;
    const count = descriptors.length;
    const encode = (d: RawDescriptor, i: number, position: (p: number) => number): DescriptorInput => {
      const next =
        d.next === undefined ? (i + 1 < count ? position(i + 1) : 0) : typeof d.next === 'number' ? position(d.next) : d.next.index;
      const flags = d.rawFlags ?? (d.write ? DescFlag.WRITE : 0) | (i + 1 < count ? DescFlag.NEXT : 0) | (d.flags ?? 0);
      return { addr: d.addr, len: d.len, flags, next };
    };
    let chain: RawChain;
    if (options.indirect) {
      const ids = this.take(1);
      const head = ids[0] as number;
      const table = this.alloc(Math.max(count, 1) * DESCRIPTOR_SIZE, 0);
      writeDescriptorTable(
        this.frontend.memory,
        table,
        descriptors.map((d, i) => encode(d, i, (p) => p)),
      );
      queue.ring.writeDescriptor(head, {
        addr: table,
        len: options.indirectLen ?? count * DESCRIPTOR_SIZE,
        flags: DescFlag.INDIRECT | (options.indirectFlags ?? 0),
        next: 0,
      });
      queue.descriptors.track({ head, descriptors: ids, indirectTable: null, token: undefined });
      chain = { head, table };
    } else {
      const ids = this.take(count);
      descriptors.forEach((d, i) =>
        queue.ring.writeDescriptor(
          ids[i] as number,
          encode(d, i, (p) => ids[p] ?? 0),
        ),
      );
      queue.descriptors.track({ head: ids[0] as number, descriptors: ids, indirectTable: null, token: undefined });
      chain = { head: ids[0] as number, table: null };
    }
    queue.publish(chain.head);
    if (options.kick ?? true) queue.kick({ force: true });
    return chain;
  }

  /** Waits for the chain's used element. */
  async completion(chain: RawChain, timeoutMs = 5_000): Promise<UsedElement> {
    const elements = await this.queue.waitUsed({ min: 1, timeoutMs });
    const mine = elements.find((e) => e.id === chain.head);
    if (mine === undefined || elements.length !== 1) {
      throw new Error(`expected one used element for head ${chain.head}, got ${JSON.stringify(elements.map((e) => [e.id, e.len]))}`);
    }
    return mine;
  }

  /**
   * Asserts that no used element arrives within `timeoutMs` (the back-end dropped the chain), then forgets the
   * chain so its descriptors can be reused. Throws if anything completed.
   */
  async expectNoCompletion(chain: RawChain, timeoutMs = 300): Promise<void> {
    try {
      const elements = await this.queue.waitUsed({ min: 1, timeoutMs });
      throw new Error(
        `head ${chain.head} should have been dropped, but used elements arrived: ${JSON.stringify(elements.map((e) => [e.id, e.len]))}`,
      );
    } catch (error) {
      if (!(error instanceof MissingCompletionError)) throw error;
      if (error.elements.length !== 0)
        throw new Error(`unexpected used elements: ${JSON.stringify(error.elements.map((e) => [e.id, e.len]))}`);
    }
    // Also nothing published without an interrupt: used.idx is where the driver last reaped.
    const { usedIdx } = this.queue.ring;
    if (usedIdx !== this.queue.indices.lastUsedIdx) {
      throw new Error(
        `head ${chain.head} should have been dropped, but used.idx moved to ${usedIdx} (reaped up to ${this.queue.indices.lastUsedIdx})`,
      );
    }
    this.forget(chain);
  }

  /** Frees the descriptors of a chain that will never complete. */
  forget(chain: RawChain): void {
    this.queue.descriptors.complete(chain.head);
  }

  /** Frees every buffer this builder allocated (after the chains are done or the queue was reset). */
  release(): void {
    const memory = this.frontend.memory;
    if (memory.isClosed) return;
    for (const gpa of this.allocations.splice(0)) memory.free(gpa);
  }

  private take(count: number): number[] {
    const ids = this.queue.descriptors.take(count);
    if (ids === null) throw new Error(`queue ${this.queueIndex}: ${count} descriptors needed, ${this.queue.descriptors.freeCount} free`);
    return ids;
  }
}

/**
 * Ring restart as QEMU does it after a vring error: GET_VRING_BASE (stops the ring, clears poison), then a
 * fresh ring at that index (SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR). Returns the base.
 */
export async function restartQueue(frontend: VhostUserFrontend, index: number): Promise<number> {
  const base = await frontend.stopQueue(index);
  frontend.queue(index).reset(base);
  await frontend.startQueue(index, base);
  return base;
}
