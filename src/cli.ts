#!/usr/bin/env node
/** The `vublk` command line. */
import path from 'node:path';
import { Command, Option, InvalidArgumentError } from 'commander';
import { buildDiskSpec, checkDistinct, parseDiskArgument, setDefaultCacheMode, setDefaultIoEngine, type DiskSpec } from './daemon/disk-spec.js';
import { CACHE_MODES, type CacheMode } from './dataplane/request-executor.js';
import { IO_ENGINE_SETTINGS, type IoEngineSetting } from './dataplane/worker-protocol.js';
import { Daemon, type DaemonMetricsOptions } from './daemon/daemon.js';
import { loadConfigFile, type ServeConfig } from './daemon/config-file.js';
import { createLogger, LOG_FORMATS, LOG_LEVELS, errorFields, type LogFormat, type LogLevel } from './log.js';
import { qemuCommandLine, qemuCommandLineForDisks, type QemuHintDisk } from './daemon/qemu-hint.js';
import { DEFAULT_METRICS_LISTEN, parseMetricsListen } from './metrics/listen-address.js';
import { adminRequest } from './metrics/admin-client.js';
import { applySocketActivation } from './daemon/socket-activation.js';
import { SystemdNotifier } from './daemon/systemd-notify.js';
import { VERSION } from './version.js';

interface ServeOptions {
  socket?: string;
  socketFd?: string;
  socketActivation?: boolean;
  image?: string;
  size?: string;
  numQueues?: string;
  threads?: string;
  socketMode?: string;
  socketOwner?: string;
  socketGroup?: string;
  queueSize?: string;
  readOnly?: boolean;
  serial?: string;
  logicalBlockSize?: string;
  writethrough?: boolean;
  iops?: string;
  iopsBurst?: string;
  bps?: string;
  bpsBurst?: string;
  disk: string[];
  ioEngine: IoEngineSetting;
  cache: CacheMode;
  pollUs?: string;
  logLevel: LogLevel;
  logFormat: LogFormat;
  config?: string;
  metricsListen: string;
  adminPublic?: boolean;
}

/** Flags that describe a disk: with --config the file describes the disks, so these are refused. */
const DISK_FLAGS: ReadonlyArray<readonly [key: keyof ServeOptions, flag: string]> = [
  ['disk', '--disk'],
  ['image', '--image'],
  ['socket', '--socket'],
  ['socketFd', '--socket-fd'],
  ['size', '--size'],
  ['numQueues', '--num-queues'],
  ['socketMode', '--socket-mode'],
  ['socketOwner', '--socket-owner'],
  ['socketGroup', '--socket-group'],
  ['queueSize', '--queue-size'],
  ['readOnly', '--read-only'],
  ['serial', '--serial'],
  ['logicalBlockSize', '--logical-block-size'],
  ['writethrough', '--writethrough'],
  ['pollUs', '--poll-us'],
  ['iops', '--iops'],
  ['iopsBurst', '--iops-burst'],
  ['bps', '--bps'],
  ['bpsBurst', '--bps-burst'],
];

const DEFAULT_IMAGE = 'vublk-disk.img';
const DEFAULT_SOCKET = 'vublk.sock';
const DEFAULT_SIZE = '1G';

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function diskSpecs(options: ServeOptions): DiskSpec[] {
  const singleDiskFlags = options.image ?? options.socket ?? options.socketFd;
  if (options.disk.length > 0 && singleDiskFlags !== undefined) {
    throw new InvalidArgumentError('use either --disk (repeatable) or the single-disk flags (--image/--socket), not both');
  }
  const specs =
    options.disk.length > 0
      ? options.disk.map((text, i) => parseDiskArgument(text, i))
      : [
          buildDiskSpec(
            {
              image: options.image ?? DEFAULT_IMAGE,
              socket: options.socketFd ? undefined : (options.socket ?? DEFAULT_SOCKET),
              socketFd: options.socketFd,
              size: options.size ?? (options.image === undefined ? DEFAULT_SIZE : undefined),
              numQueues: options.numQueues,
              threads: options.threads,
              socketMode: options.socketMode,
              socketOwner: options.socketOwner,
              socketGroup: options.socketGroup,
              queueSize: options.queueSize,
              readOnly: options.readOnly,
              serial: options.serial,
              logicalBlockSize: options.logicalBlockSize,
              writeback: options.writethrough ? false : undefined,
              pollUs: options.pollUs,
              iops: options.iops,
              iopsBurst: options.iopsBurst,
              bps: options.bps,
              bpsBurst: options.bpsBurst,
            },
            'command line',
            0,
          ),
        ];
  checkDistinct(specs);
  return specs;
}

