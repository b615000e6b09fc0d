/**
 * An NBD client for one worker thread: synchronous, non-blocking, driven by the caller's epoll.
 *
 *   const client = NbdClient.open({ endpoint, exportName }, onComplete);   // blocking handshake, with a deadline
 *   epoll.add(client.fd);                                                  // one fd, stable for the client's life
 *   client.submitRead(cookie, offset, segments);  ...                      // never blocks, never calls back
 *   on client.fd readable: client.pump();                                  // progresses I/O, calls onComplete
 *
 * Invariants (read before changing anything here):
 * - `fd` is an epoll set owned by the client: readable whenever the socket is readable, the socket is writable
 *   while output is queued, the reconnect/deadline timer fired, or completions are waiting to be delivered.
 *   The socket itself changes across reconnects; `fd` never does.
 * - `onComplete(cookie, errno)` is called only from `pump()` and `close()`, exactly once per submitted cookie.
 * - Every byte from the server is validated before use: a reply header with an unknown handle, a chunk outside
 *   its request, overlapping or missing read data, a bad length or magic is a protocol error. A protocol error
 *   or a lost connection resets the socket; every request on the wire goes back to the queue (oldest first) and
 *   is sent again after a reconnect. Read data is written into the caller's buffers only inside the request's
 *   own range, so a hostile server can corrupt what it serves but never memory outside the request.
 * - Requests larger than the server's maximum payload (or 2 GiB for trim/zeroes) are split into parts; a
 *   request completes when its last part does, with the first error any part saw.
 * - While disconnected, requests wait, unless the owner of several connections to one multi-conn export
 *   hands them to a connected one (`handWaitingTo`). Once `reconnectTimeoutMs` has passed since the
 *   connection was lost, every waiting request completes with EIO (counted in `timedOutRequests`) and new
 *   ones fail at once until the server is back; reconnect attempts continue with capped exponential backoff
 *   for the client's life.
 */
import { performance } from 'node:perf_hooks';
import {
  ChunkType,
  Command,
  CommandFlag,
  NbdErrno,
  NbdProtocolError,
  REQUEST_HEADER_SIZE,
  ReplyFlag,
  MAX_NON_DATA_CHUNK,
  SIMPLE_REPLY_SIZE,
  CHUNK_HEADER_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  decodeErrorChunk,
  decodeHoleChunk,
  decodeReplyHeader,
  encodeRequestHeader,
  errnoFromServer,
  isErrorChunk,
  readU64BE,
  replyHeaderSize,
  type ReplyHeader,
} from '../../../protocol/nbd.js';
import { addressOf, IOV_MAX, MSGHDR_SIZE } from '../../sys/libc.js';
import { Errno, errnoName, SyscallError } from '../../sys/errors.js';
import { createEventFd, drainEventFd, signalEventFd } from '../../sys/eventfd.js';
import { closeFd } from '../../sys/fd.js';
import { waitReadable } from '../../sys/poll-wait.js';
import { InterestSet, OneShotTimer } from '../../sys/interest-set.js';
import {
  connectResult,
  copyMemory,
  describeEndpoint,
  readVector,
  receiveInto,
  sendVector,
  shutdownSocket,
  startConnect,
  zeroMemory,
  type StreamEndpoint,
} from '../../sys/net-socket.js';
import { clientHandshake, NbdHandshakeError, type HandshakeStep, type NbdExportInfo } from './handshake.js';
import { SegmentList, writeIovec, type IoSegments } from './io-segments.js';
import { VublkError } from '../../errors.js';

export type { NbdExportInfo } from './handshake.js';
export type { IoSegments } from './io-segments.js';

export class NbdClientError extends VublkError {
  constructor(message: string, code = 'NBD_CLIENT') {
    super(code, message);
  }
}

export interface NbdClientOptions {
  endpoint: StreamEndpoint;
  exportName: string;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Deadline for one connect + handshake, at open and on every reconnect attempt (default 5000 ms). */
  connectTimeoutMs?: number;
  /**
   * How long requests wait for a lost or stalled server before completing with EIO (default 30000 ms),
   * counted from the moment the connection was lost until a reply arrives again.
   */
  reconnectTimeoutMs?: number;
  /**
   * A request unanswered for this long means the server is stalled: the connection is reset (so no late
   * reply can touch the caller's buffers) and the request is resent after reconnecting (default 60000 ms;
   * 0 disables).
   */
  requestTimeoutMs?: number;
  /** First reconnect delay, doubled per failed attempt up to `maxBackoffMs` (defaults 50 ms, 2000 ms). */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Requests on the wire at once; more wait in the client (default 128). */
  maxInFlight?: number;
  /** Clock in milliseconds (injectable for tests; default performance.now). */
  now?: () => number;
  /**
   * The caller calls `flush()` after every batch of submissions (the network executor's kick): a submission
   * then leaves the socket's write interest alone instead of switching it on for `transmit` to switch off
   * again (two epoll_ctl per batch). Default false: submissions are sent by a pump on writability.
   */
  callerFlushes?: boolean;
  /**
   * The caller tells the client when its epoll reports `fd` ready (`socketReady()`): once a read finds the
   * socket empty, pumps make no further read syscall until then (a drain pumps several times; each used
   * to end in a recv that returned EAGAIN). Default false: every pump reads.
   */
  readyHints?: boolean;
}

/** errno 0 = success; otherwise a positive errno (EIO, ENOSPC, EPERM, EINVAL, ENOTSUP, ...). */
export type NbdCompletion = (cookie: number, errno: number) => void;

export type NbdClientState = 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface NbdClientCounters {
  /** Successful handshakes, the first included. */
  connects: number;
  connectFailures: number;
  connectionsLost: number;
  protocolErrors: number;
  /** Connections reset because a request got no reply within requestTimeoutMs. */
  stalls: number;
  /** Requests (parts) sent again after a reconnect. */
  resubmitted: number;
  /** Requests (parts) handed to another, connected, connection of the same export while this one was down. */
  handedOver: number;
  /** Requests completed with EIO because the server stayed away longer than reconnectTimeoutMs. */
  timedOutRequests: number;
  /** Requests the server answered with an error. */
  serverErrors: number;
  requests: number;
  bytesRead: number;
  bytesWritten: number;
}

