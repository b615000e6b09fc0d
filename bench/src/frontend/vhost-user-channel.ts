/**
 * The front-end's end of the vhost-user socket: sends messages (with SCM_RIGHTS fds) and reassembles
 * replies from the byte stream, every wait bounded. It checks nothing about meaning: that is the caller's
 * job, so hostile tests can send and read anything.
 */
import { connectUnix, recvWithFds, sendWithFds } from '../../../src/sys/unix-socket.js';
import { closeAll, closeFd } from '../../../src/sys/fd.js';
import { Errno, SyscallError } from '../../../src/sys/errors.js';
import { decodeHeader, encodeMessage, HEADER_SIZE, requestName } from '../../../protocol/vhost-user.js';
import { FdWatcher, NOT_YET } from './fd-watcher.js';
import { BackendDisconnectedError, FrontendClosedError, FrontendTimeoutError, UnexpectedReplyError } from './errors.js';

export interface VhostUserMessage {
  request: number;
  flags: number;
  payload: Buffer;
  /** Fds that arrived with the message; the receiver owns (and must close) them. */
  fds: number[];
}

/** Replies larger than this mean the stream is desynchronised (or the back-end is broken). */
export const MAX_REPLY_PAYLOAD = 64 * 1024;

const DISCONNECT_ERRNOS = new Set<string>(['EPIPE', 'ECONNRESET', 'ENOTCONN']);

export class VhostUserChannel {
  private readonly watcher: FdWatcher;
  private closed = false;
  private peerClosed = false;
  /** Partial message being reassembled; survives a timed-out receive so the stream stays in sync. */
  private rxHeader = Buffer.alloc(HEADER_SIZE);
  private rxPayload: Buffer | null = null;
  private rxFill = 0;
  private rxFds: number[] = [];

  constructor(readonly fd: number) {
    this.watcher = new FdWatcher(fd);
  }

  /** Connects to a listening back-end, retrying while the socket does not exist or refuses (it may be starting). */
  static async connect(path: string, timeoutMs: number): Promise<VhostUserChannel> {
    const deadline = Date.now() + timeoutMs;
    let lastError: unknown;
    for (;;) {
      try {
        return new VhostUserChannel(connectUnix(path));
      } catch (error) {
        const retryable = error instanceof SyscallError && (error.errno === Errno.ENOENT || error.errno === Errno.ECONNREFUSED);
        if (!retryable) throw error;
        lastError = error;
      }
      if (Date.now() >= deadline) {
        throw new FrontendTimeoutError(`a back-end listening on ${path}`, timeoutMs, (lastError as Error).message);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  get isOpen(): boolean {
    return !this.closed && !this.peerClosed;
  }

  /** Sends a well-framed message: 12-byte header (size = payload length) then the payload. */
  async send(request: number, flags: number, payload: Uint8Array, fds: readonly number[], timeoutMs: number): Promise<void> {
    await this.sendBytes(encodeMessage(request, flags, payload), fds, timeoutMs, requestName(request));
  }

  /** Sends arbitrary bytes (e.g. a header whose size field lies); fds ride on the first byte. */
  async sendBytes(bytes: Uint8Array, fds: readonly number[], timeoutMs: number, what = 'raw bytes'): Promise<void> {
    this.assertOpen(`sending ${what}`);
    let offset = 0;
    let pendingFds = fds;
    const trySend = (): true | typeof NOT_YET => {
      while (offset < bytes.length) {
        let sent: number | null;
        try {
          sent = sendWithFds(this.fd, bytes, offset, pendingFds);
        } catch (error) {
          if (error instanceof SyscallError && DISCONNECT_ERRNOS.has(error.errnoName)) {
            this.peerClosed = true;
            throw new BackendDisconnectedError(`sending ${what}`);
          }
          throw error;
        }
        if (sent === null) return NOT_YET;
        offset += sent;
        pendingFds = [];
      }
      return true;
    };
    if (bytes.length === 0) return;
    await this.watcher.until(trySend, { timeoutMs, writable: true, what: `socket space to send ${what}` });
  }

  /** Waits for one complete message. Throws BackendDisconnectedError on EOF, FrontendTimeoutError on timeout. */
  async receive(timeoutMs: number, what: string): Promise<VhostUserMessage> {
    this.assertOpen(`waiting for ${what}`);
    return this.watcher.until(() => this.tryReceive(what), {
      timeoutMs,
      what,
      detail: () => (this.rxFill > 0 ? `${this.rxFill} bytes of a message arrived, the rest did not` : 'nothing arrived'),
    });
  }

  /** Non-blocking: a complete message, or NOT_YET. */
  tryReceive(what = 'a message'): VhostUserMessage | typeof NOT_YET {
    if (this.closed) throw new FrontendClosedError(`receiving ${what}`);
    if (this.peerClosed) throw new BackendDisconnectedError(what);
    for (;;) {
      const target = this.rxPayload ?? this.rxHeader;
      const start = this.rxPayload ? this.rxFill - HEADER_SIZE : this.rxFill;
      if (start < target.length) {
        let received: ReturnType<typeof recvWithFds>;
        try {
          received = recvWithFds(this.fd, target, start, target.length - start);
        } catch (error) {
          if (error instanceof SyscallError && DISCONNECT_ERRNOS.has(error.errnoName)) {
            this.peerClosed = true;
            throw new BackendDisconnectedError(what);
          }
          throw error;
        }
        if (received === null) return NOT_YET;
        this.rxFds.push(...received.fds);
        if (received.bytes === 0) {
          this.peerClosed = true;
          throw new BackendDisconnectedError(what);
        }
        this.rxFill += received.bytes;
        if (this.rxFill < HEADER_SIZE) continue;
      }
      const header = decodeHeader(this.rxHeader);
      if (this.rxPayload === null) {
        if (header.size > MAX_REPLY_PAYLOAD) {
          this.peerClosed = true;
          throw new UnexpectedReplyError(
            what,
            `header announces ${header.size} payload bytes (limit ${MAX_REPLY_PAYLOAD}); stream is out of sync`,
          );
        }
        this.rxPayload = Buffer.alloc(header.size);
      }
      if (this.rxFill < HEADER_SIZE + header.size) continue;
      const message: VhostUserMessage = { request: header.request, flags: header.flags, payload: this.rxPayload, fds: this.rxFds };
      this.rxHeader = Buffer.alloc(HEADER_SIZE);
      this.rxPayload = null;
      this.rxFill = 0;
      this.rxFds = [];
      return message;
    }
  }

  /** Closes the socket; the back-end sees a hang-up. Fds of a partly received message are closed too. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    closeFd(this.fd);
    closeAll(this.rxFds);
    this.rxFds = [];
  }

  private assertOpen(what: string): void {
    if (this.closed) throw new FrontendClosedError(what);
    if (this.peerClosed) throw new BackendDisconnectedError(what);
  }
}
