/**
 * The admin API's own listener: a Unix socket created like the vhost-user sockets (mode 0600 by default,
 * optional owner and group), so only the daemon's user (and a chosen group) can throttle or resize a disk.
 * Serves only /admin/...; metrics and health stay on the metrics listener.
 */
import fs from 'node:fs';
import type http from 'node:http';
import path from 'node:path';
import { bindSocketPath, type SocketAccess } from '../sys/socket-path.js';
import { closeFd } from '../sys/fd.js';
import type { Logger } from '../log.js';
import { closeHttpServer, createHttpServer, startListening } from './http-lifecycle.js';
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
export function defaultAdminSocketPath(
  first: { socketPath: string | null; diskName: string },
  env: NodeJS.ProcessEnv = process.env,
): string | null {
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
    const server = createHttpServer(
      async (req, res) => {
        const { pathname } = new URL(req.url ?? '/', 'http://vublk.invalid');
        if (pathname !== '/admin' && !pathname.startsWith('/admin/')) {
          req.resume();
          replyJson(res, 404, { error: 'the admin socket serves /admin/disks only' });
          return;
        }
        await serveAdmin(req, res, pathname, { admin: target });
      },
      (res) => replyJson(res, 500, { error: 'internal error' }),
      log,
      'admin socket',
    );
    const fd = bindSocketPath(options.path, options);
    try {
      await startListening(server, (done) => server.listen({ fd }, done), log, 'admin socket');
    } catch (error) {
      closeFd(fd);
      fs.rmSync(options.path, { force: true });
      throw error;
    }
    return new AdminSocketServer(server, options.path);
  }

  async close(): Promise<void> {
    await closeHttpServer(this.server);
    fs.rmSync(this.path, { force: true });
  }
}