const STAGING_SIZE = 64 * 1024;
/** Read data of at least this size is worth a header-sized recv first, so the data lands without a copy. */
const LARGE_DATA = 32 * 1024;
/** Syscalls one pump may make before yielding back to the caller's loop (fairness between disks). */
const PUMP_SYSCALL_BUDGET = 64;
/** Trim / write-zeroes parts stay below 2^32 and aligned to any power-of-two block size. */
const MAX_ZERO_PART = 0x8000_0000;
/** Separate (non-touching) data ranges one read reply may have outstanding before it is declared hostile. */
const MAX_READ_GAPS = 4096;
const EIO = NbdErrno.EIO;
const ENOTSUP = NbdErrno.ENOTSUP;
const EINVAL = NbdErrno.EINVAL;
const EPERM = NbdErrno.EPERM;

/** One caller request. */
class Operation {
  partsLeft = 0;
  errno = 0;
  constructor(
    readonly cookie: number,
    readonly segments: SegmentList | null,
    /** Emulate FUA with a FLUSH after the write when the server lacks NBD_FLAG_SEND_FUA. */
    public flushAfter: boolean,
  ) {}
}

/** One wire request. */
class Part {
  /** Order within the client that holds the part (a handover renumbers it in the receiving client). */
  seq: number;
  /** Slot in the in-flight table while on the wire, else -1. */
  slot = -1;
  /** Bytes of header+payload sent so far. */
  sent = 0;
  /** When the part went on the wire (ms). */
  admittedAt = 0;
  /** Structured read bookkeeping: sorted disjoint [start, end) ranges already received. */
  ranges: number[] = [];
  covered = 0;
  errno = 0;
  constructor(
    readonly op: Operation,
    seq: number,
    readonly command: number,
    readonly flags: number,
    readonly offset: number,
    readonly length: number,
    /** Where this part's data starts within the operation's segments. */
    readonly dataStart: number,
  ) {
    this.seq = seq;
  }

  get payloadBytes(): number {
    return this.command === Command.WRITE ? this.length : 0;
  }

  resetWireState(): void {
    this.slot = -1;
    this.sent = 0;
    this.ranges = [];
    this.covered = 0;
    this.errno = 0;
  }
}

enum Rx {
  /** Waiting for a reply header. */
  Header,
  /** Waiting for `rxNeed` payload bytes of a non-data chunk in staging. */
  Payload,
  /** Waiting for the 8-byte offset that opens an OFFSET_DATA chunk. */
  DataOffset,
  /** Moving `rxDataLeft` bytes of read data into the caller's buffers. */
  Data,
}

export class NbdClient {
  readonly fd: number;
  readonly counters: NbdClientCounters = {
    connects: 0,
    connectFailures: 0,
    connectionsLost: 0,
    protocolErrors: 0,
    stalls: 0,
    resubmitted: 0,
    handedOver: 0,
    timedOutRequests: 0,
    serverErrors: 0,
    requests: 0,
    bytesRead: 0,
    bytesWritten: 0,
  };
  /** The export as the latest handshake described it. */
  info!: NbdExportInfo;
  /** Why the last connection ended or the last attempt failed; empty while healthy. */
  lastError = '';
  lastErrorCode = '';

  private stateValue: NbdClientState = 'connecting';
  private readonly interest = new InterestSet();
  private readonly timer = new OneShotTimer();
  private readonly wake = createEventFd();
  private readonly options: Required<Omit<NbdClientOptions, 'now' | 'callerFlushes' | 'readyHints'>>;
  private readonly now: () => number;
  private readonly callerFlushes: boolean;
  private readonly readyHints: boolean;
  /**
   * With readyHints: false from a read that found the socket empty (EAGAIN, or fewer bytes than asked) until
   * the caller's epoll reports the fd again. Safe because every epoll set between the socket and the
   * caller is level-triggered: bytes that arrive after that read keep the fd ready.
   */
  private mayRead = true;

  // connection
  private socket = -1;
  private epoch = 0;
  private handshake: Generator<HandshakeStep, NbdExportInfo, Buffer | undefined> | null = null;
  private step: HandshakeStep | null = null;
  private stepBuffer: Buffer = Buffer.alloc(0);
  private stepDone = 0;
  private connectPending = false;
  private attemptDeadline = 0;
  private structured = false;

  // reconnect
  /** When the connection was lost (-1: healthy). Cleared by the first reply after a reconnect, not by the handshake. */
  private unhealthySince = -1;
  /** Next time the in-flight requests are checked against requestTimeoutMs. */
  private stallScanAt = 0;
  private nextAttemptAt = 0;
  private backoffMs: number;

  // requests
  private seq = 0;
  private readonly waiting: Part[] = [];
  private readonly slots: (Part | null)[] = [];
  private readonly freeSlots: number[] = [];
  private inFlightCount = 0;
  private readonly sendQueue: Part[] = [];
  private sendHead = 0;
  private readonly headers: Buffer;
  private readonly headersAddress: number;
  private readonly ready: Array<[number, number]> = [];
  /** The wake eventfd has been signalled and not drained yet (saves a read per pump when idle). */
  private wakeSignalled = false;
  /** Absolute deadline the timerfd is armed for; -1 when disarmed. */
  private armedDeadline = -1;

  // transmit scratch
  private readonly iov = Buffer.alloc(IOV_MAX * 16);
  private readonly iovWords = new Uint32Array(this.iov.buffer, this.iov.byteOffset, IOV_MAX * 4);
  private readonly iovAddress = addressOf(this.iov);
  private readonly msghdr = Buffer.alloc(MSGHDR_SIZE);

  // receive state
  private readonly rx = Buffer.alloc(STAGING_SIZE);
  private readonly rxAddress = addressOf(this.rx);
  private rxStart = 0;
  private rxEnd = 0;
  private rxState = Rx.Header;
  private readonly reply: ReplyHeader = { structured: false, error: 0, flags: 0, type: 0, handleHigh: 0, handleLow: 0, length: 0 };
  private rxPart: Part | null = null;
  private rxNeed = 0;
  private rxDataPos = 0;
  private rxDataLeft = 0;
  private rxDone = false;
  /** The last read data moved was large: fetch only the next header so its data can skip the staging copy. */
  private rxLargeData = false;

  private constructor(
    options: NbdClientOptions,
    private readonly onComplete: NbdCompletion,
  ) {
    this.options = {
      endpoint: options.endpoint,
      exportName: options.exportName,
      structuredReplies: options.structuredReplies ?? true,
      connectTimeoutMs: options.connectTimeoutMs ?? 5000,
      reconnectTimeoutMs: options.reconnectTimeoutMs ?? 30_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 60_000,
      initialBackoffMs: options.initialBackoffMs ?? 50,
      maxBackoffMs: options.maxBackoffMs ?? 2000,
      maxInFlight: Math.max(1, Math.min(options.maxInFlight ?? 128, 4096)),
    };
    this.now = options.now ?? (() => performance.now());
    this.callerFlushes = options.callerFlushes ?? false;
    this.readyHints = options.readyHints ?? false;
    this.backoffMs = this.options.initialBackoffMs;
    this.headers = Buffer.alloc(this.options.maxInFlight * REQUEST_HEADER_SIZE);
    this.headersAddress = addressOf(this.headers);
    this.fd = this.interest.fd;
    this.interest.watch(this.timer.fd, true, false);
    this.interest.watch(this.wake, true, false);
  }

