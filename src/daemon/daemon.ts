/**
 * The running daemon: opens every disk, listens on every socket, owns the one worker pool that serves every
 * disk's rings, serves metrics (and the admin API) over HTTP, and shuts down cleanly on SIGTERM/SIGINT
 * (close sessions, stop the workers, sync images, remove the socket files it created, log `stopped`,
 * exit 0). A second signal exits at once, without waiting for anything. With a config file, SIGHUP re-reads
 * it and applies throttle limits live (reload.ts); without one, SIGHUP is logged and ignored.
 */
import fs from 'node:fs';
import os from 'node:os';
import { BlkDisk } from '../device/blk-disk.js';
import { VublkError } from '../errors.js';
import { checkDiskPaths } from './disk-paths.js';
import { adminOptionValues, isNetworkImage } from './disk-options.js';
import { openNetworkImage } from '../device/network-image.js';
import { ExportListener } from '../control/export-listener.js';
import { DiskQueues } from '../control/disk-queues.js';
import { WorkerPool } from '../control/worker-pool.js';
import { sys } from '../sys/libc.js';
import type { DiskSpec } from './disk-spec.js';
import { errorFields, flushLogSync, type Logger } from '../log.js';
import type { DiskLimits, ResolvedDiskLimits } from '../throttle/disk-throttle.js';
import { loadConfigFile, type ServeConfig } from './config-file.js';
import { planReload, type ReloadPlan } from './reload.js';
import { createMetricsRegistry, type DiskMetricsSource } from '../metrics/registry.js';
import { MetricsListenError, MetricsServer, type Readiness } from '../metrics/http-server.js';
import { AdminSocketServer, defaultAdminSocketPath, type AdminSocketOptions } from '../metrics/admin-socket.js';
import { AdminError, mergeThrottle, throttleJson, type AdminDiskInfo, type AdminTarget } from '../metrics/admin.js';
import { baseUrl, formatAddress, isLoopback, type MetricsAddress } from '../metrics/listen-address.js';

export interface RunningDisk {
  disk: BlkDisk;
  queues: DiskQueues;
  listener: ExportListener;
  spec: DiskSpec;
}

export interface DaemonMetricsOptions {
  address: MetricsAddress;
  /** Serve the admin API even though the address is reachable from other machines. */
  adminPublic?: boolean;
  /** The address is the built-in default: if it is taken, warn and run without metrics rather than fail. */
  optional?: boolean;
  /** A file holding the bearer token that opens the admin API on a TCP listener; without it TCP has no admin. */
  adminTokenFile?: string | undefined;
}

/** The admin socket: a path (with mode/owner/group), 'default' (next to the first disk's socket) or off. */
export type DaemonAdminSocket = AdminSocketOptions | 'default' | null;

export interface DaemonOptions {
  /** Where to serve /metrics, /healthz, /readyz and /admin; absent or null = no HTTP listener. */
  metrics?: DaemonMetricsOptions | null;
  /** The config file the disks came from; SIGHUP re-reads it. */
  config?: ServeConfig;
  /** Where the admin API listens (default: 'default'). */
  adminSocket?: DaemonAdminSocket;
  /** Worker threads serving every queue of every disk (default: the number of CPUs). */
  threads?: number | undefined;
}

type State = 'idle' | 'starting' | 'running' | 'stopping';

export class Daemon implements AdminTarget {
  readonly disks: RunningDisk[] = [];
  private stopping: Promise<void> | null = null;
  private state: State = 'idle';
  private metricsServer: MetricsServer | null = null;
  private adminSocket: AdminSocketServer | null = null;

  /** The admin socket's path, or null when there is none. */
  get adminSocketPath(): string | null {
    return this.adminSocket?.path ?? null;
  }
  readonly pool: WorkerPool;
  /** A SIGTERM/SIGINT that arrived while the daemon was starting, run when the start has finished. */
  private signalDuringStart: (() => void) | null = null;
  /** False when a worker thread did not stop at shutdown: the process must not wait for it at exit. */
  private workersStopped = true;

