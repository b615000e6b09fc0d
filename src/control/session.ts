/**
 * One vhost-user session: a front-end connected to a disk. Messages are dispatched through a single table
 * (like libvhost-user's); each handler returns a reply payload, or nothing when only REPLY_ACK may be owed.
 *
 * Invariants:
 * - The handshake never fails on our side: messages we do not act on are still answered where a reply is owed.
 * - Every fd received is either kept by exactly one owner (ring, backend channel) or closed before the next
 *   message is read.
 * - A worker's ring is stopped (acknowledged) before any fd or mapping it uses is closed or unmapped.
 * - The dirty log is unmapped only after every worker using it acknowledged a newer log version (or its
 *   rings stopped), and while VHOST_F_LOG_ALL is set no ring writes guest memory without a usable log.
 */
import {
  BackendRequest,
  FrontendRequest,
  HeaderFlag,
  MAX_MEM_SLOTS,
  ProtocolFeature,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_VRING_F_LOG,
  decodeConfigMessage,
  decodeInflight,
  decodeLogDescription,
  decodeMemoryTable,
  decodeSingleRegion,
  decodeU64,
  decodeVringAddress,
  decodeVringFdRequest,
  decodeVringState,
  encodeConfigMessage,
  encodeInflight,
  encodeMessage,
  encodeReply,
  encodeU64,
  encodeVringState,
  requestName,
} from '../../protocol/vhost-user.js';
import { DeviceStatus, hasFeature, VirtioFeature } from '../../protocol/virtio.js';
import { BlkConfigOffset } from '../../protocol/virtio-blk.js';
import { isValidQueueSize } from '../../protocol/split-ring.js';
import { closeAll, closeFd } from '../sys/fd.js';
import { sendWithFds } from '../sys/unix-socket.js';
import { signalEventFd } from '../sys/eventfd.js';
import { MessageStream, type CloseReason, type IncomingMessage } from './message-stream.js';
import { VringConfig } from './vring-config.js';
import { assertNoOverlap, assertWithinLimits, layoutsOf, mapRegion, unmapRegion, type MappedRegion } from './memory-table.js';
import { adoptNotifyFd } from './notify-fd.js';
import { createInflightFd, mapInflightRegion, type MappedInflightRegion } from './inflight-region.js';
import { mapLog, unmapLog, type MappedLog } from './dirty-log-map.js';
import { OFFERED_PROTOCOL_FEATURES } from '../device/blk-features.js';
import type { BlkDisk } from '../device/blk-disk.js';
import type { DiskQueues } from './disk-queues.js';
import type { DirtyLogTable, MemoryTable, WorkerEvent } from '../dataplane/worker-protocol.js';
import { errorFields, type Logger } from '../log.js';
import { VublkError } from '../errors.js';

/** A request the session refuses; the message names the request and what to fix. */
export class SessionRequestError extends VublkError {
  constructor(request: number, detail: string) {
    super('VUBLK_ERR_SESSION_REQUEST', `${requestName(request)}: ${detail}`, { peerFault: true });
  }
}

/** What a QEMU command line needs so vublk can map guest RAM (vhost-user shares memory by fd). */
export const NO_SHARED_MEMORY_HINT =
  'give QEMU shared guest RAM: -object memory-backend-memfd,id=mem,size=<RAM>,share=on plus -numa node,memdev=mem (or -machine memory-backend=mem)';

type Handler = (message: IncomingMessage) => Promise<Uint8Array | void> | Uint8Array | void;

/** Requests whose reply is part of the request itself (REPLY_ACK does not apply to them). */
const REPLYING_REQUESTS = new Set<number>([
  FrontendRequest.GET_FEATURES,
  FrontendRequest.GET_PROTOCOL_FEATURES,
  FrontendRequest.GET_VRING_BASE,
  FrontendRequest.GET_QUEUE_NUM,
  FrontendRequest.GET_CONFIG,
  FrontendRequest.GET_INFLIGHT_FD,
  FrontendRequest.GET_MAX_MEM_SLOTS,
  FrontendRequest.GET_STATUS,
]);

export class VhostUserSession {
  private readonly stream: MessageStream;
  private readonly rings: VringConfig[];
  private regions: MappedRegion[] = [];
  /** Regions a memory table update removed while requests over them were still in flight: let go at the end. */
  private retired: MappedRegion[] = [];
  /** This session's memory table as the workers know it: id unique in the daemon, version per change. */
  private readonly memoryId: number;
  private memoryVersion = 0;
  /** The migration dirty log from SET_LOG_BASE; workers mark into it while VHOST_F_LOG_ALL is set. */
  private dirtyLog: MappedLog | null = null;
  private dirtyLogVersion = 0;
  /** Logging is on but the last SET_LOG_BASE was unusable: rings stay stopped (see setLogBase). */
  private logUnusable = false;
  /** SET_LOG_FD's eventfd: kept (and closed) but not signalled; QEMU reads the shared log itself. */
  private logFd = -1;
  private ackedFeatures = 0n;
  private featuresSet = false;
  private protocolFeatures = 0n;
  private status = 0;
  private backendFd = -1;
  /** The inflight region the front-end set (SET_INFLIGHT_FD), mapped; null without one. */
  private inflight: MappedInflightRegion | null = null;
  /** The memfd last offered by GET_INFLIGHT_FD: kept open until its reply has surely been sent. */
  private inflightOfferFd = -1;
  /** fds to attach to the reply of the message being handled. */
  private replyFds: number[] = [];
  private ended = false;
  /** Set by closeAfterStoppingRings: no ring starts again. */
  private stopping = false;
  /**
   * The front-end hung up while a message was still being handled (the stream reports it at once, and
   * closes once the handler is done): a device start still waiting for its image lock gives up.
   */
  private peerGone = false;
  private noMemoryWarned = false;
  /** The device is started (a ring ran since the last stop, reset or connect): see startDevice. */
  private deviceActive = false;
  private featuresLogged = false;
  private readonly handlers: Record<number, Handler>;

