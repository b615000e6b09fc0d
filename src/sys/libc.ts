/**
 * Raw koffi bindings to the libc calls vublk needs. Addresses are plain Numbers (`uintptr_t`):
 * user-space addresses fit in 47 bits, and BigInt pointers would cost time on the data path.
 * Every function returns the C result; errno is read by the caller with `lastErrno()` right after.
 */
import koffi from 'koffi';

/** The one handle on libc: modules with calls of their own (block-io, io-uring, net-socket) declare them on it. */
export const libc = koffi.load('libc.so.6');

/** The type a declared libc function is cast to. */
export type Fn<A extends unknown[], R> = (...args: A) => R;

export const sys = {
  close: libc.func('int close(int fd)') as Fn<[number], number>,
  /** Ends the process at once: no exit handlers, no joining of worker threads. */
  exitNow: libc.func('void _exit(int status)') as Fn<[number], void>,
  read: libc.func('intptr_t read(int fd, uintptr_t buf, size_t count)') as Fn<[number, number, number], number>,
  write: libc.func('intptr_t write(int fd, uintptr_t buf, size_t count)') as Fn<[number, number, number], number>,
  socket: libc.func('int socket(int domain, int type, int protocol)') as Fn<[number, number, number], number>,
  bind: libc.func('int bind(int fd, uintptr_t addr, uint32_t len)') as Fn<[number, number, number], number>,
  listen: libc.func('int listen(int fd, int backlog)') as Fn<[number, number], number>,
  accept4: libc.func('int accept4(int fd, uintptr_t addr, uintptr_t len, int flags)') as Fn<[number, number, number, number], number>,
  connect: libc.func('int connect(int fd, uintptr_t addr, uint32_t len)') as Fn<[number, number, number], number>,
  recvmsg: libc.func('intptr_t recvmsg(int fd, uintptr_t msg, int flags)') as Fn<[number, number, number], number>,
  sendmsg: libc.func('intptr_t sendmsg(int fd, uintptr_t msg, int flags)') as Fn<[number, number, number], number>,
  getsockopt: libc.func('int getsockopt(int fd, int level, int name, uintptr_t val, uintptr_t len)') as Fn<
    [number, number, number, number, number],
    number
  >,
  poll: libc.func('int poll(uintptr_t fds, unsigned long nfds, int timeout)') as Fn<[number, number, number], number>,
  fcntl: libc.func('int fcntl(int fd, int cmd, int arg)') as Fn<[number, number, number], number>,
  /** Returns a bigint (MAP_FAILED = 2^64-1 does not fit a Number) on failure. */
  mmap: libc.func('uintptr_t mmap(uintptr_t addr, size_t length, int prot, int flags, int fd, int64_t offset)') as Fn<
    [number, number, number, number, number, number],
    number | bigint
  >,
  munmap: libc.func('int munmap(uintptr_t addr, size_t length)') as Fn<[number, number], number>,
  eventfd: libc.func('int eventfd(unsigned int initval, int flags)') as Fn<[number, number], number>,
  epollCreate1: libc.func('int epoll_create1(int flags)') as Fn<[number], number>,
  epollCtl: libc.func('int epoll_ctl(int epfd, int op, int fd, uintptr_t event)') as Fn<[number, number, number, number], number>,
  epollWait: libc.func('int epoll_wait(int epfd, uintptr_t events, int maxevents, int timeout)') as Fn<
    [number, number, number, number],
    number
  >,
  timerfdCreate: libc.func('int timerfd_create(int clockid, int flags)') as Fn<[number, number], number>,
  timerfdSettime: libc.func('int timerfd_settime(int fd, int flags, uintptr_t newValue, uintptr_t oldValue)') as Fn<
    [number, number, number, number],
    number
  >,
  preadv: libc.func('intptr_t preadv(int fd, uintptr_t iov, int iovcnt, int64_t offset)') as Fn<[number, number, number, number], number>,
  pwritev: libc.func('intptr_t pwritev(int fd, uintptr_t iov, int iovcnt, int64_t offset)') as Fn<[number, number, number, number], number>,
  lseek: libc.func('int64_t lseek(int fd, int64_t offset, int whence)') as Fn<[number, number, number], number>,
  fdatasync: libc.func('int fdatasync(int fd)') as Fn<[number], number>,
  fallocate: libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)') as Fn<[number, number, number, number], number>,
  memfdCreate: libc.func('int memfd_create(const char *name, unsigned int flags)') as Fn<[string, number], number>,
  ftruncate: libc.func('int ftruncate(int fd, int64_t length)') as Fn<[number, number], number>,
  sendto: libc.func('intptr_t sendto(int fd, uintptr_t buf, size_t len, int flags, uintptr_t addr, uint32_t addrlen)') as Fn<
    [number, number, number, number, number, number],
    number
  >,
  recv: libc.func('intptr_t recv(int fd, uintptr_t buf, size_t len, int flags)') as Fn<[number, number, number, number], number>,
  getsockname: libc.func('int getsockname(int fd, uintptr_t addr, uintptr_t len)') as Fn<[number, number, number], number>,
};

/** Address of a Buffer's bytes as a Number. The caller keeps the Buffer alive while the address is in use. */
export function addressOf(buffer: Buffer | Uint8Array): number {
  return Number(koffi.address(buffer));
}

/** Linux's UIO_MAXIOV: one readv/writev/preadv/pwritev (or io_uring READV/WRITEV, librbd aio) takes at most this many iovecs. */
export const IOV_MAX = 1024;
/** sizeof(struct iovec) on 64-bit Linux. */
export const IOVEC_BYTES = 16;
/** sizeof(struct msghdr) on 64-bit Linux. */
export const MSGHDR_SIZE = 56;

export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SCM_RIGHTS = 1;
export const SO_ERROR = 4;
export const SO_TYPE = 3;
export const SO_ACCEPTCONN = 30;
export const SO_DOMAIN = 39;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_DONTWAIT = 0x40;
export const MSG_CMSG_CLOEXEC = 0x40000000;
export const MSG_CTRUNC = 0x8;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLIN = 0x1;
export const EPOLLET = 0x80000000;
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const CLOCK_MONOTONIC = 1;
export const TFD_NONBLOCK = 0o4000;
export const TFD_CLOEXEC = 0o2000000;
export const MFD_CLOEXEC = 1;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_GETFD = 1;
export const F_SETFD = 2;
export const FD_CLOEXEC = 1;
export const O_NONBLOCK = 0o4000;
export const FALLOC_FL_KEEP_SIZE = 0x1;
export const FALLOC_FL_PUNCH_HOLE = 0x2;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** fcntl with a pointer argument (struct flock for OFD locks); the same libc symbol as `sys.fcntl`. */
export const fcntlPointer = libc.func('int fcntl(int fd, int cmd, uintptr_t arg)') as Fn<[number, number, number], number>;

export const F_DUPFD_CLOEXEC = 1030;
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const MFD_ALLOW_SEALING = 2;
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
