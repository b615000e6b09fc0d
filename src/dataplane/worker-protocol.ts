/**
 * Messages between the control plane and a queue worker. Commands travel on a MessagePort and the worker
 * is woken by its control eventfd (it sleeps in epoll_wait, not in the Node event loop), then picks them up
 * synchronously with receiveMessageOnPort. Every command carries a sequence number and is acknowledged.
 * The control plane owns every fd; a worker only uses the fds it was handed and never closes them.
 */
import type { DeviceLimits } from './device-limits.js';
import type { RegionLayout } from './memory-regions.js';
import type { IoEngineName } from './request-executor.js';
import type { ImageIoInfo } from './raw-image.js';

/** What the user asked for: `auto` tries io_uring and falls back to the sync engine. */
export const IO_ENGINE_SETTINGS = ['auto', 'io_uring', 'sync'] as const;
export type IoEngineSetting = (typeof IO_ENGINE_SETTINGS)[number];

export function isIoEngineSetting(text: string): text is IoEngineSetting {
  return (IO_ENGINE_SETTINGS as readonly string[]).includes(text);
}

export interface WorkerInit {
  disk: string;
  /** The queues this worker serves (several when there are more queues than worker threads). */
  queues: number[];
  imageFd: number;
  controlFd: number;
  limits: DeviceLimits;
  capacityBytes: number;
  writeback: boolean;
  counters: SharedArrayBuffer;
  /** Shared token-bucket state of the disk, or null when the disk is not throttled. */
  throttle: SharedArrayBuffer | null;
  /** Request engine; the worker reports the one it ended up with in a `started` event. Default `auto`. */
  ioEngine?: IoEngineSetting;
  /** How the image was opened (cache mode, O_DIRECT alignment, block device); default: a buffered file. */
  image?: ImageIoInfo;
  /** Adaptive polling: spin on the rings and completions for up to this many µs before sleeping (0 = off). */
  pollUs?: number;
}

/** Everything needed to run a ring; addresses are front-end virtual addresses as SET_VRING_ADDR sent them. */
export interface RingStart {
  size: number;
  descUserAddr: number;
  availUserAddr: number;
  usedUserAddr: number;
  lastAvailIdx: number;
  eventIdx: boolean;
  /** -1 when the front-end negotiated polling (no kick fd). */
  kickFd: number;
  callFd: number;
  errFd: number;
}

export type WorkerCommand =
  | { op: 'memory'; seq: number; regions: RegionLayout[] }
  | { op: 'start'; seq: number; queue: number; ring: RingStart }
  | { op: 'stop'; seq: number; queue: number }
  | { op: 'setCall'; seq: number; queue: number; fd: number }
  | { op: 'setErr'; seq: number; queue: number; fd: number }
  | { op: 'settings'; seq: number; capacityBytes: number; writeback: boolean }
  | { op: 'exit'; seq: number };

export interface WorkerAck {
  type: 'ack';
  seq: number;
  /** For `stop`: where the ring stopped (GET_VRING_BASE answers with it). */
  lastAvailIdx?: number;
  error?: string;
}

/** Unsolicited events a worker reports (rare: never per request). */
export interface WorkerEvent {
  type: 'event';
  kind: 'poisoned' | 'started' | 'stopped' | 'error';
  queue: number;
  reason: string;
  /** For `poisoned`: which counter the poison was charged to. */
  cause?: 'invalid_avail_idx' | 'ring_structure';
  /** For `started`: the request engine in use (`reason` says why, e.g. an io_uring fallback). */
  ioEngine?: IoEngineName;
}

export type WorkerMessage = WorkerAck | WorkerEvent;
