/**
 * What QEMU keeps of a vhost-user-blk back-end's inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD):
 * the fd the first back-end returned from GET_INFLIGHT_FD and its description. It outlives connections: after
 * a back-end dies, the next one receives the same region with SET_INFLIGHT_FD and finds in it what the dead
 * one left in flight. A device reset drops it (QEMU's vhost_dev_free_inflight).
 */
import type { InflightDescription } from '../../../protocol/vhost-user.js';
import { closeFd } from '../../../src/sys/fd.js';

export class InflightKeeper {
  fd = -1;
  description: InflightDescription | null = null;

  get held(): boolean {
    return this.fd >= 0 && this.description !== null;
  }

  keep(fd: number, description: InflightDescription): void {
    this.drop();
    this.fd = fd;
    this.description = description;
  }

  /** Forgets the region (device reset, or the end of the test). */
  drop(): void {
    closeFd(this.fd);
    this.fd = -1;
    this.description = null;
  }
}
