/**
 * Bounded, non-blocking waits on an fd: a libuv poll handle (koffi.node.poll) wakes us when the fd is ready,
 * and a periodic re-check catches conditions that change without the fd firing (a used ring that advanced
 * without an interrupt). The event loop keeps running meanwhile, so a back-end living in the same process
 * still makes progress — a blocking poll() would deadlock it.
 */
import { pollFd, type PollHandle } from '../../../src/sys/fd-poll.js';
import { FrontendClosedError, FrontendError, FrontendTimeoutError } from './errors.js';

export interface WaitOptions {
  timeoutMs: number;
  /** Re-run the probe at least this often even if the fd stays quiet. Default 10 ms. */
  recheckMs?: number;
  /** Wait for writability instead of readability. */
  writable?: boolean;
  /** Named in the FrontendTimeoutError. */
  what: string;
  /** Extra text for the timeout error, computed when it happens. */
  detail?: () => string;
}

/** Returned by a probe that has not succeeded yet. */
export const NOT_YET: unique symbol = Symbol('not yet');

export class FdWatcher {
  private handle: PollHandle | null = null;
  private closed = false;
  private busy = false;

  /** `fd` may be -1: then only the periodic re-check drives the probe (e.g. a ring without a call eventfd). */
  constructor(readonly fd: number) {}

  /**
   * Runs `probe` now, whenever the fd becomes ready and every recheckMs, until it returns something other
   * than NOT_YET (resolved) or throws (rejected). Rejects with FrontendTimeoutError after timeoutMs.
   */
  async until<T>(probe: () => T | typeof NOT_YET, options: WaitOptions): Promise<T> {
    if (this.closed) throw new FrontendClosedError(`wait for ${options.what}`);
    if (this.busy) {
      throw new FrontendError(
        `fd ${this.fd} already has a wait in progress (for ${options.what}); await the first wait before starting another`,
      );
    }
    const first = probe();
    if (first !== NOT_YET) return first;
    this.busy = true;
    try {
      return await new Promise<T>((resolve, reject) => {
        let finished = false;
        const finish = (action: () => void): void => {
          if (finished) return;
          finished = true;
          clearInterval(ticker);
          clearTimeout(deadline);
          this.handle?.stop();
          action();
        };
        const run = (): void => {
          if (finished) return;
          try {
            const result = probe();
            if (result !== NOT_YET) finish(() => resolve(result));
          } catch (error) {
            finish(() => reject(error));
          }
        };
        const ticker = setInterval(run, options.recheckMs ?? 10);
        const deadline = setTimeout(() => {
          run();
          finish(() => reject(new FrontendTimeoutError(options.what, options.timeoutMs, options.detail?.())));
        }, options.timeoutMs);
        if (this.fd >= 0) {
          const events = { readable: !options.writable, writable: options.writable === true, disconnect: true };
          if (this.handle === null) this.handle = pollFd(this.fd, events, run);
          else this.handle.start(events, run);
        }
      });
    } finally {
      this.busy = false;
    }
  }

  /** Must run before the fd itself is closed: libuv must stop watching it first. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handle?.close();
    this.handle = null;
  }
}
