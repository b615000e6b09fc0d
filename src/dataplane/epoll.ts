/** A small epoll set for a worker thread: fds are registered with themselves as the event tag. */
import { sys, addressOf, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLET, EPOLLIN } from '../sys/libc.js';
import { check, lastErrno, Errno, SyscallError } from '../sys/errors.js';

/** struct epoll_event is packed on x86-64: le32 events, le64 data. */
const EVENT_SIZE = 12;

export class EpollSet {
  readonly fd: number;
  private readonly events: Buffer;
  private readonly eventsAddress: number;
  private readonly ctlEvent = Buffer.alloc(EVENT_SIZE);
  private readonly ctlAddress = addressOf(this.ctlEvent);

  constructor(private readonly maxEvents = 8) {
    this.fd = check(sys.epollCreate1(EPOLL_CLOEXEC), 'epoll_create1');
    this.events = Buffer.alloc(EVENT_SIZE * maxEvents);
    this.eventsAddress = addressOf(this.events);
  }

  /**
   * Watches fd for input. Edge-triggered registration reports each new write to an eventfd without the
   * counter having to be read back, which saves a syscall per wake-up on the kick path.
   */
  add(fd: number, edgeTriggered = false): void {
    this.ctlEvent.writeUInt32LE((EPOLLIN | (edgeTriggered ? EPOLLET : 0)) >>> 0, 0);
    this.ctlEvent.writeUInt32LE(fd, 4);
    this.ctlEvent.writeUInt32LE(0, 8);
    check(sys.epollCtl(this.fd, EPOLL_CTL_ADD, fd, this.ctlAddress), 'epoll_ctl(ADD)', `fd ${fd}`);
  }

  /** Removing an fd that is already gone (closed by its owner) is not an error. */
  remove(fd: number): void {
    if (sys.epollCtl(this.fd, EPOLL_CTL_DEL, fd, this.ctlAddress) < 0) {
      const errno = lastErrno();
      if (errno !== Errno.EBADF && errno !== Errno.ENOENT) throw new SyscallError('epoll_ctl(DEL)', errno, `fd ${fd}`);
    }
  }

  /** Blocks until at least one fd is readable; returns the ready fds (written into `ready`), count returned. */
  wait(ready: Int32Array, timeoutMs = -1): number {
    const n = sys.epollWait(this.fd, this.eventsAddress, Math.min(this.maxEvents, ready.length), timeoutMs);
    if (n < 0) {
      const errno = lastErrno();
      if (errno === Errno.EINTR) return 0;
      throw new SyscallError('epoll_wait', errno);
    }
    for (let i = 0; i < n; i++) ready[i] = this.events.readInt32LE(i * EVENT_SIZE + 4);
    return n;
  }

  close(): void {
    sys.close(this.fd);
  }
}
