// The admin API is not open to every local user (issue 10 item 5). A real unprivileged user (created with
// useradd when missing) tries what used to work with default flags: POST /admin/... over TCP (also with a
// foreign Host header, the shape DNS rebinding needs), and connecting to the admin socket. Both are refused,
// while /metrics stays readable over TCP. With --admin-token-file, TCP admin needs the token and this
// listener's Host. Needs root (to create the user and switch to it); skipped otherwise.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, startDaemon, type DaemonProcess } from '../support/daemon-process.js';

const USER = 'vublk-test-nobody';
const isRoot = process.getuid?.() === 0;
const haveTools = spawnSync('curl', ['--version']).status === 0 && spawnSync('runuser', ['--help']).status === 0;
if (process.env['VUBLK_E2E_REQUIRED'] === '1' && (!isRoot || !haveTools))
  throw new Error('VUBLK_E2E_REQUIRED=1 but not root or curl/runuser missing');

function ensureUser(): void {
  if (spawnSync('id', ['-u', USER]).status === 0) return;
  const made = spawnSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', USER], { encoding: 'utf8' });
  if (made.status !== 0) throw new Error(`useradd ${USER} failed: ${made.stderr}`);
}

/** curl as the unprivileged user; returns the HTTP status ('000' when it could not connect) and curl's exit code. */
function curlAs(user: string | null, args: string[]): { http: string; exit: number | null } {
  const curl = ['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '10', ...args];
  const result =
    user === null
      ? spawnSync(curl[0]!, curl.slice(1), { encoding: 'utf8' })
      : spawnSync('runuser', ['-u', user, '--', ...curl], { encoding: 'utf8', timeout: 20_000 });
  return { http: result.stdout.trim(), exit: result.status };
}

async function boundPort(daemon: DaemonProcess): Promise<number> {
  const line = await daemon.waitForLog((l) => l.msg === 'metrics listening', 15_000);
  return Number(String(line['address']).split(':').pop());
}

const throttle = ['-X', 'POST', '-H', 'Content-Type: application/json', '-d', '{"iops":1}'];

describe.skipIf(!isRoot || !haveTools)('admin API access control with a real unprivileged user', () => {
  let daemon: DaemonProcess;
  let port: number;
  let adminSocket: string;

  beforeAll(async () => {
    ensureUser();
    daemon = await startDaemon({ args: ['--metrics-listen', '127.0.0.1:0'] });
    // Let the user reach the directory: only the sockets' own modes protect them.
    fs.chmodSync(daemon.dir, 0o755);
    port = await boundPort(daemon);
    adminSocket = path.join(daemon.dir, 'vublk.admin.sock');
    await daemon.waitForLog((l) => l.msg === 'admin API listening');
  });
  afterAll(async () => {
    await daemon?.stop();
  });

  it('creates the admin socket owner-only (0600)', () => {
    const stat = fs.statSync(adminSocket);
    expect(stat.isSocket()).toBe(true);
    expect(stat.mode & 0o777).toBe(0o600);
  });

  it('refuses POST /admin over TCP, also with a foreign Host header, and leaves the limits alone', () => {
    const url = `http://127.0.0.1:${port}/admin/disks/disk0/throttle`;
    expect(curlAs(USER, [...throttle, url]).http).toBe('403');
    expect(curlAs(USER, [...throttle, '-H', 'Host: attacker.example', url]).http).toBe('403');
    expect(
      curlAs(USER, [
        '-X',
        'POST',
        '-H',
        'Content-Type: application/json',
        '-d',
        '{"size":"1T"}',
        `http://127.0.0.1:${port}/admin/disks/disk0/resize`,
      ]).http,
    ).toBe('403');
    // Metrics and health stay readable on TCP.
    expect(curlAs(USER, [`http://127.0.0.1:${port}/metrics`]).http).toBe('200');
    expect(curlAs(USER, [`http://127.0.0.1:${port}/healthz`]).http).toBe('200');
    expect(daemon.logs().some((l) => l.msg === 'throttle limits changed')).toBe(false);
  });

  it('does not let the user connect to the admin socket, while its owner can use it', () => {
    const asUser = curlAs(USER, ['--unix-socket', adminSocket, 'http://localhost/admin/disks']);
    expect(asUser.http).toBe('000');
    expect(asUser.exit).toBe(7); // couldn't connect (EACCES)
    const asOwner = curlAs(null, ['--unix-socket', adminSocket, 'http://localhost/admin/disks']);
    expect(asOwner.http).toBe('200');
    const cli = spawnSync(process.execPath, [CLI, 'throttle', '--disk', 'disk0', '--iops', '900', '--admin-socket', adminSocket], {
      encoding: 'utf8',
      timeout: 20_000,
    });
    expect(cli.status).toBe(0);
    expect(JSON.parse(cli.stdout)).toMatchObject({ disk: 'disk0', throttle: { iops: 900 } });
  });
});

describe.skipIf(!isRoot || !haveTools)('admin API on TCP with a bearer token', () => {
  let daemon: DaemonProcess;
  let port: number;
  const token = 'test-token-0123456789abcdef';

  beforeAll(async () => {
    ensureUser();
    const tokenDir = fs.mkdtempSync('/tmp/vublk-token-');
    const tokenFile = path.join(tokenDir, 'admin.token');
    fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
    daemon = await startDaemon({ args: ['--metrics-listen', '127.0.0.1:0', '--admin-token-file', tokenFile, '--admin-socket', 'off'] });
    port = await boundPort(daemon);
  });
  afterAll(async () => {
    await daemon?.stop();
  });

  it('needs the token and a Host naming this listener', () => {
    const url = `http://127.0.0.1:${port}/admin/disks/disk0/throttle`;
    const auth = ['-H', `Authorization: Bearer ${token}`];
    expect(curlAs(USER, [...throttle, url]).http).toBe('401');
    expect(curlAs(USER, [...throttle, '-H', 'Authorization: Bearer wrong-token-0123456789', url]).http).toBe('401');
    expect(curlAs(USER, [...throttle, ...auth, '-H', 'Host: attacker.example', url]).http).toBe('403');
    expect(curlAs(USER, [...throttle, ...auth, url]).http).toBe('200');
    expect(curlAs(USER, [...throttle, ...auth, '-H', `Host: localhost:${port}`, url]).http).toBe('200');
    expect(fs.existsSync(path.join(daemon.dir, 'vublk.admin.sock'))).toBe(false);
  });
});