  /**
   * Connects and negotiates, blocking the calling thread until the export is open or `connectTimeoutMs` has
   * passed. Throws NbdHandshakeError (server refused: unknown export, TLS required...), NbdProtocolError
   * (the server broke the protocol), SyscallError (connect failed) or NbdClientError (timeout).
   */
  static open(options: NbdClientOptions, onComplete: NbdCompletion): NbdClient {
    const client = new NbdClient(options, onComplete);
    try {
      client.beginAttempt();
      const deadline = client.attemptDeadline;
      for (let round = 0; client.stateValue === 'connecting'; round++) {
        const left = deadline - client.now();
        if (left <= 0 || round > 100_000) break;
        waitReadable(client.fd, Math.max(1, Math.ceil(left)));
        client.progressConnect();
      }
      if (client.stateValue !== 'connected')
        throw client.openFailure ?? new NbdClientError(`NBD connect to ${describeEndpoint(options.endpoint)} timed out`, 'NBD_TIMEOUT');
      return client;
    } catch (error) {
      client.closeWithoutCallbacks();
      throw error;
    }
  }

  /**
   * Starts a client without blocking: the export is already known (`info`, from a blocking `open` elsewhere,
   * e.g. the control thread's probe) and the connection is made in the background by `pump()`. Requests
   * submitted meanwhile wait; a server that is away is retried with backoff exactly as after a lost connection.
   */
  static connectInBackground(options: NbdClientOptions, info: NbdExportInfo, onComplete: NbdCompletion): NbdClient {
    const client = new NbdClient(options, onComplete);
    client.info = info;
    client.structured = info.structuredReplies;
    client.beginAttempt();
    client.armTimer();
    return client;
  }

  /** The first failure of `open`, kept so the blocking caller sees the real cause. */
  private openFailure: Error | null = null;

  get state(): NbdClientState {
    return this.stateValue;
  }

  /** Parts waiting to go on the wire or on it: how busy this connection is (cheap, for load balancing). */
  get queuedParts(): number {
    return this.waiting.length + this.inFlightCount;
  }

  /**
   * When this connection went down (ms, the client's clock): -1 while connected and answering, Infinity
   * while its first attempt is under way (not known to be down).
   */
  get downSince(): number {
    if (this.unhealthySince >= 0) return this.unhealthySince;
    return this.stateValue === 'connected' ? -1 : Number.POSITIVE_INFINITY;
  }

  /** Changes whenever a connection event is counted (the sum of those counters: each only grows). */
  get eventSerial(): number {
    const c = this.counters;
    return (
      c.connects + c.connectFailures + c.connectionsLost + c.resubmitted + c.handedOver + c.timedOutRequests + c.stalls + c.protocolErrors
    );
  }

  /** Parts waiting while the connection is down, which another connection could send now. */
  get waitingWhileDown(): number {
    return this.stateValue === 'connecting' || this.stateValue === 'disconnected' ? this.waiting.length : 0;
  }

  /**
   * Moves every part waiting here to `other`, a connected client of the same export (multi-conn: any
   * connection may carry any request, and a FLUSH on one covers writes completed on all). Only while this
   * connection is down: then nothing of it is on the wire (a lost connection requeues its wire), so each
   * operation's remaining parts move together and its completion comes from `other`, exactly once.
   * Parts were cut to this connection's maximum payload and flagged for its FUA support; a connection whose
   * handshake said otherwise gets none. Returns the parts moved; the caller flushes `other`, which sends them.
   */
  handWaitingTo(other: NbdClient): number {
    if (this.waitingWhileDown === 0 || other === this || other.stateValue !== 'connected') return 0;
    if (other.info.maximumPayload < this.info.maximumPayload || other.info.canFua !== this.info.canFua) return 0;
    const parts = this.waiting.splice(0);
    for (const part of parts) {
      part.seq = other.seq++;
      other.waiting.push(part);
    }
    this.counters.handedOver += parts.length;
    return parts.length;
  }

  /** Requests accepted and not yet completed. */
  get pending(): number {
    const n = this.ready.length;
    const seen = new Set<Operation>();
    for (const part of this.waiting) seen.add(part.op);
    for (const part of this.slots) if (part) seen.add(part.op);
    return n + seen.size;
  }

  // ------------------------------------------------------------------ submission

  submitRead(cookie: number, offset: number, segments: IoSegments): void {
    this.submitData(cookie, Command.READ, offset, segments, false);
  }

  /** `fua`: the write is durable when it completes (NBD FUA, or a FLUSH after it if the server has no FUA). */
  submitWrite(cookie: number, offset: number, segments: IoSegments, fua = false): void {
    this.submitData(cookie, Command.WRITE, offset, segments, fua);
  }

  submitFlush(cookie: number): void {
    if (!this.accepting(cookie)) return;
    if (!this.info.canFlush) return this.finishLater(cookie, 0); // no cache on the server side to flush
    const op = new Operation(cookie, null, false);
    this.enqueue(op, Command.FLUSH, 0, 0, 0, 0);
  }

  submitTrim(cookie: number, offset: number, length: number): void {
    if (!this.accepting(cookie)) return;
    if (this.info.readOnly) return this.finishLater(cookie, EPERM);
    if (!this.info.canTrim) return this.finishLater(cookie, ENOTSUP);
    this.submitRange(cookie, Command.TRIM, 0, offset, length);
  }

  /** `mayUnmap`: the server may punch a hole (no NBD_CMD_FLAG_NO_HOLE). */
  submitWriteZeroes(cookie: number, offset: number, length: number, mayUnmap = true): void {
    if (!this.accepting(cookie)) return;
    if (this.info.readOnly) return this.finishLater(cookie, EPERM);
    if (!this.info.canWriteZeroes) return this.finishLater(cookie, ENOTSUP);
    this.submitRange(cookie, Command.WRITE_ZEROES, mayUnmap ? 0 : CommandFlag.NO_HOLE, offset, length);
  }

