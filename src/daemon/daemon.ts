/**
 * The running daemon: opens every disk, listens on every socket, serves metrics (and the admin API) over
 * HTTP, and shuts down cleanly on SIGTERM/SIGINT (close sessions, stop workers, sync images, remove the
 * socket files it created, exit 0). A second signal exits at once. With a config file, SIGHUP re-reads it
 * and applies throttle limits live (reload.ts).
 */
import fs from 'node:fs';
import { BlkDisk, DiskSetupError } from '../device/blk-disk.js';
import { ExportListener } from '../control/export-listener.js';
import type { DiskSpec } from './disk-spec.js';
import { errorFields, type Logger } from '../log.js';
import type { DiskLimits, ResolvedDiskLimits } from '../throttle/disk-throttle.js';
import { loadConfigFile, type ServeConfig } from './config-file.js';
import { planReload, type ReloadPlan } from './reload.js';
import { createMetricsRegistry, type DiskMetricsSource } from '../metrics/registry.js';
import { MetricsServer, type Readiness } from '../metrics/http-server.js';
import { AdminSocketServer, defaultAdminSocketPath, type AdminSocketOptions } from '../metrics/admin-socket.js';
import { AdminError, mergeThrottle, throttleJson, type AdminDiskInfo, type AdminTarget } from '../metrics/admin.js';
import { baseUrl, formatAddress, isLoopback, type MetricsAddress } from '../metrics/listen-address.js';

export interface RunningDisk {
  disk: BlkDisk;
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

