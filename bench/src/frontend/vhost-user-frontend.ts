/**
 * A vhost-user FRONT-END that plays QEMU against any vhost-user-blk back-end over a real Unix socket.
 * connect() runs the QEMU 7.2 handshake; every step is also a public method, and sendMessage / receiveMessage
 * give byte-level control for hostile tests. Rings live in memfd guest memory shared with the back-end.
 */
import {
  FrontendRequest,
  HeaderFlag,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  decodeConfigMessage,
  decodeInflight,
  decodeU64,
  decodeVringState,
  encodeConfigMessage,
  encodeInflight,
  encodeMemoryTable,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddress,
  encodeVringFdRequest,
  encodeVringState,
  requestName,
  type MemoryRegion,
} from '../../../protocol/vhost-user.js';
import { DeviceStatus, VirtioFeature, hasFeature } from '../../../protocol/virtio.js';
import { decodeBlkConfig, type BlkConfig } from '../../../protocol/virtio-blk.js';
import { closeAll, closeFd } from '../../../src/sys/fd.js';
import { GuestMemory } from './guest-memory.js';
import { VhostUserChannel, type VhostUserMessage } from './vhost-user-channel.js';
import { VirtqueueDriver } from './virtqueue-driver.js';
import {
  DEFAULT_CONFIG_SIZE,
  DEFAULT_MEMORY,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_TIMEOUT_MS,
  wantedFeatures,
  wantedProtocolFeatures,
  type FrontendOptions,
} from './frontend-options.js';
import { BackendNackError, FrontendClosedError, FrontendError, NegotiationError, UnexpectedReplyError } from './errors.js';
import { createSocketPair } from './socket-pair.js';

export interface RawSendOptions {
  /** Header flags; default VERSION (1). Add HeaderFlag.NEED_REPLY yourself for raw messages. */
  flags?: number;
  payload?: Uint8Array;
  fds?: readonly number[];
}

export interface SetOptions {
  /** Override whether NEED_REPLY is set (default: whenever REPLY_ACK was negotiated). */
  needReply?: boolean;
}

export class VhostUserFrontend {
  readonly memory: GuestMemory;
  readonly queues: VirtqueueDriver[] = [];
  readonly timeoutMs: number;
  /** Filled in as the handshake progresses. */
  offeredFeatures = 0n;
  ackedFeatures = 0n;
  offeredProtocolFeatures = 0n;
  ackedProtocolFeatures = 0n;
  /** GET_QUEUE_NUM answer (null if MQ was not negotiated). */
  maxQueues: number | null = null;
  maxMemSlots: number | null = null;
  /** Raw config space from GET_CONFIG (null if not fetched). */
  config: Buffer | null = null;
  /** Our end of the back-end channel (SET_BACKEND_REQ_FD), once set up. */
  backendChannel: VhostUserChannel | null = null;
  private readonly ownsMemory: boolean;
  private closed = false;

