// Socket activation: reading LISTEN_* (sd_listen_fds rules), checking inherited fds, and giving each activated
// socket to a disk (path, then name, then position). The end-to-end path is in test/integration/systemd.test.ts.
import { mkdtempSync, openSync, closeSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  adoptListenFds,
  assignActivatedSockets,
  checkListeningUnixSocket,
  namesForFd,
  SocketActivationError,
  type ActivatedSocket,
} from '../../src/daemon/socket-activation.js';
import { buildDiskSpec, type DiskSpec } from '../../src/daemon/disk-spec.js';
import { listenUnix } from '../../src/sys/unix-socket.js';
import { openDatagramSocket } from '../../src/sys/unix-datagram.js';
import { closeFd } from '../../src/sys/fd.js';
import { sys, AF_UNIX, SOCK_STREAM, SOCK_CLOEXEC } from '../../src/sys/libc.js';

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

function tempDir(): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-sa-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function disk(name: string, socket: string): DiskSpec {
  return buildDiskSpec({ name, imagePath: `/var/lib/vublk/${name}.img`, socket }, name, 0, 'flags');
}

function activated(fd: number, name: string | null, address: string | null): ActivatedSocket {
  return { fd, name, address };
}

describe('adoptListenFds', () => {
  it('is not activated without LISTEN_FDS, and removes the variables it read', () => {
    const env: Record<string, string | undefined> = { LISTEN_PID: '42', LISTEN_FDNAMES: 'a', OTHER: 'kept' };
    expect(adoptListenFds(env, 42)).toEqual({ activated: false, reason: 'LISTEN_FDS is not set' });
    expect(env).toEqual({ OTHER: 'kept' });
  });

  it('ignores variables meant for another process (LISTEN_PID), as sd_listen_fds does, and still removes them', () => {
    const env: Record<string, string | undefined> = { LISTEN_FDS: '1', LISTEN_PID: '41' };
    expect(adoptListenFds(env, 42)).toEqual({ activated: false, reason: 'LISTEN_PID=41 is another process (this is pid 42)' });
    expect(env).toEqual({});
    expect(adoptListenFds({ LISTEN_FDS: '1' }, 42)).toMatchObject({ activated: false, reason: 'LISTEN_FDS is set but LISTEN_PID is not' });
  });

  it('rejects malformed variables with a clear error', () => {
    expect(() => adoptListenFds({ LISTEN_FDS: '1', LISTEN_PID: 'me' }, 42)).toThrow("LISTEN_PID='me' is not a process id");
    expect(() => adoptListenFds({ LISTEN_FDS: 'two', LISTEN_PID: '42' }, 42)).toThrow("LISTEN_FDS='two' is not a valid fd count");
    expect(() => adoptListenFds({ LISTEN_FDS: '2', LISTEN_PID: '42', LISTEN_FDNAMES: 'only-one' }, 42)).toThrow(
      "LISTEN_FDNAMES has 1 name ('only-one') for LISTEN_FDS=2",
    );
  });

  it('LISTEN_FDS=0 is an activation with no sockets', () => {
    expect(adoptListenFds({ LISTEN_FDS: '0', LISTEN_PID: '42' }, 42)).toEqual({ activated: true, sockets: [] });
  });
});

