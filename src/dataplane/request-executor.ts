/**
 * The seam between the drain bracket and the engine that moves data. A drain submits every admitted request,
 * then flushes once; the engine reports each completion through `onComplete` (in any order), and the drain
 * publishes it. The sync engine completes inside `submit`; the io_uring engine batches until `flush` or until
 * its submission slots are full, so one drain costs one `io_uring_enter` in the common case.
 */
import type { GuestMemory } from './guest-memory.js';
import type { BlkRequest } from './blk-request.js';

export interface Completion {
  head: number;
  /** Guest address of the status byte. */
  statusGpa: number;
  type: number;
  status: number;
  /** Bytes written into guest buffers, excluding the status byte (0 unless OK). */
  written: number;
  /** Data bytes of the request (for byte counters). */
  dataBytes: number;
  /** Service time from submission to completion. */
  latencyNanos: number;
  /** Why the request failed, for logs; empty on success. */
  error: string;
}

export interface RequestExecutor {
  /** Starts the request; everything the engine needs is copied out of `request`, which is reused afterwards. */
  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void;
  /** Completes everything submitted so far, reporting each through `onComplete`. */
  flush(): void;
  /** Requests submitted but not yet completed. */
  readonly inFlight: number;
  onComplete: (completion: Completion) => void;
  close(): void;
}

export type IoEngineName = 'sync' | 'io_uring';
