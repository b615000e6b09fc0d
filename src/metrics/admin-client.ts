/**
 * Client side of the admin API, for `vublk throttle` and `vublk disks`: a JSON request to a running daemon's
 * metrics listener, given as `http://HOST:PORT` or `unix:/path`.
 */
import http from 'node:http';
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

export async function adminRequest(metricsUrl: string, method: 'GET' | 'POST', pathname: string, body?: unknown): Promise<AdminReply> {
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
        headers: payload === undefined ? {} : { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) },
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
      else reject(new AdminClientError(`cannot reach vublk at ${metricsUrl}: ${error.code ?? error.message} (is the daemon running with --metrics-listen?)`));
    });
    req.end(payload);
  });
}