  private readonly disk: BlkDisk;

  constructor(
    fd: number,
    private readonly queues: DiskQueues,
    private readonly log: Logger,
    private readonly onEnd: (session: VhostUserSession, reason: CloseReason) => void,
  ) {
    this.disk = queues.disk;
    this.memoryId = queues.newMemoryId();
    this.rings = Array.from({ length: this.disk.options.numQueues }, (_, i) => new VringConfig(i));
    const R = FrontendRequest;
    this.handlers = {
      [R.GET_FEATURES]: () => encodeU64(this.disk.offeredFeatures),
      [R.SET_FEATURES]: (m) => this.setFeatures(decodeU64(m.header.request, m.payload)),
      [R.GET_PROTOCOL_FEATURES]: () => encodeU64(OFFERED_PROTOCOL_FEATURES),
      [R.SET_PROTOCOL_FEATURES]: (m) => this.setProtocolFeatures(decodeU64(m.header.request, m.payload)),
      [R.SET_OWNER]: () => undefined,
      [R.RESET_OWNER]: () => this.resetDevice('RESET_OWNER'),
      [R.RESET_DEVICE]: () => this.resetDevice('RESET_DEVICE'),
      [R.GET_QUEUE_NUM]: () => encodeU64(this.rings.length),
      [R.GET_MAX_MEM_SLOTS]: () => encodeU64(MAX_MEM_SLOTS),
      [R.SET_MEM_TABLE]: (m) => this.setMemTable(m),
      [R.SET_LOG_BASE]: (m) => this.setLogBase(m),
      [R.SET_LOG_FD]: (m) => this.setLogFd(m),
      [R.ADD_MEM_REG]: (m) => this.addMemRegion(m),
      [R.REM_MEM_REG]: (m) => this.removeMemRegion(m),
      [R.SET_VRING_NUM]: (m) => this.setVringNum(m),
      [R.SET_VRING_ADDR]: (m) => this.setVringAddr(m),
      [R.SET_VRING_BASE]: (m) => this.setVringBase(m),
      [R.GET_VRING_BASE]: (m) => this.getVringBase(m),
      [R.SET_VRING_KICK]: (m) => this.setVringKick(m),
      [R.SET_VRING_CALL]: (m) => this.setVringCall(m),
      [R.SET_VRING_ERR]: (m) => this.setVringErr(m),
      [R.SET_VRING_ENABLE]: (m) => this.setVringEnable(m),
      [R.GET_CONFIG]: (m) => this.getConfig(m),
      [R.SET_CONFIG]: (m) => this.setConfig(m),
      [R.SET_BACKEND_REQ_FD]: (m) => this.setBackendReqFd(m),
      [R.SET_STATUS]: (m) => this.setStatus(decodeU64(m.header.request, m.payload)),
      [R.GET_STATUS]: () => encodeU64(this.deviceStatus()),
      [R.GET_INFLIGHT_FD]: (m) => this.getInflightFd(m),
      [R.SET_INFLIGHT_FD]: (m) => this.setInflightFd(m),
    };
    queues.setWorkerEventListener((event) => this.onWorkerEvent(event));
    queues.setConfigChangeListener(() => this.notifyConfigChange());
    this.stream = new MessageStream(
      fd,
      (message) => this.handle(message),
      (reason) => void this.teardown(reason),
      () => {
        this.peerGone = true;
      },
    );
  }

  get protocolFeaturesNegotiated(): boolean {
    return this.featuresSet && hasFeature(this.ackedFeatures, VHOST_USER_F_PROTOCOL_FEATURES);
  }

  private hasProtocolFeature(bit: number): boolean {
    return hasFeature(this.protocolFeatures, bit);
  }

  /** GET_STATUS: what the front-end set, plus NEEDS_RESET while any queue is poisoned. */
  deviceStatus(): number {
    // A worker sets its shared `poisoned` gauge before it signals the err eventfd, but its event reaches this
    // thread later: read the gauge too, so a GET_STATUS sent in reaction to the err signal sees NEEDS_RESET.
    const poisoned = this.rings.some((ring) => ring.poisoned || (ring.running && this.disk.counters.read(ring.index, 'poisoned') !== 0));
    return poisoned ? this.status | DeviceStatus.NEEDS_RESET : this.status & ~DeviceStatus.NEEDS_RESET;
  }

  /** The connection is gone and teardown is in progress. */
  get isEnding(): boolean {
    return this.ended;
  }

