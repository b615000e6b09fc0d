/**
 * One network transport (an NBD connection, an RbdQueue) per disk per worker thread, shared by every queue
 * of that disk the worker runs. NBD without multi-conn and RBD (one RbdQueue per image handle) require all
 * queues of the disk on one worker and one transport; with NBD multi-conn each worker has its own, of
 * `connections` NBD connections.
 *
 * Each queue's executor is a member. Tags carry the member id (high part) and the member's slot (low 16
 * bits), so whichever member polls the transport routes every completion to its owner; a member that is not
 * the poller is woken through its own eventfd. Member ids are never reused within a channel, so a late
 * completion of a member that left (a ring stop that timed out) is dropped rather than misrouted.
 *
 * The registry is module state: every worker thread has its own copy of this module.
 */
import { NbdClient, type NbdClientCounters } from '../backend/nbd/nbd-client.js';
import { InterestSet } from '../sys/interest-set.js';
import { RbdQueue } from '../backend/rbd/rbd-queue.js';
import type { IoSegments } from '../backend/nbd/io-segments.js';
import type { NetworkBackend } from './network-backend.js';

/** Slots per member (tag low bits). */
export const SLOT_BITS = 16;
const SLOT_SPAN = 1 << SLOT_BITS;

/** errno 0 = success, else a positive errno. */
export type TransportDeliver = (tag: number, errno: number) => void;

/** Connection events a transport counts (cumulative totals, in this order: `eventTotals`). */
export const BackendEvent = {
  /** Handshakes completed, the first of each connection included. */
  connects: 0,
  /** Connection attempts that failed (refused, timed out, handshake refused). */
  connectFailures: 1,
  /** Connections that broke (EOF, socket error, protocol error, stall). */
  connectionsLost: 2,
  /** Requests sent again on a connection after it came back. */
  resent: 3,
  /** Requests moved from a connection that was down to one that was up. */
  handedOver: 4,
  /** Requests failed with EIO because no connection came back within the reconnect timeout. */
  timedOut: 5,
  /** Connections reset because a request got no reply within the request timeout. */
  stalls: 6,
  /** Connections reset because the server broke the protocol. */
  protocolErrors: 7,
  /** Reads the back-end answered with fewer bytes than asked (RBD past its end); the rest was zeroed. */
  shortReads: 8,
} as const;
export const BACKEND_EVENTS = 9;

/** The operations the network executor needs from a back-end connection. */
export interface Transport {
  /** Level-triggered: readable while the transport has progress to make (replies, timers, completions). */
  readonly fd: number;
  /** Writes are durable on completion when asked (NBD FUA); false: the executor follows them with a flush. */
  readonly supportsFua: boolean;
  read(tag: number, offset: number, segments: IoSegments): void;
  write(tag: number, offset: number, segments: IoSegments, fua: boolean): void;
  flush(tag: number): void;
  discard(tag: number, offset: number, length: number): void;
  writeZeroes(tag: number, offset: number, length: number, mayUnmap: boolean): void;
  /** Sends what was submitted (one syscall per batch). */
  kick(): void;
  /**
   * The worker's epoll reported `fd` ready. Between these calls a transport that found its fds empty makes
   * no read syscall in `poll` (a drain polls several times); `fd` being level-triggered makes that safe.
   */
  ready(): void;
  /** Progresses I/O without blocking and delivers every completion available. */
  poll(deliver: TransportDeliver): void;
  /** A change of the connection's health since the last call, for the log ('' when none). */
  healthChange(): string;
  /** Changes whenever an event total changes (cheap: read every poll); 0 for a transport without events. */
  readonly eventSerial: number;
  /** Connections not up right now (connecting, or waiting to reconnect); 0 for a transport without any. */
  readonly connectionsDown: number;
  /** Writes the event totals since the transport opened into `out` (BackendEvent order). */
  eventTotals(out: Float64Array): void;
  close(): void;
}

/**
 * One or more NBD connections (`backend.connections`, more than one only with multi-conn) behind one fd: an
 * epoll set of the clients' fds. Each request goes to the connected connection with the fewest parts queued
 * or on the wire, so a connection that is down holds no new requests while another is up.
 * A FLUSH may go to any connection: with multi-conn the server makes it cover the writes completed on all of
 * them, which is what a virtio FLUSH promises (writes completed before it). Each connection reconnects on its
 * own, with its own timeouts.
 */