interface ServeSettings {
  specs: DiskSpec[];
  config?: ServeConfig;
  metrics: DaemonMetricsOptions | null;
  logLevel: LogLevel;
  logFormat: LogFormat;
}

/** Flags, then the config file, then defaults: a flag given on the command line wins over the file. */
function serveSettings(options: ServeOptions, command: Command): ServeSettings {
  const fromCli = (key: string): boolean => command.getOptionValueSource(key) === 'cli';
  let config: ServeConfig | undefined;
  let specs: DiskSpec[];
  if (options.config !== undefined) {
    const given = DISK_FLAGS.filter(([key]) => fromCli(key)).map(([, flag]) => flag);
    if (given.length > 0) throw new InvalidArgumentError(`--config describes the disks: drop ${given.join(', ')} (or describe the disk in the file)`);
    config = loadConfigFile(options.config);
    specs = config.disks;
  } else {
    specs = diskSpecs(options);
  }
  const metricsText = fromCli('metricsListen') ? options.metricsListen : (config?.metricsListen ?? options.metricsListen);
  const address = parseMetricsListen(metricsText);
  const metrics: DaemonMetricsOptions | null =
    address === null
      ? null
      : {
          address,
          adminPublic: fromCli('adminPublic') ? options.adminPublic === true : (config?.adminPublic ?? false),
          optional: !fromCli('metricsListen') && config?.metricsListen === undefined && metricsText === DEFAULT_METRICS_LISTEN,
        };
  return {
    specs,
    config,
    metrics,
    logLevel: fromCli('logLevel') ? options.logLevel : (config?.logLevel ?? options.logLevel),
    logFormat: fromCli('logFormat') ? options.logFormat : (config?.logFormat ?? options.logFormat),
  };
}

/** The daemon's worker pool size (`--threads`); the per-disk `threads` key is ignored. */
function poolThreads(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1 || n > 1024) throw new InvalidArgumentError(`--threads ${text}: expected an integer from 1 to 1024`);
  return n;
}

async function serve(options: ServeOptions, command: Command): Promise<void> {
  let settings: ServeSettings;
  let threads: number | undefined;
  try {
    setDefaultIoEngine(options.ioEngine);
    setDefaultCacheMode(options.cache);
    settings = serveSettings(options, command);
    threads = poolThreads(options.threads);
  } catch (error) {
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(2);
  }
  const log = createLogger(settings.logLevel, settings.logFormat);
  if (settings.config !== undefined) log.info({ file: settings.config.file, disks: settings.specs.length }, 'config loaded');
  const systemd = SystemdNotifier.fromEnvironment(log);
  let specs: DiskSpec[];
  try {
    // Sockets passed by systemd (LISTEN_FDS) are used whenever present; see docs/operations.md.
    const defaultSocket = settings.config === undefined && options.disk.length === 0 && options.socket === undefined && options.socketFd === undefined;
    specs = applySocketActivation(settings.specs, {
      required: options.socketActivation === true,
      implicitSocket: (i) => defaultSocket && settings.specs[i]?.listen.kind === 'path' && settings.specs[i]?.listen.path === path.resolve(DEFAULT_SOCKET),
      log,
    });
  } catch (error) {
    log.error(errorFields(error), 'socket activation failed');
    systemd?.startupFailed(error);
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(2);
  }
  const daemon = new Daemon(log, { metrics: settings.metrics, config: settings.config, threads });
  try {
    await daemon.start(specs);
  } catch (error) {
    log.error(errorFields(error), 'startup failed');
    systemd?.startupFailed(error);
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(1);
  }
  daemon.installSignalHandlers((code) => process.exit(code));
  systemd?.ready(daemon);
  const attach: QemuHintDisk[] = [];
  for (const { disk, spec } of daemon.disks) {
    if (spec.listen.kind === 'path') {
      log.info({ disk: disk.name, qemu: qemuCommandLine(spec.listen.path, disk.options.numQueues) }, 'attach with QEMU');
      attach.push({ socketPath: spec.listen.path, numQueues: disk.options.numQueues });
    }
  }
  // Plain text on stderr, terminal or not (stdout carries the JSON log): what a new user copies first.
  if (attach.length > 0) process.stderr.write(`\nAttach with QEMU:\n  ${qemuCommandLineForDisks(attach)}\n\n`);
}

