/**
 * The one error shape of vublk. Defined here, in the pure bottom layer, so that every layer (protocol
 * included) derives from the same base; `src/errors.ts` re-exports it for the rest of the daemon.
 *
 * - `code` is stable (`VUBLK_ERR_*`, in undici's `UND_ERR_*` style): match on it, never on the message.
 * - `peerFault`: the other side is to blame (front-end bytes, CLI input, a config file, an admin request);
 *   it is refused and logged as a warning, and the daemon keeps going.
 * - `fatal`: the thing being served (a vhost-user connection, a start) cannot continue; close it
 *   rather than reply.
 */

export interface VublkErrorOptions {
  peerFault?: boolean;
  fatal?: boolean;
  cause?: unknown;
}

export class VublkError extends Error {
  readonly peerFault: boolean;
  readonly fatal: boolean;

  constructor(
    readonly code: string,
    message: string,
    options: VublkErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.peerFault = options.peerFault ?? false;
    this.fatal = options.fatal ?? false;
  }
}

export function isVublkError(error: unknown): error is VublkError {
  return error instanceof VublkError;
}
