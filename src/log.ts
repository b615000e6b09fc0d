/**
 * Structured JSON logs (pino) on stdout, one line per event, with `disk`/`queue` fields as children.
 * On a terminal (format `auto`) the same events are printed human-readable instead (log-pretty.ts).
 */
import { writeSync } from 'node:fs';
import { pino, type Logger } from 'pino';
import { prettyDestination } from './log-pretty.js';
import { VublkError } from './errors.js';
import { SyscallError } from './sys/errors.js';

export type { Logger };

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const LOG_FORMATS = ['auto', 'json', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** `auto`: pretty when stdout is a terminal, JSON otherwise. */
export function createLogger(level: LogLevel = 'info', format: LogFormat = 'json'): Logger {
  const options = { level, base: { service: 'vublk' }, timestamp: pino.stdTimeFunctions.isoTime };
  return isPrettyLog(format) ? pino(options, prettyDestination()) : pino(options);
}

/** What flushLogSync needs of pino's default stream (sonic-boom); every field is checked before use. */
interface AsyncLogStream {
  fd?: unknown;
  flushSync?: () => void;
  /** sonic-boom: a write of `_writingBuf` is on a libuv thread now. */
  _writing?: unknown;
  _writingBuf?: unknown;
}

/**
 * Writes every log line not yet on stdout, synchronously: for a process about to end with _exit. Lines are
 * written asynchronously (a slow log reader must never stall the daemon), and sonic-boom's own flushSync
 * writes what is queued but not the line already handed to a libuv thread, which _exit then kills: the last
 * line before a second-signal exit was lost now and then. That line is written here too; if the thread's write
 * also lands first, the line appears twice, which is better than not at all.
 */
export function flushLogSync(log: Logger): void {
  const stream = (log as unknown as Record<symbol, AsyncLogStream | undefined>)[pino.symbols.streamSym];
  if (stream === undefined) return;
  try {
    const inFlight = stream._writingBuf;
    if (stream._writing === true && typeof stream.fd === 'number' && (typeof inFlight === 'string' || Buffer.isBuffer(inFlight))) {
      const bytes = typeof inFlight === 'string' ? Buffer.from(inFlight) : inFlight;
      // Bounded: each pass writes at least one byte or throws (caught below).
      for (let done = 0; done < bytes.length; ) done += Math.max(1, writeSync(stream.fd, bytes, done));
    }
    stream.flushSync?.();
  } catch {
    // Nothing more can be done about a log that cannot be written.
  }
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
