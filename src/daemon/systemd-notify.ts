/**
 * sd_notify(3) without libsystemd: state lines (`READY=1`, `STATUS=...`, `STOPPING=1`, `WATCHDOG=1`) sent as
 * datagrams to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or `@name` for an abstract socket).
 * Node's dgram module only speaks UDP, so the socket is a raw libc one (src/sys/unix-datagram.ts).
 *
 * Notification is best effort: a failure is logged as a warning and never stops the daemon (systemd
 * notices a missing READY=1 or WATCHDOG=1 by itself, through its timeouts).
 */
import { closeFd } from '../sys/fd.js';
import { encodeUnixAddress, type EncodedUnixAddress } from '../sys/unix-address.js';
import { openDatagramSocket, sendDatagram } from '../sys/unix-datagram.js';
import { errorFields, type Logger } from '../log.js';

export type NotifyEnvironment = Readonly<Record<string, string | undefined>>;

/** How often the status line is recomputed (it is only sent when it changed). */
const STATUS_REFRESH_MS = 5_000;

/** The parts of the daemon the notifier reads for its STATUS line. */
export interface NotifiableDaemon {
  readonly disks: readonly { readonly disk: { readonly name: string }; readonly listener: { readonly hasSession: boolean } }[];
}

/**
 * The watchdog ping interval in ms (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or null when
 * no watchdog is asked for, or it is meant for another process ($WATCHDOG_PID set and not ours).
 */
export function watchdogPingMs(env: NotifyEnvironment, pid: number): number | null {
  const usecText = env['WATCHDOG_USEC'];
  if (usecText === undefined || usecText === '') return null;
  if (!/^\d+$/.test(usecText) || Number(usecText) === 0) return null;
  const pidText = env['WATCHDOG_PID'];
  if (pidText !== undefined && pidText !== '' && pidText !== String(pid)) return null;
  return Math.max(1, Math.floor(Number(usecText) / 2 / 1000));
}

/** One line of text for STATUS=: newlines would start a new assignment, so they become spaces. */
function oneLine(text: string): string {
  return text.replace(/[\r\n]+/g, ' ');
}

/** `disk0 connected, disk1 waiting for a front-end` */
export function statusLine(daemon: NotifiableDaemon): string {
  const disks = daemon.disks;
  if (disks.length === 0) return 'no disks';
  const connected = disks.filter((d) => d.listener.hasSession).length;
  const parts = disks.map(({ disk, listener }) => `${disk.name} ${listener.hasSession ? 'connected' : 'waiting'}`);
  return `serving ${disks.length} disk${disks.length === 1 ? '' : 's'}, ${connected} front-end${connected === 1 ? '' : 's'} connected: ${parts.join(', ')}`;
}

export class SystemdNotifier {
  private fd = -1;
  private failing = false;
  private watchdog: NodeJS.Timeout | null = null;
  private statusRefresh: NodeJS.Timeout | null = null;
  private lastStatus = '';
  private stoppingSent = false;
  private readonly signalHandler = (): void => this.stopping();

  private constructor(
    private readonly socketName: string,
    private readonly address: EncodedUnixAddress,
    private readonly log: Logger,
    private readonly watchdogMs: number | null,
  ) {}

  /**
   * A notifier for $NOTIFY_SOCKET, or null when it is unset (not started by systemd with Type=notify) or
   * unusable (logged as a warning).
   */
  static fromEnvironment(log: Logger, env: NotifyEnvironment = process.env, pid: number = process.pid): SystemdNotifier | null {
    const socket = env['NOTIFY_SOCKET'];
    if (socket === undefined || socket === '') return null;
    if (!socket.startsWith('/') && !socket.startsWith('@')) {
      log.warn({ notifySocket: socket }, 'NOTIFY_SOCKET is neither an absolute path nor an @abstract name; not notifying systemd');
      return null;
    }
    let address: EncodedUnixAddress;
    try {
      address = encodeUnixAddress(socket);
    } catch (error) {
      log.warn({ ...errorFields(error), notifySocket: socket }, 'NOTIFY_SOCKET is unusable; not notifying systemd');
      return null;
    }
    const watchdogMs = watchdogPingMs(env, pid);
    const notifier = new SystemdNotifier(socket, address, log, watchdogMs);
    log.debug({ notifySocket: socket, watchdogPingMs: watchdogMs }, 'notifying systemd');
    return notifier;
  }

  get watchdogIntervalMs(): number | null {
    return this.watchdogMs;
  }

  /** Sends newline-separated assignments; true if delivered. Never throws. */
  send(state: string): boolean {
    try {
      if (this.fd < 0) this.fd = openDatagramSocket();
      sendDatagram(this.fd, this.address, Buffer.from(state, 'utf8'), `NOTIFY_SOCKET=${this.socketName}`);
      if (this.failing) this.log.info('systemd notification works again');
      this.failing = false;
      return true;
    } catch (error) {
      const first = state.split('\n', 1)[0];
      // Warn once per run of failures: a broken socket must not flood the log with watchdog pings.
      if (!this.failing) this.log.warn({ ...errorFields(error), notifySocket: this.socketName, state: first }, 'could not notify systemd');
      else this.log.debug({ ...errorFields(error), state: first }, 'could not notify systemd');
      this.failing = true;
      return false;
    }
  }

  status(text: string): boolean {
    this.lastStatus = oneLine(text);
    return this.send(`STATUS=${this.lastStatus}`);
  }

  /**
   * Every disk is listening: READY=1 with a status line; then the watchdog pings start, the status line is
   * kept current, and SIGTERM/SIGINT send STOPPING=1 (the daemon's own handlers do the shutdown).
   */
  ready(daemon: NotifiableDaemon): void {
    this.lastStatus = oneLine(statusLine(daemon));
    if (this.send(`READY=1\nSTATUS=${this.lastStatus}`)) {
      this.log.info({ notifySocket: this.socketName, watchdogPingMs: this.watchdogMs }, 'notified systemd: ready');
    }
    if (this.watchdogMs !== null) {
      this.watchdog = setInterval(() => this.send('WATCHDOG=1'), this.watchdogMs);
      this.watchdog.unref();
    }
    this.statusRefresh = setInterval(() => {
      if (this.stoppingSent) return;
      const line = oneLine(statusLine(daemon));
      if (line !== this.lastStatus) this.status(line);
    }, STATUS_REFRESH_MS);
    this.statusRefresh.unref();
    process.on('SIGTERM', this.signalHandler);
    process.on('SIGINT', this.signalHandler);
  }

  /** STOPPING=1 (once). The watchdog keeps pinging while the daemon shuts down: a hung shutdown is still caught. */
  stopping(): void {
    if (this.stoppingSent) return;
    this.stoppingSent = true;
    this.lastStatus = 'stopping: closing sessions and syncing images';
    this.send(`STOPPING=1\nSTATUS=${this.lastStatus}`);
  }

  /** Startup failed: tell systemd why (it also sees the exit status). */
  startupFailed(error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    const errno = (error as { errno?: unknown } | null)?.errno;
    this.send(`STATUS=${oneLine(`startup failed: ${message}`)}${typeof errno === 'number' && errno > 0 ? `\nERRNO=${errno}` : ''}`);
  }

  close(): void {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    if (this.statusRefresh !== null) clearInterval(this.statusRefresh);
    this.watchdog = this.statusRefresh = null;
    process.off('SIGTERM', this.signalHandler);
    process.off('SIGINT', this.signalHandler);
    closeFd(this.fd);
    this.fd = -1;
  }
}
