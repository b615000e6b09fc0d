/**
 * The back-end seam of the data plane: what a storage back-end implements so that the request engine
 * (drain bracket, validation, throttle, metrics, and later inflight tracking) is shared by all of them.
 * Raw files and block devices are the first back-ends, through two engines: io_uring (asynchronous) and
 * sync (blocking syscalls, the fallback). qcow2, NBD and RBD back-ends implement the same interface.
 *
 * Worker side — `RequestExecutor`, one per virtqueue, used only by that queue's worker thread:
 * - `canAccept(request)` before `submit`: false when the back-end has no room (in-flight limit, submission
 *   queue, bounce buffers). The drain then stops popping and leaves the request in the avail ring; it
 *   resumes when a completion frees room. A back-end never blocks in `submit` waiting for room.
 * - `submit(...)` starts a validated request (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES). Everything
 *   needed is copied out of `request`, which is reused right after. A back-end may complete it inside
 *   `submit` (sync) or later.
 * - `submitPending()` hands what was prepared to the device without waiting (one syscall per drain in the
 *   common case); false when the device is short of resources and nothing is in flight to wake the worker
 *   (the caller retries on a timer).
 * - `completionFd` is an fd the worker's epoll watches (edge-triggered; it is never read back): it becomes
 *   readable when completions may be waiting. -1 when the back-end completes everything inside `submit`.
 * - `reap()` delivers every completion available now through `onComplete`, in any order, and never blocks.
 * - `waitIdle(ms)` blocks (bounded) until nothing is in flight, delivering completions; used when a ring
 *   stops (GET_VRING_BASE must report an exact index with nothing in flight) or guest memory is replaced.
 * - FLUSH covers every write completed before it was submitted (io_uring: IOSQE_IO_DRAIN). DISCARD and
 *   WRITE_ZEROES start after everything submitted before them completed (vublk's rule since the sync
 *   engine; virtio-blk itself orders nothing): an asynchronous back-end refuses them in `canAccept` while
 *   requests are in flight.
 *
 * Control side — the image itself (open with its cache mode, size, resize, block-device probing) lives in
 * `src/dataplane/raw-image.ts`; a network back-end has its own equivalent.
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

/** A zeroed completion record; each executor owns one and refills it before every `onComplete` (no allocation per request). */
export function emptyCompletion(): Completion {
  return { head: 0, statusGpa: 0, type: 0, status: 0, written: 0, dataBytes: 0, latencyNanos: 0, error: '' };
}

export interface RequestExecutor {
  /** Whether `request` (validated, about to be submitted) can be taken now. */
  canAccept(request: BlkRequest): boolean;
  /** Starts the request; everything the engine needs is copied out of `request`, which is reused afterwards. */
  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void;
  /** Hands prepared requests to the device without waiting; false if it must be retried later. */
  submitPending(): boolean;
  /** Delivers every completion available now; returns how many. Never blocks. */
  reap(): number;
  /** Blocks up to `timeoutMs` until nothing is in flight; true when idle. */
  waitIdle(timeoutMs: number): boolean;
  /** Readable (edge) when completions may be waiting; -1 when `submit` completes everything itself. */
  readonly completionFd: number;
  /** Watch completionFd level-triggered (a transport that may stop early and stay readable: network back-ends). */
  readonly completionLevelTriggered?: boolean;
  /**
   * The worker's epoll reported completionFd ready (called before the drain it triggers). A level-triggered
   * executor may skip reading its fds between these calls once a read found nothing (network back-ends).
   */
  completionReady?(): void;
  /** Requests submitted but not yet completed. */
  readonly inFlight: number;
  onComplete: (completion: Completion) => void;
  close(): void;
}

export type IoEngineName = 'sync' | 'io_uring';

/** Cache modes, as QEMU's `cache=`. */
export const CACHE_MODES = ['writeback', 'none', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

export function isCacheMode(text: string): text is CacheMode {
  return (CACHE_MODES as readonly string[]).includes(text);
}

/** What a cache mode means for the image and the engine. */
export interface CachePolicy {
  /** O_DIRECT: bypass the host page cache (guest buffers must meet the alignment, else they bounce). */
  direct: boolean;
  /** O_DSYNC: every write is durable when it completes. */
  dsync: boolean;
  /** The write cache the device advertises (VIRTIO_BLK_F_CONFIG_WCE writeback byte) at start. */
  writeback: boolean;
  /** FLUSH completes at once without syncing (unsafe). */
  ignoreFlush: boolean;
}

export function cachePolicy(mode: CacheMode): CachePolicy {
  switch (mode) {
    case 'none':
      return { direct: true, dsync: false, writeback: true, ignoreFlush: false };
    case 'writethrough':
      return { direct: false, dsync: false, writeback: false, ignoreFlush: false };
    case 'directsync':
      return { direct: true, dsync: true, writeback: false, ignoreFlush: false };
    case 'unsafe':
      return { direct: false, dsync: false, writeback: true, ignoreFlush: true };
    case 'writeback':
      return { direct: false, dsync: false, writeback: true, ignoreFlush: false };
  }
}

/** Engine options derived from the image and its cache mode. */
export interface EngineOptions {
  /** Requests in flight at most (io_uring slots). */
  depth?: number;
  /** O_DIRECT: host addresses and lengths must be multiples of this (1 = no constraint). */
  memAlign?: number;
  /** The fd was opened O_DSYNC: writes need no separate fdatasync in write-through mode. */
  dsync?: boolean;
  /** FLUSH completes at once (cache=unsafe). */
  ignoreFlush?: boolean;
  /** The image is a block device: DISCARD / WRITE_ZEROES through BLKDISCARD / BLKZEROOUT. */
  blockDevice?: boolean;
  /** Called once per request that went through a bounce buffer (for the bounce counter). */
  onBounce?: () => void;
}
