/**
 * The admin API, served on the metrics listener under /admin (only when that listener is on a loopback
 * address or a unix socket, or with --admin-public). JSON in, JSON out; every change is a POST.
 *
 *   GET  /admin/disks                   → { "disks": [ { name, capacity-bytes, num-queues, ..., throttle } ] }
 *   POST /admin/disks/NAME/throttle     body { "iops": 500, "bps": "100M", ... } → { disk, throttle }
 *   POST /admin/disks/NAME/resize       body { "size": "20G" } → grows the disk; the guest is told over the back-end channel
 *
 * Throttle values are numbers or strings with units, like the config file ("10k" IOPS, "100M" bytes/s);
 * 0 = unlimited. Keys left out keep their current value, except that a rate given without its burst gets
 * the default burst (one second of the new rate). The routing and validation here are pure; what they act
 * on is an AdminTarget (the daemon).
 */
import { parseCount, parseRate, parseSize } from '../throttle/size.js';
import type { DiskLimits, ResolvedDiskLimits } from '../throttle/disk-throttle.js';
import { VublkError } from '../errors.js';

/** Limits as the admin API and the config file spell them. */
export interface ThrottleJson {
  iops: number;
  'iops-burst': number;
  bps: number;
  'bps-burst': number;
}

/** One disk in `GET /admin/disks`: the options the option table shows (`admin` names), plus live state. */
export interface AdminDiskInfo {
  /** Option values by their admin name (`name`, `image`, `num-queues`, ...; see disk-options.ts). */
  [option: string]: unknown;
  socket: string;
  'capacity-bytes': number;
  connected: boolean;
  connections: number;
  throttle: ThrottleJson;
  /** RBD disks: the daemon holds the image's exclusive lock now. */
  'lock-owner'?: boolean;
}

export interface AdminTarget {
  listDisks(): AdminDiskInfo[];
  /** Applies a partial change (see the module comment); throws AdminError(404) for an unknown disk. */
  setThrottle(disk: string, change: DiskLimits): ResolvedDiskLimits;
  /** Grows a disk live and returns its new capacity; AdminError(404) for an unknown disk, 400 for a bad size. */
  resize(disk: string, sizeBytes: number): Promise<number>;
}

/** An admin request that is refused; `status` is the HTTP status of the answer. */
export class AdminError extends VublkError {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super('VUBLK_ERR_ADMIN', message, { peerFault: status < 500 });
  }
}

export interface AdminRequest {
  method: string;
  /** Path below the listener root, e.g. `/admin/disks/disk0/throttle` (percent-encoded as received). */
  pathname: string;
  /** Parsed JSON body (POST only). */
  body: unknown;
}

export interface AdminResponse {
  status: number;
  body: unknown;
}

export function throttleJson(limits: ResolvedDiskLimits): ThrottleJson {
  return { iops: limits.iops, 'iops-burst': limits.iopsBurst, bps: limits.bps, 'bps-burst': limits.bpsBurst };
}

const THROTTLE_FIELDS = [
  ['iops', 'iops', parseCount],
  ['iops-burst', 'iopsBurst', parseCount],
  ['bps', 'bps', parseRate],
  ['bps-burst', 'bpsBurst', parseSize],
] as const;

/** Validates a throttle body: an object with some of iops, iops-burst, bps, bps-burst. Throws AdminError(400). */
export function parseThrottleChange(body: unknown): DiskLimits {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new AdminError(400, 'the body must be a JSON object such as {"iops": 500, "bps": "100M"}');
  }
  const known = THROTTLE_FIELDS.map(([key]) => key);
  const unknown = Object.keys(body).filter((key) => !(known as readonly string[]).includes(key));
  if (unknown.length > 0) throw new AdminError(400, `unknown key '${unknown[0]}' (known: ${known.join(', ')})`);
  const change: DiskLimits = {};
  const record = body as Record<string, unknown>;
  for (const [key, field, parse] of THROTTLE_FIELDS) {
    if (!(key in record)) continue;
    const value = record[key];
    let text: string;
    if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) text = String(value);
    else if (typeof value === 'string') text = value;
    else throw new AdminError(400, `${key}: must be a non-negative whole number or a string such as "100M", got ${JSON.stringify(value)}`);
    try {
      change[field] = parse(text);
    } catch (error) {
      throw new AdminError(400, `${key}: ${(error as Error).message}`);
    }
  }
  if (Object.keys(change).length === 0) throw new AdminError(400, `give at least one of ${known.join(', ')}`);
  return change;
}