  constructor(
    private readonly log: Logger,
    private readonly options: DaemonOptions = {},
  ) {
    this.pool = new WorkerPool(options.threads ?? os.availableParallelism(), log);
  }

  /** The metrics listener's bound address (port 0 resolved), or null when there is none. */
  get metricsAddress(): MetricsAddress | null {
    return this.metricsServer?.address ?? null;
  }

  /** Ready once every disk listens; not ready again from the moment shutdown begins. */
  readiness(): Readiness {
    if (this.state === 'running') return { ready: true };
    return { ready: false, reason: this.state === 'stopping' ? 'shutting down' : 'starting' };
  }

  /** Opens and serves every disk; on any failure, what was already opened is closed again. */
  async start(specs: readonly DiskSpec[]): Promise<void> {
    this.state = 'starting';
    // Images this start creates: a failed start removes them again.
    const created: string[] = [];
    try {
      if (this.options.metrics) await this.startMetrics(this.options.metrics);
      for (const spec of specs) {
        const log = this.log.child({ disk: spec.options.name });
        const network = isNetworkImage(spec.options.imagePath)
          ? await openNetworkImage(spec.options).catch((error: unknown) => Promise.reject(diskError(spec, error)))
          : null;
        if (network === null) {
          checkDiskPaths(spec);
          if (!fs.existsSync(spec.options.imagePath)) created.push(spec.options.imagePath);
        }
        let disk: BlkDisk;
        try {
          disk = new BlkDisk(spec.options, log, network ?? undefined);
        } catch (error) {
          await network?.close().catch(() => undefined);
          throw error;
        }
        const queues = new DiskQueues(disk, this.pool, log);
        try {
          const listener = new ExportListener(queues, spec.listen, log);
          this.disks.push({ disk, queues, listener, spec });
        } catch (error) {
          queues.close();
          await disk.close();
          throw error;
        }
        if (network?.readOnly && !spec.options.readOnly)
          log.info({ image: network.location }, 'the server exports the image read-only: the disk is read-only');
        const nbdConnections = network?.backend.kind === 'nbd' ? network.backend.connections : undefined;
        if (nbdConnections === 1 && (spec.options.connections ?? 1) > 1)
          log.warn(
            { image: network!.location, connections: spec.options.connections },
            'the NBD server does not advertise multi-conn: the disk uses one connection, connections= is ignored',
          );
        log.info(
          {
            image: spec.options.imagePath,
            capacityBytes: disk.capacityBytes,
            numQueues: spec.options.numQueues,
            readOnly: disk.limits.readOnly,
            throttle: throttleJson(disk.throttle.limits),
            ...(network !== null ? { backend: network.kind, queuesPinned: network.pinQueues } : {}),
            ...(nbdConnections !== undefined ? { nbdConnections } : {}),
          },
          'disk ready',
        );
      }
      await this.startAdminSocket(specs);
      // The threads themselves start with the first front-end (DiskQueues.frontEndConnected): an idle
      // daemon keeps no V8 isolates (about 13 MiB each).
      this.log.info({ threads: this.pool.size, disks: this.disks.length }, 'worker pool ready');
      if (this.state === 'starting') this.state = 'running';
      const pending = this.signalDuringStart;
      this.signalDuringStart = null;
      pending?.();
    } catch (error) {
      // Not a shutdown: no `stopped` line; the caller reports the error once.
      this.state = 'stopping';
      await this.closeEverything();
      for (const image of created) fs.rmSync(image, { force: true });
      this.stopping = Promise.resolve();
      throw error;
    }
  }

