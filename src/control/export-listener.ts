/**
 * The listening socket of one disk. One front-end at a time: while a session is active, further
 * connections are accepted and closed at once with a log line (a second QEMU must not share the rings).
 * When the session ends the next connection is served, so a restarted QEMU reconnects to the same daemon.
 */
import fs from 'node:fs';
import { pollFd, type PollHandle } from '../sys/fd-poll.js';
import { acceptConnection } from '../sys/unix-socket.js';
import { bindSocketPath, type SocketAccess } from '../sys/socket-path.js';
import { closeFd } from '../sys/fd.js';
import { VhostUserSession } from './session.js';
import type { DiskQueues } from './disk-queues.js';
import { errorFields, type Logger } from '../log.js';

/** How long a second connection waits for the current session to end before it is refused. */
const RECONNECT_GRACE_MS = 1000;
/** After a failed accept (EMFILE), how long the listener waits before trying again. */
const ACCEPT_BACKOFF_MS = 200;

export type { SocketAccess } from '../sys/socket-path.js';
export { bindSocketPath, DEFAULT_SOCKET_MODE } from '../sys/socket-path.js';

export type ListenAddress = ({ kind: 'path'; path: string } & SocketAccess) | { kind: 'fd'; fd: number };

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
        // EMFILE/ENFILE leave the connection pending and the socket readable: back off instead of spinning.
        this.poll.stop();
        setTimeout(() => {
          if (!this.closed) this.poll.start({ readable: true }, () => this.acceptPending());
        }, ACCEPT_BACKOFF_MS).unref();
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
    this.queues.frontEndConnected();
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
      await this.session.closeAfterStoppingRings();
      await ended;
    }
    clearTimeout(this.waitingTimer);
    if (this.waiting !== null) closeFd(this.waiting);
    closeFd(this.listenFd);
    if (this.address.kind === 'path') fs.rmSync(this.address.path, { force: true });
  }
}
