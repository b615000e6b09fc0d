/**
 * Human-readable log lines for a terminal, from pino's JSON lines (a pino destination stream; no worker
 * thread, no extra dependency):
 *
 *   14:02:11.532 INFO  disk0/q1 ring started size=256 base=0 eventIdx=true
 *
 * Time (local), level, the `disk`/`queue` the line is about, the message, then the other fields as
 * key=value (strings with spaces and objects JSON-encoded). Colours only when `color` is set.
 */
import type { DestinationStream } from 'pino';

const LEVELS: Record<number, { label: string; color: string }> = {
  10: { label: 'TRACE', color: '\x1b[90m' },
  20: { label: 'DEBUG', color: '\x1b[36m' },
  30: { label: 'INFO', color: '\x1b[32m' },
  40: { label: 'WARN', color: '\x1b[33m' },
  50: { label: 'ERROR', color: '\x1b[31m' },
  60: { label: 'FATAL', color: '\x1b[35m' },
};
const RESET = '\x1b[0m';
const DIM = '\x1b[2m';
const BOLD = '\x1b[1m';
/** Fields shown in fixed places (or not at all). */
const PLACED = new Set(['time', 'level', 'msg', 'disk', 'queue', 'service', 'pid', 'hostname']);

function clock(time: unknown): string {
  const date = typeof time === 'string' || typeof time === 'number' ? new Date(time) : new Date();
  if (Number.isNaN(date.getTime())) return String(time);
  const pad = (n: number, width = 2): string => String(n).padStart(width, '0');
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function fieldValue(value: unknown): string {
  if (typeof value === 'string') return /^[^\s"=]+$/.test(value) ? value : JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean' || value === null) return String(value);
  return JSON.stringify(value);
}

/** Formats one pino JSON line; a line that is not JSON is returned unchanged. */
export function formatPrettyLine(line: string, color: boolean): string {
  let record: Record<string, unknown>;
  try {
    const parsed = JSON.parse(line) as unknown;
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return line.endsWith('\n') ? line : `${line}\n`;
    record = parsed as Record<string, unknown>;
  } catch {
    return line.endsWith('\n') ? line : `${line}\n`;
  }
  const level = LEVELS[Number(record['level'])] ?? { label: String(record['level'] ?? '?').toUpperCase(), color: '' };
  const paint = (code: string, text: string): string => (color && code !== '' ? `${code}${text}${RESET}` : text);
  const parts = [paint(DIM, clock(record['time'])), paint(level.color, level.label.padEnd(5))];
  const disk = record['disk'];
  const queue = record['queue'];
  if (disk !== undefined || queue !== undefined) {
    const subject = [disk !== undefined ? String(disk) : '', queue !== undefined ? `q${String(queue)}` : '']
      .filter((s) => s !== '')
      .join('/');
    parts.push(paint(BOLD, subject));
  }
  parts.push(String(record['msg'] ?? ''));
  for (const [key, value] of Object.entries(record)) {
    if (PLACED.has(key)) continue;
    parts.push(`${paint(DIM, `${key}=`)}${fieldValue(value)}`);
  }
  return `${parts.join(' ')}\n`;
}

/** A pino destination writing pretty lines to `out` (stdout by default). */
export function prettyDestination(
  out: NodeJS.WritableStream = process.stdout,
  color = (out as { isTTY?: boolean }).isTTY === true && !process.env['NO_COLOR'],
): DestinationStream {
  return {
    write(line: string): void {
      out.write(formatPrettyLine(line, color));
    },
  };
}
