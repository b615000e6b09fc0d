/**
 * What a pool worker needs to reach a network image (NBD export or Ceph RBD image), as sent in a ring's
 * DiskContext (structured-cloneable: numbers and plain objects only). The control thread opened and
 * validated the image at start (src/device/network-image.ts); workers only attach to it.
 *
 * `key` names the disk's back-end daemon-wide: every queue of the disk that runs on one worker shares one
 * transport (one NBD connection, one RbdQueue) through it (backend-channel.ts).
 */
import type { StreamEndpoint } from '../sys/net-socket.js';
import type { NbdExportInfo } from '../backend/nbd/handshake.js';

/** What every network back-end carries. */
interface BackendCommon {
  key: string;
  /** Largest READ / WRITE the executor makes by merging adjacent requests (bytes); 0 = no merging. */
  mergeMaxBytes: number;
}

export interface NbdBackend extends BackendCommon {
  kind: 'nbd';
  /** Numeric address (resolved on the control thread) or Unix socket. */
  endpoint: StreamEndpoint;
  exportName: string;
  /** The export as the control thread's probe saw it: workers connect in the background with it. */
  info: NbdExportInfo;
  connectTimeoutMs: number;
  reconnectTimeoutMs: number;
  requestTimeoutMs: number;
  /**
   * Connections each worker keeps to the export (1 unless the server advertises multi-conn): a server
   * serialises the replies of one connection, so spreading one queue's requests over several keeps more of
   * its threads busy (docs/nbd.md, "Connections").
   */
  connections: number;
}

export interface RbdBackend extends BackendCommon {
  kind: 'rbd';
  /** rbd_image_t opened on the control thread (valid in every thread of the process). */
  handle: number;
  /** The eventfd librbd signals completions on (owned by the control thread's RbdImage). */
  eventFd: number;
}

export type NetworkBackend = NbdBackend | RbdBackend;
