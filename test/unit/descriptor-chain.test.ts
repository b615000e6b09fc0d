import { describe, expect, it } from 'vitest';
import { ChainOutcome, ChainScratch, walkChain } from '../../src/dataplane/descriptor-chain.js';
import { DescFlag } from '../../protocol/split-ring.js';
import { memoryFixture } from './guest-memory-fixture.js';

const QUEUE_SIZE = 16;
const TABLE = 0; // descriptor table at buffer offset 0
const INDIRECT = 0x4000;

function writeDesc(view: DataView, tableOffset: number, index: number, addr: number, len: number, flags: number, next: number): void {
  const at = tableOffset + index * 16;
  view.setBigUint64(at, BigInt(addr), true);
  view.setUint32(at + 8, len, true);
  view.setUint16(at + 12, flags, true);
  view.setUint16(at + 14, next, true);
}

function walk(build: (fx: ReturnType<typeof memoryFixture>) => void, capacity = 6, head = 0) {
  const fx = memoryFixture();
  build(fx);
  const scratch = new ChainScratch(capacity);
  const outcome = walkChain(fx.memory, fx.view, TABLE, QUEUE_SIZE, head, scratch);
  return { outcome, scratch, fx };
}

describe('walkChain', () => {
  it('collects a direct chain in order', () => {
    const { outcome, scratch, fx } = walk((f) => {
      writeDesc(f.view, TABLE, 0, f.gpa(0x1000), 16, DescFlag.NEXT, 3);
      writeDesc(f.view, TABLE, 3, f.gpa(0x2000), 512, DescFlag.NEXT | DescFlag.WRITE, 5);
      writeDesc(f.view, TABLE, 5, f.gpa(0x3000), 1, DescFlag.WRITE, 0);
    });
    expect(outcome).toBe(ChainOutcome.Ok);
    expect(scratch.count).toBe(3);
    expect([...scratch.addr.subarray(0, 3)]).toEqual([fx.gpa(0x1000), fx.gpa(0x2000), fx.gpa(0x3000)]);
    expect([...scratch.writable.subarray(0, 3)]).toEqual([0, 1, 1]);
  });

  it('poisons on a head index out of range', () => {
    expect(walk(() => undefined, 6, QUEUE_SIZE).outcome).toBe(ChainOutcome.Poison);
  });

  it('poisons on a next index out of range', () => {
    expect(walk((f) => writeDesc(f.view, TABLE, 0, f.gpa(0x1000), 16, DescFlag.NEXT, 40)).outcome).toBe(ChainOutcome.Poison);
  });

  it('poisons on a loop in the descriptor table', () => {
    const { outcome, scratch } = walk((f) => {
      writeDesc(f.view, TABLE, 0, f.gpa(0x1000), 16, DescFlag.NEXT, 1);
      writeDesc(f.view, TABLE, 1, f.gpa(0x1000), 16, DescFlag.NEXT, 0);
    }, 64);
    expect(outcome).toBe(ChainOutcome.Poison);
    expect(scratch.reason).toMatch(/loop/);
  });

  it('drops a chain longer than seg_max + 2', () => {
    const { outcome, scratch } = walk((f) => {
      for (let i = 0; i < 8; i++) writeDesc(f.view, TABLE, i, f.gpa(0x1000), 16, i < 7 ? DescFlag.NEXT : 0, i + 1);
    });
    expect(outcome).toBe(ChainOutcome.Drop);
    expect(scratch.reason).toMatch(/exceeds/);
  });

  it('follows an indirect table', () => {
    const { outcome, scratch } = walk((f) => {
      writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 3 * 16, DescFlag.INDIRECT, 0);
      writeDesc(f.view, INDIRECT, 0, f.gpa(0x1000), 16, DescFlag.NEXT, 1);
      writeDesc(f.view, INDIRECT, 1, f.gpa(0x2000), 512, DescFlag.NEXT | DescFlag.WRITE, 2);
      writeDesc(f.view, INDIRECT, 2, f.gpa(0x3000), 1, DescFlag.WRITE, 0);
    });
    expect(outcome).toBe(ChainOutcome.Ok);
    expect(scratch.count).toBe(3);
  });

  const badIndirect: [string, (f: ReturnType<typeof memoryFixture>) => void][] = [
    ['a length that is not a multiple of 16', (f) => writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 20, DescFlag.INDIRECT, 0)],
    ['a zero length', (f) => writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 0, DescFlag.INDIRECT, 0)],
    ['INDIRECT together with NEXT', (f) => writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 32, DescFlag.INDIRECT | DescFlag.NEXT, 1)],
    ['a table outside guest memory', (f) => writeDesc(f.view, TABLE, 0, f.gpa(1 << 21), 32, DescFlag.INDIRECT, 0)],
    [
      'a nested indirect descriptor',
      (f) => {
        writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 32, DescFlag.INDIRECT, 0);
        writeDesc(f.view, INDIRECT, 0, f.gpa(INDIRECT), 32, DescFlag.INDIRECT, 0);
      },
    ],
    [
      'a loop inside the table',
      (f) => {
        writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 32, DescFlag.INDIRECT, 0);
        writeDesc(f.view, INDIRECT, 0, f.gpa(0x1000), 16, DescFlag.NEXT, 1);
        writeDesc(f.view, INDIRECT, 1, f.gpa(0x1000), 16, DescFlag.NEXT, 0);
      },
    ],
    [
      'a next index past the table',
      (f) => {
        writeDesc(f.view, TABLE, 0, f.gpa(INDIRECT), 32, DescFlag.INDIRECT, 0);
        writeDesc(f.view, INDIRECT, 0, f.gpa(0x1000), 16, DescFlag.NEXT, 2);
      },
    ],
  ];
  for (const [name, build] of badIndirect) {
    it(`drops an indirect table with ${name}`, () => {
      expect(walk(build, 64).outcome).toBe(ChainOutcome.Drop);
    });
  }
});
