import { describe, it, expect } from 'vitest';
import { RingIndices } from '../../bench/src/frontend/ring-indices.js';
import { DescriptorFreeList } from '../../bench/src/frontend/descriptor-free-list.js';
import { USED_F_NO_NOTIFY } from '../../protocol/split-ring.js';

describe('DescriptorFreeList', () => {
  it('takes all-or-nothing and frees a chain on completion', () => {
    const list = new DescriptorFreeList(4);
    const chain = list.take(3) as number[];
    expect(chain).toEqual([0, 1, 2]);
    expect(list.take(2)).toBeNull();
    expect(list.freeCount).toBe(1);
    list.track({ head: 0, descriptors: chain, indirectTable: null, token: 'a' });
    expect(list.isInflight(0)).toBe(true);
    expect(list.complete(1)).toBeNull();
    expect(list.complete(0)?.token).toBe('a');
    expect(list.freeCount).toBe(4);
    expect(list.inflightCount).toBe(0);
  });

  it('refuses to track the same head twice', () => {
    const list = new DescriptorFreeList(2);
    list.track({ head: 0, descriptors: [0], indirectTable: null, token: null });
    expect(() => list.track({ head: 0, descriptors: [0], indirectTable: null, token: null })).toThrow(/already/);
  });

  it('reset() returns the dropped chains and frees everything', () => {
    const list = new DescriptorFreeList(8);
    list.track({ head: 3, descriptors: list.take(2) as number[], indirectTable: 0x1000, token: 'x' });
    const dropped = list.reset();
    expect(dropped.map((c) => c.token)).toEqual(['x']);
    expect(list.freeCount).toBe(8);
  });
});

describe('RingIndices', () => {
  it('maps free-running indices to slots and wraps at 2^16', () => {
    const indices = new RingIndices(8, 0xfffe);
    expect(indices.publish()).toBe(0xfffe % 8);
    expect(indices.publish()).toBe(0xffff % 8);
    expect(indices.availIdx).toBe(0);
    expect(indices.publish()).toBe(0);
    expect(indices.outstanding).toBe(3);
    expect(indices.newUsedCount(0x0001)).toBe(3);
    expect(indices.consumeUsed()).toBe(6);
    expect(indices.consumeUsed()).toBe(7);
    expect(indices.consumeUsed()).toBe(0);
    expect(indices.outstanding).toBe(0);
  });

  it('rejects a used.idx that runs ahead of what was published', () => {
    const indices = new RingIndices(8);
    indices.publish();
    expect(() => indices.newUsedCount(2)).toThrow(/only 1 chains are outstanding/);
  });

  it('without EVENT_IDX kicks unless the device set NO_NOTIFY', () => {
    const indices = new RingIndices(8);
    indices.publish();
    expect(indices.decideKick(false, 0, 0)).toBe(true);
    indices.publish();
    expect(indices.decideKick(false, USED_F_NO_NOTIFY, 0)).toBe(false);
    // Nothing new published: no kick whatever the flags say.
    expect(indices.decideKick(false, 0, 0)).toBe(false);
  });

  it('with EVENT_IDX kicks only when avail_event was crossed, also across the wrap', () => {
    const indices = new RingIndices(8, 0xfffe);
    indices.publish(); // 0xffff
    indices.publish(); // 0x0000
    // Device wants a kick once it sees index 0xfffe published (avail_event = 0xfffe): crossed.
    expect(indices.decideKick(true, 0, 0xfffe)).toBe(true);
    indices.publish(); // 0x0001
    // Device already asked for the next kick only after 0x0005: not crossed.
    expect(indices.decideKick(true, 0, 0x0005)).toBe(false);
    expect(indices.unkicked).toBe(0);
  });

  it('tracks which reaped entries came with an interrupt', () => {
    const indices = new RingIndices(8);
    indices.publish();
    indices.publish();
    indices.newUsedCount(2);
    indices.consumeUsed();
    indices.consumeUsed();
    expect(indices.uncoveredReaped).toBe(2);
    indices.coverUpTo(1);
    expect(indices.uncoveredReaped).toBe(1);
    indices.coverUpTo(2);
    expect(indices.uncoveredReaped).toBe(0);
  });

  it('reset() restarts every index at the given base', () => {
    const indices = new RingIndices(8);
    indices.publish();
    indices.reset(100);
    expect([indices.availIdx, indices.lastUsedIdx, indices.lastKickAvailIdx, indices.coveredUsedIdx]).toEqual([100, 100, 100, 100]);
  });
});