  private submitData(cookie: number, command: number, offset: number, segments: IoSegments, fua: boolean): void {
    if (!this.accepting(cookie)) return;
    let list: SegmentList;
    try {
      list = new SegmentList(segments);
    } catch {
      return this.finishLater(cookie, EINVAL);
    }
    const length = list.totalBytes;
    if (command === Command.WRITE && this.info.readOnly) return this.finishLater(cookie, EPERM);
    if (!this.rangeValid(offset, length)) return this.finishLater(cookie, EINVAL);
    if (length === 0) return this.finishLater(cookie, 0);
    const emulateFua = fua && command === Command.WRITE && !this.info.canFua && this.info.canFlush;
    const flags = fua && command === Command.WRITE && this.info.canFua ? CommandFlag.FUA : 0;
    const op = new Operation(cookie, list, emulateFua);
    const max = this.info.maximumPayload;
    for (let done = 0; done < length; done += max) this.enqueue(op, command, flags, offset + done, Math.min(max, length - done), done);
  }

  private submitRange(cookie: number, command: number, flags: number, offset: number, length: number): void {
    if (!this.rangeValid(offset, length)) return this.finishLater(cookie, EINVAL);
    if (length === 0) return this.finishLater(cookie, 0);
    const op = new Operation(cookie, null, false);
    for (let done = 0; done < length; done += MAX_ZERO_PART) {
      this.enqueue(op, command, flags, offset + done, Math.min(MAX_ZERO_PART, length - done), 0);
    }
  }

  private rangeValid(offset: number, length: number): boolean {
    const block = this.info.minimumBlockSize;
    return (
      Number.isSafeInteger(offset) &&
      Number.isSafeInteger(length) &&
      offset >= 0 &&
      length >= 0 &&
      offset + length <= this.info.size &&
      offset % block === 0 &&
      length % block === 0
    );
  }

  /** False (and the cookie already answered) when the client cannot take requests now. */
  private accepting(cookie: number): boolean {
    if (this.stateValue === 'closed') throw new NbdClientError('submit on a closed NBD client', 'NBD_CLOSED');
    if (
      this.stateValue !== 'connected' &&
      this.unhealthySince >= 0 &&
      this.now() - this.unhealthySince >= this.options.reconnectTimeoutMs
    ) {
      this.counters.timedOutRequests++;
      this.finishLater(cookie, EIO);
      return false;
    }
    return true;
  }

  private enqueue(op: Operation, command: number, flags: number, offset: number, length: number, dataStart: number): void {
    op.partsLeft++;
    this.counters.requests++;
    this.waiting.push(new Part(op, this.seq++, command, flags, offset, length, dataStart));
    if (this.stateValue === 'connected') {
      this.admit();
      // With callerFlushes the caller's flush() sends the batch and sets the interest from what is left.
      if (!this.callerFlushes) this.updateSocketInterest();
    }
  }

  /** Completions that do not touch the wire are delivered from the next pump (callbacks never nest in submit). */
  private finishLater(cookie: number, errno: number): void {
    this.ready.push([cookie, errno]);
    this.signalWake();
  }

  private signalWake(): void {
    if (this.wakeSignalled) return;
    this.wakeSignalled = true;
    signalEventFd(this.wake);
  }

  // ------------------------------------------------------------------ the pump

  /** Progresses everything that can progress without blocking; calls onComplete. Returns completions delivered. */
  pump(): number {
    if (this.stateValue === 'closed') return 0;
    if (this.wakeSignalled) {
      this.wakeSignalled = false;
      drainEventFd(this.wake);
    }
    if (this.armedDeadline >= 0 && this.now() >= this.armedDeadline) {
      this.timer.clear();
      this.armedDeadline = -1;
    }
    let delivered = this.deliverReady();
    if (this.state === 'closed') return delivered; // a callback closed the client
    if (this.stateValue === 'connected') {
      try {
        delivered += this.receive();
        if (this.stateValue === 'connected') this.transmit();
      } catch (error) {
        delivered += this.deliverReady();
        this.connectionLost(error);
      }
    } else if (this.stateValue === 'connecting') {
      this.progressConnect();
    }
    this.checkTimers();
    delivered += this.deliverReady();
    this.armTimer();
    return delivered;
  }

  /** readyHints: the caller's epoll reported `fd` ready, so the next pump reads the socket again. */
  socketReady(): void {
    this.mayRead = true;
  }

  /**
   * Sends what the submissions since the last pump queued, without waiting for the socket to be reported
   * writable (saves one epoll round per batch). Never calls onComplete.
   */
  flush(): void {
    if (this.stateValue !== 'connected') return;
    try {
      this.transmit();
    } catch (error) {
      this.connectionLost(error);
      this.signalWake();
    }
    this.armTimer(); // requests went on the wire without a pump: the stall check must still be scheduled
  }

  /** Milliseconds until the client needs a pump even without socket activity (-1: none). The timerfd inside `fd` covers this already. */
  nextTimerMs(): number {
    const deadline = this.nextDeadline();
    return deadline < 0 ? -1 : Math.max(0, deadline - this.now());
  }

  /** The earliest absolute time a timer must fire, or -1. Connected and healthy: none, so no timer syscalls. */
  private nextDeadline(): number {
    let deadline = -1;
    const consider = (at: number): void => {
      if (deadline < 0 || at < deadline) deadline = at;
    };
    if (this.stateValue === 'disconnected') consider(this.nextAttemptAt);
    if (this.stateValue === 'connecting') consider(this.attemptDeadline);
    if (this.unhealthySince >= 0 && this.waiting.length > 0) consider(this.unhealthySince + this.options.reconnectTimeoutMs);
    if (this.stateValue === 'connected' && this.inFlightCount > 0 && this.options.requestTimeoutMs > 0) consider(this.stallScanAt);
    return deadline;
  }

  private deliverReady(): number {
    let n = 0;
    // Bounded: callbacks may submit more, which lands in `ready` only for immediate verdicts.
    for (let budget = this.ready.length; budget > 0 && this.ready.length > 0; budget--) {
      const [cookie, errno] = this.ready.shift() as [number, number];
      n++;
      this.onComplete(cookie, errno);
    }
    if (this.ready.length > 0) this.signalWake();
    return n;
  }

  // ------------------------------------------------------------------ transmit

  /** Moves waiting parts onto the wire while slots are free. */
  private admit(): void {
    const now = this.waiting.length > 0 ? this.now() : 0;
    while (this.waiting.length > 0 && this.inFlightCount < this.options.maxInFlight) {
      const part = this.waiting.shift() as Part;
      const slot = this.freeSlots.length > 0 ? (this.freeSlots.pop() as number) : this.slots.length;
      if (slot === this.slots.length) this.slots.push(null);
      this.slots[slot] = part;
      part.slot = slot;
      part.sent = 0;
      part.admittedAt = now;
      this.inFlightCount++;
      encodeRequestHeader(this.headers, slot * REQUEST_HEADER_SIZE, part.flags, part.command, this.epoch, slot, part.offset, part.length);
      this.sendQueue.push(part);
    }
  }

