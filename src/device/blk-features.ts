/** The virtio and vhost-user feature sets vublk offers for a virtio-blk disk. */
import { VirtioFeature, featureMask } from '../../protocol/virtio.js';
import { BlkFeature } from '../../protocol/virtio-blk.js';
import { ProtocolFeature, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES } from '../../protocol/vhost-user.js';

/** What the image can do beyond reads, writes and flushes (network images may lack either). */
export interface ImageCapabilities {
  discard: boolean;
  writeZeroes: boolean;
}

export function offeredVirtioFeatures(readOnly: boolean, image: ImageCapabilities = { discard: true, writeZeroes: true }): bigint {
  const common = featureMask(
    VirtioFeature.VERSION_1,
    VirtioFeature.RING_INDIRECT_DESC,
    VirtioFeature.RING_EVENT_IDX,
    VHOST_USER_F_PROTOCOL_FEATURES,
    // Live migration: the device logs the guest pages it writes (with LOG_SHMFD below).
    VHOST_F_LOG_ALL,
    BlkFeature.SIZE_MAX,
    BlkFeature.SEG_MAX,
    BlkFeature.BLK_SIZE,
    BlkFeature.FLUSH,
    BlkFeature.TOPOLOGY,
    BlkFeature.MQ,
    BlkFeature.CONFIG_WCE,
  );
  // A read-only disk advertises RO and no way to change data, so guests never issue discards to it.
  if (readOnly) return common | featureMask(BlkFeature.RO);
  return common | (image.discard ? featureMask(BlkFeature.DISCARD) : 0n) | (image.writeZeroes ? featureMask(BlkFeature.WRITE_ZEROES) : 0n);
}

/**
 * INFLIGHT_SHMFD: requests stay in flight across drains and complete out of order, so QEMU's reconnect rewind
 * (last_avail_idx := used_idx) cannot tell which requests a dead back-end left unfinished; the inflight region
 * does (src/dataplane/inflight-queue.ts).
 */
export const OFFERED_PROTOCOL_FEATURES = featureMask(
  ProtocolFeature.MQ,
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.CONFIG,
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.INFLIGHT_SHMFD,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.STATUS,
);
