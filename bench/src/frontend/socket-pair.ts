/**
 * A connected pair of AF_UNIX stream sockets for the back-end channel (SET_BACKEND_REQ_FD), where QEMU uses
 * socketpair(2). Built from the socket calls the project already binds: listen on a private temporary path,
 * connect, accept, then unlink the path. Both ends are non-blocking and close-on-exec.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { acceptConnection, connectUnix, listenUnix } from '../../../src/sys/unix-socket.js';
import { closeFd } from '../../../src/sys/fd.js';
import { FrontendError } from './errors.js';

/** Returns [ours, theirs]: keep the first, send the second over SCM_RIGHTS (then close it here). */
export function createSocketPair(): [number, number] {
  const dir = mkdtempSync(join(tmpdir(), 'vublk-fe-pair-'));
  const path = join(dir, 's');
  let listenFd = -1;
  let ours = -1;
  try {
    listenFd = listenUnix(path, 1);
    ours = connectUnix(path);
    // A Unix-domain connect completes once the connection is queued, so accept has it at once.
    const theirs = acceptConnection(listenFd);
    if (theirs === null) throw new FrontendError('socket pair: the connection was not ready to accept');
    return [ours, theirs];
  } catch (error) {
    closeFd(ours);
    throw error;
  } finally {
    closeFd(listenFd);
    rmSync(dir, { recursive: true, force: true });
  }
}
