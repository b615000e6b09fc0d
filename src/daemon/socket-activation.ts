/**
 * systemd socket activation (sd_listen_fds(3), without libsystemd): systemd (or systemd-socket-activate)
 * binds the listening sockets itself and passes them as fds 3, 4, ... with LISTEN_FDS=N, LISTEN_PID=<our pid>
 * and LISTEN_FDNAMES=name:name:... (from `FileDescriptorName=` in the .socket unit; the socket unit's name
 * when that is not set). The variables are removed from our environment once read, so nothing we start
 * inherits them.
 *
 * Each fd goes to one disk, tried in this order:
 *  1. path: the disk's configured socket path is the path the activated socket is bound to (getsockname);
 *  2. name: the fd's name is the disk's name (also `unit@NAME.socket` / `NAME.socket`, systemd's default
 *     name) — the activated socket then replaces the disk's configured socket path, with a warning;
 *  3. position: the fds still unassigned go, in order, to the disks without a configured socket
 *     (`vublk serve --image X` with no --socket);
 *  and a disk configured with `socket-fd=N` (N an activated fd) keeps it.
 * An fd left over is an error (a front-end connecting to it would wait forever); a disk left without an fd
 * binds its own socket path as usual.
 */
import path from 'node:path';
import { AF_UNIX, SOCK_STREAM } from '../sys/libc.js';
import { Errno, SyscallError } from '../sys/errors.js';
import { setNonBlocking } from '../sys/fd.js';
import { describeSocket, setCloseOnExec, unixSocketName } from '../sys/socket-info.js';
import type { DiskSpec } from './disk-spec.js';
import type { Logger } from '../log.js';
import { VublkError } from '../errors.js';

/** SD_LISTEN_FDS_START */
export const LISTEN_FDS_START = 3;
const MAX_LISTEN_FDS = 4096;

export class SocketActivationError extends VublkError {
  constructor(message: string) {
    super('VUBLK_ERR_SOCKET_ACTIVATION', `socket activation: ${message}`, { peerFault: true, fatal: true });
  }
}

export interface ActivatedSocket {
  fd: number;
  /** From LISTEN_FDNAMES; null when absent or systemd's placeholder `unknown`. */
  name: string | null;
  /** The bound path, `@name` for an abstract socket, or null when unnamed. */
  address: string | null;
}

export type Activation = { activated: true; sockets: ActivatedSocket[] } | { activated: false; reason: string };

const SOCKET_TYPES: Record<number, string> = { 1: 'stream', 2: 'datagram', 3: 'raw', 5: 'seqpacket' };

function describeFd(socket: Pick<ActivatedSocket, 'fd' | 'name' | 'address'>): string {
  const parts = [`fd ${socket.fd}`];
  if (socket.name !== null) parts.push(`named '${socket.name}'`);
  if (socket.address !== null) parts.push(`bound to ${socket.address}`);
  return parts.join(', ');
}

/** Checks that an inherited fd is a listening AF_UNIX stream socket; returns its bound address. */
export function checkListeningUnixSocket(fd: number, label: string): string | null {
  let info: ReturnType<typeof describeSocket>;
  try {
    info = describeSocket(fd);
  } catch (error) {
    if (error instanceof SyscallError && error.errno === Errno.ENOTSOCK) throw new SocketActivationError(`${label} is not a socket`);
    if (error instanceof SyscallError && error.errno === Errno.EBADF) throw new SocketActivationError(`${label} is not an open fd`);
    throw error;
  }
  if (info.domain !== AF_UNIX) {
    throw new SocketActivationError(
      `${label} is not an AF_UNIX socket (domain ${info.domain}); vhost-user needs a Unix socket: use ListenStream=/path`,
    );
  }
  if (info.type !== SOCK_STREAM) {
    throw new SocketActivationError(
      `${label} is a ${SOCKET_TYPES[info.type] ?? `type ${info.type}`} socket; vhost-user needs a stream socket: use ListenStream=, not ListenDatagram=/ListenSequentialPacket=`,
    );
  }
  if (!info.listening) {
    throw new SocketActivationError(
      `${label} is not a listening socket (with Accept=yes systemd passes connections; vublk needs Accept=no)`,
    );
  }
  return unixSocketName(fd);
}