describe('checkListeningUnixSocket', () => {
  it('accepts a listening AF_UNIX stream socket and returns the path it is bound to', () => {
    const socketPath = path.join(tempDir(), 'listening.sock');
    const fd = listenUnix(socketPath);
    cleanups.push(() => closeFd(fd));
    expect(checkListeningUnixSocket(fd, 'fd under test')).toBe(socketPath);
  });

  it('names what is wrong with anything else', () => {
    const dir = tempDir();
    writeFileSync(path.join(dir, 'file'), '');
    const file = openSync(path.join(dir, 'file'), 'r');
    cleanups.push(() => closeSync(file));
    expect(() => checkListeningUnixSocket(file, 'fd X')).toThrow(new SocketActivationError('fd X is not a socket'));

    const datagram = openDatagramSocket();
    cleanups.push(() => closeFd(datagram));
    expect(() => checkListeningUnixSocket(datagram, 'fd X')).toThrow(/fd X is a datagram socket; vhost-user needs a stream socket/);

    const unbound = sys.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cleanups.push(() => closeFd(unbound));
    expect(() => checkListeningUnixSocket(unbound, 'fd X')).toThrow(/fd X is not a listening socket \(with Accept=yes/);

    const closed = openDatagramSocket();
    closeFd(closed);
    expect(() => checkListeningUnixSocket(closed, 'fd X')).toThrow('fd X is not an open fd');
  });
});

describe('namesForFd', () => {
  it('reads systemd default names (the socket unit name) as the instance or unit name', () => {
    expect(namesForFd('disk0')).toEqual(['disk0']);
    expect(namesForFd('vublk@disk0.socket')).toEqual(['vublk@disk0.socket', 'disk0']);
    expect(namesForFd('vublk.socket')).toEqual(['vublk.socket', 'vublk']);
  });
});

describe('assignActivatedSockets', () => {
  const a = disk('a', '/run/vublk/a.sock');
  const b = disk('b', '/run/vublk/b.sock');

  it('matches by bound path first, whatever the names say', () => {
    const result = assignActivatedSockets([a, b], [activated(3, 'a', '/run/vublk/b.sock'), activated(4, 'b', '/run/vublk/a.sock')]);
    expect(result.specs.map((s) => s.listen)).toEqual([
      { kind: 'fd', fd: 4 },
      { kind: 'fd', fd: 3 },
    ]);
    expect(result.assignments.map((x) => [x.disk, x.via])).toEqual([
      ['b', 'path'],
      ['a', 'path'],
    ]);
  });

  it('matches by name (FileDescriptorName= or the unit default) and reports the socket path it replaces', () => {
    const result = assignActivatedSockets([a, b], [activated(3, 'vublk@b.socket', '/run/other/x.sock'), activated(4, 'a', null)]);
    expect(result.specs.map((s) => s.listen)).toEqual([
      { kind: 'fd', fd: 4 },
      { kind: 'fd', fd: 3 },
    ]);
    expect(result.assignments.find((x) => x.disk === 'b')).toMatchObject({ via: 'name', replacedPath: '/run/vublk/b.sock' });
  });

  it('leaves disks without an activated socket to bind their own path', () => {
    const result = assignActivatedSockets([a, b], [activated(3, null, '/run/vublk/b.sock')]);
    expect(result.specs[0]!.listen).toEqual({ kind: 'path', path: '/run/vublk/a.sock' });
    expect(result.specs[1]!.listen).toEqual({ kind: 'fd', fd: 3 });
  });

  it('gives left-over sockets, in order, to the disks with only a default socket path', () => {
    const implicit = disk('disk0', './vublk.sock');
    const result = assignActivatedSockets([implicit], [activated(3, null, '/tmp/x.sock')], (i) => i === 0);
    expect(result.specs[0]!.listen).toEqual({ kind: 'fd', fd: 3 });
    expect(result.assignments[0]).toMatchObject({ via: 'position' });
    expect(result.assignments[0]!.replacedPath).toBeUndefined();
  });

  it('never gives a socket to a disk with a different configured path by position', () => {
    expect(() => assignActivatedSockets([a], [activated(3, null, '/run/vublk/zzz.sock')])).toThrow(
      /no disk takes fd 3, bound to \/run\/vublk\/zzz\.sock\. Disks: a \(\/run\/vublk\/a\.sock\)/,
    );
  });

  it('refuses a second socket named after a disk that already has one', () => {
    expect(() => assignActivatedSockets([a], [activated(3, null, '/run/vublk/a.sock'), activated(4, 'a', '/run/x.sock')])).toThrow(
      /fd 4, named 'a', bound to \/run\/x\.sock is named after disk 'a', which already serves on fd 3/,
    );
  });

  it('keeps a disk configured with socket-fd=N on that activated fd', () => {
    const byFd = buildDiskSpec({ name: 'c', imagePath: '/x.img', socketFd: 4 }, 'c', 0, 'flags');
    const result = assignActivatedSockets([a, byFd], [activated(3, null, '/run/vublk/a.sock'), activated(4, null, '/run/y.sock')]);
    expect(result.specs[1]!.listen).toEqual({ kind: 'fd', fd: 4 });
    expect(result.assignments.map((x) => x.via).sort()).toEqual(['path', 'socket-fd']);
  });

  it('does not modify its input', () => {
    const specs = [a];
    assignActivatedSockets(specs, [activated(3, null, '/run/vublk/a.sock')]);
    expect(specs[0]!.listen).toEqual({ kind: 'path', path: '/run/vublk/a.sock' });
  });
});