  private async startAdminSocket(specs: readonly DiskSpec[]): Promise<void> {
    const setting = this.options.adminSocket === undefined ? 'default' : this.options.adminSocket;
    if (setting === null || specs.length === 0) return;
    let options: AdminSocketOptions;
    if (setting === 'default') {
      const first = specs[0]!;
      const file = defaultAdminSocketPath({
        socketPath: first.listen.kind === 'path' ? first.listen.path : null,
        diskName: first.options.name,
      });
      if (file === null) {
        this.log.warn('no admin socket: the first disk is socket-activated and $RUNTIME_DIRECTORY is unset (pass --admin-socket PATH)');
        return;
      }
      options = { path: file };
    } else {
      options = setting;
    }
    this.adminSocket = await AdminSocketServer.start(options, this, this.log);
    this.log.info({ socket: options.path, mode: `0${(options.mode ?? 0o600).toString(8)}` }, 'admin API listening');
  }

  private async startMetrics(options: DaemonMetricsOptions): Promise<void> {
    const { address } = options;
    const token = options.adminTokenFile === undefined ? undefined : readAdminToken(options.adminTokenFile);
    // A unix metrics socket is owner-only (0600): the admin API may stay there. TCP is reachable by every local
    // user (and a browser tricked by DNS rebinding): admin only with a token, and off-host only with --admin-public.
    const adminAllowed = address.kind === 'unix' || (token !== undefined && (isLoopback(address) || options.adminPublic === true));
    const refusal =
      token === undefined
        ? `the admin API is not served on TCP (${formatAddress(address)}) without --admin-token-file; use the admin socket (vublk throttle/resize/disks do by default)`
        : `the admin API is off: ${formatAddress(address)} is not a loopback address (start vublk with --admin-public to allow it)`;
    const hosts = new Set<string>();
    const adminAuth = token !== undefined && address.kind === 'tcp' ? { token, hosts } : undefined;
    const registry = createMetricsRegistry(() => this.disks.map(metricsSource));
    try {
      this.metricsServer = await MetricsServer.start(
        address,
        { registry, readiness: () => this.readiness(), admin: adminAllowed ? this : null, adminRefusal: refusal, adminAuth },
        this.log,
      );
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (options.optional === true && code === 'EADDRINUSE') {
        this.log.warn(
          { address: formatAddress(address) },
          'metrics listener not started: the default address is in use (pass --metrics-listen to choose another)',
        );
        return;
      }
      throw new MetricsListenError(`metrics listener ${formatAddress(address)}: ${(error as Error).message}`, { cause: error });
    }
    const bound = this.metricsServer.address;
    if (bound.kind === 'tcp') for (const host of acceptedHosts(bound)) hosts.add(host);
    if (!adminAllowed && token !== undefined) this.log.warn({ address: formatAddress(bound) }, refusal);
    this.log.info({ address: formatAddress(bound), url: `${baseUrl(bound)}/metrics`, admin: adminAllowed }, 'metrics listening');
  }

  /**
   * `onStopped` runs after a clean shutdown. A second signal, or a worker thread that would not stop, ends
   * the process with _exit: process.exit joins every worker thread, and one blocked in a system call would
   * hold the process forever.
   */
  installSignalHandlers(onStopped: (code: number) => void): void {
    const handler = (signal: NodeJS.Signals): void => {
      if (this.state === 'idle' || this.state === 'starting') {
        // Installed before start (a signal then must neither kill the process half-started nor race start's
        // own set-up): the shutdown runs as soon as start has finished.
        this.log.info({ signal }, 'shutting down once the start has finished');
        this.signalDuringStart = () => handler(signal);
        return;
      }
      if (this.stopping !== null) {
        this.log.warn({ signal }, 'second signal: exiting immediately');
        exitNow(this.log, 1);
        return;
      }
      this.log.info({ signal }, 'shutting down');
      const done = (code: number): void => (this.workersStopped ? onStopped(code) : exitNow(this.log, code === 0 ? 1 : code));
      this.stop().then(
        () => done(0),
        (error: unknown) => {
          this.log.error(errorFields(error), 'shutdown failed');
          done(1);
        },
      );
    };
    process.on('SIGTERM', handler);
    process.on('SIGINT', handler);
    // SIGHUP's default action kills the process: always handle it (reload() says when there is nothing to do).
    process.on('SIGHUP', () => this.reload());
  }

