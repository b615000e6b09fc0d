/**
 * vhost-user message framing on a non-blocking Unix socket watched by koffi.node.poll.
 *
 * One message is read at a time (header, then payload) and handed to `onMessage`; reading pauses until its
 * promise settles, which keeps message handling strictly in order and gives the peer back-pressure.
 * A header that cannot start a valid message (bad version, oversized payload) means the stream is no longer
 * framed: the stream is closed rather than guessed at.
 *
 * Back-pressure both ways: no message is read while replies wait to be sent, so a peer that sends requests
 * but never reads the answers fills its own socket, not the daemon's memory (at most one reply is queued).
 *
 * A peer that hangs up while a handler is still running (a device start waiting for an RBD lock) is reported
 * at once through `onPeerGone`, so the handler can give up its wait; the stream itself closes only when the
 * handler is done, as handlers assume they never run beside the teardown. Until then the hang-up is no longer
 * watched: the poll is level-triggered, and a hang-up left armed would be reported again on every loop turn
 * (a spinning CPU for as long as the handler runs).
 */
import { pollFd, type PollEvents, type PollHandle } from '../sys/fd-poll.js';
import { HEADER_SIZE, MAX_PAYLOAD_SIZE, HeaderFlag, decodeHeader, type MessageHeader } from '../../protocol/vhost-user.js';
import { recvWithFds, sendWithFds, TruncatedFdsError } from '../sys/unix-socket.js';
import { closeAll, closeFd } from '../sys/fd.js';

export interface IncomingMessage {
  header: MessageHeader;
  payload: Uint8Array;
  /** Owned by the handler: whatever it does not keep must be closed (the stream closes leftovers). */
  fds: number[];
}

export type CloseReason = { kind: 'peer-closed' } | { kind: 'protocol-error'; detail: string } | { kind: 'local' };

export class MessageStream {
  private readonly buffer = Buffer.alloc(HEADER_SIZE + MAX_PAYLOAD_SIZE);
  private received = 0;
  private header: MessageHeader | null = null;
  private fds: number[] = [];
  private readonly poll: PollHandle;
  private closed = false;
  private busy = false;
  /** The peer hung up while a handler ran (see the header); the stream closes when the handler is done. */
  private peerGone = false;
  private readonly outbox: { bytes: Uint8Array; offset: number; fds: number[] }[] = [];

  constructor(
    readonly fd: number,
    private readonly onMessage: (message: IncomingMessage) => Promise<void>,
    private readonly onClose: (reason: CloseReason) => void,
    private readonly onPeerGone: () => void = () => undefined,
  ) {
    this.poll = pollFd(fd, { readable: true, disconnect: true }, (status, events) => this.onPoll(status, events));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Sends (or queues, if the socket is full) one whole message; fds are sent, not closed. */
  send(bytes: Uint8Array, fds: number[] = []): void {
    if (this.closed) return;
    this.outbox.push({ bytes, offset: 0, fds });
    this.flush();
  }

  close(reason: CloseReason = { kind: 'local' }): void {
    if (this.closed) return;
    this.closed = true;
    this.poll.stop();
    this.poll.close();
    closeAll(this.fds);
    this.fds = [];
    closeFd(this.fd);
    this.onClose(reason);
  }

  private onPoll(status: number, events: PollEvents): void {
    if (this.closed) return;
    if (status < 0) {
      this.close({ kind: 'protocol-error', detail: `poll failed with status ${status}` });
      return;
    }
    if (events.disconnect && this.busy && !this.peerGone) {
      this.peerGone = true;
      this.rearm();
      this.onPeerGone();
      return;
    }
    if (events.writable) this.flush();
    if (events.readable || events.disconnect || (events.writable && this.canRead)) this.readAvailable();
  }

  private flush(): void {
    while (this.outbox.length > 0) {
      const next = this.outbox[0]!;
      let sent: number | null;
      try {
        sent = sendWithFds(this.fd, next.bytes, next.offset, next.offset === 0 ? next.fds : []);
      } catch (error) {
        this.close({ kind: 'protocol-error', detail: error instanceof Error ? error.message : String(error) });
        return;
      }
      if (sent === null) break;
      next.offset += sent;
      if (next.offset >= next.bytes.length) this.outbox.shift();
    }
    this.rearm();
  }

  private get canRead(): boolean {
    return !this.busy && this.outbox.length === 0;
  }

  private rearm(): void {
    if (this.closed) return;
    // While a handler runs after a hang-up, nothing is left to watch for (see the header); a reply it still
    // queues is sent once it is done (and fails then, closing the stream).
    if (this.busy && this.peerGone) {
      this.poll.stop();
      return;
    }
    this.poll.start({ readable: this.canRead, writable: this.outbox.length > 0, disconnect: true }, (s, e) => this.onPoll(s, e));
  }

  private readAvailable(): void {
    while (!this.closed && this.canRead) {
      const want = this.header === null ? HEADER_SIZE : HEADER_SIZE + this.header.size;
      let got: ReturnType<typeof recvWithFds>;
      try {
        got = recvWithFds(this.fd, this.buffer, this.received, want - this.received);
      } catch (error) {
        const detail =
          error instanceof TruncatedFdsError ? error.message : `recvmsg: ${error instanceof Error ? error.message : String(error)}`;
        this.close({ kind: 'protocol-error', detail });
        return;
      }
      if (got === null) return;
      if (got.bytes === 0) {
        this.close({ kind: 'peer-closed' });
        return;
      }
      this.fds.push(...got.fds);
      this.received += got.bytes;
      if (this.header === null && this.received >= HEADER_SIZE) {
        const header = decodeHeader(this.buffer);
        if ((header.flags & HeaderFlag.VERSION_MASK) !== HeaderFlag.VERSION) {
          this.close({ kind: 'protocol-error', detail: `unsupported protocol version ${header.flags & HeaderFlag.VERSION_MASK}` });
          return;
        }
        if (header.size > MAX_PAYLOAD_SIZE) {
          this.close({ kind: 'protocol-error', detail: `payload size ${header.size} exceeds ${MAX_PAYLOAD_SIZE}` });
          return;
        }
        this.header = header;
      }
      if (this.header !== null && this.received === HEADER_SIZE + this.header.size) this.dispatch(this.header);
    }
  }

  private dispatch(header: MessageHeader): void {
    const message: IncomingMessage = {
      header,
      payload: Uint8Array.prototype.slice.call(this.buffer, HEADER_SIZE, HEADER_SIZE + header.size),
      fds: this.fds,
    };
    this.header = null;
    this.received = 0;
    this.fds = [];
    this.busy = true;
    this.rearm();
    this.onMessage(message)
      .catch((error: unknown) => {
        this.close({ kind: 'protocol-error', detail: error instanceof Error ? error.message : String(error) });
      })
      .finally(() => {
        this.busy = false;
        if (this.closed) return;
        this.rearm();
        this.readAvailable();
      });
  }
}