export class NbdTransport implements Transport {
  readonly supportsFua = true;
  readonly fd: number;
  private readonly clients: NbdClient[] = [];
  private readonly fds = new InterestSet();
  /** Where the search for the least busy connection starts: rotates, so ties spread. */
  private start = 0;
  private deliver: TransportDeliver | null = null;
  private readonly onComplete = (tag: number, errno: number): void => this.deliver?.(tag, errno);

  constructor(backend: Extract<NetworkBackend, { kind: 'nbd' }>) {
    const count = Math.max(1, backend.connections);
    try {
      for (let i = 0; i < count; i++) {
        const client = NbdClient.connectInBackground(
          {
            endpoint: backend.endpoint,
            exportName: backend.exportName,
            connectTimeoutMs: backend.connectTimeoutMs,
            reconnectTimeoutMs: backend.reconnectTimeoutMs,
            requestTimeoutMs: backend.requestTimeoutMs,
            // The executor kicks (flush) after every batch it submits, and passes on its epoll's reports (ready).
            callerFlushes: true,
            readyHints: true,
          },
          backend.info,
          this.onComplete,
        );
        this.clients.push(client);
        this.fds.watch(client.fd, true, false);
      }
    } catch (error) {
      this.close();
      throw error;
    }
    this.fd = this.fds.fd;
  }

  /**
   * The connection for the next request: the connected one with the fewest parts queued or on the wire
   * (ties rotate). When none is connected, the one down for the shortest time (a just-lost connection
   * rather than one past its reconnect timeout, which would fail the request at once; ties rotate too,
   * e.g. at ring start, when every connection is still making its first attempt); `poll` hands what
   * waits there to whichever connection comes up first, so a connection the server never accepts (a
   * client limit such as qemu-nbd's --shared) keeps no request. Bounded by the connection count (at most 16).
   */
  private pick(): NbdClient {
    const clients = this.clients;
    const count = clients.length;
    if (count === 1) return clients[0]!;
    const start = this.start;
    this.start = (start + 1) % count;
    const best = this.leastBusyConnected(start);
    if (best !== null) return best;
    let freshest = clients[start]!;
    for (let i = 1; i < count; i++) {
      const client = clients[(start + i) % count]!;
      if (client.downSince > freshest.downSince) freshest = client;
    }
    return freshest;
  }

  /** The connected connection with the fewest parts queued or on the wire, searched from `start`; null when none is up. */
  private leastBusyConnected(start: number): NbdClient | null {
    const clients = this.clients;
    let best: NbdClient | null = null;
    for (let i = 0; i < clients.length; i++) {
      const client = clients[(start + i) % clients.length]!;
      if (client.state === 'connected' && (best === null || client.queuedParts < best.queuedParts)) best = client;
    }
    return best;
  }

  /**
   * Requests waiting on a connection that is down go to the least busy connected one: they would otherwise
   * wait for their own connection's reconnect, or fail after its timeout while another could serve them.
   */
  private handOver(): void {
    for (const from of this.clients) {
      if (from.waitingWhileDown === 0) continue;
      const to = this.leastBusyConnected(0);
      if (to === null) return;
      if (from.handWaitingTo(to) > 0) to.flush();
    }
  }

