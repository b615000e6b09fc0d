/**
 * The control plane's handle on one queue worker: spawns it, sends commands (MessagePort + control eventfd
 * wake-up) and resolves each command's promise when the worker acknowledges it.
 */
import { Worker } from 'node:worker_threads';
import { createEventFd, signalEventFd } from '../sys/eventfd.js';
import { closeFd } from '../sys/fd.js';
import type { WorkerCommand, WorkerEvent, WorkerInit, WorkerMessage, WorkerAck } from '../dataplane/worker-protocol.js';
import { VublkError } from '../errors.js';

const WORKER_URL = new URL('../dataplane/queue-worker.js', import.meta.url);
/** A worker that does not acknowledge within this time is considered wedged. */
const ACK_TIMEOUT_MS = 10_000;

export class WorkerCommandError extends VublkError {
  constructor(label: string, op: string, detail: string) {
    super('VUBLK_ERR_WORKER_COMMAND', `${label} worker failed '${op}': ${detail}`);
  }
}

type Distribute<T> = T extends unknown ? Omit<T, 'seq'> : never;
export type CommandBody = Distribute<WorkerCommand>;

export class QueueWorkerHandle {
  private readonly worker: Worker;
  private readonly controlFd: number;
  private seq = 0;
  private readonly pending = new Map<number, { resolve(ack: WorkerAck): void; reject(error: Error): void; op: string }>();
  private exited = false;

  constructor(
    init: Omit<WorkerInit, 'controlFd'>,
    private readonly onEvent: (event: WorkerEvent) => void,
    private readonly onExit: (queues: readonly number[], code: number) => void,
  ) {
    this.controlFd = createEventFd();
    this.label = `queue${init.queues.length > 1 ? 's' : ''} ${init.queues.join(',')}`;
    this.worker = new Worker(WORKER_URL, {
      workerData: { ...init, controlFd: this.controlFd } satisfies WorkerInit,
      name: `vublk-${init.disk}-q${init.queues.join('-')}`,
    });
    this.worker.on('message', (message: WorkerMessage) => this.onMessage(message));
    this.worker.on('error', (error) => this.failAll(error));
    this.worker.on('exit', (code) => {
      this.exited = true;
      this.failAll(new Error(`worker exited with code ${code}`));
      closeFd(this.controlFd);
      this.onExit(init.queues, code);
    });
    // Workers must not keep the daemon alive on their own: shutdown is explicit.
    this.worker.unref();
  }

  /** "queue 0" or "queues 0,2": names the worker in errors. */
  private readonly label: string;

  /** Sends a command and waits for its acknowledgement; rejects on a worker error or a wedged worker. */
  send(body: CommandBody): Promise<WorkerAck> {
    if (this.exited) return Promise.reject(new WorkerCommandError(this.label, body.op, 'worker has exited'));
    const seq = ++this.seq;
    return new Promise<WorkerAck>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        reject(new WorkerCommandError(this.label, body.op, `no acknowledgement within ${ACK_TIMEOUT_MS} ms`));
      }, ACK_TIMEOUT_MS);
      this.pending.set(seq, {
        op: body.op,
        resolve: (ack) => {
          clearTimeout(timer);
          if (ack.error) reject(new WorkerCommandError(this.label, body.op, ack.error));
          else resolve(ack);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      this.worker.postMessage({ ...body, seq } as WorkerCommand);
      signalEventFd(this.controlFd);
    });
  }

  async exit(): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
    await this.send({ op: 'exit' }).catch(() => undefined);
    await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
    if (!this.exited) await this.worker.terminate();
  }

  private onMessage(message: WorkerMessage): void {
    if (message.type === 'ack') {
      const waiter = this.pending.get(message.seq);
      if (waiter === undefined) return;
      this.pending.delete(message.seq);
      waiter.resolve(message);
    } else {
      this.onEvent(message);
    }
  }

  private failAll(error: Error): void {
    for (const [seq, waiter] of this.pending) {
      this.pending.delete(seq);
      waiter.reject(new WorkerCommandError(this.label, waiter.op, error.message));
    }
  }
}
