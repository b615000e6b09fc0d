/**
 * The control plane's side of one disk: the passive device (BlkDisk) plus its rings on the daemon's worker
 * pool. Sessions start and stop rings through it; run-time changes of the device (write cache mode, resize)
 * go through it so the rings switch before the front-end is told.
 */
import type { BlkDisk } from '../device/blk-disk.js';
import type { IoEngineName } from '../dataplane/request-executor.js';
import type { DirtyLogTable, MemoryTable, RingStart, WorkerEvent } from '../dataplane/worker-protocol.js';
import type { Logger } from '../log.js';
import type { RingStopped, WorkerPool } from './worker-pool.js';

export type WorkerEventListener = (event: WorkerEvent) => void;

export class DiskQueues {
  private readonly diskId: number;
  private eventListener: WorkerEventListener = () => undefined;
  private configChangeListener: () => void = () => undefined;
  /** The engine last reported per queue: logged when it changes, not at every ring start. */
  private readonly engines: (IoEngineName | undefined)[];

  constructor(
    readonly disk: BlkDisk,
    private readonly pool: WorkerPool,
    private readonly log: Logger,
  ) {
    this.engines = new Array<IoEngineName | undefined>(disk.options.numQueues).fill(undefined);
    this.diskId = pool.addDisk((event) => this.onWorkerEvent(event), { pinQueues: disk.pinQueues });
  }

  /** A daemon-wide id for a new session's memory table. */
  /**
   * A front-end connected: the pool's threads start now if they have not (an idle daemon with no front-end
   * keeps none), while the handshake runs, so its first ring start does not wait for a thread to boot.
   */
  frontEndConnected(): void {
    this.pool.startAll();
  }

  newMemoryId(): number {
    return this.pool.newMemoryId();
  }

  start(queue: number, ring: RingStart, memory: MemoryTable, log: DirtyLogTable): Promise<void> {
    return this.pool.startRing(this.diskId, queue, { disk: this.disk.ringContext(), settings: this.disk.settings(), memory, log, ring });
  }

  /** Stops the ring; returns where it stopped (undefined when it was not running) and what it left in flight. */
  stop(queue: number): Promise<RingStopped> {
    return this.pool.stopRing(this.diskId, queue);
  }

  setNotifyFd(queue: number, op: 'setCall' | 'setErr', fd: number): Promise<void> {
    return this.pool.setNotifyFd(this.diskId, queue, op, fd);
  }

  /** Returns how many requests over the previous table were left in flight. */
  updateMemory(table: MemoryTable): Promise<number> {
    return this.pool.updateMemory(table);
  }

  updateLog(table: DirtyLogTable): Promise<void> {
    return this.pool.updateLog(table);
  }

  async setWriteback(enabled: boolean): Promise<void> {
    this.disk.setWriteback(enabled);
    await this.pool.updateSettings(this.diskId, this.disk.settings());
  }

  /** Grows the disk; running rings use the new capacity before the front-end hears of it. */
  async resize(sizeBytes: number): Promise<void> {
    await this.disk.growNetworkImage(sizeBytes);
    const previous = this.disk.grow(sizeBytes);
    if (previous === null) return;
    await this.pool.updateSettings(this.diskId, this.disk.settings());
    this.log.info({ previousBytes: previous, capacityBytes: sizeBytes }, 'disk resized');
    this.configChangeListener();
  }

  /** Routes worker events (poison) to the current session. */
  setWorkerEventListener(listener: WorkerEventListener): void {
    this.eventListener = listener;
  }

  /** Called after a config-space change the front-end must be told about (the current session sends it). */
  setConfigChangeListener(listener: () => void): void {
    this.configChangeListener = listener;
  }

  /** Forgets the disk in the pool; its rings must be stopped (its sessions ended) first. */
  close(): void {
    this.pool.removeDisk(this.diskId);
  }

  private onWorkerEvent(event: WorkerEvent): void {
    if (event.kind === 'started' && event.ioEngine !== undefined) {
      if (this.engines[event.queue] !== event.ioEngine) {
        this.engines[event.queue] = event.ioEngine;
        this.log.info({ queue: event.queue, ioEngine: event.ioEngine, reason: event.reason }, 'queue worker io engine');
      }
    } else if (event.kind === 'inflight') {
      this.log.info({ queue: event.queue, reason: event.reason }, 'inflight requests resumed');
    } else if (event.kind === 'backend') {
      this.log.warn({ queue: event.queue, reason: event.reason }, 'network back-end');
    } else if (event.kind === 'error') {
      this.log.error({ queue: event.queue, reason: event.reason }, 'queue worker error');
    }
    this.eventListener(event);
  }
}