  close(): void {
    this.stream.close({ kind: 'local' });
  }

  /**
   * A clean stop (SIGTERM, restart, upgrade): the rings stop first — requests in flight complete and reach
   * the used ring while the front-end is still connected — then the connection closes. QEMU's rewind
   * (last_avail_idx := used.idx) then loses nothing, and what a stop could not finish stays in the inflight
   * region for the next daemon.
   */
  async closeAfterStoppingRings(): Promise<void> {
    this.stopping = true;
    await Promise.allSettled(this.rings.map((ring) => this.stopRing(ring)));
    this.close();
  }

  private async handle(message: IncomingMessage): Promise<void> {
    const { request, flags } = message.header;
    const handler = this.handlers[request];
    // Under LOG_SHMFD, SET_LOG_BASE is answered like a GET (vhost-user "Communication"); QEMU waits for it.
    const replying =
      REPLYING_REQUESTS.has(request) || (request === FrontendRequest.SET_LOG_BASE && this.hasProtocolFeature(ProtocolFeature.LOG_SHMFD));
    const wantsAck = (flags & HeaderFlag.NEED_REPLY) !== 0 && this.hasProtocolFeature(ProtocolFeature.REPLY_ACK) && !replying;
    let reply: Uint8Array | undefined;
    let failed = false;
    try {
      if (handler === undefined) throw new SessionRequestError(request, 'request not supported by vublk');
      reply = (await handler(message)) ?? undefined;
    } catch (error) {
      failed = true;
      // The error's classification decides: the front-end's fault is a warning, ours an error;
      // a fatal error ends the connection instead of a reply.
      const classified = error instanceof VublkError ? error : null;
      this.log[classified?.peerFault === true ? 'warn' : 'error'](
        { request: requestName(request), ...errorFields(error) },
        'vhost-user request rejected',
      );
      if (classified?.fatal === true) this.stream.close({ kind: 'protocol-error', detail: classified.message });
    } finally {
      // Whatever a handler did not take ownership of is closed here (handlers splice out the fds they keep).
      closeAll(message.fds);
      message.fds.length = 0;
    }
    const replyFds = this.replyFds;
    this.replyFds = [];
    if (this.stream.isClosed) return;
    if (replying) {
      // A reply is owed whatever happened; an empty payload is the clearest "no" the protocol has.
      const payload = reply instanceof Uint8Array && !failed ? reply : null;
      this.stream.send(encodeReply(request, payload ?? new Uint8Array(0)), payload !== null ? replyFds : []);
    } else if (wantsAck) {
      this.stream.send(encodeReply(request, encodeU64(failed ? 1 : 0)));
    }
  }

  // --- features -----------------------------------------------------------------------------------

  private async setFeatures(features: bigint): Promise<void> {
    if (hasFeature(features, VHOST_F_LOG_ALL) && this.dirtyLog === null) {
      // Acknowledging would let writes go unlogged: the front-end's migration must fail instead.
      throw new SessionRequestError(FrontendRequest.SET_FEATURES, 'VHOST_F_LOG_ALL without a dirty log (SET_LOG_BASE first)');
    }
    const unknown = features & ~this.disk.offeredFeatures;
    if (unknown !== 0n) {
      // Accept the intersection: failing here would fail the front-end's device start for good.
      this.log.warn({ unknown: `0x${unknown.toString(16)}` }, 'front-end acknowledged features that were not offered; ignoring them');
    }
    const previous = this.ackedFeatures;
    this.ackedFeatures = features & this.disk.offeredFeatures;
    this.featuresSet = true;
    this.logFeatures(previous);
    // EVENT_IDX changes how a running ring suppresses notifications: restart running rings with it.
    if (hasFeature(previous ^ this.ackedFeatures, VirtioFeature.RING_EVENT_IDX)) {
      for (const ring of this.rings) if (ring.running) await this.restartRing(ring);
    }
    // Logging starts (or stops) in every running ring before this message is acknowledged.
    if (hasFeature(previous ^ this.ackedFeatures, VHOST_F_LOG_ALL)) await this.publishDirtyLog();
    if (!hasFeature(this.ackedFeatures, VHOST_F_LOG_ALL)) this.logUnusable = false;
    for (const ring of this.rings) await this.reconcile(ring);
  }

  private get logging(): boolean {
    return this.dirtyLog !== null && hasFeature(this.ackedFeatures, VHOST_F_LOG_ALL);
  }

  /**
   * One `features negotiated` line per session. QEMU sends SET_FEATURES at every device start: the firmware's
   * driver (SeaBIOS) starts the device with a few features, the guest kernel's again with its own; repeats
   * with the same set are debug, a different set is `features renegotiated` with both values.
   */
  private logFeatures(previous: bigint): void {
    const fields = {
      features: `0x${this.ackedFeatures.toString(16)}`,
      eventIdx: this.eventIdx,
      version1: hasFeature(this.ackedFeatures, VirtioFeature.VERSION_1),
    };
    if (!this.featuresLogged) {
      this.featuresLogged = true;
      this.log.info(fields, 'features negotiated');
    } else if (previous !== this.ackedFeatures) {
      this.log.info({ ...fields, previous: `0x${previous.toString(16)}` }, 'features renegotiated');
    } else {
      this.log.debug(fields, 'features negotiated again (unchanged)');
    }
  }

