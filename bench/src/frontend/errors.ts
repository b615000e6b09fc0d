/**
 * Typed errors of the test front-end. Each names what went wrong from the guest's point of view so a
 * failing test says "queue 1: no used entry within 5000 ms" rather than "timeout".
 */
import type { UsedElement } from './used-element.js';

export class FrontendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FrontendError';
  }
}

/** Every wait of the front-end is bounded; this names what was awaited and for how long. */
export class FrontendTimeoutError extends FrontendError {
  constructor(
    readonly waitedFor: string,
    readonly timeoutMs: number,
    readonly detail?: string,
  ) {
    super(`timed out after ${timeoutMs} ms waiting for ${waitedFor}${detail ? `: ${detail}` : ''}`);
    this.name = 'FrontendTimeoutError';
  }
}

/** The back-end did not put enough entries in the used ring: the request was lost or is still running. */
export class MissingCompletionError extends FrontendTimeoutError {
  constructor(
    waitedFor: string,
    timeoutMs: number,
    detail: string,
    /** Entries that did arrive (already reaped; their descriptors are free again). */
    readonly elements: readonly UsedElement[],
  ) {
    super(waitedFor, timeoutMs, detail);
    this.name = 'MissingCompletionError';
  }
}

/** The used ring advanced but the call eventfd was never signalled: a guest would hang on these requests. */
export class MissingInterruptError extends FrontendTimeoutError {
  constructor(
    waitedFor: string,
    timeoutMs: number,
    detail: string,
    /** The completions that came without an interrupt (already reaped). */
    readonly elements: readonly UsedElement[],
  ) {
    super(waitedFor, timeoutMs, detail);
    this.name = 'MissingInterruptError';
  }
}

/** The back-end closed the socket (or it was closed by us) while something was still expected. */
export class BackendDisconnectedError extends FrontendError {
  constructor(readonly during: string) {
    super(`back-end closed the connection during ${during}`);
    this.name = 'BackendDisconnectedError';
  }
}

/** A reply that does not fit the request: wrong code, missing REPLY flag, wrong size. */
export class UnexpectedReplyError extends FrontendError {
  constructor(
    readonly request: string,
    detail: string,
  ) {
    super(`unexpected reply to ${request}: ${detail}`);
    this.name = 'UnexpectedReplyError';
  }
}

/** REPLY_ACK answered with a non-zero u64: the back-end rejected the request. */
export class BackendNackError extends FrontendError {
  constructor(
    readonly request: string,
    readonly value: bigint,
  ) {
    super(`back-end rejected ${request} (REPLY_ACK value ${value}); check the back-end's log for the reason`);
    this.name = 'BackendNackError';
  }
}

/** Feature or queue negotiation cannot satisfy the options the test asked for. */
export class NegotiationError extends FrontendError {
  constructor(detail: string) {
    super(`negotiation failed: ${detail}`);
    this.name = 'NegotiationError';
  }
}

/** A guest-physical range that no region covers, or a misuse of guest memory. */
export class GuestMemoryError extends FrontendError {
  constructor(detail: string) {
    super(`guest memory: ${detail}`);
    this.name = 'GuestMemoryError';
  }
}

export class OutOfGuestMemoryError extends GuestMemoryError {
  constructor(size: number, where: string) {
    super(`no free ${size}-byte range in ${where}; free earlier buffers or give the region more memory`);
    this.name = 'OutOfGuestMemoryError';
  }
}

/** Not enough free descriptors for a chain; reap completions first or use a larger queue. */
export class RingFullError extends FrontendError {
  constructor(queue: number, needed: number, free: number) {
    super(`queue ${queue}: chain needs ${needed} descriptors but only ${free} are free; reap completions or raise queueSize`);
    this.name = 'RingFullError';
  }
}

/** The back-end broke the used ring contract: unknown head id, index running ahead of what was made available. */
export class UsedRingError extends FrontendError {
  constructor(queue: number, detail: string) {
    super(`queue ${queue}: back-end wrote an invalid used ring: ${detail}`);
    this.name = 'UsedRingError';
  }
}

/** A virtio-blk request completed with a status other than OK. */
export class BlkStatusError extends FrontendError {
  constructor(
    readonly operation: string,
    readonly status: number,
  ) {
    super(`virtio-blk ${operation} completed with status ${status} (${blkStatusName(status)})`);
    this.name = 'BlkStatusError';
  }
}

function blkStatusName(status: number): string {
  return ['OK', 'IOERR', 'UNSUPP'][status] ?? 'unknown';
}

/** Using the front-end after close(). */
export class FrontendClosedError extends FrontendError {
  constructor(what: string) {
    super(`${what} used after close()`);
    this.name = 'FrontendClosedError';
  }
}
