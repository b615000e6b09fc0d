/**
 * Entry point of a queue worker thread. It sleeps in epoll_wait on its control eventfd and, for every queue
 * it serves, that ring's kick eventfd and retry timer, and runs the drain bracket of whichever ring woke it.
 * Blocking here is the point: this thread has nothing else to do, and the control plane's event loop never
 * waits for it.
 */
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { drainEventFd } from '../sys/eventfd.js';
import { EpollSet } from './epoll.js';
import { waitPolling } from './adaptive-poll.js';
import { GuestMemory } from './guest-memory.js';
import { RingServer } from './ring-server.js';
import type { WorkerCommand, WorkerInit, WorkerMessage } from './worker-protocol.js';

class QueueWorker {
  private readonly epoll = new EpollSet(16);
  private readonly rings = new Map<number, RingServer>();
  private memory = new GuestMemory([]);
  private running = true;
  private readonly ready = new Int32Array(16);

  constructor(
    private readonly init: WorkerInit,
    private readonly port: MessagePort,
  ) {
    const settings = { capacityBytes: init.capacityBytes, writeback: init.writeback };
    for (const queue of init.queues) {
      this.rings.set(queue, new RingServer(queue, init, this.epoll, (message) => this.post(message), settings));
    }
    this.epoll.add(init.controlFd);
  }

  run(): void {
    try {
      this.serve();
    } finally {
      for (const ring of this.rings.values()) ring.close();
      this.epoll.close();
    }
  }

  private serve(): void {
    while (this.running) {
      const n = waitPolling(this.epoll, this.ready, this.init.pollUs ?? 0, this.rings.values());
      for (let i = 0; i < n; i++) {
        const fd = this.ready[i] ?? -1;
        if (fd === this.init.controlFd) {
          drainEventFd(fd);
          this.handleCommands();
          continue;
        }
        for (const ring of this.rings.values()) if (ring.dispatch(fd)) break;
      }
    }
  }

  private handleCommands(): void {
    for (;;) {
      const received = receiveMessageOnPort(this.port);
      if (received === undefined) return;
      const command = received.message as WorkerCommand;
      let error: string | undefined;
      let lastAvailIdx: number | undefined;
      try {
        lastAvailIdx = this.apply(command);
      } catch (cause) {
        error = cause instanceof Error ? cause.message : String(cause);
      }
      this.post({ type: 'ack', seq: command.seq, ...(lastAvailIdx === undefined ? {} : { lastAvailIdx }), ...(error ? { error } : {}) });
    }
  }

  private ringFor(queue: number): RingServer {
    const ring = this.rings.get(queue);
    if (ring === undefined) throw new Error(`queue ${queue} is not served by this worker (it serves ${[...this.rings.keys()].join(', ')})`);
    return ring;
  }

  private apply(command: WorkerCommand): number | undefined {
    switch (command.op) {
      case 'memory':
        this.memory = new GuestMemory(command.regions);
        for (const ring of this.rings.values()) ring.memoryChanged(this.memory);
        return undefined;
      case 'start': {
        const ring = this.ringFor(command.queue);
        ring.stop();
        ring.start(command.ring, command.ring.lastAvailIdx, this.memory);
        return undefined;
      }
      case 'stop':
        return this.ringFor(command.queue).stop();
      case 'setCall':
        this.ringFor(command.queue).setCall(command.fd);
        return undefined;
      case 'setErr':
        this.ringFor(command.queue).setErr(command.fd);
        return undefined;
      case 'settings':
        for (const ring of this.rings.values()) ring.applySettings(command.capacityBytes, command.writeback);
        return undefined;
      case 'exit':
        for (const ring of this.rings.values()) ring.stop();
        this.running = false;
        return undefined;
    }
  }

  private post(message: WorkerMessage): void {
    this.port.postMessage(message);
  }
}

const init = workerData as WorkerInit;
if (parentPort === null) throw new Error('queue-worker must run as a worker thread');
new QueueWorker(init, parentPort).run();
// Leaving the blocking loop lets the thread's event loop end, which terminates the worker.
parentPort.close();
