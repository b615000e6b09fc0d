/**
 * What the metrics listener and the admin socket share about running a node:http server: a failed
 * handler is logged and answered 500 (never an unhandled rejection), slow clients time out, listening
 * reports its error instead of emitting it, and closing drains in-flight requests for at most 2 s.
 */
import http from 'node:http';
import { errorFields, type Logger } from '../log.js';

const REQUEST_TIMEOUT_MS = 10_000;
const CLOSE_GRACE_MS = 2_000;

/** `serve` handles a request; when it throws, `answerFailure` replies 500 (if nothing was sent yet). */
export function createHttpServer(
  serve: (req: http.IncomingMessage, res: http.ServerResponse) => Promise<void>,
  answerFailure: (res: http.ServerResponse) => void,
  log: Logger,
  what: string,
): http.Server {
  const server = http.createServer((req, res) => {
    serve(req, res).catch((error: unknown) => {
      log.error(errorFields(error), `${what} request failed`);
      if (!res.headersSent) answerFailure(res);
      else res.destroy();
    });
  });
  server.requestTimeout = REQUEST_TIMEOUT_MS;
  server.headersTimeout = REQUEST_TIMEOUT_MS;
  server.keepAliveTimeout = 5_000;
  return server;
}

/** Calls `listen(done)` and resolves once listening, or rejects with the listen error; later errors are logged. */
export async function startListening(server: http.Server, listen: (done: () => void) => void, log: Logger, what: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    listen(() => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (error) => log.error(errorFields(error), `${what} error`));
}

/** Stops listening and drops idle keep-alive connections; in-flight requests get CLOSE_GRACE_MS to finish. */
export async function closeHttpServer(server: http.Server): Promise<void> {
  await new Promise<void>((resolve) => {
    const force = setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS);
    server.close(() => {
      clearTimeout(force);
      resolve();
    });
    server.closeIdleConnections();
  });
}
