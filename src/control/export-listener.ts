/**
 * The listening socket of one disk. One front-end at a time: while a session is active, further
 * connections are accepted and closed at once with a log line (a second QEMU must not share the rings).
 * When the session ends the next connection is served, so a restarted QEMU reconnects to the same daemon.
 */
import fs from 'node:fs';
import { pollFd, type PollHandle } from '../sys/fd-poll.js';
import { acceptConnection, isSocketLive, listenUnix, SocketPathError } from '../sys/unix-socket.js';
import { closeFd } from '../sys/fd.js';
import { VhostUserSession } from './session.js';
import type { DiskQueues } from './disk-queues.js';
import { errorFields, type Logger } from '../log.js';

/** How long a second connection waits for the current session to end before it is refused. */
const RECONNECT_GRACE_MS = 1000;


/** Who may connect to a socket vublk creates: its mode (default 0600) and, optionally, its owner and group. */
export interface SocketAccess {
  mode?: number | undefined;
  uid?: number | undefined;
  gid?: number | undefined;
}

export type ListenAddress = ({ kind: 'path'; path: string } & SocketAccess) | { kind: 'fd'; fd: number };

export const DEFAULT_SOCKET_MODE = 0o600;

/** Binds `path`, replacing a stale socket file left by a dead daemon but never a live one. */
export function bindSocketPath(path: string, access: SocketAccess = {}): number {
  if (fs.existsSync(path)) {
    const stat = fs.lstatSync(path);
    if (!stat.isSocket()) throw new SocketPathError(path, 'exists and is not a socket; refusing to replace it');
    if (isSocketLive(path)) throw new SocketPathError(path, 'is in use by a running process (another vublk?)');
    fs.unlinkSync(path);
  }
  // Created owner-only, so there is no moment in which the socket is reachable with the umask's looser mode.
  const previousMask = process.umask(0o177);
  let fd: number;
  try {
    fd = listenUnix(path);
  } finally {
    process.umask(previousMask);
  }
  try {
    if (access.uid !== undefined || access.gid !== undefined) fs.chownSync(path, access.uid ?? -1, access.gid ?? -1);
    fs.chmodSync(path, access.mode ?? DEFAULT_SOCKET_MODE);
  } catch (error) {
    closeFd(fd);
    fs.rmSync(path, { force: true });
    throw new SocketPathError(path, `cannot set its owner or mode: ${(error as Error).message}`);
  }
  return fd;
}

export class ExportListener {
  private readonly listenFd: number;
  private readonly poll: PollHandle;
  private session: VhostUserSession | null = null;
  /** A connection that arrived while the previous session was still tearing down; served right after. */
  private waiting: number | null = null;
  private waitingTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private sessionEnded: (() => void) | null = null;
  /** Connections served since start (including the current one). */
  connections = 0;

  constructor(
    private readonly queues: DiskQueues,
    private readonly address: ListenAddress,
    private readonly log: Logger,
  ) {
    this.listenFd = address.kind === 'path' ? bindSocketPath(address.path, address) : address.fd;
    this.poll = pollFd(this.listenFd, { readable: true }, () => this.acceptPending());
    log.info({ socket: address.kind === 'path' ? address.path : `fd:${address.fd}` }, 'listening for a vhost-user front-end');
  }

  get hasSession(): boolean {
    return this.session !== null;
  }

  private acceptPending(): void {
    for (;;) {
      let fd: number | null;
      try {
        fd = acceptConnection(this.listenFd);
      } catch (error) {
        this.log.error(errorFields(error), 'accept failed');
        return;
      }
      if (fd === null) return;
      if (this.closed) {
        closeFd(fd);
      } else if (this.session === null) {
        this.startSession(fd);
      } else if (this.waiting === null) {
        // A restarted front-end often reconnects before we have seen the old connection close, or while
        // its teardown runs: hold the newcomer briefly and serve it next, refusing it only if the current
        // session is still alive when the grace period ends.
        this.waiting = fd;
        this.waitingTimer = setTimeout(() => this.refuseWaiting(), RECONNECT_GRACE_MS);
      } else {
        this.refuse(fd);
      }
    }
  }

  private refuse(fd: number): void {
    this.log.warn('refused a second front-end: this disk already has one connected');
    closeFd(fd);
  }

  private refuseWaiting(): void {
    if (this.waiting === null || this.session?.isEnding) return;
    const fd = this.waiting;
    this.waiting = null;
    this.refuse(fd);
  }

  private startSession(fd: number): void {
    this.connections++;
    this.log.info({ connection: this.connections }, 'front-end connected');
    this.session = new VhostUserSession(fd, this.queues, this.log, () => {
      this.session = null;
      const next = this.waiting;
      this.waiting = null;
      clearTimeout(this.waitingTimer);
      if (next !== null && !this.closed) {
        this.startSession(next);
        return;
      }
      if (next !== null) closeFd(next);
      this.sessionEnded?.();
    });
  }

  /** Stops accepting, closes the active session and waits for its teardown; removes the socket file. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.poll.stop();
    this.poll.close();
    if (this.session !== null) {
      const ended = new Promise<void>((resolve) => (this.sessionEnded = resolve));
      this.session.close();
      await ended;
    }
    clearTimeout(this.waitingTimer);
    if (this.waiting !== null) closeFd(this.waiting);
    closeFd(this.listenFd);
    if (this.address.kind === 'path') fs.rmSync(this.address.path, { force: true });
  }
}
