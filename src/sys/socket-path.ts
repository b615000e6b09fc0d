/** Creating a Unix socket file safely: never replacing a live one, never reachable with a looser mode. */
import fs from 'node:fs';
import { isSocketLive, listenUnix } from './unix-socket.js';
import { closeFd } from './fd.js';
import { VublkError } from '../errors.js';

export class SocketPathError extends VublkError {
  constructor(path: string, reason: string) {
    super('VUBLK_ERR_SOCKET_PATH', `socket path ${path}: ${reason}`, { peerFault: true });
  }
}

/** Who may connect to a socket vublk creates: its mode (default 0600) and, optionally, its owner and group. */
export interface SocketAccess {
  mode?: number | undefined;
  uid?: number | undefined;
  gid?: number | undefined;
}

export const DEFAULT_SOCKET_MODE = 0o600;

/** Binds `path`, replacing a stale socket file left by a dead daemon but never a live one. */
export function bindSocketPath(path: string, access: SocketAccess = {}): number {
  if (fs.existsSync(path)) {
    const stat = fs.lstatSync(path);
    if (!stat.isSocket()) throw new SocketPathError(path, 'exists and is not a socket; refusing to replace it');
    if (isSocketLive(path)) throw new SocketPathError(path, 'is in use by a running process (another vublk?)');
    fs.unlinkSync(path);
  }
  // Created owner-only, so there is no moment in which the socket is reachable with the umask's looser mode.
  const previousMask = process.umask(0o177);
  let fd: number;
  try {
    fd = listenUnix(path);
  } finally {
    process.umask(previousMask);
  }
  try {
    if (access.uid !== undefined || access.gid !== undefined) fs.chownSync(path, access.uid ?? -1, access.gid ?? -1);
    fs.chmodSync(path, access.mode ?? DEFAULT_SOCKET_MODE);
  } catch (error) {
    closeFd(fd);
    fs.rmSync(path, { force: true });
    throw new SocketPathError(path, `cannot set its owner or mode: ${(error as Error).message}`);
  }
  return fd;
}