  private transmit(): void {
    this.admit();
    for (let calls = 0; calls < PUMP_SYSCALL_BUDGET && this.sendHead < this.sendQueue.length; calls++) {
      let count = 0;
      for (let i = this.sendHead; i < this.sendQueue.length && count < IOV_MAX; i++) {
        const part = this.sendQueue[i] as Part;
        const skip = i === this.sendHead ? part.sent : 0;
        if (skip < REQUEST_HEADER_SIZE) {
          writeIovec(this.iovWords, count++, this.headersAddress + part.slot * REQUEST_HEADER_SIZE + skip, REQUEST_HEADER_SIZE - skip);
        }
        const payload = part.payloadBytes;
        if (payload > 0 && count < IOV_MAX) {
          const from = Math.max(0, skip - REQUEST_HEADER_SIZE);
          count = part.op.segments!.fill(part.dataStart + from, payload - from, this.iovWords, count, IOV_MAX);
        }
      }
      const n = sendVector(this.socket, this.msghdr, this.iovAddress, count);
      if (n === -Errno.EAGAIN || n === -Errno.EINTR) break;
      if (n < 0) throw new SyscallError('sendmsg', -n, 'NBD socket');
      let left = n;
      while (left > 0 && this.sendHead < this.sendQueue.length) {
        const part = this.sendQueue[this.sendHead] as Part;
        const total = REQUEST_HEADER_SIZE + part.payloadBytes;
        const take = Math.min(left, total - part.sent);
        part.sent += take;
        left -= take;
        if (part.sent === total) {
          this.counters.bytesWritten += part.payloadBytes;
          this.sendHead++;
        }
      }
      if (this.sendHead === this.sendQueue.length) {
        this.sendQueue.length = 0;
        this.sendHead = 0;
        this.admit(); // slots may have freed while sending
      }
    }
    if (this.sendHead > 256) {
      this.sendQueue.splice(0, this.sendHead);
      this.sendHead = 0;
    }
    this.updateSocketInterest();
  }

  private updateSocketInterest(): void {
    if (this.socket < 0 || this.stateValue !== 'connected') return;
    this.interest.watch(
      this.socket,
      true,
      this.sendHead < this.sendQueue.length || (this.waiting.length > 0 && this.inFlightCount < this.options.maxInFlight),
    );
  }

  // ------------------------------------------------------------------ receive

  /**
   * Reads and handles replies until the socket is drained or the budget is spent. Throws on protocol errors
   * and EOF. A read that returns fewer bytes than asked found the socket empty: the loop stops there rather
   * than spend a syscall on the EAGAIN (the caller's level-triggered epoll reports what arrives later).
   */
  private receive(): number {
    let completed = 0;
    let drained = false;
    for (let calls = 0; calls < PUMP_SYSCALL_BUDGET; ) {
      completed += this.parseStaged();
      if (this.stateValue !== 'connected') return completed;
      if (drained || !this.mayRead) break;
      if (this.rxState === Rx.Data && this.rxStart === this.rxEnd) {
        // Read data goes straight from the socket into the caller's buffers, and whatever follows it (the
        // next reply's header, if it has arrived) into the empty staging buffer in the same call: one syscall
        // per reply. After large data only a header's worth, so the next large data is not copied either.
        const part = this.rxPart as Part;
        let count = part.op.segments!.fill(this.rxDataPos, this.rxDataLeft, this.iovWords, 0, IOV_MAX);
        this.rxStart = 0;
        this.rxEnd = 0;
        if (count < IOV_MAX) writeIovec(this.iovWords, count++, this.rxAddress, this.rxLargeData ? CHUNK_HEADER_SIZE + 8 : this.rx.length);
        let asked = 0;
        for (let i = 0; i < count; i++) asked += this.iovWords[i * 4 + 2] ?? 0; // every piece is below 4 GiB
        const n = readVector(this.socket, this.iovAddress, count);
        calls++;
        if (n === -Errno.EAGAIN || n === -Errno.EINTR) {
          if (n === -Errno.EAGAIN) this.socketEmpty(); // EINTR says nothing about the socket
          break;
        }
        if (n < 0) throw new SyscallError('readv', -n, 'NBD socket');
        if (n === 0) throw new NbdClientError('the server closed the connection', 'NBD_EOF');
        // Fewer bytes than the iovecs hold: the socket ran dry.
        if (n < asked) {
          drained = true;
          this.socketEmpty();
        }
        const data = Math.min(n, this.rxDataLeft);
        this.rxEnd = n - data;
        this.rxDataPos += data;
        this.rxDataLeft -= data;
        this.counters.bytesRead += data;
        if (this.rxDataLeft === 0) completed += this.endData();
        continue;
      }
      if (this.rxStart === this.rxEnd) {
        this.rxStart = 0;
        this.rxEnd = 0;
      } else if (this.rxEnd === this.rx.length) {
        this.rx.copy(this.rx, 0, this.rxStart, this.rxEnd);
        this.rxEnd -= this.rxStart;
        this.rxStart = 0;
      }
      const want = this.rxLargeData && this.rxState === Rx.Header && this.rxEnd === 0 ? CHUNK_HEADER_SIZE + 8 : this.rx.length - this.rxEnd;
      const n = receiveInto(this.socket, this.rxAddress + this.rxEnd, want);
      calls++;
      if (n === -Errno.EAGAIN || n === -Errno.EINTR) {
        if (n === -Errno.EAGAIN) this.socketEmpty();
        break;
      }
      if (n < 0) throw new SyscallError('recv', -n, 'NBD socket');
      if (n === 0) throw new NbdClientError('the server closed the connection', 'NBD_EOF');
      if (n < want) {
        drained = true;
        this.socketEmpty();
      }
      this.rxEnd += n;
    }
    return completed;
  }

  /** A read found the socket empty: with readyHints, no more reads until the caller reports the fd ready. */
  private socketEmpty(): void {
    if (this.readyHints) this.mayRead = false;
  }

