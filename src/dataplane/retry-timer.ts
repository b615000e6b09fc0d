/** A one-shot monotonic timerfd for throttle retries (also the tick of a kick-less, polling-mode ring). */
import { sys, addressOf, CLOCK_MONOTONIC, TFD_CLOEXEC, TFD_NONBLOCK } from '../sys/libc.js';
import { check } from '../sys/errors.js';
import { drainEventFd } from '../sys/eventfd.js';

export class RetryTimer {
  readonly fd = check(sys.timerfdCreate(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC), 'timerfd_create');
  /** struct itimerspec: interval {sec, nsec}, value {sec, nsec}. */
  private readonly spec = Buffer.alloc(32);
  private readonly specAddress = addressOf(this.spec);

  /** Arms the timer to fire once after `nanos` (and every `intervalNanos` after that, if non-zero). */
  arm(nanos: number, intervalNanos = 0): void {
    const value = Math.max(1, Math.round(nanos));
    this.spec.writeBigInt64LE(BigInt(Math.floor(intervalNanos / 1e9)), 0);
    this.spec.writeBigInt64LE(BigInt(intervalNanos % 1e9), 8);
    this.spec.writeBigInt64LE(BigInt(Math.floor(value / 1e9)), 16);
    this.spec.writeBigInt64LE(BigInt(value % 1e9), 24);
    check(sys.timerfdSettime(this.fd, 0, this.specAddress, 0), 'timerfd_settime');
  }

  disarm(): void {
    this.spec.fill(0);
    check(sys.timerfdSettime(this.fd, 0, this.specAddress, 0), 'timerfd_settime');
  }

  /** Consumes expirations so the fd stops being readable. */
  acknowledge(): void {
    drainEventFd(this.fd);
  }

  close(): void {
    sys.close(this.fd);
  }
}