  private get eventIdx(): boolean {
    return hasFeature(this.ackedFeatures, VirtioFeature.RING_EVENT_IDX);
  }

  private setProtocolFeatures(features: bigint): void {
    this.protocolFeatures = features & OFFERED_PROTOCOL_FEATURES;
  }

  private setStatus(value: bigint): void {
    // SET_STATUS(0) may come before or after GET_VRING_BASE depending on the QEMU version: it only records.
    this.status = Number(value & 0xffn) & ~DeviceStatus.NEEDS_RESET;
  }

  // --- memory -------------------------------------------------------------------------------------

  private async setMemTable(message: IncomingMessage): Promise<void> {
    const request = message.header.request;
    const regions = decodeMemoryTable(request, message.payload);
    if (message.fds.length !== regions.length) {
      throw new SessionRequestError(request, `${regions.length} regions but ${message.fds.length} fds`);
    }
    const fds = message.fds.splice(0);
    const mapped: MappedRegion[] = [];
    // mapRegion closes its fd whether it succeeds or throws: only the fds it never got are closed here. Closing
    // one twice could close an fd a worker thread opened meanwhile under the same number (a ring's timer).
    let consumed = 0;
    try {
      for (const region of regions) mapped.push(mapRegion(region, fds[consumed++]!));
      assertNoOverlap(mapped);
      assertWithinLimits(mapped);
    } catch (error) {
      mapped.forEach(unmapRegion);
      closeAll(fds.slice(consumed));
      throw error;
    }
    await this.replaceMemory(mapped);
  }

  private async addMemRegion(message: IncomingMessage): Promise<void> {
    const request = message.header.request;
    const region = decodeSingleRegion(request, message.payload);
    const fd = message.fds.shift();
    if (fd === undefined) throw new SessionRequestError(request, 'no fd for the region');
    if (this.regions.length >= MAX_MEM_SLOTS) {
      closeFd(fd);
      throw new SessionRequestError(request, `all ${MAX_MEM_SLOTS} memory slots are in use`);
    }
    const mapped = mapRegion(region, fd);
    try {
      assertNoOverlap([...this.regions, mapped]);
      assertWithinLimits([...this.regions, mapped]);
    } catch (error) {
      unmapRegion(mapped);
      throw error;
    }
    await this.replaceMemory([...this.regions, mapped]);
  }

  private async removeMemRegion(message: IncomingMessage): Promise<void> {
    const request = message.header.request;
    const region = decodeSingleRegion(request, message.payload);
    // QEMU may attach the region's fd again; it is not needed (closed with the message's leftovers).
    const gpa = Number(region.guestPhysAddr);
    const size = Number(region.memorySize);
    const match = this.regions.find((r) => r.layout.guestPhysAddr === gpa && r.layout.size === size);
    if (match === undefined) throw new SessionRequestError(request, `no region at 0x${gpa.toString(16)} of ${size} bytes`);
    await this.replaceMemory(this.regions.filter((r) => r !== match));
  }

  private memoryTable(): MemoryTable {
    return { id: this.memoryId, version: this.memoryVersion, regions: layoutsOf(this.regions) };
  }

  /** Publishes a new table to every worker running one of our rings, then unmaps what is no longer in it. */
  private async replaceMemory(next: MappedRegion[]): Promise<void> {
    const previous = this.regions;
    this.regions = next;
    const unsealed = next.filter((region) => region.shrinkGuard === 'unsealable' && !previous.includes(region)).length;
    if (unsealed > 0)
      this.log.warn({ regions: unsealed }, 'guest memory fd cannot be sealed against shrinking; the front-end must not truncate it');
    this.memoryVersion++;
    const table = this.memoryTable();
    const layouts = table.regions;
    const leftInFlight = await this.queues.updateMemory(table);
    const removed = previous.filter((region) => !next.includes(region));
    if (leftInFlight > 0) {
      // The rings go on and will publish those requests: what they write must reach this guest's memory, so
      // the old mappings stay as they are until the session ends.
      this.holdMemory(removed, leftInFlight, 'memory table update');
      this.retired.push(...removed);
    } else removed.forEach(unmapRegion);
    this.log.debug({ regions: layouts.length }, 'memory table updated');
    for (const ring of this.rings) await this.reconcile(ring);
  }

  // --- inflight tracking --------------------------------------------------------------------------

  /** GET_INFLIGHT_FD: a fresh zeroed region for num_queues × queue_size; the fd rides on the reply. */
  private getInflightFd(message: IncomingMessage): Uint8Array {
    const request = message.header.request;
    const asked = decodeInflight(request, message.payload);
    const { fd, description } = createInflightFd({ numQueues: asked.numQueues, queueSize: asked.queueSize }, this.rings.length);
    closeFd(this.inflightOfferFd);
    this.inflightOfferFd = fd;
    this.replyFds = [fd];
    this.log.debug(
      { numQueues: description.numQueues, queueSize: description.queueSize, bytes: Number(description.mmapSize) },
      'inflight region offered',
    );
    return encodeInflight(description);
  }

