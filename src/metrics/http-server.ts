/**
 * The metrics HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 while the process runs),
 * `/readyz` (200 once every disk is listening, 503 before and during shutdown), and the admin API under
 * `/admin` when enabled. Runs on the main thread's event loop, which never blocks (the data plane is on
 * worker threads), so a scrape is answered even while the disks are busy.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import { isSocketLive } from '../sys/unix-socket.js';
import type { Logger } from '../log.js';
import { closeHttpServer, createHttpServer, startListening } from './http-lifecycle.js';
import { AdminError, handleAdmin, type AdminTarget } from './admin.js';
import { formatAddress, type MetricsAddress } from './listen-address.js';
import { VublkError } from '../errors.js';

export interface Readiness {
  ready: boolean;
  /** Why not, e.g. 'starting', 'stopping'. */
  reason?: string;
}

export interface MetricsServerOptions {
  registry: Registry;
  readiness: () => Readiness;
  /** The admin API's target, or null when admin is disabled (then /admin answers 403 with `adminRefusal`). */
  admin: AdminTarget | null;
  adminRefusal?: string;
  /** On TCP the admin API needs a bearer token and a Host header naming this listener (no DNS rebinding). */
  adminAuth?: AdminAuth | undefined;
}

export interface AdminAuth {
  token: string;
  /** Accepted Host header values, lower case, e.g. `127.0.0.1:9477`, `localhost:9477`. */
  hosts: ReadonlySet<string>;
}

const MAX_BODY_BYTES = 64 * 1024;

export class MetricsServer {
  private constructor(
    private readonly server: http.Server,
    /** The bound address (a requested port 0 is replaced by the real one). */
    readonly address: MetricsAddress,
  ) {}

  /** Binds and listens; rejects with the listen error (EADDRINUSE, EACCES, ...). */
  static async start(requested: MetricsAddress, options: MetricsServerOptions, log: Logger): Promise<MetricsServer> {
    const server = createHttpServer(
      (req, res) => serve(req, res, options),
      (res) => reply(res, 500, 'text/plain; charset=utf-8', 'internal error\n'),
      log,
      'metrics',
    );
    if (requested.kind === 'unix') removeStaleSocket(requested.path);
    await startListening(
      server,
      (done) =>
        requested.kind === 'unix'
          ? server.listen(requested.path, done)
          : server.listen({ host: requested.host, port: requested.port, exclusive: true }, done),
      log,
      'metrics listener',
    );
    let bound: MetricsAddress = requested;
    if (requested.kind === 'unix') {
      fs.chmodSync(requested.path, 0o600);
    } else {
      const info = server.address() as AddressInfo;
      bound = { kind: 'tcp', host: requested.host, port: info.port };
    }
    return new MetricsServer(server, bound);
  }

  get displayAddress(): string {
    return formatAddress(this.address);
  }

  /** Stops listening and drops idle keep-alive connections; in-flight requests get 2 s to finish. */
  async close(): Promise<void> {
    await closeHttpServer(this.server);
    if (this.address.kind === 'unix') fs.rmSync(this.address.path, { force: true });
  }
}

/** The metrics listener cannot be started. */
export class MetricsListenError extends VublkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super('VUBLK_ERR_METRICS_LISTEN', message, { fatal: true, ...options });
  }
}

function removeStaleSocket(path: string): void {
  if (!fs.existsSync(path)) return;
  const stat = fs.lstatSync(path);
  if (!stat.isSocket()) throw new MetricsListenError(`metrics socket ${path} exists and is not a socket; refusing to replace it`);
  if (isSocketLive(path)) throw new MetricsListenError(`metrics socket ${path} is in use by a running process`);
  fs.unlinkSync(path);
}

