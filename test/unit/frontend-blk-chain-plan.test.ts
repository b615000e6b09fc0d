import { describe, it, expect } from 'vitest';
import { planBlkChain, FramingError } from '../../bench/src/frontend/blk-chain-plan.js';

describe('planBlkChain', () => {
  it('classic layout: header, data, status in three descriptors', () => {
    const plan = planBlkChain(0, 4096);
    expect(plan.descriptors).toEqual([
      { offset: 0, len: 16, writable: false },
      { offset: 16, len: 4096, writable: true },
      { offset: 4112, len: 1, writable: true },
    ]);
    expect(plan.totalBytes).toBe(4113);
    expect(plan.inOffset).toBe(16);
    expect(plan.statusOffset).toBe(4112);
  });

  it('header and write data in one descriptor', () => {
    const plan = planBlkChain(1024, 0, { headerWithData: true });
    expect(plan.descriptors).toEqual([
      { offset: 0, len: 1040, writable: false },
      { offset: 1040, len: 1, writable: true },
    ]);
  });

  it('read data and status in one descriptor, with a multi-byte status area', () => {
    const plan = planBlkChain(0, 512, { statusWithData: true, statusBytes: 4 });
    expect(plan.descriptors).toEqual([
      { offset: 0, len: 16, writable: false },
      { offset: 16, len: 516, writable: true },
    ]);
    // The status is the LAST byte of the last writable descriptor.
    expect(plan.statusOffset).toBe(16 + 512 + 3);
  });

  it('splits data into segments, remainder spread over the first ones', () => {
    const plan = planBlkChain(0, 10, { dataSegments: 3 });
    expect(plan.descriptors.map((d) => d.len)).toEqual([16, 4, 3, 3, 1]);
    const contiguous = plan.descriptors.every((d, i, all) => i === 0 || d.offset === (all[i - 1]?.offset ?? 0) + (all[i - 1]?.len ?? 0));
    expect(contiguous).toBe(true);
  });

  it('header+data with segments keeps the header in the first one', () => {
    const plan = planBlkChain(1000, 0, { headerWithData: true, dataSegments: 2 });
    expect(plan.descriptors).toEqual([
      { offset: 0, len: 516, writable: false },
      { offset: 516, len: 500, writable: false },
      { offset: 1016, len: 1, writable: true },
    ]);
  });

  it('flush: header and status only', () => {
    expect(planBlkChain(0, 0, { headerWithData: true, statusWithData: true }).descriptors).toEqual([
      { offset: 0, len: 16, writable: false },
      { offset: 16, len: 1, writable: true },
    ]);
  });

  it('rejects nonsense', () => {
    expect(() => planBlkChain(-1, 0)).toThrow(FramingError);
    expect(() => planBlkChain(0, 0, { statusBytes: 0 })).toThrow(FramingError);
    expect(() => planBlkChain(0, 0, { dataSegments: 0 })).toThrow(FramingError);
  });
});
