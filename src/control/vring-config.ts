/**
 * What the control plane knows about one virtqueue, as the front-end configured it. The worker owns the
 * running ring; this record decides when it should run and remembers where it stopped.
 */
import { isValidQueueSize } from '../../protocol/split-ring.js';
import { closeFd } from '../sys/fd.js';

export class VringConfig {
  size = 0;
  descUserAddr = -1;
  availUserAddr = -1;
  usedUserAddr = -1;
  /** Guest address used-ring writes are logged at (SET_VRING_ADDR with VHOST_VRING_F_LOG), or -1. */
  usedLogGpa = -1;
  /** Next avail index to consume: from SET_VRING_BASE, updated from the worker when the ring stops. */
  base = 0;
  /** The kick fd (or polling mode) was set since the last stop: the ring may start. */
  kickArmed = false;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  /** Explicit SET_VRING_ENABLE state; null until the front-end sends one. */
  enabled: boolean | null = null;
  /** A start command has been acknowledged and no stop since. */
  running = false;
  poisoned = false;

  constructor(readonly index: number) {}

  get addressed(): boolean {
    return this.descUserAddr >= 0 && this.availUserAddr >= 0 && this.usedUserAddr >= 0 && isValidQueueSize(this.size);
  }

  /** Rings start disabled only when protocol features were negotiated (vhost-user spec, "Ring states"). */
  isEnabled(protocolFeaturesNegotiated: boolean): boolean {
    return this.enabled ?? !protocolFeaturesNegotiated;
  }

  /** Closes every fd this ring holds and forgets its configuration (RESET_DEVICE, disconnect). */
  reset(): void {
    closeFd(this.kickFd);
    closeFd(this.callFd);
    closeFd(this.errFd);
    Object.assign(this, new VringConfig(this.index));
  }
}