  constructor(
    private readonly log: Logger,
    private readonly options: DaemonOptions = {},
  ) {}

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
    try {
      if (this.options.metrics) await this.startMetrics(this.options.metrics);
      for (const spec of specs) {
        const log = this.log.child({ disk: spec.options.name });
        const disk = new BlkDisk(spec.options, log);
        try {
          const listener = new ExportListener(disk, spec.listen, log);
          this.disks.push({ disk, listener, spec });
        } catch (error) {
          await disk.close();
          throw error;
        }
        log.info(
          { image: spec.options.imagePath, capacityBytes: disk.capacityBytes, numQueues: spec.options.numQueues, readOnly: spec.options.readOnly, throttle: throttleJson(disk.throttle.limits) },
          'disk ready',
        );
      }
      await this.startAdminSocket(specs);
      if (this.state === 'starting') this.state = 'running';
    } catch (error) {
      await this.stop();
      throw error;
    }
  }

  private async startAdminSocket(specs: readonly DiskSpec[]): Promise<void> {
    const setting = this.options.adminSocket === undefined ? 'default' : this.options.adminSocket;
    if (setting === null || specs.length === 0) return;
    let options: AdminSocketOptions;
    if (setting === 'default') {
      const first = specs[0]!;
      const file = defaultAdminSocketPath({ socketPath: first.listen.kind === 'path' ? first.listen.path : null, diskName: first.options.name });
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
        this.log.warn({ address: formatAddress(address) }, 'metrics listener not started: the default address is in use (pass --metrics-listen to choose another)');
        return;
      }
      throw new Error(`metrics listener ${formatAddress(address)}: ${(error as Error).message}`);
    }
    const bound = this.metricsServer.address;
    if (bound.kind === 'tcp') for (const host of acceptedHosts(bound)) hosts.add(host);
    if (!adminAllowed && token !== undefined) this.log.warn({ address: formatAddress(bound) }, refusal);
    this.log.info({ address: formatAddress(bound), url: `${baseUrl(bound)}/metrics`, admin: adminAllowed }, 'metrics listening');
  }

  installSignalHandlers(onStopped: (code: number) => void): void {
    const handler = (signal: NodeJS.Signals): void => {
      if (this.stopping !== null) {
        this.log.warn({ signal }, 'second signal: exiting immediately');
        onStopped(1);
        return;
      }
      this.log.info({ signal }, 'shutting down');
      this.stop().then(
        () => onStopped(0),
        (error: unknown) => {
          this.log.error(errorFields(error), 'shutdown failed');
          onStopped(1);
        },
      );
    };
    process.on('SIGTERM', handler);
    process.on('SIGINT', handler);
    if (this.options.config !== undefined) process.on('SIGHUP', () => this.reload());
  }

  /**
   * Re-reads the config file: throttle limits are applied live, other changes are logged as needing a
   * restart. An invalid file changes nothing. Returns the plan applied, or null when nothing was applied.
   */
  reload(): ReloadPlan | null {
    const config = this.options.config;
    if (config === undefined) {
      this.log.warn('reload ignored: vublk was not started with --config');
      return null;
    }
    if (this.state !== 'running') {
      this.log.warn({ state: this.state }, 'reload ignored: the daemon is not running');
      return null;
    }
    let plan: ReloadPlan;
    try {
      const next = loadConfigFile(config.file);
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
      this.log.info({ disk: change.disk, from: throttleJson(change.from), to: throttleJson(change.to), source: 'config' }, 'throttle limits changed');
    }
    for (const change of plan.restart) {
      this.log.warn({ ...(change.disk !== undefined ? { disk: change.disk } : {}), change: change.change, keys: change.keys }, 'config change requires restart: not applied');
    }
    this.log.info({ file: config.file, throttleChanged: plan.throttle.length, restartRequired: plan.restart.length }, 'config reloaded');
    return plan;
  }

  // --- AdminTarget ---------------------------------------------------------------------------------

  listDisks(): AdminDiskInfo[] {
    return this.disks.map(({ disk, listener, spec }) => ({
      name: disk.name,
      image: disk.options.imagePath,
      socket: spec.listen.kind === 'path' ? spec.listen.path : `fd:${spec.listen.fd}`,
      'capacity-bytes': disk.capacityBytes,
      'num-queues': disk.options.numQueues,
      'queue-size': disk.options.queueSize,
      'read-only': disk.options.readOnly,
      'logical-block-size': disk.options.logicalBlockSize,
      connected: listener.hasSession,
      connections: listener.connections,
      throttle: throttleJson(disk.throttle.limits),
    }));
  }

  setThrottle(name: string, change: DiskLimits): ResolvedDiskLimits {
    const running = this.disks.find(({ disk }) => disk.name === name);
    if (running === undefined) throw new AdminError(404, `no disk named '${name}' (disks: ${this.disks.map(({ disk }) => disk.name).join(', ')})`);
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
    if (running === undefined) throw new AdminError(404, `no disk named '${name}' (disks: ${this.disks.map(({ disk }) => disk.name).join(', ')})`);
    try {
      await running.disk.resize(sizeBytes);
    } catch (error) {
      if (error instanceof DiskSetupError) throw new AdminError(400, error.message);
      throw error;
    }
    return running.disk.capacityBytes;
  }

  stop(): Promise<void> {
    this.state = 'stopping';
    this.stopping ??= (async () => {
      for (const { listener } of this.disks) await listener.close();
      for (const { disk } of this.disks) await disk.close();
      if (this.metricsServer !== null) await this.metricsServer.close();
      if (this.adminSocket !== null) await this.adminSocket.close();
      this.log.info('stopped');
    })();
    return this.stopping;
  }
}

/** Reads the admin bearer token; the file must not be readable by other users. */
function readAdminToken(file: string): string {
  const stat = fs.statSync(file);
  if ((stat.mode & 0o004) !== 0) throw new Error(`admin token file ${file} is readable by every user (chmod 0600 or 0640 it)`);
  const token = fs.readFileSync(file, 'utf8').trim();
  if (token.length < 16) throw new Error(`admin token file ${file} holds fewer than 16 characters`);
  if (/\s/.test(token)) throw new Error(`admin token file ${file} must hold one token without spaces`);
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

function metricsSource({ disk, listener }: RunningDisk): DiskMetricsSource {
  return {
    name: disk.name,
    capacityBytes: disk.capacityBytes,
    counters: disk.counters,
    throttleLimits: disk.throttle.limits,
    connected: listener.hasSession,
    connections: listener.connections,
  };
}