  read(tag: number, offset: number, segments: IoSegments): void {
    this.pick().submitRead(tag, offset, segments);
  }
  write(tag: number, offset: number, segments: IoSegments, fua: boolean): void {
    this.pick().submitWrite(tag, offset, segments, fua);
  }
  flush(tag: number): void {
    this.pick().submitFlush(tag);
  }
  discard(tag: number, offset: number, length: number): void {
    this.pick().submitTrim(tag, offset, length);
  }
  writeZeroes(tag: number, offset: number, length: number, mayUnmap: boolean): void {
    this.pick().submitWriteZeroes(tag, offset, length, mayUnmap);
  }
  get connectionsDown(): number {
    let down = 0;
    for (const client of this.clients) if (client.state !== 'connected') down++;
    return down;
  }
  get eventSerial(): number {
    let serial = 0;
    for (const client of this.clients) serial += client.eventSerial;
    return serial;
  }
  eventTotals(out: Float64Array): void {
    out.fill(0);
    for (const { counters: c } of this.clients) {
      out[BackendEvent.connects]! += c.connects;
      out[BackendEvent.connectFailures]! += c.connectFailures;
      out[BackendEvent.connectionsLost]! += c.connectionsLost;
      out[BackendEvent.resent]! += c.resubmitted;
      out[BackendEvent.handedOver]! += c.handedOver;
      out[BackendEvent.timedOut]! += c.timedOutRequests;
      out[BackendEvent.stalls]! += c.stalls;
      out[BackendEvent.protocolErrors]! += c.protocolErrors;
    }
  }
  /** Each connection's state and counters, in connection order (diagnostics and tests). */
  connections(): Array<{ state: string; counters: Readonly<NbdClientCounters> }> {
    return this.clients.map((client) => ({ state: client.state, counters: client.counters }));
  }
  kick(): void {
    for (const client of this.clients) client.flush();
  }
  ready(): void {
    for (const client of this.clients) client.socketReady();
  }
  poll(deliver: TransportDeliver): void {
    this.deliver = deliver;
    try {
      for (const client of this.clients) client.pump();
    } finally {
      this.deliver = null;
    }
    if (this.clients.length > 1) this.handOver();
  }
  /** null until the first connect succeeds or fails (connecting at ring start is not news). */
  private healthy: boolean | null = null;
  /** Healthy: every connection is up. The message names the first one that is not. */
  healthChange(): string {
    const down = this.clients.find((c) => !(c.state === 'connected' && c.lastError === ''));
    const connected = down === undefined;
    const neverFailed = this.clients.every((c) => c.counters.connectFailures === 0);
    const healthy = this.healthy === null && !connected && neverFailed ? null : connected;
    if (healthy === this.healthy) return '';
    const first = this.healthy === null;
    this.healthy = healthy;
    if (first && healthy === true) return '';
    const which = this.clients.length > 1 ? ` (${this.clients.length} connections)` : '';
    if (!healthy)
      return `NBD connection lost${which}: ${down!.lastError || down!.state}; reconnecting (requests wait up to the reconnect timeout)`;
    const totals = new Float64Array(BACKEND_EVENTS); // a rare line: a fresh array is fine
    this.eventTotals(totals);
    return (
      `NBD connection up again${which} (connects ${totals[BackendEvent.connects]}, requests resent ${totals[BackendEvent.resent]}, ` +
      `handed to another connection ${totals[BackendEvent.handedOver]}, failed after the reconnect timeout ${totals[BackendEvent.timedOut]})`
    );
  }
  close(): void {
    for (const client of this.clients.splice(0)) {
      this.fds.forget(client.fd);
      client.close();
    }
    this.fds.close();
  }
}

class RbdTransport implements Transport {
  readonly supportsFua = false;
  private readonly queue: RbdQueue;

  constructor(backend: Extract<NetworkBackend, { kind: 'rbd' }>) {
    this.queue = new RbdQueue(backend.handle, backend.eventFd);
  }

  get fd(): number {
    return this.queue.fd;
  }

  read(tag: number, offset: number, segments: IoSegments): void {
    this.queue.submitRead(tag, offset, segments);
  }
  write(tag: number, offset: number, segments: IoSegments): void {
    this.queue.submitWrite(tag, offset, segments);
  }
  flush(tag: number): void {
    this.queue.submitFlush(tag);
  }
  discard(tag: number, offset: number, length: number): void {
    this.queue.submitDiscard(tag, offset, length);
  }
  writeZeroes(tag: number, offset: number, length: number): void {
    this.queue.submitWriteZeroes(tag, offset, length);
  }
  kick(): void {
    // librbd sends at submission.
  }
  /** The eventfd was reported readable since the last poll drained it. */
  private signalled = true;
  ready(): void {
    this.signalled = true;
  }
  /** The caller's deliver for the poll in progress (a field, so the handler below is made once, not per poll). */
  private deliver: TransportDeliver | null = null;
  private readonly onReaped = (tag: number, result: number): void => this.deliver?.(tag, result < 0 ? -result : 0);
  poll(deliver: TransportDeliver): void {
    // Completions are taken from librbd at every poll; the eventfd is read only after epoll reported it, so
    // completions that arrive meanwhile leave it readable and the next epoll round comes back here.
    const drainSignal = this.signalled;
    this.signalled = false;
    this.deliver = deliver;
    this.queue.reap(this.onReaped, drainSignal);
  }
  /** Short reads reported to the log so far. */
  private shortReadsLogged = 0;
  healthChange(): string {
    const count = this.queue.shortReads;
    if (count === this.shortReadsLogged) return '';
    const { asked, read } = this.queue.lastShortRead;
    const since = count - this.shortReadsLogged;
    this.shortReadsLogged = count;
    return (
      `librbd answered ${since} read${since === 1 ? '' : 's'} short (the latest: ${read} of ${asked} bytes; the image ends ` +
      'sooner than the disk size, e.g. shrunk by another client): the rest was zeroed'
    );
  }
  /** librbd reconnects inside librados and reports nothing of it per request: only short reads are events. */
  get eventSerial(): number {
    return this.queue.shortReads;
  }
  readonly connectionsDown = 0;
  eventTotals(out: Float64Array): void {
    out.fill(0);
    out[BackendEvent.shortReads] = this.queue.shortReads;
  }
  close(): void {
    this.queue.close();
  }
}

