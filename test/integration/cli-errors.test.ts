// The CLI refuses bad input with a clear message and a non-zero exit, before touching anything.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, startDaemon } from '../support/daemon-process.js';
import { listenUnix } from '../../src/sys/unix-socket.js';
import { closeFd } from '../../src/sys/fd.js';

const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function serve(...args: string[]): { status: number | null; stderr: string; stdout: string } {
  const result = spawnSync(process.execPath, [CLI, 'serve', ...args], { encoding: 'utf8', timeout: 15_000, cwd: dir });
  return { status: result.status, stderr: result.stderr, stdout: result.stdout };
}

/** The daemon's JSON log lines (stdout is not a terminal, so the log is JSON). */
function logLines(stdout: string): { msg: string; [field: string]: unknown }[] {
  return stdout
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as { msg: string });
}

describe('vublk serve refuses bad input', () => {
  it('names a missing image and how to create it', () => {
    const { status, stderr } = serve('--socket', path.join(dir, 'a.sock'), '--image', path.join(dir, 'missing.img'));
    expect(status).toBe(1);
    expect(stderr).toMatch(/missing\.img does not exist \(pass --size to create it\)/);
    expect(existsSync(path.join(dir, 'a.sock'))).toBe(false);
  });

  for (const [size, message] of [
    ['12X', /invalid size/],
    ['-5', /negative/],
    ['1000', /multiple of 512/],
    ['0', /multiple of 512/],
  ] as const) {
    it(`rejects --size ${size}`, () => {
      const { status, stderr } = serve('--socket', path.join(dir, 'b.sock'), '--image', path.join(dir, 'b.img'), '--size', size);
      expect(status).toBe(2);
      expect(stderr).toMatch(message);
      expect(existsSync(path.join(dir, 'b.img'))).toBe(false);
    });
  }

  it('rejects bad queue counts and sizes', () => {
    expect(serve('--image', 'x', '--socket', 's', '--num-queues', '0').stderr).toMatch(
      /^vublk: --num-queues: must be between 1 and 64, got 0\n$/,
    );
    expect(serve('--image', 'x', '--socket', 's', '--queue-size', '100').stderr).toMatch(/--queue-size: must be a power of two/);
    expect(serve('--image', 'x', '--socket', 's', '--logical-block-size', '1024').stderr).toMatch(/512 or 4096/);
  });

  it('rejects a bad socket mode and an unknown socket owner', () => {
    expect(serve('--image', 'x', '--socket', 's', '--socket-mode', '999').stderr).toMatch(/--socket-mode: must be octal/);
    expect(serve('--image', 'x', '--socket', 's', '--socket-owner', 'no-such-user-here').stderr).toMatch(
      /no user named 'no-such-user-here'/,
    );
  });

  it('rejects malformed --disk specifications', () => {
    expect(serve('--disk', 'image=x,sockett=y').stderr).toMatch(/unknown key 'sockett'/);
    expect(serve('--disk', 'image=x').stderr).toMatch(/socket path .* is required/);
    expect(serve('--disk', 'image=x,socket=a', '--disk', 'image=y,socket=a').stderr).toMatch(/two disks/);
  });

  it('refuses a socket path that a live process listens on', async () => {
    const socketPath = path.join(dir, 'live.sock');
    const fd = listenUnix(socketPath);
    try {
      writeFileSync(path.join(dir, 'live.img'), Buffer.alloc(1 << 20));
      const { status, stderr } = serve('--socket', socketPath, '--image', path.join(dir, 'live.img'));
      expect(status).toBe(1);
      expect(stderr).toMatch(/is in use by a running process/);
    } finally {
      closeFd(fd);
    }
  });

  it('refuses to replace a path that is not a socket', () => {
    const notSocket = path.join(dir, 'file.sock');
    writeFileSync(notSocket, 'precious');
    writeFileSync(path.join(dir, 'f.img'), Buffer.alloc(1 << 20));
    const { status, stderr } = serve('--socket', notSocket, '--image', path.join(dir, 'f.img'));
    expect(status).toBe(1);
    expect(stderr).toMatch(/exists and is not a socket/);
  });

  it('creates the socket 0600 by default, or with the mode, owner and group asked for', async () => {
    const plain = await startDaemon();
    try {
      expect(statSync(plain.socketPath).mode & 0o777).toBe(0o600);
    } finally {
      await plain.stop();
    }
    const shared = await startDaemon({ args: ['--socket-mode', '0660', '--socket-owner', 'root', '--socket-group', 'root'] });
    try {
      const stat = statSync(shared.socketPath);
      expect(stat.mode & 0o777).toBe(0o660);
      expect([stat.uid, stat.gid]).toEqual([0, 0]);
    } finally {
      await shared.stop();
    }
  });

  it('replaces a stale socket file left by a dead daemon', async () => {
    const socketPath = path.join(dir, 'stale.sock');
    closeFd(listenUnix(socketPath)); // bound, then closed: the file stays, nobody listens
    expect(existsSync(socketPath)).toBe(true);
    const daemon = await startDaemon({
      rawArgs: ['serve', '--socket', socketPath, '--image', path.join(dir, 'stale.img'), '--size', '1M'],
      waitForSocket: false,
    });
    try {
      await daemon.waitForLog((l) => l.msg === 'listening for a vhost-user front-end');
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
    expect(existsSync(socketPath)).toBe(false);
  });

  it('exits 2 for every usage error, an unknown flag included', () => {
    const unknown = serve('--imagee', 'x');
    expect(unknown.status).toBe(2);
    expect(unknown.stderr).toMatch(/unknown option '--imagee'/);
    expect(serve('--image').status).toBe(2);
    expect(serve('--log-level', 'loud').status).toBe(2);
    expect(serve('--image', 'x', '--socket', 's', '--num-queues', '0').status).toBe(2);
    expect(serve('--disk', 'image=x,socket=y', '--image', 'z').status).toBe(2);
  });

  it('names the disk, the path and the fix when the image folder is missing, once, without a stopped line', () => {
    const image = path.join(dir, 'no-such-folder', 'disk.img');
    const { status, stderr, stdout } = serve('--socket', path.join(dir, 'm.sock'), '--image', image, '--size', '1M');
    expect(status).toBe(1);
    expect(stderr).toBe(
      `vublk: disk disk0: the folder of the image ${image} does not exist: create ${path.dirname(image)} (mkdir -p) or give an image path in an existing folder\n`,
    );
    const logs = logLines(stdout);
    expect(logs.filter((l) => l.msg === 'startup failed')).toHaveLength(1);
    expect(logs.find((l) => l.msg === 'startup failed')).toMatchObject({ code: 'VUBLK_ERR_DISK_PATH', peerFault: true });
    expect(logs.some((l) => l.msg === 'stopped')).toBe(false);
    expect(existsSync(path.join(dir, 'm.sock'))).toBe(false);
  });

  it('removes the image a failed start created (socket folder missing)', () => {
    const image = path.join(dir, 'fresh.img');
    const socketPath = path.join(dir, 'no-such-run-dir', 'v.sock');
    const { status, stderr } = serve('--socket', socketPath, '--image', image, '--size', '1M');
    expect(status).toBe(1);
    expect(stderr).toMatch(/^vublk: disk disk0: the folder of the socket .*v\.sock does not exist: create .*no-such-run-dir/);
    expect(existsSync(image)).toBe(false);
  });

  it('removes the image a failed start created (a later disk fails), and keeps images that existed', () => {
    writeFileSync(path.join(dir, 'kept.img'), Buffer.alloc(1 << 20));
    const blocker = path.join(dir, 'blocker.sock');
    writeFileSync(blocker, 'not a socket');
    const { status, stderr } = serve(
      '--disk',
      `image=${path.join(dir, 'new1.img')},socket=${path.join(dir, 'n1.sock')},size=1M`,
      '--disk',
      `image=${path.join(dir, 'kept.img')},socket=${blocker}`,
    );
    expect(status).toBe(1);
    expect(stderr).toMatch(/exists and is not a socket/);
    expect(existsSync(path.join(dir, 'new1.img'))).toBe(false);
    expect(existsSync(path.join(dir, 'kept.img'))).toBe(true);
    expect(existsSync(path.join(dir, 'n1.sock'))).toBe(false);
  });
});

describe('signals', () => {
  it('SIGTERM while the daemon is still starting: it finishes starting, then shuts down cleanly (exit 0, socket removed)', async () => {
    // A port of its own: on the default one, another daemon of a parallel test may be listening already.
    const daemon = await startDaemon({ waitForSocket: false, args: ['--metrics-listen', '127.0.0.1:0'] });
    try {
      // The metrics listener comes up before the disks: the signal lands in the middle of the start.
      await daemon.waitForLog((l) => l.msg === 'metrics listening');
      const exited = new Promise<number | null>((resolve) => daemon.child.once('exit', (code) => resolve(code)));
      daemon.child.kill('SIGTERM');
      const code = await Promise.race([exited, new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), 30_000))]);
      expect(code).toBe(0);
      expect(existsSync(daemon.socketPath)).toBe(false);
    } finally {
      await daemon.stop();
    }
  }, 60_000);

  it('SIGHUP without --config logs that there is nothing to reload and keeps serving', async () => {
    const daemon = await startDaemon();
    try {
      daemon.child.kill('SIGHUP');
      const line = await daemon.waitForLog((l) => /nothing to reload/.test(l.msg));
      expect(line.level).toBe(40);
      expect(daemon.running()).toBe(true);
      expect(existsSync(daemon.socketPath)).toBe(true);
      // Still a normal daemon: SIGTERM stops it with exit 0 (a generous deadline: the machine may be loaded).
      const exited = new Promise<number | null>((resolve) => daemon.child.once('exit', (code) => resolve(code)));
      daemon.child.kill('SIGTERM');
      const code = await Promise.race([exited, new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), 30_000))]);
      expect(code).toBe(0);
    } finally {
      await daemon.stop();
    }
  }, 60_000);
});
