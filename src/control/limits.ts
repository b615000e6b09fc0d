/**
 * The most a front-end can make one session hold. Each is enforced where the message is handled, with an
 * error naming the limit (docs/operations.md, "Resource limits"). Together they bound what a hostile
 * front-end can make the daemon allocate: fds, mappings, address space and per-queue memory.
 */
import { MAX_MEM_SLOTS, MAX_PAYLOAD_SIZE } from '../../protocol/vhost-user.js';
import { MAX_QUEUE_SIZE } from '../../protocol/split-ring.js';

export const SessionLimits = {
  /** Memory regions in one table (SET_MEM_TABLE carries at most 8; ADD_MEM_REG up to GET_MAX_MEM_SLOTS). */
  memoryRegions: MAX_MEM_SLOTS,
  /** Total bytes of guest memory mapped for one session: 1 TiB. */
  mappedBytes: 2 ** 40,
  /** Largest message payload; a larger header closes the session (the stream is no longer framed). */
  messagePayload: MAX_PAYLOAD_SIZE,
  /** Largest virtqueue (split ring) a front-end may configure; the disk's --queue-size lowers it. */
  queueSize: MAX_QUEUE_SIZE,
  /** Most queues a disk may have: enforced by --num-queues (src/daemon/disk-spec.ts MAX_QUEUES). */
  queues: 64,
} as const;