interface ThrottleCommandOptions {
  disk: string;
  iops?: string;
  iopsBurst?: string;
  bps?: string;
  bpsBurst?: string;
  metricsUrl: string;
}

/** Prints an admin reply; a failure goes to stderr with exit code 1. */
function printAdminReply(reply: { status: number; body: unknown }): void {
  if (reply.status >= 200 && reply.status < 300) {
    process.stdout.write(`${JSON.stringify(reply.body, null, 2)}\n`);
    return;
  }
  const body = reply.body as { error?: unknown } | null;
  const detail = body !== null && typeof body === 'object' && typeof body.error === 'string' ? body.error : JSON.stringify(reply.body);
  process.stderr.write(`vublk: HTTP ${reply.status}: ${detail}\n`);
  process.exitCode = 1;
}

async function throttleCommand(options: ThrottleCommandOptions): Promise<void> {
  const body: Record<string, string> = {};
  if (options.iops !== undefined) body['iops'] = options.iops;
  if (options.iopsBurst !== undefined) body['iops-burst'] = options.iopsBurst;
  if (options.bps !== undefined) body['bps'] = options.bps;
  if (options.bpsBurst !== undefined) body['bps-burst'] = options.bpsBurst;
  if (Object.keys(body).length === 0) throw new InvalidArgumentError('give at least one of --iops, --iops-burst, --bps, --bps-burst');
  printAdminReply(await adminRequest(options.metricsUrl, 'POST', `/admin/disks/${encodeURIComponent(options.disk)}/throttle`, body));
}

async function resizeCommand(options: { disk: string; size: string; metricsUrl: string }): Promise<void> {
  printAdminReply(await adminRequest(options.metricsUrl, 'POST', `/admin/disks/${encodeURIComponent(options.disk)}/resize`, { size: options.size }));
}

async function disksCommand(options: { metricsUrl: string }): Promise<void> {
  printAdminReply(await adminRequest(options.metricsUrl, 'GET', '/admin/disks'));
}

const program = new Command();
program.name('vublk').description('vhost-user-blk back-end: serves virtio-blk disks to QEMU and cloud-hypervisor guests');
program.version(VERSION, '-v, --version', 'print the version of vublk');

