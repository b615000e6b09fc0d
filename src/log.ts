/**
 * Structured JSON logs (pino) on stdout, one line per event, with `disk`/`queue` fields as children.
 * On a terminal (format `auto`) the same events are printed human-readable instead (log-pretty.ts).
 */
import { pino, type Logger } from 'pino';
import { prettyDestination } from './log-pretty.js';

export type { Logger };

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const LOG_FORMATS = ['auto', 'json', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** `auto`: pretty when stdout is a terminal, JSON otherwise. */
export function createLogger(level: LogLevel = 'info', format: LogFormat = 'json'): Logger {
  const options = { level, base: { service: 'vublk' }, timestamp: pino.stdTimeFunctions.isoTime };
  const pretty = format === 'pretty' || (format === 'auto' && process.stdout.isTTY === true);
  return pretty ? pino(options, prettyDestination()) : pino(options);
}

/** Turns a thrown value into log fields; SyscallErrors keep their call and errno name. */
export function errorFields(error: unknown): Record<string, unknown> {
  if (error instanceof Error) {
    const fields: Record<string, unknown> = { err: error.message, errType: error.name };
    const maybe = error as Error & { call?: unknown; code?: unknown };
    if (typeof maybe.call === 'string') fields['call'] = maybe.call;
    if (typeof maybe.code === 'string') fields['errno'] = maybe.code;
    return fields;
  }
  return { err: String(error) };
}