  /**
   * SET_INFLIGHT_FD: maps the region (possibly one a previous daemon filled) for the rings' next start. Rings
   * running now are restarted over it; the old region is unmapped only after they stopped.
   */
  private async setInflightFd(message: IncomingMessage): Promise<void> {
    const request = message.header.request;
    const description = decodeInflight(request, message.payload);
    const fd = message.fds.shift();
    if (fd === undefined) throw new SessionRequestError(request, 'no fd attached');
    // The offer's reply went out before this message was read.
    closeFd(this.inflightOfferFd);
    this.inflightOfferFd = -1;
    const region = mapInflightRegion(description, fd, this.rings.length);
    const running = this.rings.filter((ring) => ring.running);
    for (const ring of running) await this.stopRing(ring);
    this.inflight?.unmap();
    this.inflight = region;
    this.log.info({ numQueues: region.numQueues, queueSize: region.queueSize }, 'inflight region set');
    for (const ring of running) await this.reconcile(ring);
  }

  // --- migration dirty log -----------------------------------------------------------------------

  private dirtyLogTable(): DirtyLogTable {
    const log = this.logging ? this.dirtyLog : null;
    return { id: this.memoryId, version: this.dirtyLogVersion, hostAddr: log?.hostAddr ?? 0, size: log?.size ?? 0 };
  }

  /** Sends the current log state to every worker running one of our rings (acknowledged). */
  private async publishDirtyLog(): Promise<void> {
    this.dirtyLogVersion++;
    const table = this.dirtyLogTable();
    await this.queues.updateLog(table);
    // Counters of running rings are published at the end of each drain; stopped rings have published all.
    const pagesLogged = this.rings.reduce((sum, ring) => sum + this.disk.counters.read(ring.index, 'dirtyPagesLogged'), 0);
    this.log.info(
      { logging: table.size > 0, logBytes: table.size, pagesLogged },
      table.size > 0 ? 'dirty logging on' : 'dirty logging off',
    );
  }

  /**
   * SET_LOG_BASE (LOG_SHMFD): maps the new log, switches the workers to it, then unmaps the old one. QEMU
   * replaces the log while logging when guest memory grows. If the new log cannot be used while logging is
   * on, the rings stop (nothing more is written to guest memory, so nothing goes unlogged) until a usable
   * log arrives or logging is switched off; the refusal is answered like any other.
   */
  private async setLogBase(message: IncomingMessage): Promise<Uint8Array> {
    const request = message.header.request;
    if (!this.hasProtocolFeature(ProtocolFeature.LOG_SHMFD))
      throw new SessionRequestError(request, 'LOG_SHMFD was not negotiated (a log without an fd is not supported)');
    let mapped: MappedLog;
    try {
      const description = decodeLogDescription(request, message.payload);
      const fd = message.fds.shift();
      if (fd === undefined) throw new SessionRequestError(request, 'no log fd attached');
      mapped = mapLog(description, fd);
    } catch (error) {
      if (this.logging) await this.suspendForUnusableLog(error);
      throw error;
    }
    const previous = this.dirtyLog;
    this.dirtyLog = mapped;
    this.logUnusable = false;
    if (this.logging || previous !== null) await this.publishDirtyLog();
    if (previous !== null) unmapLog(previous);
    this.log.info({ logBytes: mapped.size }, 'dirty log mapped');
    for (const ring of this.rings) await this.reconcile(ring);
    return encodeU64(0);
  }

  /** Logging is on but the front-end's new log is unusable: stop the rings, then let the old log go. */
  private async suspendForUnusableLog(error: unknown): Promise<void> {
    this.logUnusable = true;
    this.log.warn(errorFields(error), 'replacement dirty log unusable while logging: rings stopped until a usable log or logging off');
    for (const ring of this.rings) await this.stopRing(ring);
    const previous = this.dirtyLog;
    this.dirtyLog = null;
    await this.publishDirtyLog();
    if (previous !== null) unmapLog(previous);
  }

  private setLogFd(message: IncomingMessage): void {
    const fd = message.fds.shift();
    if (fd === undefined) throw new SessionRequestError(message.header.request, 'no fd attached');
    closeFd(this.logFd);
    this.logFd = fd;
  }

  // --- rings --------------------------------------------------------------------------------------

  private ring(request: number, index: number): VringConfig {
    const ring = this.rings[index];
    if (ring === undefined) throw new SessionRequestError(request, `queue ${index} does not exist (the disk has ${this.rings.length})`);
    return ring;
  }

  private async setVringNum(message: IncomingMessage): Promise<void> {
    const { index, num } = decodeVringState(message.header.request, message.payload);
    const ring = this.ring(message.header.request, index);
    if (!isValidQueueSize(num) || num > this.disk.options.queueSize) {
      throw new SessionRequestError(message.header.request, `queue size ${num} is not a power of two up to ${this.disk.options.queueSize}`);
    }
    await this.stopRing(ring);
    ring.size = num;
  }