  /** Handles every complete message in the staging buffer. Bounded by the staging buffer's size. */
  private parseStaged(): number {
    let completed = 0;
    for (;;) {
      const available = this.rxEnd - this.rxStart;
      switch (this.rxState) {
        case Rx.Header: {
          if (available < 4) return completed;
          const size = replyHeaderSize(this.rx.readUInt32BE(this.rxStart), this.structured);
          if (available < size) return completed;
          decodeReplyHeader(this.rx, this.rxStart, this.structured, this.reply);
          this.rxStart += size;
          completed += this.onReplyHeader();
          break;
        }
        case Rx.Payload: {
          if (available < this.rxNeed) return completed;
          const payload = this.rx.subarray(this.rxStart, this.rxStart + this.rxNeed);
          this.rxStart += this.rxNeed;
          completed += this.onChunkPayload(payload);
          break;
        }
        case Rx.DataOffset: {
          if (available < 8) return completed;
          const offset = readU64BE(this.rx, this.rxStart);
          this.rxStart += 8;
          this.startDataChunk(offset, this.reply.length - 8);
          break;
        }
        case Rx.Data: {
          if (available === 0) return completed;
          const take = Math.min(available, this.rxDataLeft);
          const part = this.rxPart as Part;
          let from = this.rxAddress + this.rxStart;
          part.op.segments!.forEach(this.rxDataPos, take, (address, length) => {
            copyMemory(address, from, length);
            from += length;
          });
          this.rxStart += take;
          this.rxDataPos += take;
          this.rxDataLeft -= take;
          this.counters.bytesRead += take;
          if (this.rxDataLeft === 0) completed += this.endData();
          break;
        }
      }
    }
  }

  private lookup(): Part {
    const { handleHigh, handleLow } = this.reply;
    const part = handleHigh === this.epoch ? this.slots[handleLow] : undefined;
    if (!part) throw new NbdProtocolError(`reply for unknown handle ${handleHigh}:${handleLow}`);
    if (part.sent < REQUEST_HEADER_SIZE + part.payloadBytes) throw new NbdProtocolError('reply to a request that was not fully sent');
    return part;
  }