/**
 * The limits after applying `change` to `current` (see the module comment). Throws AdminError(400) when a
 * burst would be left without its rate.
 */
export function mergeThrottle(current: ResolvedDiskLimits, change: DiskLimits): DiskLimits {
  const next: DiskLimits = { ...current };
  if (change.iops !== undefined) next.iopsBurst = change.iopsBurst ?? 0;
  else if (change.iopsBurst !== undefined) next.iopsBurst = change.iopsBurst;
  if (change.iops !== undefined) next.iops = change.iops;
  if (change.bps !== undefined) next.bpsBurst = change.bpsBurst ?? 0;
  else if (change.bpsBurst !== undefined) next.bpsBurst = change.bpsBurst;
  if (change.bps !== undefined) next.bps = change.bps;
  if (next.iops === 0) next.iopsBurst = change.iopsBurst ? raise('iops-burst needs iops (the disk has no IOPS limit)') : 0;
  if (next.bps === 0) next.bpsBurst = change.bpsBurst ? raise('bps-burst needs bps (the disk has no bandwidth limit)') : 0;
  return next;
}

function raise(message: string): never {
  throw new AdminError(400, message);
}

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new AdminError(400, `'${segment}' is not a valid percent-encoded path segment`);
  }
}

function requireMethod(request: AdminRequest, method: 'GET' | 'POST'): void {
  if (request.method !== method && !(method === 'GET' && request.method === 'HEAD')) {
    throw new AdminError(405, `${request.pathname} takes ${method}, not ${request.method}`);
  }
}

/** Routes one admin request. Errors come back as `{ error }` bodies with their status, never as throws. */
export async function handleAdmin(request: AdminRequest, target: AdminTarget): Promise<AdminResponse> {
  try {
    return await route(request, target);
  } catch (error) {
    if (error instanceof AdminError) return { status: error.status, body: { error: error.message } };
    return { status: 500, body: { error: (error as Error).message ?? String(error) } };
  }
}

async function route(request: AdminRequest, target: AdminTarget): Promise<AdminResponse> {
  const parts = request.pathname.split('/').filter((part) => part !== '');
  // parts[0] === 'admin'
  if (parts.length === 2 && parts[1] === 'disks') {
    requireMethod(request, 'GET');
    return { status: 200, body: { disks: target.listDisks() } };
  }
  if (parts.length === 4 && parts[1] === 'disks') {
    const disk = decodeSegment(parts[2] ?? '');
    const action = parts[3];
    if (action === 'throttle') {
      requireMethod(request, 'POST');
      const limits = target.setThrottle(disk, parseThrottleChange(request.body));
      return { status: 200, body: { disk, throttle: throttleJson(limits) } };
    }
    if (action === 'resize') {
      requireMethod(request, 'POST');
      const body = request.body as Record<string, unknown> | null;
      const size = body !== null && typeof body === 'object' ? body['size'] : undefined;
      if (typeof size !== 'number' && typeof size !== 'string') throw new AdminError(400, 'the body must be {"size": BYTES or "20G"}');
      let bytes: number;
      try {
        bytes = parseSize(String(size));
      } catch (error) {
        throw new AdminError(400, `size: ${(error as Error).message}`);
      }
      return { status: 200, body: { disk, 'capacity-bytes': await target.resize(disk, bytes) } };
    }
  }
  throw new AdminError(
    404,
    `no admin endpoint ${request.method} ${request.pathname} (try GET /admin/disks or POST /admin/disks/NAME/throttle)`,
  );
}