  private async setVringAddr(message: IncomingMessage): Promise<void> {
    const address = decodeVringAddress(message.header.request, message.payload);
    const ring = this.ring(message.header.request, address.index);
    const limit = BigInt(Number.MAX_SAFE_INTEGER);
    if (address.descUserAddr > limit || address.availUserAddr > limit || address.usedUserAddr > limit || address.logGuestAddr > limit) {
      throw new SessionRequestError(message.header.request, 'ring address beyond 2^53');
    }
    // Split-ring alignment (virtio 1.x 2.7): the worker views the rings as typed arrays at these addresses.
    if (address.descUserAddr % 16n !== 0n || address.availUserAddr % 2n !== 0n || address.usedUserAddr % 4n !== 0n) {
      throw new SessionRequestError(
        message.header.request,
        'ring addresses must be aligned: descriptor table to 16, avail ring to 2, used ring to 4 bytes',
      );
    }
    const logUsed = (address.flags & (1 << VHOST_VRING_F_LOG)) !== 0;
    const wasRunning = ring.running;
    await this.stopRing(ring);
    ring.descUserAddr = Number(address.descUserAddr);
    ring.availUserAddr = Number(address.availUserAddr);
    ring.usedUserAddr = Number(address.usedUserAddr);
    ring.usedLogGpa = logUsed ? Number(address.logGuestAddr) : -1;
    if (wasRunning) await this.reconcile(ring);
  }

  private async setVringBase(message: IncomingMessage): Promise<void> {
    const { index, num } = decodeVringState(message.header.request, message.payload);
    const ring = this.ring(message.header.request, index);
    await this.stopRing(ring);
    ring.base = num & 0xffff;
  }

  private async getVringBase(message: IncomingMessage): Promise<Uint8Array> {
    const { index } = decodeVringState(message.header.request, message.payload);
    const ring = this.ring(message.header.request, index);
    await this.stopRing(ring);
    // Before the reply: a migration's destination starts only once the source answered its last GET_VRING_BASE.
    await this.stopDevice();
    // The ring is now stopped: it restarts with the next SET_VRING_KICK, poison and NEEDS_RESET cleared.
    ring.kickArmed = false;
    closeFd(ring.kickFd);
    ring.kickFd = -1;
    if (ring.poisoned) this.log.info({ queue: index }, 'poisoned queue stopped by the front-end; poison cleared');
    ring.poisoned = false;
    return encodeVringState({ index, num: ring.base });
  }

  private async setVringKick(message: IncomingMessage): Promise<void> {
    const request = message.header.request;
    const { index, noFd } = decodeVringFdRequest(request, message.payload);
    const ring = this.ring(request, index);
    const fd = noFd ? -1 : message.fds.shift();
    if (fd === undefined) throw new SessionRequestError(request, 'no kick fd attached and the no-fd flag is clear');
    this.adopt(request, fd, 'kick');
    await this.stopRing(ring);
    closeFd(ring.kickFd);
    ring.kickFd = fd;
    ring.kickArmed = true;
    if (noFd) this.log.warn({ queue: index }, 'kick fd absent: queue is polled every millisecond');
    if (!this.protocolFeaturesNegotiated) this.warnIfNoMemory(index);
    await this.reconcile(ring);
  }

  /**
   * A ring is being started but no memory table ever came: QEMU leaves guest RAM out of the table when it
   * cannot share it (no fd), so the guest hangs at boot with nothing logged anywhere. Said once per session.
   */
  private warnIfNoMemory(queue: number): void {
    if (this.regions.length > 0 || this.noMemoryWarned) return;
    this.noMemoryWarned = true;
    this.log.warn(
      { queue, hint: NO_SHARED_MEMORY_HINT },
      'the front-end starts a queue but has sent no guest memory table: its guest RAM is probably not shared memory (the guest will hang at boot)',
    );
  }

  private async setVringCall(message: IncomingMessage): Promise<void> {
    await this.replaceNotifyFd(message, 'callFd', 'setCall');
  }

  private async setVringErr(message: IncomingMessage): Promise<void> {
    await this.replaceNotifyFd(message, 'errFd', 'setErr');
  }

  /** Swaps a call/err fd; the old one is closed only after the worker has switched to the new one. */
  private async replaceNotifyFd(message: IncomingMessage, field: 'callFd' | 'errFd', op: 'setCall' | 'setErr'): Promise<void> {
    const request = message.header.request;
    const { index, noFd } = decodeVringFdRequest(request, message.payload);
    const ring = this.ring(request, index);
    const fd = noFd ? -1 : message.fds.shift();
    if (fd === undefined) throw new SessionRequestError(request, 'no fd attached and the no-fd flag is clear');
    this.adopt(request, fd, field === 'callFd' ? 'call' : 'err');
    const old = ring[field];
    ring[field] = fd;
    try {
      if (ring.running) await this.queues.setNotifyFd(index, op, fd);
      // A guest may have lost an interrupt across a ring restart; one spurious interrupt is harmless.
      else if (field === 'callFd' && fd >= 0) signalEventFd(fd);
    } finally {
      closeFd(old);
    }
  }

  /** A received kick/call/err fd must be an eventfd; it is made non-blocking. On refusal the fd is closed. */
  private adopt(request: number, fd: number, role: 'kick' | 'call' | 'err'): void {
    if (fd < 0) return;
    try {
      adoptNotifyFd(fd, role);
    } catch (error) {
      closeFd(fd);
      throw new SessionRequestError(request, error instanceof Error ? error.message : String(error));
    }
  }

