/**
 * An epoll set whose own fd is the one thing an owner exposes to its caller's event loop: it becomes readable
 * whenever any registered fd is ready for what it was registered for (in or out). Used by back-ends whose
 * sockets and timers change over their life (reconnects) while the fd the worker polls must stay the same.
 * Level-triggered throughout, so nothing is lost when the owner stops early.
 */
import {
  sys,
  addressOf,
  EPOLL_CLOEXEC,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLLIN,
  TFD_CLOEXEC,
  TFD_NONBLOCK,
  CLOCK_MONOTONIC,
} from './libc.js';
import { check, lastErrno, Errno, SyscallError } from './errors.js';

export const EPOLLOUT = 0x4;
const EVENT_SIZE = 12;

export class InterestSet {
  readonly fd: number;
  private readonly ctl = Buffer.alloc(EVENT_SIZE);
  private readonly ctlAddress = addressOf(this.ctl);
  private readonly interest = new Map<number, number>();

  constructor() {
    this.fd = check(sys.epollCreate1(EPOLL_CLOEXEC), 'epoll_create1');
  }

  /** Registers fd or changes what it is watched for; `readable`/`writable` pick EPOLLIN/EPOLLOUT. */
  watch(fd: number, readable: boolean, writable: boolean): void {
    const events = (readable ? EPOLLIN : 0) | (writable ? EPOLLOUT : 0);
    const current = this.interest.get(fd);
    if (current === events) return;
    this.ctl.writeUInt32LE(events >>> 0, 0);
    this.ctl.writeUInt32LE(fd, 4);
    this.ctl.writeUInt32LE(0, 8);
    const op = current === undefined ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    check(sys.epollCtl(this.fd, op, fd, this.ctlAddress), op === EPOLL_CTL_ADD ? 'epoll_ctl(ADD)' : 'epoll_ctl(MOD)', `fd ${fd}`);
    this.interest.set(fd, events);
  }

  /** Call before closing fd. Forgetting an fd that was never watched is fine. */
  forget(fd: number): void {
    if (!this.interest.delete(fd)) return;
    if (sys.epollCtl(this.fd, EPOLL_CTL_DEL, fd, this.ctlAddress) < 0) {
      const errno = lastErrno();
      if (errno !== Errno.EBADF && errno !== Errno.ENOENT) throw new SyscallError('epoll_ctl(DEL)', errno, `fd ${fd}`);
    }
  }

  close(): void {
    sys.close(this.fd);
  }
}

/** Readiness flags as epoll reports them, for callers that want to know about errors and hang-ups too. */
/** A one-shot monotonic timerfd: `arm(ms)` (re)starts it, `disarm()` stops it, `clear()` reads off an expiry. */
export class OneShotTimer {
  readonly fd: number;
  private readonly spec = Buffer.alloc(32);
  private readonly specAddress = addressOf(this.spec);
  private readonly scratch = Buffer.alloc(8);
  private readonly scratchAddress = addressOf(this.scratch);

  constructor() {
    this.fd = check(sys.timerfdCreate(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC), 'timerfd_create');
  }

  arm(delayMs: number): void {
    const nanos = Math.max(1, Math.round(delayMs * 1e6)); // 0 would disarm
    this.spec.fill(0);
    this.spec.writeBigInt64LE(BigInt(Math.floor(nanos / 1e9)), 16);
    this.spec.writeBigInt64LE(BigInt(nanos % 1e9), 24);
    check(sys.timerfdSettime(this.fd, 0, this.specAddress, 0), 'timerfd_settime');
  }

  disarm(): void {
    this.spec.fill(0);
    check(sys.timerfdSettime(this.fd, 0, this.specAddress, 0), 'timerfd_settime');
  }

  /** Consumes a pending expiry so the fd stops being readable. */
  clear(): void {
    sys.read(this.fd, this.scratchAddress, 8);
  }

  close(): void {
    sys.close(this.fd);
  }
}