  /**
   * Re-reads the config file: throttle limits are applied live, other changes are logged as needing a
   * restart. An invalid file changes nothing. Returns the plan applied, or null when nothing was applied.
   */
  reload(): ReloadPlan | null {
    const config = this.options.config;
    if (config === undefined) {
      this.log.warn('SIGHUP: nothing to reload (vublk was not started with --config); still serving');
      return null;
    }
    if (this.state !== 'running') {
      this.log.warn({ state: this.state }, 'reload ignored: the daemon is not running');
      return null;
    }
    let plan: ReloadPlan;
    try {
      const next = loadConfigFile(config.file, config.diskDefaults);
      // Baseline: the disks as the file described them at start (before socket activation swapped
      // a socket path for an inherited fd), so only real edits of the file are reported.
      const running = this.disks.map(({ spec, disk }) => ({
        spec: config.disks.find((s) => s.options.name === disk.name) ?? spec,
        limits: disk.throttle.limits,
      }));
      plan = planReload(running, config, next);
    } catch (error) {
      this.log.error({ file: config.file, ...errorFields(error) }, 'config reload failed: keeping the running configuration');
      return null;
    }
    for (const change of plan.throttle) {
      const running = this.disks.find(({ disk }) => disk.name === change.disk);
      running?.disk.throttle.setLimits(change.limits);
      this.log.info(
        { disk: change.disk, from: throttleJson(change.from), to: throttleJson(change.to), source: 'config' },
        'throttle limits changed',
      );
    }
    for (const change of plan.restart) {
      this.log.warn(
        { ...(change.disk !== undefined ? { disk: change.disk } : {}), change: change.change, keys: change.keys },
        'config change requires restart: not applied',
      );
    }
    this.log.info({ file: config.file, throttleChanged: plan.throttle.length, restartRequired: plan.restart.length }, 'config reloaded');
    return plan;
  }

  // --- AdminTarget ---------------------------------------------------------------------------------

  listDisks(): AdminDiskInfo[] {
    return this.disks.map(({ disk, listener, spec }) => ({
      ...adminOptionValues(spec.fields),
      socket: spec.listen.kind === 'path' ? spec.listen.path : `fd:${spec.listen.fd}`,
      'capacity-bytes': disk.capacityBytes,
      connected: listener.hasSession,
      connections: listener.connections,
      throttle: throttleJson(disk.throttle.limits),
      ...lockOwnerField(disk.lockOwner()),
    }));
  }

  setThrottle(name: string, change: DiskLimits): ResolvedDiskLimits {
    const running = this.disks.find(({ disk }) => disk.name === name);
    if (running === undefined)
      throw new AdminError(404, `no disk named '${name}' (disks: ${this.disks.map(({ disk }) => disk.name).join(', ')})`);
    const { throttle } = running.disk;
    const from = throttle.limits;
    const next = mergeThrottle(from, change);
    try {
      throttle.setLimits(next);
    } catch (error) {
      throw new AdminError(400, (error as Error).message);
    }
    this.log.info({ disk: name, from: throttleJson(from), to: throttleJson(throttle.limits), source: 'admin' }, 'throttle limits changed');
    return throttle.limits;
  }

  async resize(name: string, sizeBytes: number): Promise<number> {
    const running = this.disks.find(({ disk }) => disk.name === name);
    if (running === undefined)
      throw new AdminError(404, `no disk named '${name}' (disks: ${this.disks.map(({ disk }) => disk.name).join(', ')})`);
    try {
      await running.queues.resize(sizeBytes);
    } catch (error) {
      // The admin client asked for something the disk refuses (shrink, misaligned, read-only): a 400.
      if (error instanceof VublkError && error.peerFault) throw new AdminError(400, error.message);
      throw error;
    }
    return running.disk.capacityBytes;
  }