function reply(res: http.ServerResponse, status: number, type: string, body: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store', ...headers });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}

export function replyJson(res: http.ServerResponse, status: number, body: unknown): void {
  reply(res, status, 'application/json; charset=utf-8', `${JSON.stringify(body)}\n`);
}

async function serve(req: http.IncomingMessage, res: http.ServerResponse, options: MetricsServerOptions): Promise<void> {
  const method = req.method ?? 'GET';
  const { pathname } = new URL(req.url ?? '/', 'http://vublk.invalid');
  const readOnly = method === 'GET' || method === 'HEAD';
  if (pathname === '/admin' || pathname.startsWith('/admin/')) {
    await serveAdmin(req, res, pathname, options);
    return;
  }
  if (pathname !== '/metrics' && pathname !== '/healthz' && pathname !== '/readyz' && pathname !== '/') {
    reply(res, 404, 'text/plain; charset=utf-8', 'not found: try /metrics, /healthz, /readyz or /admin/disks\n');
    return;
  }
  if (!readOnly) {
    req.resume();
    reply(res, 405, 'text/plain; charset=utf-8', `${pathname} takes GET\n`, { Allow: 'GET, HEAD' });
    return;
  }
  switch (pathname) {
    case '/metrics':
      reply(res, 200, options.registry.contentType, await options.registry.metrics());
      return;
    case '/healthz':
      reply(res, 200, 'text/plain; charset=utf-8', 'ok\n');
      return;
    case '/readyz': {
      const state = options.readiness();
      if (state.ready) reply(res, 200, 'text/plain; charset=utf-8', 'ready\n');
      else reply(res, 503, 'text/plain; charset=utf-8', `not ready: ${state.reason ?? 'starting'}\n`);
      return;
    }
    default:
      reply(res, 200, 'text/plain; charset=utf-8', 'vublk: /metrics /healthz /readyz /admin/disks\n');
  }
}

/** Constant-time comparison of the bearer token; a missing or malformed header fails. */
function hasToken(req: http.IncomingMessage, token: string): boolean {
  const header = req.headers.authorization ?? '';
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  if (match === null) return false;
  const given = Buffer.from(match[1]!, 'utf8');
  const expected = Buffer.from(token, 'utf8');
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

export async function serveAdmin(
  req: http.IncomingMessage,
  res: http.ServerResponse,
  pathname: string,
  options: Pick<MetricsServerOptions, 'admin' | 'adminRefusal' | 'adminAuth'>,
): Promise<void> {
  const method = req.method ?? 'GET';
  if (options.admin === null) {
    req.resume();
    replyJson(res, 403, { error: options.adminRefusal ?? 'the admin API is disabled' });
    return;
  }
  if (options.adminAuth !== undefined) {
    const host = (req.headers.host ?? '').toLowerCase();
    if (!options.adminAuth.hosts.has(host)) {
      req.resume();
      replyJson(res, 403, {
        error: `Host '${req.headers.host ?? ''}' is not this listener; the admin API answers only requests addressed to it`,
      });
      return;
    }
    if (!hasToken(req, options.adminAuth.token)) {
      req.resume();
      res.setHeader('WWW-Authenticate', 'Bearer realm="vublk-admin"');
      replyJson(res, 401, { error: "the admin API on TCP needs Authorization: Bearer <token> (the daemon's --admin-token-file)" });
      return;
    }
  }
  let body: unknown;
  if (method === 'POST') {
    try {
      body = await readJsonBody(req);
    } catch (error) {
      if (error instanceof AdminError) {
        replyJson(res, error.status, { error: error.message });
        return;
      }
      throw error;
    }
  } else {
    req.resume();
  }
  const result = await handleAdmin({ method, pathname, body }, options.admin);
  replyJson(res, result.status, result.body);
}

/**
 * Reads a JSON body of at most 64 KiB. The Content-Type must be application/json: a browser cannot send that
 * cross-origin without a CORS preflight (which is never answered), so a web page cannot drive the API.
 */
async function readJsonBody(req: http.IncomingMessage): Promise<unknown> {
  const type = (req.headers['content-type'] ?? '').split(';')[0]?.trim().toLowerCase();
  if (type !== 'application/json') {
    req.resume();
    throw new AdminError(415, 'send the body as JSON with Content-Type: application/json');
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    const buffer = chunk as Buffer;
    size += buffer.length;
    if (size > MAX_BODY_BYTES) throw new AdminError(413, `the body is larger than ${MAX_BODY_BYTES} bytes`);
    chunks.push(buffer);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') throw new AdminError(400, 'the body is empty; send a JSON object');
  try {
    return JSON.parse(text) as unknown;
  } catch (error) {
    throw new AdminError(400, `the body is not valid JSON: ${(error as Error).message}`);
  }
}
