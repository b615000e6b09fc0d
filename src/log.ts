/** Structured JSON logs (pino) on stdout, one line per event, with `disk`/`queue` fields as children. */
import { pino, type Logger } from 'pino';

export type { Logger };

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function createLogger(level: LogLevel = 'info'): Logger {
  return pino({ level, base: { service: 'vublk' }, timestamp: pino.stdTimeFunctions.isoTime });
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