  private onReplyHeader(): number {
    const part = this.lookup();
    const reply = this.reply;
    if (!reply.structured) {
      if (reply.error !== 0) return this.finishPart(part, this.serverErrno(reply.error, ''));
      if (part.command === Command.READ) {
        // Without structured replies the data follows; with them a simple reply must not carry data.
        if (this.structured) throw new NbdProtocolError('simple reply without error to a read after structured replies were negotiated');
        this.beginData(part, part.dataStart, part.length, true);
        return 0;
      }
      return this.finishPart(part, 0);
    }
    this.rxDone = (reply.flags & ReplyFlag.DONE) !== 0;
    switch (reply.type) {
      case ChunkType.NONE:
        if (reply.length !== 0) throw new NbdProtocolError('NBD_REPLY_TYPE_NONE with a payload');
        if (!this.rxDone) throw new NbdProtocolError('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
        return this.finishStructured(part);
      case ChunkType.OFFSET_DATA:
        if (part.command !== Command.READ) throw new NbdProtocolError('OFFSET_DATA chunk for a request that is not a read');
        if (reply.length < 9) throw new NbdProtocolError(`OFFSET_DATA chunk of ${reply.length} bytes`);
        if (reply.length - 8 > part.length) throw new NbdProtocolError('OFFSET_DATA chunk larger than its request');
        this.rxPart = part;
        this.rxState = Rx.DataOffset;
        return 0;
      case ChunkType.OFFSET_HOLE:
        if (part.command !== Command.READ) throw new NbdProtocolError('OFFSET_HOLE chunk for a request that is not a read');
        if (reply.length !== 12) throw new NbdProtocolError(`OFFSET_HOLE chunk of ${reply.length} bytes`);
        break;
      default:
        if (!isErrorChunk(reply.type)) throw new NbdProtocolError(`unexpected chunk type ${reply.type}`);
        if (reply.length > MAX_NON_DATA_CHUNK) throw new NbdProtocolError(`error chunk of ${reply.length} bytes`);
    }
    this.rxPart = part;
    this.rxNeed = reply.length;
    this.rxState = Rx.Payload;
    return 0;
  }

  private onChunkPayload(payload: Buffer): number {
    const part = this.rxPart as Part;
    this.rxState = Rx.Header;
    this.rxPart = null;
    if (this.reply.type === ChunkType.OFFSET_HOLE) {
      const hole = decodeHoleChunk(payload);
      this.claimRange(part, hole.offset, hole.length);
      part.op.segments!.forEach(part.dataStart + (hole.offset - part.offset), hole.length, zeroMemory);
    } else {
      const error = decodeErrorChunk(this.reply.type, payload);
      if (error.offset >= 0 && (error.offset < part.offset || error.offset >= part.offset + Math.max(1, part.length))) {
        throw new NbdProtocolError('ERROR_OFFSET chunk outside its request');
      }
      if (part.errno === 0) part.errno = this.serverErrno(error.errno, error.message);
    }
    return this.rxDone ? this.finishStructured(part) : 0;
  }

  private startDataChunk(offset: number, length: number): void {
    const part = this.rxPart as Part;
    this.claimRange(part, offset, length);
    this.beginData(part, part.dataStart + (offset - part.offset), length, this.rxDone);
  }

  /**
   * Records [offset, offset+length) as received for a structured read: inside the request, no overlap.
   * Ranges are kept sorted and merged when they touch, so a server sending chunks in order keeps one range;
   * at most MAX_READ_GAPS separate ranges may exist (a hostile server cannot make this quadratic).
   */
  private claimRange(part: Part, offset: number, length: number): void {
    const end = offset + length;
    if (offset < part.offset || end > part.offset + part.length) throw new NbdProtocolError('read chunk outside its request');
    const ranges = part.ranges;
    // Binary search for the first range starting at or after `offset` (ranges = [start0, end0, start1, end1, ...]).
    let low = 0;
    let high = ranges.length / 2;
    while (low < high) {
      const mid = (low + high) >>> 1;
      if ((ranges[mid * 2] as number) < offset) low = mid + 1;
      else high = mid;
    }
    const i = low * 2;
    const before = i >= 2 ? (ranges[i - 1] as number) : -1;
    const after = i < ranges.length ? (ranges[i] as number) : Infinity;
    if (before > offset || after < end) throw new NbdProtocolError('overlapping read chunks');
    const joinsBefore = before === offset;
    const joinsAfter = after === end;
    if (joinsBefore && joinsAfter) ranges.splice(i - 1, 2);
    else if (joinsBefore) ranges[i - 1] = end;
    else if (joinsAfter) ranges[i] = offset;
    else {
      if (ranges.length >= MAX_READ_GAPS * 2) throw new NbdProtocolError('too many separate read chunks');
      ranges.splice(i, 0, offset, end);
    }
    part.covered += length;
  }

  private beginData(part: Part, position: number, length: number, finishAfter: boolean): void {
    this.rxLargeData = length >= LARGE_DATA;
    this.rxPart = part;
    this.rxDataPos = position;
    this.rxDataLeft = length;
    this.rxDone = finishAfter;
    this.rxState = Rx.Data;
  }

  private endData(): number {
    const part = this.rxPart as Part;
    this.rxState = Rx.Header;
    this.rxPart = null;
    if (!this.rxDone) return 0;
    return this.structured ? this.finishStructured(part) : this.finishPart(part, 0);
  }

  private finishStructured(part: Part): number {
    if (part.command === Command.READ && part.errno === 0 && part.covered !== part.length) {
      throw new NbdProtocolError(`read reply covered ${part.covered} of ${part.length} bytes`);
    }
    return this.finishPart(part, part.errno);
  }

  /** A server error value; ESHUTDOWN means "reconnect and resend", which the spec obliges us to do. */
  private serverErrno(value: number, message: string): number {
    const errno = errnoFromServer(value);
    if (errno === NbdErrno.ESHUTDOWN) throw new NbdClientError('the server is shutting down', 'NBD_SHUTDOWN');
    this.counters.serverErrors++;
    this.lastError = `server error ${errnoName(errno)}${message ? `: ${message}` : ''}`;
    this.lastErrorCode = 'NBD_SERVER_ERROR';
    return errno;
  }

  private finishPart(part: Part, errno: number): number {
    if (this.unhealthySince >= 0) {
      this.unhealthySince = -1;
      this.backoffMs = this.options.initialBackoffMs;
    }
    this.slots[part.slot] = null;
    this.freeSlots.push(part.slot);
    this.inFlightCount--;
    part.slot = -1;
    const op = part.op;
    if (errno !== 0 && op.errno === 0) op.errno = errno;
    if (--op.partsLeft > 0) return 0;
    if (op.errno === 0 && op.flushAfter) {
      op.flushAfter = false;
      this.enqueue(op, Command.FLUSH, 0, 0, 0, 0);
      return 0;
    }
    this.ready.push([op.cookie, op.errno]);
    return 0;
  }

  // ------------------------------------------------------------------ connection life

  private beginAttempt(): void {
    this.stateValue = 'connecting';
    this.attemptDeadline = this.now() + this.options.connectTimeoutMs;
    this.handshake = clientHandshake({ exportName: this.options.exportName, structuredReplies: this.options.structuredReplies });
    this.step = null;
    try {
      const pending = startConnect(this.options.endpoint);
      this.socket = pending.fd;
      this.connectPending = pending.inProgress;
      this.interest.watch(this.socket, !pending.inProgress, pending.inProgress);
      if (!pending.inProgress) this.progressConnect();
    } catch (error) {
      this.attemptFailed(error);
    }
  }

  /** Drives the non-blocking connect and handshake as far as the socket allows. */
  private progressConnect(): void {
    if (this.stateValue !== 'connecting' || this.socket < 0) return;
    try {
      if (this.connectPending) {
        const errno = connectResult(this.socket);
        if (errno === Errno.EINPROGRESS) return;
        if (errno !== 0) throw new SyscallError('connect', errno, describeEndpoint(this.options.endpoint));
        this.connectPending = false;
      }
      const handshake = this.handshake as Generator<HandshakeStep, NbdExportInfo, Buffer | undefined>;
      if (!this.step) this.nextStep(handshake.next());
      for (let rounds = 0; this.step && rounds < 1000; rounds++) {
        const step: HandshakeStep = this.step;
        const io =
          'send' in step
            ? sendVector(this.socket, this.msghdr, this.stageIovec(step.send, this.stepDone), 1)
            : receiveInto(this.socket, addressOf(this.stepBuffer) + this.stepDone, this.stepBuffer.length - this.stepDone);
        if (io === -Errno.EAGAIN || io === -Errno.EINTR) {
          this.interest.watch(this.socket, !('send' in step), 'send' in step);
          return;
        }
        if (io < 0) throw new SyscallError('send' in step ? 'sendmsg' : 'recv', -io, describeEndpoint(this.options.endpoint));
        if (io === 0 && !('send' in step)) throw new NbdClientError('the server closed the connection during the handshake', 'NBD_EOF');
        this.stepDone += io;
        const target = 'send' in step ? step.send.length : this.stepBuffer.length;
        if (this.stepDone < target) continue;
        this.nextStep(handshake.next('send' in step ? undefined : this.stepBuffer));
      }
    } catch (error) {
      this.attemptFailed(error);
    }
  }

  private stageIovec(buffer: Buffer, done: number): number {
    this.stepBuffer = buffer; // keep it alive while its address is in the iovec
    writeIovec(this.iovWords, 0, addressOf(buffer) + done, buffer.length - done);
    return this.iovAddress;
  }

  private nextStep(result: IteratorResult<HandshakeStep, NbdExportInfo>): void {
    this.stepDone = 0;
    if (result.done) {
      this.step = null;
      this.connected(result.value);
      return;
    }
    this.step = result.value;
    if ('receive' in result.value) this.stepBuffer = Buffer.alloc(result.value.receive);
  }

  private connected(info: NbdExportInfo): void {
    const reconnect = this.counters.connects > 0;
    const shrunk = reconnect && info.size < this.info.size ? this.info.size : -1;
    this.info = info;
    this.structured = info.structuredReplies;
    this.handshake = null;
    this.stateValue = 'connected';
    this.mayRead = true; // a new socket: nothing is known about it yet
    this.epoch = (this.epoch + 1) >>> 0;
    this.counters.connects++;
    // Healthy again only once the server answers something; with nothing to resend there is nothing to prove.
    if (this.waiting.length === 0) this.unhealthySince = -1;
    if (this.unhealthySince < 0) this.backoffMs = this.options.initialBackoffMs;
    this.lastError = '';
    this.lastErrorCode = '';
    if (shrunk >= 0) {
      // The export shrank under us: requests past the new end will fail at the server (EINVAL/ENOSPC).
      this.lastError = `export shrank from ${shrunk} to ${info.size} bytes across a reconnect`;
      this.lastErrorCode = 'NBD_EXPORT_SHRANK';
    }
    this.rxState = Rx.Header;
    this.rxStart = this.rxEnd = 0;
    this.interest.watch(this.socket, true, this.waiting.length > 0);
    if (reconnect) this.counters.resubmitted += this.waiting.length;
  }

  private attemptFailed(error: unknown): void {
    this.counters.connectFailures++;
    this.recordError(error);
    if (this.counters.connects === 0 && !this.openFailure) this.openFailure = error instanceof Error ? error : new Error(String(error));
    this.dropSocket();
    this.stateValue = 'disconnected';
    if (this.unhealthySince < 0) this.unhealthySince = this.now();
    const permanent = error instanceof NbdHandshakeError && error.permanent;
    this.nextAttemptAt = this.now() + (permanent ? this.options.maxBackoffMs : this.backoffMs);
    this.backoffMs = Math.min(this.backoffMs * 2, this.options.maxBackoffMs);
  }

  /** The connection broke (EOF, socket error, protocol error): requeue everything on the wire and reconnect. */
  private connectionLost(error: unknown): void {
    if (this.state === 'closed') return;
    if (error instanceof NbdProtocolError) this.counters.protocolErrors++;
    this.counters.connectionsLost++;
    this.recordError(error);
    this.dropSocket();
    const onWire = this.slots.filter((part): part is Part => part !== null);
    this.slots.length = 0;
    this.freeSlots.length = 0;
    this.inFlightCount = 0;
    this.sendQueue.length = 0;
    this.sendHead = 0;
    for (const part of onWire) part.resetWireState();
    this.waiting.push(...onWire);
    this.waiting.sort((a, b) => a.seq - b.seq);
    this.rxState = Rx.Header;
    this.rxPart = null;
    this.rxStart = this.rxEnd = 0;
    this.stateValue = 'disconnected';
    if (this.unhealthySince < 0) {
      // The first retry after a healthy period is immediate: a restarted server is often already back.
      this.unhealthySince = this.now();
      this.nextAttemptAt = this.now();
    } else {
      // Lost again before any reply: back off, or a server that kills every connection would make us spin.
      this.nextAttemptAt = this.now() + this.backoffMs;
      this.backoffMs = Math.min(this.backoffMs * 2, this.options.maxBackoffMs);
    }
  }

  private recordError(error: unknown): void {
    this.lastError = error instanceof Error ? error.message : String(error);
    this.lastErrorCode = (error as { code?: unknown })?.code ? String((error as { code: unknown }).code) : 'NBD_ERROR';
  }

  private dropSocket(): void {
    if (this.socket < 0) return;
    this.interest.forget(this.socket);
    shutdownSocket(this.socket);
    closeFd(this.socket);
    this.socket = -1;
    this.handshake = null;
    this.step = null;
  }

  private checkTimers(): void {
    if (this.stateValue === 'closed') return;
    const now = this.now();
    if (this.stateValue === 'connected' && this.inFlightCount > 0 && this.options.requestTimeoutMs > 0 && now >= this.stallScanAt) {
      // Coarse scan (a quarter of the timeout apart) so the healthy path costs no timer syscalls per request.
      this.stallScanAt = now + this.options.requestTimeoutMs / 4;
      const oldest = this.slots.reduce((min, part) => (part && part.admittedAt < min ? part.admittedAt : min), Infinity);
      if (now - oldest >= this.options.requestTimeoutMs) {
        this.connectionLost(new NbdClientError(`a request got no reply within ${this.options.requestTimeoutMs} ms`, 'NBD_REQUEST_TIMEOUT'));
        this.counters.stalls++;
      }
    }
    if (this.stateValue === 'connecting' && now >= this.attemptDeadline) {
      this.attemptFailed(new NbdClientError(`NBD connect to ${describeEndpoint(this.options.endpoint)} timed out`, 'NBD_TIMEOUT'));
    }
    if (this.unhealthySince >= 0 && now - this.unhealthySince >= this.options.reconnectTimeoutMs && this.waiting.length > 0) {
      this.failWaiting();
    }
    if (this.stateValue === 'disconnected' && now >= this.nextAttemptAt) this.beginAttempt();
  }

  /** The server stayed away too long: everything waiting completes with EIO. */
  private failWaiting(): void {
    const parts = this.waiting.splice(0);
    for (const part of parts) {
      const op = part.op;
      if (op.errno === 0) op.errno = EIO;
      op.flushAfter = false;
      if (--op.partsLeft === 0) {
        this.counters.timedOutRequests++;
        this.ready.push([op.cookie, op.errno]);
      }
    }
  }

  private armTimer(): void {
    if (this.stateValue === 'closed') return;
    const deadline = this.nextDeadline();
    if (deadline === this.armedDeadline) return;
    // An armed timer that fires no later than needed stays: an early or needless expiry costs one pump (which
    // re-arms), whereas following every idle/busy flip of the in-flight count cost two syscalls per batch.
    if (this.armedDeadline >= 0 && (deadline < 0 || deadline > this.armedDeadline)) return;
    if (deadline < 0) this.timer.disarm();
    else this.timer.arm(Math.max(0, deadline - this.now()));
    this.armedDeadline = deadline;
  }

  // ------------------------------------------------------------------ close

  /**
   * Ends the client: a polite NBD_CMD_DISC when the connection is idle, then every request still pending is
   * completed with EIO (through onComplete, before close returns) and all fds are closed.
   */
  close(): void {
    if (this.stateValue === 'closed') return;
    if (this.stateValue === 'connected' && this.inFlightCount === 0 && this.sendQueue.length === 0) {
      const disc = Buffer.alloc(REQUEST_HEADER_SIZE);
      encodeRequestHeader(disc, 0, 0, Command.DISC, this.epoch, 0xffffffff, 0, 0);
      writeIovec(this.iovWords, 0, addressOf(disc), disc.length);
      sendVector(this.socket, this.msghdr, this.iovAddress, 1);
    }
    const onWire = this.slots.filter((part): part is Part => part !== null);
    this.waiting.push(...onWire);
    this.slots.length = 0;
    this.inFlightCount = 0;
    this.failAllPending();
    this.deliverReady();
    this.closeWithoutCallbacks();
  }

  private failAllPending(): void {
    const parts = this.waiting.splice(0);
    const done = new Set<Operation>();
    for (const part of parts) {
      if (done.has(part.op)) continue;
      done.add(part.op);
      this.ready.push([part.op.cookie, EIO]);
    }
  }

  private closeWithoutCallbacks(): void {
    this.dropSocket();
    this.stateValue = 'closed';
    this.timer.close();
    closeFd(this.wake);
    this.interest.close();
  }
}

/** The fixed 16/20-byte sizes, exported for tests that build replies by hand. */
export const ReplySizes = { SIMPLE_REPLY_SIZE, CHUNK_HEADER_SIZE, NBD_SIMPLE_REPLY_MAGIC } as const;