/** What a channel needs of a member (the per-queue network executor). */
export interface ChannelMember {
  /** A completion for slot `slot` of this member. `direct`: delivered while this member itself polls. */
  accept(slot: number, errno: number, direct: boolean): void;
  /** Connection events since the last report (BackendEvent order), told to whichever member polled. */
  backendEvents(deltas: Float64Array): void;
  /** The transport's connections not up, told to one member (the oldest) when it changes. */
  backendConnectionsDown(count: number): void;
}

export class BackendChannel {
  private readonly members = new Map<number, ChannelMember>();
  private nextId = 1;
  private poller: ChannelMember | null = null;
  private readonly route: TransportDeliver = (tag, errno) => {
    const member = this.members.get(Math.floor(tag / SLOT_SPAN));
    // A member that left (its ring stopped without waiting for it): nothing to publish to.
    if (member === undefined) return;
    member.accept(tag % SLOT_SPAN, errno, member === this.poller);
  };

  /**
   * The member that reports how many connections are down: the oldest still joined, so one queue per worker
   * carries the gauge and the disk's sum over queues counts each connection once.
   */
  private owner: ChannelMember | null = null;
  /** What the owner last reported (-1: nothing yet, e.g. it just became the owner). */
  private reportedDown = -1;
  /** The transport's event serial and totals as last reported to a member. */
  private reportedSerial = 0;
  private readonly reported = new Float64Array(BACKEND_EVENTS);
  private readonly totals = new Float64Array(BACKEND_EVENTS);
  private readonly deltas = new Float64Array(BACKEND_EVENTS);

  constructor(
    readonly key: string,
    readonly transport: Transport,
  ) {}

  join(member: ChannelMember): number {
    const id = this.nextId++;
    this.members.set(id, member);
    if (this.owner === null) {
      this.owner = member;
      this.reportedDown = -1;
    }
    return id;
  }

  /** Removes a member; closes the transport (and forgets the channel) when it was the last. */
  leave(id: number): void {
    const member = this.members.get(id);
    this.members.delete(id);
    if (member === this.owner) {
      // The next oldest reports from its next poll on (a connection that is down keeps polls coming: its
      // reconnect timer wakes every member).
      this.owner = this.members.values().next().value ?? null;
      this.reportedDown = -1;
    }
    if (this.members.size > 0) return;
    channels.delete(this.key);
    this.transport.close();
  }

  tag(id: number, slot: number): number {
    return id * SLOT_SPAN + slot;
  }

  /**
   * Polls the transport on behalf of `member`; other members' completions wake them. Returns a change of
   * the connection's health to report ('' when none; reported once, by whichever member polled).
   */
  poll(member: ChannelMember): string {
    this.poller = member;
    try {
      this.transport.poll(this.route);
    } finally {
      this.poller = null;
    }
    const serial = this.transport.eventSerial;
    if (serial !== this.reportedSerial) {
      // Events are rare (connects, losses): the totals are summed only when the serial says one happened.
      this.reportedSerial = serial;
      this.transport.eventTotals(this.totals);
      for (let i = 0; i < BACKEND_EVENTS; i++) {
        this.deltas[i] = this.totals[i]! - this.reported[i]!;
        this.reported[i] = this.totals[i]!;
      }
      member.backendEvents(this.deltas);
    }
    if (member === this.owner) {
      const down = this.transport.connectionsDown;
      if (down !== this.reportedDown) {
        this.reportedDown = down;
        member.backendConnectionsDown(down);
      }
    }
    return this.transport.healthChange();
  }
}

const channels = new Map<string, BackendChannel>();

/** The channel of `backend` on this worker thread, opened on first use. */
export function channelFor(backend: NetworkBackend): BackendChannel {
  let channel = channels.get(backend.key);
  if (channel === undefined) {
    const transport = backend.kind === 'nbd' ? new NbdTransport(backend) : new RbdTransport(backend);
    channel = new BackendChannel(backend.key, transport);
    channels.set(backend.key, channel);
  }
  return channel;
}
