/**
 * Watching an fd from the calling thread's own event loop (libuv poll via koffi.node.poll). koffi's type
 * declarations describe the callback as `(events)`, but it is called as `(status, events)`; this module holds
 * the one correct typing so callers need no casts.
 */
import koffi from 'koffi';

export interface PollEvents {
  readable: boolean;
  writable: boolean;
  disconnect: boolean;
}

export interface PollInterest {
  readable?: boolean;
  writable?: boolean;
  disconnect?: boolean;
}

/** `status` < 0 is a libuv error on the watch itself. */
export type PollCallback = (status: number, events: PollEvents) => void;

export interface PollHandle {
  start(interest: PollInterest, callback: PollCallback): void;
  stop(): void;
  close(): void;
}

export const pollFd = koffi.node.poll as unknown as (fd: number, interest: PollInterest, callback: PollCallback) => PollHandle;
