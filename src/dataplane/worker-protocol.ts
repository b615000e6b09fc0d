/**
 * Messages between the control plane and a pool worker. Commands travel on a MessagePort and the worker is
 * woken by its control eventfd (it sleeps in epoll_wait, not in the Node event loop), then picks them up
 * synchronously with receiveMessageOnPort. Every command carries a sequence number and is acknowledged.
 * The control plane owns every fd; a worker only uses the fds it was handed and never closes them.
 *
 * One worker serves rings of several disks and several sessions: a ring is named by its disk's pool id and
 * its queue index, and it runs over the memory table of its session, named by a daemon-wide table id.
 */
import type { DeviceLimits } from './device-limits.js';
import type { RegionLayout } from './memory-regions.js';
import type { IoEngineName } from './request-executor.js';
import type { ImageIoInfo } from './raw-image.js';
import type { InflightQueueMapping } from './inflight-layout.js';
import type { NetworkBackend } from './network-backend.js';
import type { LayerDescription } from '../backend/qcow2/index.js';

/** What the user asked for: `auto` tries io_uring and falls back to the sync engine. */
export const IO_ENGINE_SETTINGS = ['auto', 'io_uring', 'sync'] as const;
export type IoEngineSetting = (typeof IO_ENGINE_SETTINGS)[number];

export interface WorkerInit {
  /** Index of the worker in the pool: names it in logs. */
  worker: number;
  controlFd: number;
}

/** What a ring needs of its disk, whichever worker serves it. */
export interface DiskContext {
  disk: string;
  imageFd: number;
  limits: DeviceLimits;
  /** The disk's counter blocks (one per queue; the ring's worker is the only writer of its block). */
  counters: SharedArrayBuffer;
  /** Shared token-bucket state of the disk, or null when the disk is not throttled. */
  throttle: SharedArrayBuffer | null;
  /** Request engine; the worker reports the one it ended up with in a `started` event. Default `auto`. */
  ioEngine?: IoEngineSetting;
  /** How the image was opened (cache mode, O_DIRECT alignment, block device); default: a buffered file. */
  image?: ImageIoInfo;
  /** Adaptive polling: spin on the rings and completions for up to this many µs before sleeping (0 = off). */
  pollUs?: number;
  /** A network image (NBD, RBD) instead of `imageFd`. */
  network?: NetworkBackend;
  /** A qcow2 image (format=qcow2): its shared state; `imageFd` is then the top image opened with the cache mode's flags. */
  qcow2?: LayerDescription;
}

/** Disk state that changes at run time (SET_CONFIG of the writeback byte, a resize). */
export interface DiskSettings {
  capacityBytes: number;
  writeback: boolean;
}

/** A session's guest memory table; `version` grows with every change the session makes to it. */
export interface MemoryTable {
  id: number;
  version: number;
  regions: RegionLayout[];
}

/**
 * A session's migration dirty log as the workers know it: `size` 0 means logging is off (no log mapped, or
 * VHOST_F_LOG_ALL not set). Versioned like the memory table (same id); the control plane unmaps an old log
 * only after every worker using it has acknowledged a newer version.
 */
export interface DirtyLogTable {
  id: number;
  version: number;
  hostAddr: number;
  size: number;
}

/** Everything needed to run a ring; addresses are front-end virtual addresses as SET_VRING_ADDR sent them. */
export interface RingStart {
  size: number;
  descUserAddr: number;
  availUserAddr: number;
  usedUserAddr: number;
  lastAvailIdx: number;
  eventIdx: boolean;
  /** Guest address at which writes to the used ring are logged (SET_VRING_ADDR with VHOST_VRING_F_LOG), or -1. */
  usedLogGpa: number;
  /** -1 when the front-end negotiated polling (no kick fd). */
  kickFd: number;
  callFd: number;
  errFd: number;
  /** This queue's part of the inflight region (SET_INFLIGHT_FD), when the front-end gave one. */
  inflight?: InflightQueueMapping;
}

export type WorkerCommand =
  /** A new version of a memory table: every ring of this worker running over it switches to it. */
  | { op: 'memory'; seq: number; memory: MemoryTable }
  | {
      op: 'start';
      seq: number;
      diskId: number;
      queue: number;
      disk: DiskContext;
      settings: DiskSettings;
      memory: MemoryTable;
      log: DirtyLogTable;
      ring: RingStart;
    }
  /** A new version of a session's dirty log: every ring of this worker over that session marks into it. */
  | { op: 'log'; seq: number; log: DirtyLogTable }
  /** Stops the ring and forgets it (its engine and timer are released). */
  | { op: 'stop'; seq: number; diskId: number; queue: number }
  | { op: 'setCall'; seq: number; diskId: number; queue: number; fd: number }
  | { op: 'setErr'; seq: number; diskId: number; queue: number; fd: number }
  | { op: 'settings'; seq: number; diskId: number; settings: DiskSettings }
  | { op: 'exit'; seq: number };

export interface WorkerAck {
  type: 'ack';
  seq: number;
  /** For `stop`: where the ring stopped (GET_VRING_BASE answers with it). */
  lastAvailIdx?: number;
  /**
   * For `stop` and `memory`: requests the ring(s) had to leave in flight (the back-end did not answer in
   * time). Absent when none: the memory they point into may then be unmapped.
   */
  leftInFlight?: number;
  error?: string;
}

/** Unsolicited events a worker reports (rare: never per request). */
export interface WorkerEvent {
  type: 'event';
  /**
   * `inflight`: a ring resumed requests a previous back-end left in flight (`reason` says how many).
   * `backend`: a network back-end's connection was lost or is back (logged; rare).
   */
  kind: 'poisoned' | 'started' | 'error' | 'inflight' | 'backend';
  /** The disk (pool id) whose ring raised the event. */
  diskId: number;
  queue: number;
  reason: string;
  /** For `poisoned`: which counter the poison was charged to. */
  cause?: 'invalid_avail_idx' | 'ring_structure';
  /** For `started`: the request engine in use (`reason` says why, e.g. an io_uring fallback). */
  ioEngine?: IoEngineName;
}

/** What a ring posts: the worker adds the disk id. */
export type RingEvent = Omit<WorkerEvent, 'diskId'>;

export type WorkerMessage = WorkerAck | WorkerEvent;
