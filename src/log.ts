/**
 * Structured JSON logs (pino) on stdout, one line per event, with `disk`/`queue` fields as children.
 * On a terminal (format `auto`) the same events are printed human-readable instead (log-pretty.ts).
 */
import { pino, type Logger } from 'pino';
import { prettyDestination } from './log-pretty.js';
import { VublkError } from './errors.js';
import { SyscallError } from './sys/errors.js';

export type { Logger };

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const LOG_FORMATS = ['auto', 'json', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/**
 * `auto`: pretty when stdout is a terminal, JSON otherwise.
 *
 * JSON lines are written synchronously. pino's default stream writes asynchronously on a libuv thread, and
 * a daemon that ends with _exit (a second signal, a worker that would not stop) killed that write with the
 * process: its flushSync writes what is queued, not the line already handed to that thread, so the last
 * line ("second signal: exiting immediately") was lost now and then. vublk logs per event, never per
 * request, so this costs one write(2) per line.
 */
export function createLogger(level: LogLevel = 'info', format: LogFormat = 'json'): Logger {
  const options = { level, base: { service: 'vublk' }, timestamp: pino.stdTimeFunctions.isoTime };
  return isPrettyLog(format) ? pino(options, prettyDestination()) : pino(options, pino.destination({ dest: 1, sync: true }));
}

/** Whether `format` prints human-readable lines (`auto` on a terminal) rather than JSON. */
export function isPrettyLog(format: LogFormat): boolean {
  return format === 'pretty' || (format === 'auto' && process.stdout.isTTY === true);
}

/**
 * Turns a thrown value into log fields: message, type, the stable `code` and classification of a
 * VublkError, the call and errno name of a SyscallError, and the code of a Node.js system error.
 */
export function errorFields(error: unknown): Record<string, unknown> {
  if (!(error instanceof Error)) return { err: String(error) };
  const fields: Record<string, unknown> = { err: error.message, errType: error.name };
  if (error instanceof VublkError) {
    fields['code'] = error.code;
    if (error.peerFault) fields['peerFault'] = true;
    if (error.fatal) fields['fatal'] = true;
    if (error instanceof SyscallError) {
      fields['call'] = error.call;
      fields['errno'] = error.errnoName;
    }
    return fields;
  }
  // Node.js system errors (fs, net) carry their errno name as `code`.
  const system = error as NodeJS.ErrnoException;
  if (typeof system.code === 'string') fields['errno'] = system.code;
  if (typeof system.syscall === 'string') fields['call'] = system.syscall;
  return fields;
}