/**
 * Reads LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES and removes them from `env`. Not activated when LISTEN_FDS is
 * unset or the variables are meant for another process (LISTEN_PID missing or not ours), as sd_listen_fds
 * does. Each adopted fd is checked (a listening AF_UNIX stream socket), made close-on-exec and non-blocking.
 */
export function adoptListenFds(env: Record<string, string | undefined> = process.env, pid: number = process.pid): Activation {
  const fdsText = env['LISTEN_FDS'];
  const pidText = env['LISTEN_PID'];
  const namesText = env['LISTEN_FDNAMES'];
  delete env['LISTEN_FDS'];
  delete env['LISTEN_PID'];
  delete env['LISTEN_FDNAMES'];

  if (fdsText === undefined || fdsText === '') return { activated: false, reason: 'LISTEN_FDS is not set' };
  if (pidText === undefined || pidText === '') return { activated: false, reason: 'LISTEN_FDS is set but LISTEN_PID is not' };
  if (!/^\d+$/.test(pidText)) throw new SocketActivationError(`LISTEN_PID='${pidText}' is not a process id`);
  if (Number(pidText) !== pid) return { activated: false, reason: `LISTEN_PID=${pidText} is another process (this is pid ${pid})` };
  if (!/^\d+$/.test(fdsText) || Number(fdsText) > MAX_LISTEN_FDS)
    throw new SocketActivationError(`LISTEN_FDS='${fdsText}' is not a valid fd count`);
  const count = Number(fdsText);

  let names: (string | null)[] = new Array<string | null>(count).fill(null);
  if (namesText !== undefined && namesText !== '') {
    const split = namesText.split(':');
    if (split.length !== count) {
      throw new SocketActivationError(
        `LISTEN_FDNAMES has ${split.length} name${split.length === 1 ? '' : 's'} ('${namesText}') for LISTEN_FDS=${count}`,
      );
    }
    names = split.map((name) => (name === '' || name === 'unknown' ? null : name));
  }

  const sockets: ActivatedSocket[] = [];
  for (let i = 0; i < count; i++) {
    const fd = LISTEN_FDS_START + i;
    const name = names[i] ?? null;
    const address = checkListeningUnixSocket(fd, `${describeFd({ fd, name, address: null })} (from LISTEN_FDS)`);
    setCloseOnExec(fd);
    setNonBlocking(fd);
    sockets.push({ fd, name, address });
  }
  return { activated: true, sockets };
}

/** The disk names an fd name stands for: itself, and for systemd's default `unit@NAME.socket`, NAME. */
export function namesForFd(name: string): string[] {
  const names = [name];
  if (name.endsWith('.socket')) {
    const unit = name.slice(0, -'.socket'.length);
    const at = unit.indexOf('@');
    if (at >= 0 && at < unit.length - 1) names.push(unit.slice(at + 1));
    else if (at < 0) names.push(unit);
  }
  return names;
}

export interface Assignment {
  disk: string;
  fd: number;
  via: 'path' | 'name' | 'position' | 'socket-fd';
  socket: ActivatedSocket;
  /** A configured socket path the activated socket replaces (name matches only). */
  replacedPath?: string;
}

export interface AssignResult {
  specs: DiskSpec[];
  assignments: Assignment[];
}

/**
 * Gives each activated socket to a disk (see the file comment for the order). `implicitSocket(i)` tells
 * whether disk i's socket path is only a default (no --socket/socket= given): such disks take the left-over
 * fds by position. Pure: returns new specs, throws SocketActivationError for an fd no disk takes.
 */
