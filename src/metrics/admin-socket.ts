/**
 * The admin API's own listener: a Unix socket created like the vhost-user sockets (mode 0600 by default,
 * optional owner and group), so only the daemon's user (and a chosen group) can throttle or resize a disk.
 * Serves only /admin/...; metrics and health stay on the metrics listener.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { bindSocketPath, type SocketAccess } from '../sys/socket-path.js';
import { closeFd } from '../sys/fd.js';
import { errorFields, type Logger } from '../log.js';
import type { AdminTarget } from './admin.js';
import { replyJson, serveAdmin } from './http-server.js';

export interface AdminSocketOptions extends SocketAccess {
  path: string;
}

/**
 * Where the admin socket goes when --admin-socket is not given: next to the first disk's vhost-user socket,
 * named after it (`/run/vublk/disk0.sock` → `/run/vublk/disk0.admin.sock`); for a socket-activated first disk,
 * `$RUNTIME_DIRECTORY/NAME.admin.sock`. Null when neither is known.
 */
export function defaultAdminSocketPath(first: { socketPath: string | null; diskName: string }, env: NodeJS.ProcessEnv = process.env): string | null {
  if (first.socketPath !== null) {
    const dir = path.dirname(first.socketPath);
    return path.join(dir, `${path.basename(first.socketPath).replace(/\.sock$/, '')}.admin.sock`);
  }
  const runtime = env['RUNTIME_DIRECTORY']?.split(':')[0];
  return runtime ? path.join(runtime, `${first.diskName}.admin.sock`) : null;
}

export class AdminSocketServer {
  private constructor(
    private readonly server: http.Server,
    readonly path: string,
  ) {}

  static async start(options: AdminSocketOptions, target: AdminTarget, log: Logger): Promise<AdminSocketServer> {
    const server = http.createServer((req, res) => {
      const { pathname } = new URL(req.url ?? '/', 'http://vublk.invalid');
      if (pathname !== '/admin' && !pathname.startsWith('/admin/')) {
        req.resume();
        replyJson(res, 404, { error: 'the admin socket serves /admin/disks only' });
        return;
      }
      serveAdmin(req, res, pathname, { admin: target }).catch((error: unknown) => {
        log.error(errorFields(error), 'admin request failed');
        if (!res.headersSent) replyJson(res, 500, { error: 'internal error' });
        else res.destroy();
      });
    });
    server.requestTimeout = 10_000;
    server.headersTimeout = 10_000;
    const fd = bindSocketPath(options.path, options);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ fd }, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (error) {
      closeFd(fd);
      fs.rmSync(options.path, { force: true });
      throw error;
    }
    server.on('error', (error) => log.error(errorFields(error), 'admin socket error'));
    return new AdminSocketServer(server, options.path);
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      const force = setTimeout(() => this.server.closeAllConnections(), 2_000);
      this.server.close(() => {
        clearTimeout(force);
        resolve();
      });
      this.server.closeIdleConnections();
    });
    fs.rmSync(this.path, { force: true });
  }
}