program
  .command('serve')
  .description('serve one or more disks over vhost-user sockets')
  .option('--socket <path>', `Unix socket to listen on (default ./${DEFAULT_SOCKET} with the default image)`)
  .option('--socket-mode <octal>', 'permissions of the socket file vublk creates (default 0600)')
  .option('--socket-owner <user>', 'owner of the socket file (name or uid), e.g. the user QEMU runs as')
  .option('--socket-group <group>', 'group of the socket file (name or gid); use with --socket-mode 0660')
  .option('--socket-fd <n>', 'serve on an already-listening inherited Unix socket fd instead of --socket')
  .option('--socket-activation', 'require sockets passed by systemd socket activation (LISTEN_FDS); without this flag they are used when present')
  .option('--image <path>', `backing image (default ./${DEFAULT_IMAGE}, created sparse at ${DEFAULT_SIZE})`)
  .option('--size <bytes>', 'create the image at this size if missing, or grow it (e.g. 1G, 512M, 1073741824)')
  .option('--num-queues <n>', 'number of virtqueues', '1')
  .option('--threads <n>', 'worker threads serving every queue of every disk (default: the number of CPUs)')
  .option('--queue-size <n>', 'largest queue size a front-end may configure (power of two)')
  .option('--read-only', 'export the disk read-only (VIRTIO_BLK_F_RO)')
  .option('--serial <str>', 'serial answered to GET_ID (up to 20 ASCII characters; default from the image name)')
  .option('--logical-block-size <n>', 'logical block size: 512 or 4096', '512')
  .option('--writethrough', 'start with the write cache off (every write is synced before it completes)')
  .option('--iops <n>', 'throttle: requests per second across all queues (e.g. 500, 10k; 0 = unlimited)')
  .option('--iops-burst <n>', 'throttle: request burst (default: one second of --iops)')
  .option('--bps <rate>', 'throttle: bytes per second across all queues (e.g. 100M; 0 = unlimited)')
  .option('--bps-burst <size>', 'throttle: byte burst (default: one second of --bps)')
  .option('--disk <spec>', 'a disk as image=PATH,socket=PATH|socket-fd=N[,num-queues=N][,read-only=on][,serial=STR][,size=BYTES][,name=NAME][,threads=N][,io-engine=auto|io_uring|sync]; repeatable', collect, [])
  .option('--config <file>', 'describe the disks (and these settings) in a YAML or JSON file; SIGHUP re-reads it')
  .option('--metrics-listen <address>', 'HTTP listener for /metrics, /healthz, /readyz and /admin: HOST:PORT, [IPV6]:PORT, unix:PATH or off', DEFAULT_METRICS_LISTEN)
  .option('--admin-public', 'serve the admin API even when --metrics-listen is not a loopback address or unix socket')
  .addOption(
    new Option('--io-engine <engine>', 'request engine of disks that set no io-engine= key: auto (io_uring, else sync), io_uring or sync')
      .choices(IO_ENGINE_SETTINGS)
      .default('auto')
      .env('VUBLK_IO_ENGINE'),
  )
  .addOption(
    new Option('--cache <mode>', 'cache mode of disks that set no cache= key, as QEMU: writeback, none (O_DIRECT), writethrough, directsync (O_DIRECT + O_DSYNC), unsafe (FLUSH ignored)')
      .choices(CACHE_MODES)
      .default('writeback'),
  )
  .option('--poll-us <n>', 'adaptive polling: spin on the rings and completions up to N µs before sleeping (default 0 = off)')
  .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default('info'))
  .addOption(new Option('--log-format <format>', 'log format: auto = human-readable on a terminal, JSON otherwise').choices(LOG_FORMATS).default('auto'))
  .action((options: ServeOptions, command: Command) => serve(options, command));

const METRICS_URL = `http://${DEFAULT_METRICS_LISTEN}`;

program
  .command('throttle')
  .description("change a running disk's throttle limits live (through the admin API on the metrics listener)")
  .requiredOption('--disk <name>', 'the disk to change')
  .option('--iops <n>', 'requests per second (e.g. 500, 10k; 0 = unlimited)')
  .option('--iops-burst <n>', 'request burst (default: one second of --iops)')
  .option('--bps <rate>', 'bytes per second (e.g. 100M; 0 = unlimited)')
  .option('--bps-burst <size>', 'byte burst (default: one second of --bps)')
  .option('--metrics-url <url>', 'the daemon\'s metrics listener: http://HOST:PORT or unix:PATH', METRICS_URL)
  .action((options: ThrottleCommandOptions) => throttleCommand(options));

program
  .command('resize')
  .description('grow a running disk (image and guest-visible capacity) through the admin API; never shrinks')
  .requiredOption('--disk <name>', 'the disk to grow')
  .requiredOption('--size <bytes>', 'the new size, e.g. 2G')
  .option('--metrics-url <url>', 'the daemon\'s metrics listener: http://HOST:PORT or unix:PATH', METRICS_URL)
  .action((options: { disk: string; size: string; metricsUrl: string }) => resizeCommand(options));

program
  .command('disks')
  .description("list a running daemon's disks: capacity, queues, throttle limits, whether a front-end is connected")
  .option('--metrics-url <url>', 'the daemon\'s metrics listener: http://HOST:PORT or unix:PATH', METRICS_URL)
  .action((options: { metricsUrl: string }) => disksCommand(options));

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(`vublk: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