export function assignActivatedSockets(
  specs: readonly DiskSpec[],
  sockets: readonly ActivatedSocket[],
  implicitSocket: (index: number) => boolean = () => false,
): AssignResult {
  const out = specs.map((spec) => ({ ...spec }));
  const assigned = new Map<number, Assignment>(); // disk index → assignment
  const taken = new Set<number>(); // fds
  const give = (index: number, socket: ActivatedSocket, via: Assignment['via'], replacedPath?: string): void => {
    const spec = out[index]!;
    const assignment: Assignment = { disk: spec.options.name, fd: socket.fd, via, socket };
    if (replacedPath !== undefined) assignment.replacedPath = replacedPath;
    assigned.set(index, assignment);
    taken.add(socket.fd);
    out[index] = { ...spec, listen: { kind: 'fd', fd: socket.fd } };
  };

  // socket-fd=N naming an activated fd: already assigned by the user.
  out.forEach((spec, index) => {
    if (spec.listen.kind !== 'fd') return;
    const fd = spec.listen.fd;
    const socket = sockets.find((s) => s.fd === fd);
    if (socket !== undefined) {
      assigned.set(index, { disk: spec.options.name, fd, via: 'socket-fd', socket });
      taken.add(fd);
    }
  });

  // 1. path
  for (const socket of sockets) {
    if (taken.has(socket.fd) || socket.address === null || socket.address.startsWith('@')) continue;
    const bound = path.resolve(socket.address);
    const index = out.findIndex((spec, i) => !assigned.has(i) && spec.listen.kind === 'path' && spec.listen.path === bound);
    if (index >= 0) give(index, socket, 'path');
  }

  // 2. name
  for (const socket of sockets) {
    if (taken.has(socket.fd) || socket.name === null) continue;
    const candidates = namesForFd(socket.name);
    const index = out.findIndex((spec) => candidates.includes(spec.options.name));
    if (index < 0) continue;
    const holder = assigned.get(index);
    if (holder !== undefined) {
      throw new SocketActivationError(
        `${describeFd(socket)} is named after disk '${out[index]!.options.name}', which already serves on ${describeFd(holder.socket)} (matched by ${holder.via}); a disk serves one socket`,
      );
    }
    const listen = out[index]!.listen;
    give(index, socket, 'name', listen.kind === 'path' && !implicitSocket(index) ? listen.path : undefined);
  }

  // 3. position
  const leftover = sockets.filter((s) => !taken.has(s.fd));
  for (let index = 0; index < out.length && leftover.length > 0; index++) {
    if (!assigned.has(index) && implicitSocket(index)) give(index, leftover.shift()!, 'position');
  }

  if (leftover.length > 0) {
    const disks = out
      .map((spec) => `${spec.options.name} (${spec.listen.kind === 'path' ? spec.listen.path : `fd ${spec.listen.fd}`})`)
      .join(', ');
    throw new SocketActivationError(
      `no disk takes ${leftover.map(describeFd).join('; ')}. Disks: ${disks}. ` +
        'Give the disk the same socket path as the .socket unit, name the disk as its FileDescriptorName=, or leave out --socket for a single disk.',
    );
  }
  return { specs: out, assignments: [...assigned.values()] };
}

export interface SocketActivationOptions {
  /** --socket-activation: being started without sockets is an error. */
  required: boolean;
  /** Whether disk i has no configured socket (its path is only the default). */
  implicitSocket?: (index: number) => boolean;
  log: Logger;
  env?: Record<string, string | undefined>;
  pid?: number;
}

/**
 * Adopts the activated sockets (if any) and points the disks at them. Without LISTEN_FDS the specs come back
 * unchanged, unless activation is required.
 */
export function applySocketActivation(specs: readonly DiskSpec[], options: SocketActivationOptions): DiskSpec[] {
  const activation = adoptListenFds(options.env, options.pid);
  if (!activation.activated) {
    if (options.required) throw new SocketActivationError(`--socket-activation was given but no sockets were passed: ${activation.reason}`);
    if (activation.reason !== 'LISTEN_FDS is not set')
      options.log.warn({ reason: activation.reason }, 'ignoring socket activation variables');
    return [...specs];
  }
  if (activation.sockets.length === 0 && options.required)
    throw new SocketActivationError('--socket-activation was given but LISTEN_FDS=0');
  const { specs: result, assignments } = assignActivatedSockets(specs, activation.sockets, options.implicitSocket);
  for (const a of assignments) {
    const fields = { disk: a.disk, fd: a.fd, fdName: a.socket.name, socket: a.socket.address, matchedBy: a.via };
    if (a.replacedPath !== undefined) {
      options.log.warn(
        { ...fields, configuredSocket: a.replacedPath },
        'activated socket named after the disk replaces its configured socket path',
      );
    } else {
      options.log.info(fields, 'serving on a socket-activated fd');
    }
  }
  return result;
}
