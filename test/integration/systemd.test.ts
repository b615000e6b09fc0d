// systemd integration: socket activation (LISTEN_FDS), sd_notify (READY/STATUS/WATCHDOG/STOPPING) and the
// unit files under systemd/. The daemon runs as `node dist/src/cli.js serve` (run `npm run build` first),
// started the way systemd starts it: the listening socket at fd 3 and LISTEN_PID set to the daemon's own pid.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import {
  closeSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  chmodSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { connectUnix, listenUnix, recvWithFds, sendWithFds } from '../../src/sys/unix-socket.js';
import { bindDatagram, openDatagramSocket, receiveDatagram } from '../../src/sys/unix-datagram.js';
import { closeFd } from '../../src/sys/fd.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CLI = path.join(ROOT, 'dist/src/cli.js');
const UNITS = path.join(ROOT, 'systemd');
/** `sh` puts its own pid in LISTEN_PID, then execs node: the pid systemd would have written after fork. */
const AS_SYSTEMD = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"';

interface Started {
  child: ChildProcess;
  dir: string;
  socketPath: string;
  image: string;
  notes: string[];
  log(): string;
  exited: Promise<number | null>;
  waitForNote(predicate: (note: string) => boolean, timeoutMs?: number): Promise<string>;
  waitForLog(text: string, timeoutMs?: number): Promise<void>;
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

interface StartOptions {
  /** serve arguments; `{dir}` is replaced by the temp directory. */
  args: string[];
  env?: Record<string, string>;
  /** The fd to pass as fd 3 instead of a listening socket on {dir}/vublk.sock. */
  fd3?: number;
  /** Start node directly (LISTEN_PID then comes from env, if at all). */
  direct?: boolean;
}

function start(options: StartOptions): Started {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-sd-'));
  const socketPath = path.join(dir, 'vublk.sock');
  const notifyPath = path.join(dir, 'notify.sock');
  const image = path.join(dir, 'disk.img');
  const listenFd = options.fd3 ?? listenUnix(socketPath);
  const notifyFd = bindDatagram(notifyPath);
  const args = ['serve', ...options.args.map((a) => a.replaceAll('{dir}', dir))];
  const env: NodeJS.ProcessEnv = { ...process.env, LISTEN_FDS: '1', NOTIFY_SOCKET: notifyPath, ...options.env };
  delete env['LISTEN_PID'];
  if (options.direct && options.env?.['LISTEN_PID']) env['LISTEN_PID'] = options.env['LISTEN_PID'];
  const child = options.direct
    ? spawn(process.execPath, [CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe', listenFd] })
    : spawn('/bin/sh', ['-c', AS_SYSTEMD, process.execPath, CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe', listenFd] });
  let log = '';
  child.stdout?.setEncoding('utf8').on('data', (text: string) => (log += text));
  child.stderr?.setEncoding('utf8').on('data', (text: string) => (log += text));
  // 'close', not 'exit': by then the output pipes are read to their end, so log() holds the last lines.
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  const notes: string[] = [];
  let running = true;
  let exitedAt = 0;
  void exited.then(() => {
    running = false;
    exitedAt = Date.now();
  });
  // Collect notifications until the test ends (a few more may arrive after exit: drain then stop).
  const collector = setInterval(() => {
    for (let note = receiveDatagram(notifyFd); note !== null; note = receiveDatagram(notifyFd)) notes.push(note.toString('utf8'));
  }, 10);
  cleanups.push(() => {
    clearInterval(collector);
    if (running) child.kill('SIGKILL');
    closeFd(notifyFd);
    if (options.fd3 === undefined) closeFd(listenFd);
    rmSync(dir, { recursive: true, force: true });
  });
  const started: Started = {
    child,
    dir,
    socketPath,
    image,
    notes,
    log: () => log,
    exited,
    async waitForNote(predicate, timeoutMs = 15_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const found = notes.find(predicate);
        if (found !== undefined) return found;
        if (Date.now() > deadline)
          throw new Error(`no matching notification in ${timeoutMs} ms; got ${JSON.stringify(notes)}; log:\n${log}`);
        // Notifications sent just before exit are collected within a few ms; give them 300.
        if (!running && Date.now() > exitedAt + 300) {
          throw new Error(
            `daemon exited (code ${child.exitCode}) without a matching notification; got ${JSON.stringify(notes)}; log:\n${log}`,
          );
        }
        await sleep(10);
      }
    },
    async waitForLog(text, timeoutMs = 15_000) {
      const deadline = Date.now() + timeoutMs;
      while (!log.includes(text)) {
        if (Date.now() > deadline) throw new Error(`log never contained '${text}'; log:\n${log}`);
        await sleep(10);
      }
    },
  };
  return started;
}

function logLines(log: string): Record<string, unknown>[] {
  return log
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

/** GET_FEATURES over a fresh connection: 12-byte header {request 1, flags = version 1, size 0}; reply is 20 bytes. */
async function getFeatures(socketPath: string): Promise<{ request: number; flags: number; size: number; features: bigint }> {
  const fd = connectUnix(socketPath);
  try {
    const header = Buffer.alloc(12);
    header.writeUInt32LE(1, 0);
    header.writeUInt32LE(1, 4);
    header.writeUInt32LE(0, 8);
    expect(sendWithFds(fd, header, 0)).toBe(12);
    const reply = Buffer.alloc(20);
    let have = 0;
    const deadline = Date.now() + 10_000;
    while (have < 20) {
      const got = recvWithFds(fd, reply, have, 20 - have);
      if (got === null) {
        if (Date.now() > deadline) throw new Error(`GET_FEATURES: ${have} of 20 reply bytes after 10 s`);
        await sleep(5);
        continue;
      }
      if (got.bytes === 0) throw new Error(`GET_FEATURES: connection closed after ${have} reply bytes`);
      have += got.bytes;
    }
    return {
      request: reply.readUInt32LE(0),
      flags: reply.readUInt32LE(4),
      size: reply.readUInt32LE(8),
      features: reply.readBigUInt64LE(12),
    };
  } finally {
    closeFd(fd);
  }
}

describe('socket activation and sd_notify', () => {
  it('serves on the activated socket, notifies READY/STATUS/WATCHDOG, and STOPPING=1 then exits 0 on SIGTERM', async () => {
    const d = start({ args: ['--image', '{dir}/disk.img', '--size', '16M'], env: { WATCHDOG_USEC: '200000' } });
    const ready = await d.waitForNote((n) => n.split('\n').includes('READY=1'));
    expect(ready).toMatch(/^STATUS=serving 1 disk, 0 front-ends connected: disk0 waiting$/m);

    // READY=1 comes after the disk listens (both lines are written to stdout in program order).
    await d.waitForLog('notified systemd: ready');
    const lines = logLines(d.log());
    const listening = lines.findIndex((l) => l['msg'] === 'listening for a vhost-user front-end');
    const notified = lines.findIndex((l) => l['msg'] === 'notified systemd: ready');
    expect(listening).toBeGreaterThanOrEqual(0);
    expect(listening).toBeLessThan(notified);
    expect(lines[listening]!['socket']).toBe('fd:3');
    expect(lines.find((l) => l['msg'] === 'serving on a socket-activated fd')).toMatchObject({
      disk: 'disk0',
      fd: 3,
      matchedBy: 'position',
      socket: d.socketPath,
    });

    // A front-end connecting to the activated socket is served by the daemon.
    const reply = await getFeatures(d.socketPath);
    expect(reply.request).toBe(1);
    expect(reply.flags & 0x3).toBe(1);
    expect(reply.flags & 0x4).toBe(0x4);
    expect(reply.size).toBe(8);
    expect(reply.features & (1n << 32n)).toBe(1n << 32n); // VIRTIO_F_VERSION_1

    // WATCHDOG_USEC=200000: a ping every 100 ms.
    await d.waitForNote((n) => n === 'WATCHDOG=1', 5_000);
    // The image was created; the socket file is systemd's and is not ours to bind.
    expect(existsSync(d.image)).toBe(true);

    d.child.kill('SIGTERM');
    expect(await d.exited).toBe(0);
    await d.waitForNote((n) => n.split('\n').includes('STOPPING=1'), 2_000);
    const stoppingAt = d.notes.findIndex((n) => n.split('\n').includes('STOPPING=1'));
    expect(d.notes.findIndex((n) => n.split('\n').includes('READY=1'))).toBeLessThan(stoppingAt);
    // An activated socket belongs to systemd: the daemon must not remove its file.
    expect(existsSync(d.socketPath)).toBe(true);
  });

  it('matches a disk whose socket= path is the activated socket', async () => {
    const d = start({
      args: ['--disk', 'image={dir}/disk.img,size=16M,socket={dir}/vublk.sock,name=vm0'],
      env: { LISTEN_FDNAMES: 'not-a-disk-name' },
    });
    await d.waitForNote((n) => n.startsWith('READY=1'));
    // The log is written asynchronously: a line logged before READY=1 may reach the pipe after it.
    await d.waitForLog('serving on a socket-activated fd');
    expect(logLines(d.log()).find((l) => l['msg'] === 'serving on a socket-activated fd')).toMatchObject({
      disk: 'vm0',
      fdName: 'not-a-disk-name',
      matchedBy: 'path',
    });
    expect((await getFeatures(d.socketPath)).size).toBe(8);
    d.child.kill('SIGTERM');
    expect(await d.exited).toBe(0);
  });

  it('matches a disk named like the socket (FileDescriptorName=), replacing its configured path', async () => {
    const d = start({
      args: ['--disk', 'image={dir}/disk.img,size=16M,socket={dir}/elsewhere.sock,name=vm0'],
      env: { LISTEN_FDNAMES: 'vm0' },
    });
    await d.waitForNote((n) => n.startsWith('READY=1'));
    await d.waitForLog('replaces its configured socket path');
    expect(logLines(d.log()).find((l) => String(l['msg']).includes('replaces its configured socket path'))).toMatchObject({
      disk: 'vm0',
      matchedBy: 'name',
      configuredSocket: path.join(d.dir, 'elsewhere.sock'),
    });
    expect(existsSync(path.join(d.dir, 'elsewhere.sock'))).toBe(false);
    expect((await getFeatures(d.socketPath)).size).toBe(8);
    d.child.kill('SIGTERM');
    expect(await d.exited).toBe(0);
  });

  it('refuses an activated fd that no disk takes', async () => {
    const d = start({ args: ['--disk', 'image={dir}/disk.img,size=16M,socket={dir}/other.sock'], env: { LISTEN_FDNAMES: 'nobody' } });
    expect(await d.exited).toBe(2);
    expect(d.log()).toMatch(/socket activation: no disk takes fd 3, named 'nobody', bound to .*vublk\.sock/);
  });

  it('refuses an activated fd that is not a listening Unix stream socket', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-sd-fd-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'not-a-socket');
    writeFileSync(file, '');
    const fileFd = openSync(file, 'r');
    cleanups.push(() => closeSync(fileFd));
    const notSocket = start({ args: ['--image', '{dir}/disk.img', '--size', '16M'], fd3: fileFd });
    expect(await notSocket.exited).toBe(2);
    expect(notSocket.log()).toContain('socket activation: fd 3 (from LISTEN_FDS) is not a socket');

    const datagramFd = openDatagramSocket();
    cleanups.push(() => closeFd(datagramFd));
    const datagram = start({ args: ['--image', '{dir}/disk.img', '--size', '16M'], fd3: datagramFd });
    expect(await datagram.exited).toBe(2);
    expect(datagram.log()).toContain('is a datagram socket; vhost-user needs a stream socket');
  });

  it('ignores LISTEN_FDS meant for another process, unless --socket-activation requires it', async () => {
    const ignored = start({
      args: ['--image', '{dir}/disk.img', '--size', '16M', '--socket', '{dir}/own.sock'],
      direct: true,
      env: { LISTEN_PID: '1' },
    });
    await ignored.waitForNote((n) => n.startsWith('READY=1'));
    // Logged before READY=1, but the log is written asynchronously and may reach the pipe after it.
    await ignored.waitForLog('ignoring socket activation variables');
    expect(existsSync(path.join(ignored.dir, 'own.sock'))).toBe(true);
    ignored.child.kill('SIGTERM');
    expect(await ignored.exited).toBe(0);

    const required = start({
      args: ['--image', '{dir}/disk.img', '--size', '16M', '--socket-activation'],
      direct: true,
      env: { LISTEN_PID: '1' },
    });
    expect(await required.exited).toBe(2);
    expect(required.log()).toMatch(/--socket-activation was given but no sockets were passed: LISTEN_PID=1 is another process/);
  });
});

// ---------------------------------------------------------------------------------------------------------
// The unit files. `systemd-analyze verify` checks that ExecStart's binary exists and loads the units' default
// dependencies (sysinit.target, ...), so the units are verified unmodified inside a scratch root (--root): the
// units in <root>/etc/systemd/system, the host's /usr/lib/systemd/system copied beside them (or stub targets
// when the host has none), and an executable stand-in at ExecStart's path.

function systemdAnalyzeMissing(): string | null {
  const probe = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
  if (probe.error) return `systemd-analyze is not installed (${probe.error.message}); Debian: apt-get install systemd`;
  if (probe.status !== 0) return `systemd-analyze --version failed: ${probe.stderr}`;
  return null;
}

const analyzeMissing = systemdAnalyzeMissing();
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';
if (analyzeMissing !== null) console.warn(`systemd unit tests ${required ? 'cannot run' : 'skipped'}: ${analyzeMissing}`);

describe('systemd units', () => {
  if (analyzeMissing !== null && required) {
    it('systemd-analyze is available (VUBLK_E2E_REQUIRED=1)', () => expect.fail(analyzeMissing));
    return;
  }

  /** The binaries of every Exec*= line (ExecStart=, ExecReload=, ...). */
  function execBinaries(unitText: string): string[] {
    return unitText
      .split('\n')
      .filter((l) => /^Exec[A-Za-z]+=\S/.test(l))
      .map(
        (l) =>
          l
            .slice(l.indexOf('=') + 1)
            .replace(/^[-@:+!]+/, '')
            .split(/\s+/)[0]!,
      );
  }

  function scratchRoot(): string {
    const root = mkdtempSync(path.join(os.tmpdir(), 'vublk-units-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const unitDir = path.join(root, 'etc/systemd/system');
    mkdirSync(unitDir, { recursive: true });
    for (const unit of ['vublk@.service', 'vublk@.socket']) cpSync(path.join(UNITS, unit), path.join(unitDir, unit));
    const libDir = path.join(root, 'usr/lib/systemd/system');
    if (existsSync('/usr/lib/systemd/system/sysinit.target')) {
      cpSync('/usr/lib/systemd/system', libDir, { recursive: true, verbatimSymlinks: true });
    } else {
      mkdirSync(libDir, { recursive: true });
      for (const target of ['sysinit.target', 'basic.target', 'sockets.target', 'shutdown.target', 'multi-user.target']) {
        writeFileSync(path.join(libDir, target), '[Unit]\nDescription=stub\n');
      }
    }
    const binaries = execBinaries(readFileSync(path.join(UNITS, 'vublk@.service'), 'utf8'));
    expect(binaries).toContain('/usr/local/bin/vublk');
    for (const binary of binaries) {
      expect(path.isAbsolute(binary), `${binary} is not an absolute path`).toBe(true);
      mkdirSync(path.join(root, path.dirname(binary)), { recursive: true });
      writeFileSync(path.join(root, binary), '#!/bin/sh\nexit 0\n');
      chmodSync(path.join(root, binary), 0o755);
    }
    return root;
  }

  it.skipIf(analyzeMissing !== null)('systemd-analyze verify accepts vublk@.service and vublk@.socket without a warning', () => {
    const root = scratchRoot();
    const result = spawnSync('systemd-analyze', ['verify', '--man=no', `--root=${root}`, 'vublk@disk0.service', 'vublk@disk0.socket'], {
      encoding: 'utf8',
    });
    expect(result.stderr.trim(), result.stderr).toBe('');
    expect(result.status, result.stderr).toBe(0);
  });

  it.skipIf(analyzeMissing !== null)('systemd-analyze verify catches a broken unit (the check is not vacuous)', () => {
    const root = scratchRoot();
    const unit = path.join(root, 'etc/systemd/system/vublk@.service');
    writeFileSync(unit, readFileSync(unit, 'utf8').replace('ProtectSystem=strict', 'ProtectSytem=strict'));
    const result = spawnSync('systemd-analyze', ['verify', '--man=no', `--root=${root}`, 'vublk@disk0.service'], { encoding: 'utf8' });
    expect(result.stderr).toContain("Unknown key 'ProtectSytem'");
  });

  it.skipIf(analyzeMissing !== null)('the sysusers.d and tmpfiles.d entries create the vublk user and /run/vublk owned by it', () => {
    const root = mkdtempSync(path.join(os.tmpdir(), 'vublk-sysusers-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    mkdirSync(path.join(root, 'etc'));
    const sysusers = spawnSync('systemd-sysusers', [`--root=${root}`, path.join(UNITS, 'vublk.sysusers.conf')], { encoding: 'utf8' });
    expect(sysusers.status, sysusers.stderr).toBe(0);
    const passwd = readFileSync(path.join(root, 'etc/passwd'), 'utf8');
    const entry = passwd.split('\n').find((line) => line.startsWith('vublk:'));
    expect(entry).toMatch(/^vublk:x:\d+:\d+:[^:]*:\/var\/lib\/vublk:/);
    const uid = Number(entry!.split(':')[2]);
    const tmpfiles = spawnSync('systemd-tmpfiles', [`--root=${root}`, '--create', path.join(UNITS, 'vublk.tmpfiles.conf')], {
      encoding: 'utf8',
    });
    expect(tmpfiles.status, tmpfiles.stderr).toBe(0);
    const run = statSync(path.join(root, 'run/vublk'));
    expect(run.isDirectory()).toBe(true);
    expect(run.uid).toBe(uid);
    expect(run.mode & 0o777).toBe(0o755);
  });

  it('the units say what the daemon expects', () => {
    const service = readFileSync(path.join(UNITS, 'vublk@.service'), 'utf8');
    const socket = readFileSync(path.join(UNITS, 'vublk@.socket'), 'utf8');
    expect(service).toMatch(/^Type=notify$/m);
    expect(service).toMatch(/^NotifyAccess=main$/m);
    expect(service).toMatch(/^MemoryDenyWriteExecute=no$/m);
    expect(service).toMatch(/^ExecStart=\S+ serve --config \/etc\/vublk\/%i\.yaml$/m);
    // The socket path the .socket unit binds is the one a config's `socket:` must name for path matching.
    expect(socket).toMatch(/^ListenStream=\/run\/vublk\/%i\.sock$/m);
    expect(socket).toMatch(/^FileDescriptorName=%i$/m);
    expect(socket).toMatch(/^Service=vublk@%i\.service$/m);
    expect(socket).not.toMatch(/^Accept=yes$/m);
  });
});