  private async setVringEnable(message: IncomingMessage): Promise<void> {
    const { index, num } = decodeVringState(message.header.request, message.payload);
    const ring = this.ring(message.header.request, index);
    if (num > 1) throw new SessionRequestError(message.header.request, `enable value ${num} is neither 0 nor 1`);
    ring.enabled = num === 1;
    if (ring.enabled) this.warnIfNoMemory(index);
    await this.reconcile(ring);
  }

  /** Starts or stops the worker's ring so that it runs exactly when the configuration allows it. */
  private async reconcile(ring: VringConfig): Promise<void> {
    const shouldRun =
      !this.abandoned &&
      ring.kickArmed &&
      ring.addressed &&
      ring.isEnabled(this.protocolFeaturesNegotiated) &&
      this.regions.length > 0 &&
      !this.logUnusable;
    if (shouldRun && !ring.running) {
      if (!this.deviceActive) {
        await this.startDevice();
        // The front-end may have left (or a stop begun) while the image's start step waited.
        if (this.abandoned) return;
      }
      await this.queues.start(
        ring.index,
        {
          size: ring.size,
          descUserAddr: ring.descUserAddr,
          availUserAddr: ring.availUserAddr,
          usedUserAddr: ring.usedUserAddr,
          lastAvailIdx: ring.base,
          eventIdx: this.eventIdx,
          usedLogGpa: ring.usedLogGpa,
          kickFd: ring.kickFd,
          callFd: ring.callFd,
          errFd: ring.errFd,
          ...(this.inflightFor(ring.index) ?? {}),
        },
        this.memoryTable(),
        this.dirtyLogTable(),
      );
      ring.running = true;
      this.log.info(
        { queue: ring.index, size: ring.size, base: ring.base, eventIdx: this.eventIdx, logUsed: ring.usedLogGpa >= 0 },
        'ring started',
      );
    } else if (!shouldRun && ring.running) {
      await this.stopRing(ring);
    }
  }

  private inflightFor(queue: number): { inflight: NonNullable<ReturnType<MappedInflightRegion['queue']>> } | undefined {
    const mapping = this.inflight?.queue(queue);
    return mapping === undefined ? undefined : { inflight: mapping };
  }

  private async stopRing(ring: VringConfig): Promise<void> {
    if (!ring.running) return;
    const { lastAvailIdx, leftInFlight } = await this.queues.stop(ring.index);
    if (leftInFlight > 0) this.holdMemory(this.regions, leftInFlight, `queue ${ring.index} stop`);
    ring.running = false;
    if (lastAvailIdx !== undefined) ring.base = lastAvailIdx;
    this.log.info(
      { queue: ring.index, base: ring.base, pagesLogged: this.disk.counters.read(ring.index, 'dirtyPagesLogged') },
      'ring stopped',
    );
  }

  /**
   * The device starts with its first ring, not with every ring start: a ring restarted by the control plane
   * (memory table, features, dirty log) keeps the device started. What the image needs (RBD lock=migratable
   * takes the exclusive lock) is awaited here, so no request is popped before; a failure is logged and the
   * rings start anyway (with the lock held elsewhere librbd refuses the writes: IOERR, counted).
   */
  private async startDevice(): Promise<void> {
    this.deviceActive = true;
    try {
      const done = await this.disk.deviceStarted(() => this.abandoned);
      if (done !== null) this.log.info(done);
    } catch (error) {
      const detail = { error: error instanceof Error ? error.message : String(error) };
      if (this.abandoned) this.log.info(detail, 'device start abandoned: the front-end left while it waited for the image lock');
      else this.log.error(detail, 'device started without its image lock: writes fail with IOERR while another client holds it');
    }
  }

  /**
   * A ring left requests in flight (its back-end did not answer in time): they may still use the guest memory
   * they point into, so these regions are not unmapped when they go (MappedRegion.held: quarantined for a
   * network disk, kept otherwise), never given to a later mapping that a late write would corrupt.
   */
  private holdMemory(regions: readonly MappedRegion[], requests: number, when: string): void {
    const fresh = regions.filter((region) => region.held === undefined);
    const mode = this.disk.network !== undefined ? 'quarantine' : 'keep';
    for (const region of fresh) region.held = mode;
    if (fresh.length > 0) {
      this.log.warn(
        { requests, regions: fresh.length, bytes: fresh.reduce((sum, r) => sum + r.mapLength, 0), at: when, mode },
        mode === 'quarantine'
          ? 'requests left in flight: their guest memory is quarantined, not unmapped, when the session lets it go'
          : 'requests left in flight: their guest memory stays mapped until the daemon restarts',
      );
    }
  }

  /** No ring may start any more: the front-end left (or hung up mid-message), or a clean stop began. */
  private get abandoned(): boolean {
    return this.ended || this.stopping || this.peerGone;
  }

