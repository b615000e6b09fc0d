/**
 * Client side of the admin API, for `vublk throttle` and `vublk disks`: a JSON request to a running daemon's
 * metrics listener, given as `http://HOST:PORT` or `unix:/path`.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { VublkError } from '../errors.js';

export interface AdminReply {
  status: number;
  body: unknown;
}

export class AdminClientError extends VublkError {
  constructor(message: string) {
    super('VUBLK_ERR_ADMIN_CLIENT', message);
  }
}

const TIMEOUT_MS = 10_000;

/** Where `vublk throttle/resize/disks` send requests: the admin socket, or a TCP listener with a token. */
export interface AdminEndpoint {
  /** `unix:/path` or `http://HOST:PORT`. */
  url: string;
  token?: string | undefined;
}

export const ADMIN_SOCKET_DIR = '/run/vublk';

/**
 * The admin socket a client uses when none is named: $VUBLK_ADMIN_SOCKET, else /run/vublk/DISK.admin.sock
 * when it exists, else the only *.admin.sock in /run/vublk. Throws AdminClientError naming what to pass.
 */
export function defaultAdminSocket(disk: string | undefined, env: NodeJS.ProcessEnv = process.env, dir = ADMIN_SOCKET_DIR): string {
  const fromEnv = env['VUBLK_ADMIN_SOCKET'];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  if (disk !== undefined && fs.existsSync(path.join(dir, `${disk}.admin.sock`))) return path.join(dir, `${disk}.admin.sock`);
  let found: string[] = [];
  try {
    found = fs.readdirSync(dir).filter((name) => name.endsWith('.admin.sock'));
  } catch {
    // no such directory
  }
  if (found.length === 1) return path.join(dir, found[0]!);
  throw new AdminClientError(
    found.length === 0
      ? `no admin socket found in ${dir}; pass --admin-socket PATH (the daemon logs it as 'admin API listening')`
      : `several admin sockets in ${dir} (${found.join(', ')}); pass --admin-socket PATH`,
  );
}

export async function adminRequest(
  endpoint: string | AdminEndpoint,
  method: 'GET' | 'POST',
  pathname: string,
  body?: unknown,
): Promise<AdminReply> {
  const metricsUrl = typeof endpoint === 'string' ? endpoint : endpoint.url;
  const token = typeof endpoint === 'string' ? undefined : endpoint.token;
  let target: http.RequestOptions;
  if (metricsUrl.startsWith('unix:')) {
    target = { socketPath: metricsUrl.slice('unix:'.length), path: pathname };
  } else {
    let url: URL;
    try {
      url = new URL(pathname, metricsUrl.endsWith('/') ? metricsUrl : `${metricsUrl}/`);
    } catch {
      throw new AdminClientError(`'${metricsUrl}' is not a URL (expected e.g. http://127.0.0.1:9477 or unix:/run/vublk/metrics.sock)`);
    }
    if (url.protocol !== 'http:') throw new AdminClientError(`'${metricsUrl}': only http:// and unix: are supported`);
    target = { host: url.hostname.replace(/^\[|\]$/g, ''), port: url.port === '' ? 80 : Number(url.port), path: url.pathname };
  }
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise<AdminReply>((resolve, reject) => {
    const req = http.request(
      {
        ...target,
        method,
        timeout: TIMEOUT_MS,
        headers: {
          ...(payload === undefined ? {} : { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) }),
          ...(token === undefined ? {} : { Authorization: `Bearer ${token}` }),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: unknown = text;
          try {
            parsed = JSON.parse(text) as unknown;
          } catch {
            // not JSON: keep the text
          }
          resolve({ status: res.statusCode ?? 0, body: parsed });
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new AdminClientError(`no answer from ${metricsUrl} within ${TIMEOUT_MS / 1000} s`)));
    req.on('error', (error: NodeJS.ErrnoException) => {
      if (error instanceof AdminClientError) reject(error);
      else
        reject(
          new AdminClientError(
            `cannot reach vublk at ${metricsUrl}: ${error.code ?? error.message} (is the daemon running? is this its admin socket?)`,
          ),
        );
    });
    req.end(payload);
  });
}
