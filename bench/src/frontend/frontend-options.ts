/**
 * Options of the test front-end and the virtio / protocol feature masks they translate to. Defaults mirror
 * what QEMU 7.2 negotiates with a vhost-user-blk back-end (split rings only).
 */
import { ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES } from '../../../protocol/vhost-user.js';
import { VirtioFeature, featureMask } from '../../../protocol/virtio.js';
import { BlkFeature } from '../../../protocol/virtio-blk.js';
import type { GuestAllocOptions, GuestMemory, GuestRegionSpec } from './guest-memory.js';
import type { KickPolicy } from './virtqueue-driver.js';
import type { InflightKeeper } from './inflight-keeper.js';

export interface FeatureOptions {
  /** VIRTIO_RING_F_EVENT_IDX. Default true. */
  eventIdx?: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC. Default true. */
  indirect?: boolean;
  /** VIRTIO_F_VERSION_1; false drives the device as a legacy (0.9.5) one. Default true. */
  version1?: boolean;
  /** More bits to accept when offered. */
  extra?: bigint;
  /** Send exactly this to SET_FEATURES, offered or not (hostile tests). */
  exact?: bigint;
}

export interface ProtocolOptions {
  /** Use protocol features at all (needs VHOST_USER_F_PROTOCOL_FEATURES offered). Default true. */
  enabled?: boolean;
  /** Default true. */
  replyAck?: boolean;
  /** Default true. */
  mq?: boolean;
  /** Default true. */
  config?: boolean;
  /** SET_STATUS / GET_STATUS. Default false (QEMU 7.2 does use it when offered). */
  status?: boolean;
  /** Needed for ADD_MEM_REG; default true iff memoryMessages is 'add-mem-reg'. */
  configureMemSlots?: boolean;
  /** BACKEND_REQ: when negotiated, the handshake sets up the back-end channel (SET_BACKEND_REQ_FD) like QEMU. Default false. */
  backendReq?: boolean;
  /**
   * INFLIGHT_SHMFD: when negotiated, the handshake gets the region once (GET_INFLIGHT_FD) into this keeper and
   * sets it (SET_INFLIGHT_FD) at every start, like QEMU's vhost-user-blk. Default: not negotiated.
   */
  inflight?: InflightKeeper;
  extra?: bigint;
  /** Send exactly this to SET_PROTOCOL_FEATURES (hostile tests). */
  exact?: bigint;
}

export interface FrontendOptions {
  /** Bound of every single wait (reply, completion). Default 5000 ms. */
  timeoutMs?: number;
  /** How long connect() retries while the socket is missing or refusing. Default = timeoutMs. */
  connectTimeoutMs?: number;
  features?: FeatureOptions;
  protocol?: ProtocolOptions;
  /** Queues to set up; 'max' = what GET_QUEUE_NUM reports. Default 1. */
  numQueues?: number | 'max';
  /** Default 128 (QEMU's default for vhost-user-blk). */
  queueSize?: number;
  /** Guest RAM: an existing GuestMemory (not closed by the front-end) or region specs. Default one 64 MiB region at 0. */
  memory?: GuestMemory | readonly GuestRegionSpec[];
  /** SET_MEM_TABLE (default) or one ADD_MEM_REG per region. */
  memoryMessages?: 'table' | 'add-mem-reg';
  /** Bytes asked for with GET_CONFIG. Default 60 (sizeof struct virtio_blk_config in QEMU 7.2). */
  configSize?: number;
  kickPolicy?: KickPolicy;
  /** Give each ring a call eventfd (default true); otherwise completions are found by polling. */
  useCallFd?: boolean;
  /** A completion without an interrupt fails the wait (default true). */
  requireInterrupts?: boolean;
  /** How often waits re-read used.idx. Default 10 ms. */
  recheckMs?: number;
  /** Where rings and indirect tables go (e.g. { region: 1 }). */
  ringPlacement?: GuestAllocOptions;
  /** Run the whole handshake in connect(). Default true; false leaves every step to the test. */
  handshake?: boolean;
}

export const DEFAULT_TIMEOUT_MS = 5000;
export const DEFAULT_QUEUE_SIZE = 128;
export const DEFAULT_CONFIG_SIZE = 60;
export const DEFAULT_MEMORY: readonly GuestRegionSpec[] = [{ gpa: 0, size: 64 * 1024 * 1024 }];

/** Virtio feature bits the front-end accepts when the back-end offers them. */
export function wantedFeatures(options: FeatureOptions = {}, protocol: ProtocolOptions = {}): bigint {
  let wanted = featureMask(
    BlkFeature.SIZE_MAX,
    BlkFeature.SEG_MAX,
    BlkFeature.GEOMETRY,
    BlkFeature.RO,
    BlkFeature.BLK_SIZE,
    BlkFeature.FLUSH,
    BlkFeature.TOPOLOGY,
    BlkFeature.CONFIG_WCE,
    BlkFeature.MQ,
    BlkFeature.DISCARD,
    BlkFeature.WRITE_ZEROES,
  );
  if (options.version1 ?? true) wanted |= featureMask(VirtioFeature.VERSION_1);
  if (options.indirect ?? true) wanted |= featureMask(VirtioFeature.RING_INDIRECT_DESC);
  if (options.eventIdx ?? true) wanted |= featureMask(VirtioFeature.RING_EVENT_IDX);
  if (protocol.enabled ?? true) wanted |= featureMask(VHOST_USER_F_PROTOCOL_FEATURES);
  return wanted | (options.extra ?? 0n);
}

export function wantedProtocolFeatures(options: ProtocolOptions = {}, memoryMessages: 'table' | 'add-mem-reg' = 'table'): bigint {
  let wanted = 0n;
  if (options.replyAck ?? true) wanted |= featureMask(ProtocolFeature.REPLY_ACK);
  if (options.mq ?? true) wanted |= featureMask(ProtocolFeature.MQ);
  if (options.config ?? true) wanted |= featureMask(ProtocolFeature.CONFIG);
  if (options.status ?? false) wanted |= featureMask(ProtocolFeature.STATUS);
  if (options.configureMemSlots ?? memoryMessages === 'add-mem-reg') wanted |= featureMask(ProtocolFeature.CONFIGURE_MEM_SLOTS);
  if (options.backendReq ?? false) wanted |= featureMask(ProtocolFeature.BACKEND_REQ);
  if (options.inflight !== undefined) wanted |= featureMask(ProtocolFeature.INFLIGHT_SHMFD);
  return wanted | (options.extra ?? 0n);
}