  /** The front-end stopped the last ring (GET_VRING_BASE), reset the device or left: the image's stop step. */
  private async stopDevice(): Promise<void> {
    if (!this.deviceActive || this.rings.some((ring) => ring.running)) return;
    this.deviceActive = false;
    try {
      const done = await this.disk.deviceStopped();
      if (done !== null) this.log.info(done);
    } catch (error) {
      this.log.error({ error: error instanceof Error ? error.message : String(error) }, 'device stop step of the image failed');
    }
  }

  private async restartRing(ring: VringConfig): Promise<void> {
    await this.stopRing(ring);
    await this.reconcile(ring);
  }

  private onWorkerEvent(event: WorkerEvent): void {
    if (event.kind !== 'poisoned') return;
    const ring = this.rings[event.queue];
    if (ring === undefined) return;
    ring.poisoned = true;
    this.log.warn({ queue: event.queue, cause: event.cause, reason: event.reason }, 'queue poisoned: device needs reset');
  }

  // --- config space -------------------------------------------------------------------------------

  private getConfig(message: IncomingMessage): Uint8Array {
    const { offset, size } = decodeConfigMessage(message.header.request, message.payload);
    const space = new Uint8Array(Math.max(offset + size, 0));
    space.set(this.disk.configSpace().subarray(0, space.length));
    return encodeConfigMessage({ offset, flags: 0, data: space.subarray(offset, offset + size) });
  }

  private async setConfig(message: IncomingMessage): Promise<void> {
    const request = message.header.request;
    const { offset, size, data } = decodeConfigMessage(request, message.payload);
    if (offset !== BlkConfigOffset.writeback || size !== 1) {
      throw new SessionRequestError(request, `only the writeback byte (offset ${BlkConfigOffset.writeback}, size 1) is writable`);
    }
    const writeback = data[0] !== 0;
    await this.queues.setWriteback(writeback);
    this.log.info({ writeback }, 'guest changed the write cache mode');
  }

  private setBackendReqFd(message: IncomingMessage): void {
    const fd = message.fds.shift();
    if (fd === undefined) throw new SessionRequestError(message.header.request, 'no fd attached');
    closeFd(this.backendFd);
    this.backendFd = fd;
  }

  /**
   * Tells the front-end the config space changed (a resize): CONFIG_CHANGE_MSG on the back-end channel makes
   * QEMU re-read GET_CONFIG and interrupt the guest. Without the channel the guest learns on its next reboot.
   */
  private notifyConfigChange(): void {
    if (this.backendFd < 0 || !this.hasProtocolFeature(ProtocolFeature.BACKEND_REQ)) {
      this.log.warn('config changed but the front-end has no back-end channel: the guest sees it after a reset');
      return;
    }
    try {
      const sent = sendWithFds(this.backendFd, encodeMessage(BackendRequest.CONFIG_CHANGE_MSG, HeaderFlag.VERSION), 0);
      if (sent === null) this.log.warn('back-end channel is full: config change notification dropped');
      else this.log.info('config change sent to the front-end');
    } catch (error) {
      this.log.warn(errorFields(error), 'config change notification failed');
    }
  }

  // --- reset and teardown -------------------------------------------------------------------------

  private async resetDevice(why: string): Promise<void> {
    for (const ring of this.rings) {
      await this.stopRing(ring);
      ring.reset();
    }
    await this.stopDevice();
    // The rings start over: nothing of the old ones may be resubmitted.
    this.inflight?.clear();
    this.status = 0;
    this.ackedFeatures = 0n;
    this.featuresSet = false;
    this.logUnusable = false;
    // Logging is off with VHOST_F_LOG_ALL gone; the next ring start must not reuse a worker's cached log.
    this.dirtyLogVersion++;
    this.log.info({ request: why }, 'device reset');
  }

  private async teardown(reason: CloseReason): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    const level = reason.kind === 'protocol-error' ? 'warn' : 'info';
    this.log[level](
      { reason: reason.kind, ...(reason.kind === 'protocol-error' ? { detail: reason.detail } : {}) },
      'front-end disconnected',
    );
    // Rings stop concurrently: they may sit on different workers, and one slow worker must not hold the others.
    const stops = await Promise.allSettled(this.rings.map((ring) => this.stopRing(ring)));
    const failed = stops.filter((s) => s.status === 'rejected').length;
    await this.stopDevice();
    try {
      if (failed > 0) {
        // A ring that did not confirm its stop may still read guest memory: leak the mappings, never crash.
        this.log.error({ rings: failed }, 'rings did not stop at disconnect: guest memory mappings kept');
        this.regions = [];
        this.retired = [];
      }
    } finally {
      for (const ring of this.rings) ring.reset();
      this.regions.forEach(unmapRegion);
      this.retired.forEach(unmapRegion);
      this.retired = [];
      this.regions = [];
      // Kept only when a ring did not confirm its stop (it may still write the region).
      if (failed === 0) this.inflight?.unmap();
      this.inflight = null;
      closeFd(this.inflightOfferFd);
      this.inflightOfferFd = -1;
      if (failed === 0 && this.dirtyLog !== null) unmapLog(this.dirtyLog);
      this.dirtyLog = null;
      closeFd(this.logFd);
      this.logFd = -1;
      closeFd(this.backendFd);
      this.backendFd = -1;
      this.queues.setConfigChangeListener(() => undefined);
      this.onEnd(this, reason);
    }
  }
}