  stop(): Promise<void> {
    this.state = 'stopping';
    this.stopping ??= (async () => {
      // Nothing else may keep the event loop alive here (no metrics listener, idle workers are unref'd):
      // without this the process would end mid-shutdown, before the images are synced.
      const keepAlive = setInterval(() => undefined, 60_000);
      try {
        await this.closeEverything();
        this.log.info('stopped');
      } finally {
        clearInterval(keepAlive);
      }
    })();
    return this.stopping;
  }

  /** Everything stop() closes, without its log line: a failed start is not a shutdown. */
  private async closeEverything(): Promise<void> {
    await Promise.all(this.disks.map(({ listener }) => listener.close()));
    this.workersStopped = await this.pool.close();
    for (const { disk, queues } of this.disks) {
      queues.close();
      try {
        await disk.close();
      } catch (error) {
        this.log.error({ disk: disk.name, ...errorFields(error) }, 'closing the image failed');
      }
    }
    if (this.metricsServer !== null) await this.metricsServer.close();
    if (this.adminSocket !== null) await this.adminSocket.close();
  }
}

/** Reads the admin bearer token; the file must not be readable by other users. */
function readAdminToken(file: string): string {
  const stat = fs.statSync(file);
  if ((stat.mode & 0o004) !== 0) throw new AdminTokenError(`admin token file ${file} is readable by every user (chmod 0600 or 0640 it)`);
  const token = fs.readFileSync(file, 'utf8').trim();
  if (token.length < 16) throw new AdminTokenError(`admin token file ${file} holds fewer than 16 characters`);
  if (/\s/.test(token)) throw new AdminTokenError(`admin token file ${file} must hold one token without spaces`);
  return token;
}

/** Host header values naming the listener: its address, and for loopback also localhost and 127.0.0.1/[::1]. */
function acceptedHosts(bound: { host: string; port: number }): string[] {
  const port = bound.port;
  const name = (host: string): string => (host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`).toLowerCase();
  const hosts = [name(bound.host)];
  if (isLoopback({ kind: 'tcp', host: bound.host, port })) hosts.push(name('localhost'), name('127.0.0.1'), name('::1'));
  return hosts;
}

/** Writes out buffered log lines, then ends the process without joining worker threads. */
function exitNow(log: Logger, code: number): never {
  flushLogSync(log);
  sys.exitNow(code);
  throw new Error('unreachable: _exit returned');
}

/** `lock-owner` in GET /admin/disks, for disks whose image has an exclusive lock (RBD). */
function lockOwnerField(owner: boolean | null): { 'lock-owner'?: boolean } {
  return owner === null ? {} : { 'lock-owner': owner };
}

function metricsSource({ disk, listener }: RunningDisk): DiskMetricsSource {
  return {
    name: disk.name,
    capacityBytes: disk.capacityBytes,
    counters: disk.counters,
    throttleLimits: disk.throttle.limits,
    connected: listener.hasSession,
    connections: listener.connections,
    lockOwner: () => disk.lockOwner(),
  };
}

/** The admin token file is unusable: the operator's configuration, refused at start. */
class AdminTokenError extends VublkError {
  constructor(detail: string) {
    super('VUBLK_ERR_ADMIN_TOKEN', detail, { fatal: true });
  }
}

/** A network image that cannot be opened: the disk is named, the cause kept (its code says which check failed). */
function diskError(spec: DiskSpec, error: unknown): unknown {
  if (!(error instanceof VublkError)) return error;
  return new VublkError(error.code, `disk ${spec.options.name}: ${error.message}`, {
    peerFault: error.peerFault,
    fatal: true,
    cause: error,
  });
}
