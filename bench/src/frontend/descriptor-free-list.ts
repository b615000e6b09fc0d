/**
 * Driver-side bookkeeping of a split ring's descriptor table: which descriptor indices are free, and which
 * chains are in flight (head → descriptor indices + submitter's token). Pure: no guest memory access.
 */

export interface InflightChain {
  head: number;
  /** Every descriptor index of the chain in the main table (one, for an indirect chain). */
  descriptors: number[];
  /** Guest address of the indirect table owned by this chain, to be freed with it. */
  indirectTable: number | null;
  token: unknown;
}

export class DescriptorFreeList {
  /** LIFO stack of free indices: recently freed descriptors are reused first, like Linux does. */
  private readonly freeStack: number[] = [];
  private readonly inflight = new Map<number, InflightChain>();

  constructor(readonly size: number) {
    for (let i = size - 1; i >= 0; i--) this.freeStack.push(i);
  }

  get freeCount(): number {
    return this.freeStack.length;
  }

  get inflightCount(): number {
    return this.inflight.size;
  }

  /** Takes `count` free indices, or returns null (taking none) if there are not enough. */
  take(count: number): number[] | null {
    if (count <= 0 || count > this.freeStack.length) return null;
    const taken: number[] = [];
    for (let i = 0; i < count; i++) taken.push(this.freeStack.pop() as number);
    return taken;
  }

  /** Gives indices back without them ever having been in flight (e.g. a chain that failed to build). */
  giveBack(indices: readonly number[]): void {
    for (let i = indices.length - 1; i >= 0; i--) this.freeStack.push(indices[i] as number);
  }

  track(chain: InflightChain): void {
    if (this.inflight.has(chain.head)) throw new RangeError(`descriptor ${chain.head} is already the head of an in-flight chain`);
    this.inflight.set(chain.head, chain);
  }

  isInflight(head: number): boolean {
    return this.inflight.has(head);
  }

  /** Ends the chain headed by `head` and frees its descriptors; null if `head` is not an in-flight head. */
  complete(head: number): InflightChain | null {
    const chain = this.inflight.get(head);
    if (chain === undefined) return null;
    this.inflight.delete(head);
    this.giveBack(chain.descriptors);
    return chain;
  }

  heads(): number[] {
    return [...this.inflight.keys()];
  }

  /** Forgets all in-flight chains (after the back-end was reset); returns them so owners can free buffers. */
  reset(): InflightChain[] {
    const chains = [...this.inflight.values()];
    this.inflight.clear();
    this.freeStack.length = 0;
    for (let i = this.size - 1; i >= 0; i--) this.freeStack.push(i);
    return chains;
  }
}
