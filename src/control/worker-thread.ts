/**
 * The control plane's handle on one pool worker thread: spawns it, sends commands (MessagePort + control
 * eventfd wake-up) and resolves each command's promise when the worker acknowledges it. Commands of
 * different sessions are independent: each waits only for its own acknowledgement.
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
    super('VUBLK_ERR_WORKER_COMMAND', `${label} failed '${op}': ${detail}`);
  }
}

type Distribute<T> = T extends unknown ? Omit<T, 'seq'> : never;
export type CommandBody = Distribute<WorkerCommand>;

export class WorkerThread {
  private readonly worker: Worker;
  private readonly controlFd: number;
  private seq = 0;
  private readonly pending = new Map<number, { resolve(ack: WorkerAck): void; reject(error: Error): void; op: string }>();
  private exitedFlag = false;
  private readonly exitedPromise: Promise<void>;
  /** "pool worker 0": names the worker in errors. */
  readonly label: string;

  constructor(
    index: number,
    private readonly onEvent: (event: WorkerEvent) => void,
    onExit: (code: number) => void,
  ) {
    this.controlFd = createEventFd();
    this.label = `pool worker ${index}`;
    this.worker = new Worker(WORKER_URL, {
      workerData: { worker: index, controlFd: this.controlFd } satisfies WorkerInit,
      name: `vublk-worker-${index}`,
    });
    this.worker.on('message', (message: WorkerMessage) => this.onMessage(message));
    this.worker.on('error', (error) => this.failAll(error));
    this.exitedPromise = new Promise((resolve) => {
      this.worker.on('exit', (code) => {
        this.exitedFlag = true;
        this.failAll(new Error(`worker exited with code ${code}`));
        closeFd(this.controlFd);
        resolve();
        onExit(code);
      });
    });
    // An idle worker must not keep the daemon alive on its own: shutdown is explicit (and refs it again).
    this.worker.unref();
  }

  get exited(): boolean {
    return this.exitedFlag;
  }

  /** Sends a command and waits for its acknowledgement; rejects on a worker error or a wedged worker. */
  send(body: CommandBody): Promise<WorkerAck> {
    if (this.exitedFlag) return Promise.reject(new WorkerCommandError(this.label, body.op, 'worker has exited'));
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

  /**
   * Tells the worker to stop its rings and leave its loop, and waits (the event loop kept alive) until the
   * thread is gone. Returns false when it is still running after `timeoutMs`: a thread blocked in a system
   * call cannot be terminated, and the process must then not wait for it at exit.
   */
  async exit(timeoutMs: number): Promise<boolean> {
    if (this.exitedFlag) return true;
    this.worker.ref();
    this.send({ op: 'exit' }).catch(() => undefined);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)));
    await Promise.race([this.exitedPromise, timedOut]);
    clearTimeout(timer);
    return this.exitedFlag;
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
