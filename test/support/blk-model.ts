/**
 * An independent reference model of vublk's request engine, written from the rules in design.md §3 (and
 * docs/architecture.md "The drain bracket"), NOT from the daemon's parser: the fuzzer asks it what the
 * daemon must do with a chain and compares. It reads the chain from the same guest memory the daemon reads,
 * through the small ModelMemory interface, and uses BigInt for every guest address and sector so that
 * wrap-around near 2^64 is computed exactly.
 *
 * Verdicts:
 *   poison   — the descriptor TABLE is broken (head / next out of range, loop in the main table);
 *   drop     — no trustworthy status byte (too long, bad indirect table, last descriptor not writable or
 *              empty, status byte outside memory): no used element;
 *   complete — a status byte (OK / IOERR / UNSUPP), the used length, and what an OK request does.
 *
 * Where design.md leaves a detail open, the model states the interpretation it uses (marked "reading:").
 */

export const DescFlags = { NEXT: 1, WRITE: 2, INDIRECT: 4 } as const;
export const ReqType = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 } as const;
export const Status = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

const TWO_64 = 1n << 64n;
const HEADER = 16;
const SECTOR = 512n;

export interface ModelDescriptor {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

export interface ModelLimits {
  queueSize: number;
  segMax: number;
  sizeMax: number;
  capacityBytes: bigint;
  logicalBlockSize: number;
  readOnly: boolean;
  maxDiscardSeg: number;
  maxDiscardSectors: number;
  maxWriteZeroesSeg: number;
  maxWriteZeroesSectors: number;
}

/** The guest as the device sees it. */
export interface ModelMemory {
  /** Every byte of [addr, addr+len) lies in some region of the memory table (regions may be adjacent). */
  mapped(addr: bigint, len: number): boolean;
  /** [addr, addr+len) lies inside one region (where an indirect table must be). */
  withinOneRegion(addr: bigint, len: number): boolean;
  /** Bytes of a mapped range. */
  read(addr: bigint, len: number): Uint8Array;
  /** Entry `index` of the ring's descriptor table. */
  descriptor(index: number): ModelDescriptor;
}

export interface Piece {
  addr: bigint;
  len: number;
}

export interface ByteRange {
  offset: number;
  length: number;
}

export type Effect =
  | { op: 'read'; range: ByteRange; pieces: Piece[] }
  | { op: 'write'; range: ByteRange; pieces: Piece[] }
  | { op: 'getId'; pieces: Piece[]; length: number }
  | { op: 'flush' }
  | { op: 'zero'; ranges: ByteRange[] }
  | { op: 'discard'; ranges: ByteRange[] };

export type Verdict =
  | { kind: 'poison'; reason: string }
  | { kind: 'drop'; reason: string }
  | { kind: 'complete'; status: number; reason: string; type: number; statusAddr: bigint; usedLen: number; effect: Effect | null };

function decodeDescriptor(bytes: Uint8Array, index: number): ModelDescriptor {
  const view = new DataView(bytes.buffer, bytes.byteOffset + index * 16, 16);
  return {
    addr: view.getBigUint64(0, true),
    len: view.getUint32(8, true),
    flags: view.getUint16(12, true),
    next: view.getUint16(14, true),
  };
}

type Walk = { kind: 'ok'; descriptors: ModelDescriptor[] } | { kind: 'poison'; reason: string } | { kind: 'drop'; reason: string };

/** §3.3–3.4: follow the chain from `head` through at most one indirect table. */
export function walkChain(head: number, memory: ModelMemory, limits: ModelLimits): Walk {
  const chain: ModelDescriptor[] = [];
  let indirect: Uint8Array | null = null;
  let tableSize = limits.queueSize;
  let index = head;
  let seen = new Set<number>();
  // A broken main table poisons the queue; a broken indirect table only loses this chain.
  const fault = (reason: string): Walk => (indirect === null ? { kind: 'poison', reason } : { kind: 'drop', reason });
  for (;;) {
    if (index >= tableSize) return fault(`descriptor index ${index} out of range (${tableSize})`);
    // The table is not changing under us, so revisiting an entry means the chain never ends.
    if (seen.has(index)) return fault(`descriptor loop at ${index}`);
    seen.add(index);
    const d = indirect === null ? memory.descriptor(index) : decodeDescriptor(indirect, index);
    if ((d.flags & DescFlags.INDIRECT) !== 0) {
      if (indirect !== null) return { kind: 'drop', reason: 'indirect descriptor inside an indirect table' };
      // Reading: an INDIRECT descriptor must end the chain (virtio: the driver MUST NOT set NEXT with it).
      if ((d.flags & DescFlags.NEXT) !== 0) return { kind: 'drop', reason: 'INDIRECT together with NEXT' };
      if (d.len === 0 || d.len % 16 !== 0) return { kind: 'drop', reason: `indirect table length ${d.len}` };
      if (!memory.withinOneRegion(d.addr, d.len)) return { kind: 'drop', reason: 'indirect table outside guest memory' };
      indirect = memory.read(d.addr, d.len);
      tableSize = d.len / 16;
      index = 0;
      seen = new Set<number>();
      continue;
    }
    chain.push(d);
    if ((d.flags & DescFlags.NEXT) === 0) break;
    index = d.next;
  }
  if (chain.length > limits.segMax + 2) return { kind: 'drop', reason: `${chain.length} descriptors > seg_max + 2` };
  return { kind: 'ok', descriptors: chain };
}

function writable(d: ModelDescriptor): boolean {
  return (d.flags & DescFlags.WRITE) !== 0;
}

/** The stream bytes [from, from+length) of `descriptors`, split at descriptor boundaries (empty pieces skipped). */
function streamPieces(descriptors: readonly ModelDescriptor[], from: number, length: number): Piece[] {
  const pieces: Piece[] = [];
  let skip = from;
  let remaining = length;
  for (const d of descriptors) {
    if (remaining === 0) break;
    if (skip >= d.len) {
      skip -= d.len;
      continue;
    }
    const take = Math.min(d.len - skip, remaining);
    pieces.push({ addr: d.addr + BigInt(skip), len: take });
    skip = 0;
    remaining -= take;
  }
  return pieces;
}

function inMemory(memory: ModelMemory, piece: Piece): boolean {
  return piece.addr + BigInt(piece.len) <= TWO_64 && memory.mapped(piece.addr, piece.len);
}

/** Evaluates one chain: what the device must do with it. */
export function evaluateChain(head: number, memory: ModelMemory, limits: ModelLimits): Verdict {
  const walk = walkChain(head, memory, limits);
  if (walk.kind !== 'ok') return walk;
  const chain = walk.descriptors;

  // §3.5 status: last byte of the LAST descriptor, device-writable, length ≥ 1, address overflow-checked.
  const last = chain[chain.length - 1] as ModelDescriptor;
  if (!writable(last)) return { kind: 'drop', reason: 'last descriptor is not device-writable' };
  if (last.len === 0) return { kind: 'drop', reason: 'status descriptor has length 0' };
  const statusAddr = last.addr + BigInt(last.len) - 1n;
  if (statusAddr >= TWO_64 || !memory.mapped(statusAddr, 1)) return { kind: 'drop', reason: 'status byte outside guest memory' };

  let type = -1;
  const complete = (status: number, reason: string, usedLen = 1, effect: Effect | null = null): Verdict => ({
    kind: 'complete',
    status,
    reason,
    type,
    statusAddr,
    usedLen: status === Status.OK ? usedLen : 1,
    effect: status === Status.OK ? effect : null,
  });

  // §3.4 framing: readable part first, then writable part.
  const readable: ModelDescriptor[] = [];
  const writableDescs: ModelDescriptor[] = [];
  for (const d of chain) {
    if (writable(d)) writableDescs.push(d);
    else if (writableDescs.length > 0) return complete(Status.IOERR, 'readable descriptor after a writable one');
    else readable.push(d);
  }
  const readableBytes = readable.reduce((n, d) => n + d.len, 0);
  const writableBytes = writableDescs.reduce((n, d) => n + d.len, 0);

  // §3.6 header: the first 16 readable bytes, readable from guest memory.
  if (readableBytes < HEADER) return complete(Status.IOERR, `only ${readableBytes} readable bytes`);
  const header = new Uint8Array(HEADER);
  let at = 0;
  for (const piece of streamPieces(readable, 0, HEADER)) {
    if (!inMemory(memory, piece)) return complete(Status.IOERR, 'header outside guest memory');
    header.set(memory.read(piece.addr, piece.len), at);
    at += piece.len;
  }
  const hv = new DataView(header.buffer);
  type = hv.getUint32(0, true);
  const sector = hv.getBigUint64(8, true);

  // §3.7 data rules.
  const readsData = type === ReqType.IN || type === ReqType.GET_ID;
  const writesData = type === ReqType.OUT || type === ReqType.DISCARD || type === ReqType.WRITE_ZEROES;
  const extraReadable = readableBytes - HEADER;
  const extraWritable = writableBytes - 1;
  let pieces: Piece[] = [];
  let dataBytes = 0;
  if (readsData || writesData) {
    if (readsData && extraReadable > 0) return complete(Status.IOERR, 'device-readable data on a request that returns data');
    if (writesData && extraWritable > 0) return complete(Status.IOERR, 'device-writable data on a request that carries data');
    pieces = readsData ? streamPieces(writableDescs, 0, extraWritable) : streamPieces(readable, HEADER, extraReadable);
    // Reading: "data descriptor longer than SIZE_MAX" is about the data it carries (a descriptor that also
    // holds the header or the status may be longer by those bytes).
    for (const piece of pieces) if (piece.len > limits.sizeMax) return complete(Status.IOERR, `data piece of ${piece.len} > size_max`);
    dataBytes = pieces.reduce((n, p) => n + p.len, 0);
    if (dataBytes === 0) return complete(Status.IOERR, 'no data');
    for (const piece of pieces) if (!inMemory(memory, piece)) return complete(Status.IOERR, 'data outside guest memory');
  } else if (type === ReqType.FLUSH && (extraReadable > 0 || extraWritable > 0)) {
    return complete(Status.IOERR, 'FLUSH with data');
  }

  const capacity = limits.capacityBytes;
  switch (type) {
    case ReqType.IN:
    case ReqType.OUT: {
      if (dataBytes % limits.logicalBlockSize !== 0) return complete(Status.IOERR, 'length not a multiple of the block');
      const offset = sector * SECTOR;
      if (offset % BigInt(limits.logicalBlockSize) !== 0n) return complete(Status.IOERR, 'offset not aligned to the block');
      if (offset + BigInt(dataBytes) > capacity) return complete(Status.IOERR, 'past capacity');
      if (type === ReqType.OUT && limits.readOnly) return complete(Status.IOERR, 'write to a read-only disk');
      const range = { offset: Number(offset), length: dataBytes };
      return type === ReqType.IN
        ? complete(Status.OK, 'read', dataBytes + 1, { op: 'read', range, pieces })
        : complete(Status.OK, 'write', 1, { op: 'write', range, pieces });
    }
    case ReqType.GET_ID: {
      const length = Math.min(20, dataBytes);
      return complete(Status.OK, 'get id', length + 1, { op: 'getId', pieces, length });
    }
    case ReqType.FLUSH:
      return complete(Status.OK, 'flush', 1, { op: 'flush' });
    case ReqType.DISCARD:
    case ReqType.WRITE_ZEROES: {
      // §3.8 then §3.10's segment validation. Reading: a payload that is not whole 16-byte segments is IOERR.
      if (dataBytes % 16 !== 0) return complete(Status.IOERR, 'payload not whole segments');
      const isZeroes = type === ReqType.WRITE_ZEROES;
      const segments = dataBytes / 16;
      if (segments > (isZeroes ? limits.maxWriteZeroesSeg : limits.maxDiscardSeg)) return complete(Status.UNSUPP, 'too many segments');
      if (limits.readOnly) return complete(Status.IOERR, 'discard/write-zeroes on a read-only disk');
      const payload = new Uint8Array(dataBytes);
      let p = 0;
      for (const piece of pieces) {
        payload.set(memory.read(piece.addr, piece.len), p);
        p += piece.len;
      }
      const view = new DataView(payload.buffer);
      const maxSectors = isZeroes ? limits.maxWriteZeroesSectors : limits.maxDiscardSectors;
      const ranges: ByteRange[] = [];
      for (let s = 0; s < segments; s++) {
        const segSector = view.getBigUint64(s * 16, true);
        const num = view.getUint32(s * 16 + 8, true);
        const flags = view.getUint32(s * 16 + 12, true);
        if ((flags & ~1) !== 0) return complete(Status.UNSUPP, 'reserved segment flags');
        if (num > maxSectors) return complete(Status.IOERR, 'segment larger than the advertised maximum');
        if ((segSector + BigInt(num)) * SECTOR > capacity) return complete(Status.IOERR, 'segment past capacity');
        if (num > 0) ranges.push({ offset: Number(segSector * SECTOR), length: num * 512 });
      }
      return complete(Status.OK, isZeroes ? 'write zeroes' : 'discard', 1, isZeroes ? { op: 'zero', ranges } : { op: 'discard', ranges });
    }
    default:
      return complete(Status.UNSUPP, `unknown type ${type}`);
  }
}

/** The counters one verdict moves (design.md §6), in the shape of test/support/metrics-scrape.ts. */
export interface CounterDelta {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  getIds: number;
  bytesRead: number;
  bytesWritten: number;
  ioErrors: number;
  unsupported: number;
}

export function emptyCounters(): CounterDelta {
  return {
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    writeZeroes: 0,
    getIds: 0,
    bytesRead: 0,
    bytesWritten: 0,
    ioErrors: 0,
    unsupported: 0,
  };
}

export function countVerdict(verdict: Verdict, into: CounterDelta): void {
  if (verdict.kind !== 'complete') {
    into.ioErrors++;
    return;
  }
  if (verdict.status === Status.IOERR) into.ioErrors++;
  else if (verdict.status === Status.UNSUPP) into.unsupported++;
  else {
    const effect = verdict.effect;
    switch (effect?.op) {
      case 'read':
        into.reads++;
        into.bytesRead += effect.range.length;
        break;
      case 'write':
        into.writes++;
        into.bytesWritten += effect.range.length;
        break;
      case 'flush':
        into.flushes++;
        break;
      case 'getId':
        into.getIds++;
        break;
      case 'discard':
        into.discards++;
        break;
      case 'zero':
        into.writeZeroes++;
        break;
    }
  }
}