  private constructor(
    /** Replaced by reconnect(). */
    public channel: VhostUserChannel,
    readonly socketPath: string,
    readonly options: FrontendOptions,
  ) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const memory = options.memory ?? DEFAULT_MEMORY;
    this.ownsMemory = !(memory instanceof GuestMemory);
    this.memory = memory instanceof GuestMemory ? memory : GuestMemory.create(memory);
  }

  /** Connects (retrying while the back-end starts) and, unless options.handshake is false, runs the handshake. */
  static async connect(socketPath: string, options: FrontendOptions = {}): Promise<VhostUserFrontend> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const channel = await VhostUserChannel.connect(socketPath, options.connectTimeoutMs ?? timeoutMs);
    let frontend: VhostUserFrontend;
    try {
      frontend = new VhostUserFrontend(channel, socketPath, options);
    } catch (error) {
      channel.close();
      throw error;
    }
    if (options.handshake ?? true) {
      try {
        await frontend.handshake();
      } catch (error) {
        frontend.close();
        throw error;
      }
    }
    return frontend;
  }

  // ---------------------------------------------------------------- negotiated state

  hasFeature(bit: number): boolean {
    return hasFeature(this.ackedFeatures, bit);
  }

  hasProtocolFeature(bit: number): boolean {
    return hasFeature(this.ackedProtocolFeatures, bit);
  }

  get replyAck(): boolean {
    return this.hasProtocolFeature(ProtocolFeature.REPLY_ACK);
  }

  get blkConfig(): BlkConfig | null {
    return this.config !== null && this.config.length >= 60 ? decodeBlkConfig(this.config) : null;
  }

  queue(index: number): VirtqueueDriver {
    const queue = this.queues[index];
    if (queue === undefined) throw new RangeError(`queue ${index} does not exist; ${this.queues.length} were set up`);
    return queue;
  }

  // ---------------------------------------------------------------- the QEMU 7.2 sequence

  /** The full start-up sequence of QEMU 7.2's vhost-user-blk (see the module comment of each step). */
  async handshake(): Promise<void> {
    await this.setUpDevice();
    this.createQueues(this.resolveQueueCount());
    for (const queue of this.queues) await this.startQueue(queue.index);
    await this.enableQueues();
  }

  /** What every connection does before the rings: features, config, inflight region, status, memory table. */
  private async setUpDevice(): Promise<void> {
    await this.negotiate();
    await this.setOwner();
    if (this.hasProtocolFeature(ProtocolFeature.CONFIG)) await this.getConfig();
    await this.handOverInflight();
    await this.setFeatures(this.options.features?.exact ?? this.ackedFeatures);
    if (this.hasProtocolFeature(ProtocolFeature.STATUS)) await this.addStatus(DeviceStatus.FEATURES_OK);
    await this.sendMemory();
  }

  /** After the rings: enable them (with PROTOCOL_FEATURES) and set DRIVER_OK (with STATUS). */
  private async enableQueues(): Promise<void> {
    if (this.hasFeature(VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (const queue of this.queues) await this.setVringEnable(queue.index, true);
    }
    if (this.hasProtocolFeature(ProtocolFeature.STATUS)) {
      await this.addStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK);
    }
  }

  /**
   * QEMU's reconnect=1 after the back-end went away (crash, kill -9, restart): a new connection to the same
   * socket, the same guest memory, rings and outstanding requests. Each ring resumes at used.idx (QEMU's
   * rewind when GET_VRING_BASE cannot be answered) and the kept inflight region is handed to the new back-end,
   * which resubmits what the old one left in flight.
   */
  async reconnect(connectTimeoutMs = this.timeoutMs): Promise<void> {
    this.assertOpen();
    this.channel.close();
    this.backendChannel?.close();
    this.backendChannel = null;
    this.channel = await VhostUserChannel.connect(this.socketPath, connectTimeoutMs);
    await this.setUpDevice();
    for (const queue of this.queues) await this.resumeQueue(queue.index, queue.ring.usedIdx);
    await this.enableQueues();
  }

  /** vhost_user_blk_start: GET_INFLIGHT_FD the first time (kept across connections), SET_INFLIGHT_FD every time. */
  async handOverInflight(): Promise<void> {
    const keeper = this.options.protocol?.inflight;
    if (keeper === undefined || !this.hasProtocolFeature(ProtocolFeature.INFLIGHT_SHMFD)) return;
    if (!keeper.held) {
      const queueSize = this.options.queueSize ?? DEFAULT_QUEUE_SIZE;
      const asked = encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: this.resolveQueueCount(), queueSize });
      const reply = await this.callWithFds(FrontendRequest.GET_INFLIGHT_FD, asked);
      const fd = reply.fds[0];
      if (fd === undefined) throw new UnexpectedReplyError('GET_INFLIGHT_FD', 'the reply carries no fd');
      closeAll(reply.fds.slice(1));
      keeper.keep(
        fd,
        this.decodeReply('GET_INFLIGHT_FD', () => decodeInflight(FrontendRequest.GET_INFLIGHT_FD, reply.payload)),
      );
    }
    await this.set(FrontendRequest.SET_INFLIGHT_FD, encodeInflight(keeper.description!), [keeper.fd]);
  }

  /** A ring's start on a reconnect: its driver state (indices, chains in flight) is kept, only the back-end is told. */
  async resumeQueue(index: number, base: number): Promise<void> {
    await this.sendRing(index, base);
  }

  /** GET_FEATURES, then GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM and GET_MAX_MEM_SLOTS as negotiated. */
  async negotiate(): Promise<void> {
    const featureOptions = this.options.features ?? {};
    const protocolOptions = this.options.protocol ?? {};
    this.offeredFeatures = await this.getFeatures();
    this.ackedFeatures = this.offeredFeatures & wantedFeatures(featureOptions, protocolOptions);
    if ((featureOptions.version1 ?? true) && !hasFeature(this.ackedFeatures, VirtioFeature.VERSION_1)) {
      throw new NegotiationError('back-end does not offer VIRTIO_F_VERSION_1; pass features.version1=false to drive it as legacy');
    }
    if (this.hasFeature(VHOST_USER_F_PROTOCOL_FEATURES)) {
      this.offeredProtocolFeatures = await this.getProtocolFeatures();
      const wanted = wantedProtocolFeatures(protocolOptions, this.options.memoryMessages);
      const acked = protocolOptions.exact ?? this.offeredProtocolFeatures & wanted;
      await this.setProtocolFeatures(acked);
      if (this.options.memoryMessages === 'add-mem-reg' && !this.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
        throw new NegotiationError('memoryMessages "add-mem-reg" needs CONFIGURE_MEM_SLOTS, which the back-end does not offer');
      }
      if (this.hasProtocolFeature(ProtocolFeature.MQ)) this.maxQueues = await this.getQueueNum();
      if (this.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS)) this.maxMemSlots = await this.getMaxMemSlots();
      // QEMU (vhost_setup_backend_channel) hands over the back-end channel right after this point.
      if (this.hasProtocolFeature(ProtocolFeature.BACKEND_REQ)) await this.setBackendReqFd();
    } else if (this.options.memoryMessages === 'add-mem-reg') {
      throw new NegotiationError('memoryMessages "add-mem-reg" needs protocol features, which are disabled or not offered');
    }
  }

  /** SET_MEM_TABLE with every region, or one ADD_MEM_REG per region. */
  async sendMemory(): Promise<void> {
    if (this.options.memoryMessages === 'add-mem-reg') {
      for (const region of this.memory.regions) await this.addMemReg(region.index);
    } else {
      await this.setMemTable();
    }
  }

  /** Creates the driver side of `count` rings in guest memory (no messages sent). */
  createQueues(count: number): VirtqueueDriver[] {
    this.assertOpen();
    for (let index = this.queues.length; index < count; index++) {
      this.queues.push(
        new VirtqueueDriver(this.memory, {
          index,
          size: this.options.queueSize ?? DEFAULT_QUEUE_SIZE,
          eventIdx: this.hasFeature(VirtioFeature.RING_EVENT_IDX),
          kickPolicy: this.options.kickPolicy,
          useCallFd: this.options.useCallFd,
          requireInterrupts: this.options.requireInterrupts,
          timeoutMs: this.timeoutMs,
          recheckMs: this.options.recheckMs,
          placement: this.options.ringPlacement,
        }),
      );
    }
    return this.queues;
  }

  /** SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR for one ring. */
  async startQueue(index: number, base = 0): Promise<void> {
    const queue = this.queue(index);
    if (base !== queue.indices.availIdx || queue.inflight > 0) queue.reset(base);
    await this.sendRing(index, base);
  }

  /** Tells the back-end about one ring as the driver has it: size, base, addresses and its three eventfds. */
  private async sendRing(index: number, base: number): Promise<void> {
    const queue = this.queue(index);
    await this.setVringNum(index, queue.size);
    await this.setVringBase(index, base);
    await this.setVringAddr(index);
    await this.setVringKick(index, queue.kickFd);
    await this.setVringCall(index, queue.callFd >= 0 ? queue.callFd : null);
    await this.setVringErr(index, queue.errFd);
  }

  /** GET_VRING_BASE: the back-end stops the ring and reports where it stopped. */
  async stopQueue(index: number): Promise<number> {
    return this.getVringBase(index);
  }

  private resolveQueueCount(): number {
    const wanted = this.options.numQueues ?? 1;
    if (wanted === 'max') {
      if (this.maxQueues === null) throw new NegotiationError('numQueues "max" needs the MQ protocol feature (GET_QUEUE_NUM)');
      return this.maxQueues;
    }
    if (this.maxQueues !== null && wanted > this.maxQueues) {
      throw new NegotiationError(`${wanted} queues asked for, the back-end supports ${this.maxQueues} (GET_QUEUE_NUM)`);
    }
    return wanted;
  }

  // ---------------------------------------------------------------- single messages

  async getFeatures(): Promise<bigint> {
    return this.callU64(FrontendRequest.GET_FEATURES);
  }

  async setFeatures(features: bigint, options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_FEATURES, encodeU64(features), [], options);
    this.ackedFeatures = features;
  }

  async getProtocolFeatures(): Promise<bigint> {
    return this.callU64(FrontendRequest.GET_PROTOCOL_FEATURES);
  }

  /** Like QEMU, never asks for an ack: REPLY_ACK only takes effect once this message is processed. */
  async setProtocolFeatures(features: bigint, options: SetOptions = { needReply: false }): Promise<void> {
    await this.set(FrontendRequest.SET_PROTOCOL_FEATURES, encodeU64(features), [], options);
    this.ackedProtocolFeatures = features;
  }

  async getQueueNum(): Promise<number> {
    return Number(await this.callU64(FrontendRequest.GET_QUEUE_NUM));
  }

  async getMaxMemSlots(): Promise<number> {
    return Number(await this.callU64(FrontendRequest.GET_MAX_MEM_SLOTS));
  }

  async setOwner(options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_OWNER, new Uint8Array(0), [], options);
  }

  async resetDevice(options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.RESET_DEVICE, new Uint8Array(0), [], options);
  }

  /** GET_CONFIG; stores and returns the config bytes. */
  async getConfig(offset = 0, size = this.options.configSize ?? DEFAULT_CONFIG_SIZE, flags = 0): Promise<Buffer> {
    const reply = await this.call(FrontendRequest.GET_CONFIG, encodeConfigMessage({ offset, flags, data: new Uint8Array(size) }));
    let message: ReturnType<typeof decodeConfigMessage>;
    try {
      message = decodeConfigMessage(FrontendRequest.GET_CONFIG, reply);
    } catch (error) {
      throw new UnexpectedReplyError('GET_CONFIG', (error as Error).message);
    }
    if (message.size !== size) {
      throw new UnexpectedReplyError(
        'GET_CONFIG',
        `asked for ${size} bytes at ${offset}, got ${message.size} (a size of 0 means the back-end refused)`,
      );
    }
    const data = Buffer.from(message.data);
    if (offset === 0) this.config = data;
    return data;
  }

  async setConfig(offset: number, data: Uint8Array, flags = 0, options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_CONFIG, encodeConfigMessage({ offset, flags, data }), [], options);
  }

  /** SET_MEM_TABLE; by default all guest regions with their memfds. */
  async setMemTable(
    regions: readonly MemoryRegion[] = this.memory.wireRegions(),
    fds: readonly number[] = this.memory.fds,
    options?: SetOptions,
  ): Promise<void> {
    await this.set(FrontendRequest.SET_MEM_TABLE, encodeMemoryTable(regions), fds, options);
  }

  async addMemReg(regionIndex: number, options?: SetOptions): Promise<void> {
    const region = this.memory.regions[regionIndex];
    if (region === undefined) throw new RangeError(`no guest region ${regionIndex}`);
    await this.set(
      FrontendRequest.ADD_MEM_REG,
      encodeSingleRegion(this.memory.wireRegions()[regionIndex] as MemoryRegion),
      [region.fd],
      options,
    );
  }

  async remMemReg(regionIndex: number, options?: SetOptions): Promise<void> {
    const wire = this.memory.wireRegions()[regionIndex];
    if (wire === undefined) throw new RangeError(`no guest region ${regionIndex}`);
    await this.set(FrontendRequest.REM_MEM_REG, encodeSingleRegion(wire), [], options);
  }

  async setVringNum(index: number, num: number, options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_VRING_NUM, encodeVringState({ index, num }), [], options);
  }

  async setVringBase(index: number, num: number, options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_VRING_BASE, encodeVringState({ index, num }), [], options);
  }

  async getVringBase(index: number): Promise<number> {
    const reply = await this.call(FrontendRequest.GET_VRING_BASE, encodeVringState({ index, num: 0 }));
    const state = this.decodeReply('GET_VRING_BASE', () => decodeVringState(FrontendRequest.GET_VRING_BASE, reply));
    if (state.index !== index) throw new UnexpectedReplyError('GET_VRING_BASE', `asked for ring ${index}, reply names ring ${state.index}`);
    return state.num;
  }

  /** SET_VRING_ADDR with the ring's areas as USER addresses (QEMU virtual addresses), not guest-physical ones. */
  async setVringAddr(
    index: number,
    addresses?: { desc: bigint; avail: bigint; used: bigint; flags?: number; log?: bigint },
    options?: SetOptions,
  ): Promise<void> {
    const queue = addresses === undefined ? this.queue(index) : null;
    const payload = encodeVringAddress({
      index,
      flags: addresses?.flags ?? 0,
      descUserAddr: addresses?.desc ?? this.memory.toUserAddr((queue as VirtqueueDriver).descGpa),
      availUserAddr: addresses?.avail ?? this.memory.toUserAddr((queue as VirtqueueDriver).availGpa),
      usedUserAddr: addresses?.used ?? this.memory.toUserAddr((queue as VirtqueueDriver).usedGpa),
      logGuestAddr: addresses?.log ?? 0n,
    });
    await this.set(FrontendRequest.SET_VRING_ADDR, payload, [], options);
  }

  /** fd null sends VRING_NOFD (the back-end must poll / may not notify). */
  async setVringKick(index: number, fd: number | null, options?: SetOptions): Promise<void> {
    await this.setVringFd(FrontendRequest.SET_VRING_KICK, index, fd, options);
  }

  async setVringCall(index: number, fd: number | null, options?: SetOptions): Promise<void> {
    await this.setVringFd(FrontendRequest.SET_VRING_CALL, index, fd, options);
  }

  async setVringErr(index: number, fd: number | null, options?: SetOptions): Promise<void> {
    await this.setVringFd(FrontendRequest.SET_VRING_ERR, index, fd, options);
  }

  async setVringEnable(index: number, enable: boolean, options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_VRING_ENABLE, encodeVringState({ index, num: enable ? 1 : 0 }), [], options);
  }

  /**
   * SET_BACKEND_REQ_FD: creates a socket pair, sends one end, keeps the other as `backendChannel` (replacing
   * an earlier one). The back-end sends its requests (CONFIG_CHANGE_MSG, ...) there.
   */
  async setBackendReqFd(options?: SetOptions): Promise<VhostUserChannel> {
    this.assertOpen();
    const [ours, theirs] = createSocketPair();
    const channel = new VhostUserChannel(ours);
    try {
      await this.set(FrontendRequest.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs], options);
    } catch (error) {
      channel.close();
      throw error;
    } finally {
      closeFd(theirs);
    }
    this.backendChannel?.close();
    this.backendChannel = channel;
    return channel;
  }

  /** Waits for the next request on the back-end channel; answers it with an ack of 0 if it asks for a reply. */
  async receiveBackendRequest(timeoutMs = this.timeoutMs): Promise<VhostUserMessage> {
    this.assertOpen();
    const channel = this.backendChannel;
    if (channel === null) throw new FrontendError('no back-end channel: negotiate protocol.backendReq or call setBackendReqFd() first');
    const message = await channel.receive(timeoutMs, 'a request on the back-end channel');
    if ((message.flags & HeaderFlag.NEED_REPLY) !== 0) {
      await channel.send(message.request, HeaderFlag.VERSION | HeaderFlag.REPLY, encodeU64(0n), [], timeoutMs);
    }
    return message;
  }

  async setStatus(status: number, options?: SetOptions): Promise<void> {
    await this.set(FrontendRequest.SET_STATUS, encodeU64(status), [], options);
  }

  async getStatus(): Promise<number> {
    return Number(await this.callU64(FrontendRequest.GET_STATUS));
  }

  /** QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS with the new bits if any are missing. */
  async addStatus(bits: number): Promise<void> {
    const current = await this.getStatus();
    if ((current & bits) !== bits) await this.setStatus(current | bits);
  }

  // ---------------------------------------------------------------- request / reply plumbing

  /** Sends a message exactly as given (no NEED_REPLY unless in flags) and does not wait for anything. */
  async sendMessage(request: number, options: RawSendOptions = {}): Promise<void> {
    this.assertOpen();
    await this.channel.send(
      request,
      options.flags ?? HeaderFlag.VERSION,
      options.payload ?? new Uint8Array(0),
      options.fds ?? [],
      this.timeoutMs,
    );
  }

  /** Sends arbitrary bytes on the socket (e.g. a lying size field or half a header). */
  async sendBytes(bytes: Uint8Array, fds: readonly number[] = []): Promise<void> {
    this.assertOpen();
    await this.channel.sendBytes(bytes, fds, this.timeoutMs);
  }

  /** Waits for the next message from the back-end, whatever it is. The caller owns any fds it carries. */
  async receiveMessage(timeoutMs = this.timeoutMs, what = 'a message from the back-end'): Promise<VhostUserMessage> {
    this.assertOpen();
    return this.channel.receive(timeoutMs, what);
  }

  /** A request that has its own reply: send, wait, check code and flags; returns the payload. */
  async call(request: number, payload: Uint8Array = new Uint8Array(0), fds: readonly number[] = []): Promise<Buffer> {
    const reply = await this.callWithFds(request, payload, fds);
    closeAll(reply.fds);
    return reply.payload;
  }

  /** Like call(), but hands over the fds of the reply (GET_INFLIGHT_FD). */
  async callWithFds(request: number, payload: Uint8Array = new Uint8Array(0), fds: readonly number[] = []): Promise<VhostUserMessage> {
    await this.sendMessage(request, { payload, fds });
    return this.receiveReply(request);
  }

  /** A request without a reply of its own: NEED_REPLY is set (and the u64 ack checked) when REPLY_ACK is on. */
  async set(request: number, payload: Uint8Array, fds: readonly number[] = [], options: SetOptions = {}): Promise<void> {
    const needReply = options.needReply ?? this.replyAck;
    await this.sendMessage(request, { flags: HeaderFlag.VERSION | (needReply ? HeaderFlag.NEED_REPLY : 0), payload, fds });
    if (!needReply) return;
    const reply = await this.receiveReply(request);
    closeAll(reply.fds);
    const value = this.decodeReply(requestName(request), () => decodeU64(request, reply.payload));
    if (value !== 0n) throw new BackendNackError(requestName(request), value);
  }

  private async receiveReply(request: number): Promise<VhostUserMessage> {
    const name = requestName(request);
    const reply = await this.channel.receive(this.timeoutMs, `the reply to ${name}`);
    const problem =
      reply.request !== request
        ? `reply is for ${requestName(reply.request)}`
        : (reply.flags & HeaderFlag.VERSION_MASK) !== HeaderFlag.VERSION
          ? `header version ${reply.flags & HeaderFlag.VERSION_MASK}, expected ${HeaderFlag.VERSION}`
          : (reply.flags & HeaderFlag.REPLY) === 0
            ? `REPLY flag missing (flags 0x${reply.flags.toString(16)})`
            : null;
    if (problem !== null) {
      closeAll(reply.fds);
      throw new UnexpectedReplyError(name, problem);
    }
    return reply;
  }

  private async callU64(request: number): Promise<bigint> {
    const payload = await this.call(request);
    return this.decodeReply(requestName(request), () => decodeU64(request, payload));
  }

  private decodeReply<T>(name: string, decode: () => T): T {
    try {
      return decode();
    } catch (error) {
      throw new UnexpectedReplyError(name, (error as Error).message);
    }
  }

  private async setVringFd(request: number, index: number, fd: number | null, options?: SetOptions): Promise<void> {
    await this.set(request, encodeVringFdRequest({ index, noFd: fd === null }), fd === null ? [] : [fd], options);
  }

  // ---------------------------------------------------------------- teardown

  /** Drops the connection only (the back-end sees a hang-up); rings and memory stay for inspection. */
  disconnect(): void {
    this.channel.close();
  }

  /** Closes the socket, every eventfd, and unmaps guest memory (if the front-end created it). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.channel.close();
    this.backendChannel?.close();
    for (const queue of this.queues) queue.close();
    if (this.ownsMemory) this.memory.close();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private assertOpen(): void {
    if (this.closed) throw new FrontendClosedError('front-end');
  }
}
