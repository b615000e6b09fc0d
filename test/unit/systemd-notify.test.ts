// sd_notify: datagrams to $NOTIFY_SOCKET (path or @abstract), watchdog interval rules, failures never thrown.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SystemdNotifier, statusLine, watchdogPingMs } from '../../src/daemon/systemd-notify.js';
import { bindDatagram, receiveDatagram } from '../../src/sys/unix-datagram.js';
import { closeFd } from '../../src/sys/fd.js';
import { createLogger } from '../../src/log.js';

const log = createLogger('silent');
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

function receiver(address: string): number {
  const fd = bindDatagram(address);
  cleanups.push(() => closeFd(fd));
  return fd;
}

function notifier(env: Record<string, string>): SystemdNotifier {
  const n = SystemdNotifier.fromEnvironment(log, env, 1234);
  if (n === null) throw new Error('expected a notifier');
  cleanups.push(() => n.close());
  return n;
}

describe('SystemdNotifier', () => {
  it('is absent without NOTIFY_SOCKET or with an unusable one', () => {
    expect(SystemdNotifier.fromEnvironment(log, {}, 1)).toBeNull();
    expect(SystemdNotifier.fromEnvironment(log, { NOTIFY_SOCKET: '' }, 1)).toBeNull();
    expect(SystemdNotifier.fromEnvironment(log, { NOTIFY_SOCKET: 'relative/path' }, 1)).toBeNull();
    expect(SystemdNotifier.fromEnvironment(log, { NOTIFY_SOCKET: 'vsock:2:1234' }, 1)).toBeNull();
  });

  it('sends to a socket path', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-notify-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const socketPath = path.join(dir, 'notify.sock');
    const fd = receiver(socketPath);
    const n = notifier({ NOTIFY_SOCKET: socketPath });
    expect(n.status('starting\nnow')).toBe(true);
    expect(receiveDatagram(fd)?.toString()).toBe('STATUS=starting now');
  });

  it('sends to an abstract socket (@name)', () => {
    const name = `@vublk-test-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const fd = receiver(name);
    const n = notifier({ NOTIFY_SOCKET: name });
    expect(n.send('READY=1')).toBe(true);
    expect(receiveDatagram(fd)?.toString()).toBe('READY=1');
  });

  it('READY=1 with the status line, then STOPPING=1 once', () => {
    const name = `@vublk-test-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const fd = receiver(name);
    const n = notifier({ NOTIFY_SOCKET: name });
    const daemon = {
      disks: [
        { disk: { name: 'disk0' }, listener: { hasSession: true } },
        { disk: { name: 'disk1' }, listener: { hasSession: false } },
      ],
    };
    n.ready(daemon);
    expect(receiveDatagram(fd)?.toString()).toBe('READY=1\nSTATUS=serving 2 disks, 1 front-end connected: disk0 connected, disk1 waiting');
    n.stopping();
    n.stopping();
    expect(receiveDatagram(fd)?.toString()).toMatch(/^STOPPING=1\nSTATUS=stopping/);
    expect(receiveDatagram(fd)).toBeNull();
  });

  it('never throws when nobody listens; reports false', () => {
    const n = notifier({ NOTIFY_SOCKET: `@vublk-nobody-${process.pid}-${Math.random().toString(36).slice(2)}` });
    expect(n.send('READY=1')).toBe(false);
    expect(n.send('WATCHDOG=1')).toBe(false);
    expect(() => n.startupFailed(new Error('boom'))).not.toThrow();
  });
});

describe('watchdogPingMs', () => {
  it('is half of WATCHDOG_USEC, for this process only', () => {
    expect(watchdogPingMs({}, 7)).toBeNull();
    expect(watchdogPingMs({ WATCHDOG_USEC: '30000000' }, 7)).toBe(15_000);
    expect(watchdogPingMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '7' }, 7)).toBe(15_000);
    expect(watchdogPingMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '8' }, 7)).toBeNull();
    expect(watchdogPingMs({ WATCHDOG_USEC: '0' }, 7)).toBeNull();
    expect(watchdogPingMs({ WATCHDOG_USEC: 'soon' }, 7)).toBeNull();
  });
});

describe('statusLine', () => {
  it('summarises the disks', () => {
    expect(statusLine({ disks: [] })).toBe('no disks');
    expect(statusLine({ disks: [{ disk: { name: 'd' }, listener: { hasSession: false } }] })).toBe(
      'serving 1 disk, 0 front-ends connected: d waiting',
    );
  });
});
