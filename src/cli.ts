#!/usr/bin/env node
/** The `vublk` command line. */
import path from 'node:path';
import { Command, type CommanderError, Option } from 'commander';
import { VublkError } from './errors.js';
import { buildDiskSpec, checkDistinct, parseDiskArgument, readOption, type DiskSpec } from './daemon/disk-spec.js';
import { DISK_OPTIONS, type DiskFields } from './daemon/disk-options.js';
import { parseSize } from './throttle/size.js';
import { Daemon, type DaemonAdminSocket, type DaemonMetricsOptions } from './daemon/daemon.js';
import { groupId, userId } from './daemon/account-lookup.js';
import { loadConfigFile, type ServeConfig } from './daemon/config-file.js';
import { createLogger, isPrettyLog, LOG_FORMATS, LOG_LEVELS, errorFields, type LogFormat, type LogLevel } from './log.js';
import { qemuCommandLine, qemuCommandLineForDisks, type QemuHintDisk } from './daemon/qemu-hint.js';
import { DEFAULT_METRICS_LISTEN, parseMetricsListen } from './metrics/listen-address.js';
import { adminRequest, defaultAdminSocket, type AdminEndpoint } from './metrics/admin-client.js';
import fs from 'node:fs';
import { applySocketActivation } from './daemon/socket-activation.js';
import { SystemdNotifier } from './daemon/systemd-notify.js';
import { VERSION } from './version.js';

/** Wrong use of the command line: exit code 2, like every other usage error. */
class UsageError extends VublkError {
  constructor(message: string) {
    super('VUBLK_ERR_USAGE', message, { peerFault: true });
  }
}

/** `serve`'s own flags; the disk flags come from the option table (commander names them in camelCase). */
interface ServeOptions extends Record<string, unknown> {
  socketActivation?: boolean;
  disk: string[];
  logLevel: LogLevel;
  logFormat: LogFormat;
  config?: string;
  metricsListen: string;
  adminPublic?: boolean;
  adminSocket?: string;
  adminSocketMode?: string;
  adminSocketOwner?: string;
  adminSocketGroup?: string;
  adminTokenFile?: string;
}

const DEFAULT_IMAGE = 'vublk-disk.img';
const DEFAULT_SOCKET = 'vublk.sock';
const DEFAULT_SIZE = '1G';

/** The table's rows that are `serve` flags, with commander's attribute name for each. */
const FLAG_ROWS = DISK_OPTIONS.filter((row) => row.flag !== undefined).map((row) => ({ row, attribute: attributeName(row.flag!) }));

/** `--max-discard-seg` → `maxDiscardSeg`, as commander names the option's value. */
function attributeName(flag: string): string {
  return flag.replace(/^--/, '').replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** Reads the disk flags the table describes; a flag counts when given or (for flagIsDefault rows) set by its env variable. */
function flagFields(options: ServeOptions, command: Command, rows = FLAG_ROWS): Partial<DiskFields> {
  const fields: Partial<Record<keyof DiskFields, unknown>> = {};
  for (const { row, attribute } of rows) {
    const value = options[attribute];
    if (value === undefined || command.getOptionValueSource(attribute) === 'default') continue;
    fields[row.field] = readOption(row, '', 'flags', (r) => (r.flagSets !== undefined ? r.flagSets : r.type.text(String(value))));
  }
  return fields as Partial<DiskFields>;
}

/** Flags that also set the default of `--disk` and `--config` disks (`--io-engine`). */
function diskDefaults(options: ServeOptions, command: Command): Partial<DiskFields> {
  return flagFields(
    options,
    command,
    FLAG_ROWS.filter(({ row }) => row.flagIsDefault === true),
  );
}

function diskSpecs(options: ServeOptions, command: Command): DiskSpec[] {
  const fromCli = (attribute: string): boolean => command.getOptionValueSource(attribute) === 'cli';
  const defaults = diskDefaults(options, command);
  let specs: DiskSpec[];
  if (options.disk.length > 0) {
    const single = FLAG_ROWS.filter(({ row, attribute }) => row.flagIsDefault !== true && fromCli(attribute)).map(({ row }) => row.flag);
    if (single.length > 0)
      throw new UsageError(`use either --disk (repeatable) or the single-disk flags, not both: drop ${single.join(', ')}`);
    specs = options.disk.map((text, i) => parseDiskArgument(text, i, defaults));
  } else {
    const fields = flagFields(options, command);
    // The default disk: ./vublk-disk.img served on ./vublk.sock, created at 1G when missing.
    if (fields.imagePath === undefined) {
      fields.imagePath = path.resolve(DEFAULT_IMAGE);
      fields.sizeBytes ??= parseSize(DEFAULT_SIZE);
    }
    if (fields.socket === undefined && fields.socketFd === undefined) fields.socket = path.resolve(DEFAULT_SOCKET);
    specs = [buildDiskSpec(fields, '', 0, 'flags')];
  }
  checkDistinct(specs);
  return specs;
}

interface ServeSettings {
  adminSocket: DaemonAdminSocket;
  specs: DiskSpec[];
  config?: ServeConfig;
  metrics: DaemonMetricsOptions | null;
  logLevel: LogLevel;
  logFormat: LogFormat;
}

/** --admin-socket PATH|off and its mode/owner/group (issue 10: the admin API is not open to every local user). */
function adminSocketSetting(options: ServeOptions): DaemonAdminSocket {
  if (options.adminSocket === 'off') return null;
  const mode = options.adminSocketMode;
  if (mode !== undefined && !/^0?[0-7]{3}$/.test(mode)) throw new UsageError(`--admin-socket-mode must be octal like 0660, got '${mode}'`);
  const access = {
    mode: mode === undefined ? undefined : parseInt(mode, 8),
    uid: options.adminSocketOwner === undefined ? undefined : userId(options.adminSocketOwner),
    gid: options.adminSocketGroup === undefined ? undefined : groupId(options.adminSocketGroup),
  };
  if (options.adminSocket === undefined) {
    if (access.mode === undefined && access.uid === undefined && access.gid === undefined) return 'default';
    throw new UsageError('--admin-socket-mode/-owner/-group need --admin-socket PATH');
  }
  return { path: path.resolve(options.adminSocket), ...access };
}

/** Flags, then the config file, then defaults: a flag given on the command line wins over the file. */
function serveSettings(options: ServeOptions, command: Command): ServeSettings {
  const fromCli = (key: string): boolean => command.getOptionValueSource(key) === 'cli';
  let config: ServeConfig | undefined;
  let specs: DiskSpec[];
  if (options.config !== undefined) {
    const given = [
      ...FLAG_ROWS.filter(({ row, attribute }) => row.flagIsDefault !== true && fromCli(attribute)).map(({ row }) => row.flag!),
      ...(options.disk.length > 0 ? ['--disk'] : []),
    ];
    if (given.length > 0) throw new UsageError(`--config describes the disks: drop ${given.join(', ')} (or describe the disk in the file)`);
    config = loadConfigFile(options.config, diskDefaults(options, command));
    specs = config.disks;
  } else {
    specs = diskSpecs(options, command);
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
          adminTokenFile: options.adminTokenFile,
        };
  return {
    specs,
    config,
    metrics,
    adminSocket: adminSocketSetting(options),
    logLevel: fromCli('logLevel') ? options.logLevel : (config?.logLevel ?? options.logLevel),
    logFormat: fromCli('logFormat') ? options.logFormat : (config?.logFormat ?? options.logFormat),
  };
}

/** The daemon's worker pool size (`--threads`): a daemon setting, not a disk option. */
function poolThreads(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1 || n > 1024) throw new UsageError(`--threads ${text}: expected an integer from 1 to 1024`);
  return n;
}

async function serve(options: ServeOptions, command: Command): Promise<void> {
  let settings: ServeSettings;
  let threads: number | undefined;
  try {
    settings = serveSettings(options, command);
    threads = poolThreads(options['threads'] as string | undefined);
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
    const defaultSocket =
      settings.config === undefined && options.disk.length === 0 && options['socket'] === undefined && options['socketFd'] === undefined;
    specs = applySocketActivation(settings.specs, {
      required: options.socketActivation === true,
      implicitSocket: (i) =>
        defaultSocket && settings.specs[i]?.listen.kind === 'path' && settings.specs[i]?.listen.path === path.resolve(DEFAULT_SOCKET),
      log,
    });
  } catch (error) {
    if (!isPrettyLog(settings.logFormat)) log.error(errorFields(error), 'socket activation failed');
    systemd?.startupFailed(error);
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(2);
  }
  const daemon = new Daemon(log, { metrics: settings.metrics, config: settings.config, threads, adminSocket: settings.adminSocket });
  // Before start: SIGHUP's default action would kill a daemon still starting, and SIGTERM would skip the clean-up.
  daemon.installSignalHandlers((code) => process.exit(code));
  try {
    await daemon.start(specs);
  } catch (error) {
    // Reported once: on stderr, plus a structured line for log collectors when the log is JSON (a
    // human-readable log goes to the same terminal as stderr, where it would only repeat it).
    if (!isPrettyLog(settings.logFormat)) log.error(errorFields(error), 'startup failed');
    systemd?.startupFailed(error);
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(1);
  }
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
}

/** How a client command reaches the daemon: --admin-socket (default) or --metrics-url with a token. */
interface AdminClientOptions {
  adminSocket?: string;
  metricsUrl?: string;
  adminTokenFile?: string;
}

function adminEndpoint(options: AdminClientOptions, disk?: string): AdminEndpoint {
  const token = options.adminTokenFile === undefined ? undefined : fs.readFileSync(options.adminTokenFile, 'utf8').trim();
  if (options.metricsUrl !== undefined) return { url: options.metricsUrl, token };
  return { url: `unix:${options.adminSocket ?? defaultAdminSocket(disk)}` };
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

async function throttleCommand(options: ThrottleCommandOptions & AdminClientOptions): Promise<void> {
  const body: Record<string, string> = {};
  if (options.iops !== undefined) body['iops'] = options.iops;
  if (options.iopsBurst !== undefined) body['iops-burst'] = options.iopsBurst;
  if (options.bps !== undefined) body['bps'] = options.bps;
  if (options.bpsBurst !== undefined) body['bps-burst'] = options.bpsBurst;
  if (Object.keys(body).length === 0) throw new UsageError('give at least one of --iops, --iops-burst, --bps, --bps-burst');
  printAdminReply(
    await adminRequest(adminEndpoint(options, options.disk), 'POST', `/admin/disks/${encodeURIComponent(options.disk)}/throttle`, body),
  );
}

async function resizeCommand(options: { disk: string; size: string } & AdminClientOptions): Promise<void> {
  printAdminReply(
    await adminRequest(adminEndpoint(options, options.disk), 'POST', `/admin/disks/${encodeURIComponent(options.disk)}/resize`, {
      size: options.size,
    }),
  );
}

async function disksCommand(options: AdminClientOptions): Promise<void> {
  printAdminReply(await adminRequest(adminEndpoint(options), 'GET', '/admin/disks'));
}

/** Usage errors (unknown flag, missing value, bad choice) exit 2; help and --version exit 0. */
const EXIT_USAGE = 2;

const program = new Command();
program
  .name('vublk')
  .description('vhost-user-blk back-end: serves virtio-blk disks to QEMU and cloud-hypervisor guests')
  .version(VERSION, '-v, --version', 'print the version of vublk')
  // Inherited by every subcommand defined below; commander has already printed its message.
  .exitOverride((error: CommanderError) => process.exit(error.exitCode === 0 ? 0 : EXIT_USAGE));

const serveCommand = program.command('serve').description('serve one or more disks over vhost-user sockets');
/** What `serve` without --image/--socket does, said where those flags are described. */
const SINGLE_DISK_DEFAULTS: Record<string, string> = {
  '--image': ` (default ./${DEFAULT_IMAGE}, created sparse at ${DEFAULT_SIZE})`,
  '--socket': ` (default ./${DEFAULT_SOCKET})`,
};
for (const { row } of FLAG_ROWS) {
  const flag = row.flagSets !== undefined ? row.flag! : `${row.flag!} ${row.type.placeholder}`;
  const shownDefault =
    SINGLE_DISK_DEFAULTS[row.flag!] ?? (row.default !== undefined && row.flagSets === undefined ? ` (default ${String(row.default)})` : '');
  const option = new Option(flag, `${row.help}${shownDefault}`);
  if (row.env !== undefined) option.env(row.env);
  serveCommand.addOption(option);
}
serveCommand
  .option(
    '--socket-activation',
    'require sockets passed by systemd socket activation (LISTEN_FDS); without this flag they are used when present',
  )
  .option(
    '--disk <spec>',
    `a disk as key=value pairs: image=PATH,socket=PATH|socket-fd=N[,...]; keys: ${DISK_OPTIONS.map((row) => row.key).join(', ')}; repeatable`,
    collect,
    [],
  )
  .option('--threads <n>', "worker threads of the daemon's one pool, serving every queue of every disk (default: the number of CPUs)")
  .option('--config <file>', 'describe the disks (and these settings) in a YAML or JSON file; SIGHUP re-reads it')
  .option(
    '--metrics-listen <address>',
    'HTTP listener for /metrics, /healthz, /readyz and /admin: HOST:PORT, [IPV6]:PORT, unix:PATH or off',
    DEFAULT_METRICS_LISTEN,
  )
  .option('--admin-public', 'allow the admin API on a non-loopback --metrics-listen (needs --admin-token-file)')
  .option('--admin-socket <path>', 'Unix socket of the admin API, or off (default: next to the first disk socket, DISK.admin.sock)')
  .option('--admin-socket-mode <octal>', 'permissions of the admin socket (default 0600)')
  .option('--admin-socket-owner <user>', 'owner of the admin socket (name or uid)')
  .option('--admin-socket-group <group>', 'group of the admin socket (name or gid); use with --admin-socket-mode 0660')
  .option('--admin-token-file <file>', 'bearer token that opens the admin API on a TCP --metrics-listen (Host header checked too)')
  .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default('info'))
  .addOption(
    new Option('--log-format <format>', 'log format: auto = human-readable on a terminal, JSON otherwise')
      .choices(LOG_FORMATS)
      .default('auto'),
  )
  .action((options: ServeOptions, command: Command) => serve(options, command));

program
  .command('throttle')
  .description("change a running disk's throttle limits live (through the admin socket)")
  .requiredOption('--disk <name>', 'the disk to change')
  .option('--iops <n>', 'requests per second (e.g. 500, 10k; 0 = unlimited)')
  .option('--iops-burst <n>', 'request burst (default: one second of --iops)')
  .option('--bps <rate>', 'bytes per second (e.g. 100M; 0 = unlimited)')
  .option('--bps-burst <size>', 'byte burst (default: one second of --bps)')
  .option(
    '--admin-socket <path>',
    "the daemon's admin socket (default $VUBLK_ADMIN_SOCKET, /run/vublk/DISK.admin.sock or the only one there)",
  )
  .option('--metrics-url <url>', 'use a TCP listener instead: http://HOST:PORT (needs --admin-token-file)')
  .option('--admin-token-file <file>', 'bearer token for --metrics-url')
  .action((options: ThrottleCommandOptions & AdminClientOptions) => throttleCommand(options));

program
  .command('resize')
  .description('grow a running disk (image and guest-visible capacity) through the admin API; never shrinks')
  .requiredOption('--disk <name>', 'the disk to grow')
  .requiredOption('--size <bytes>', 'the new size, e.g. 2G')
  .option(
    '--admin-socket <path>',
    "the daemon's admin socket (default $VUBLK_ADMIN_SOCKET, /run/vublk/DISK.admin.sock or the only one there)",
  )
  .option('--metrics-url <url>', 'use a TCP listener instead: http://HOST:PORT (needs --admin-token-file)')
  .option('--admin-token-file <file>', 'bearer token for --metrics-url')
  .action((options: { disk: string; size: string } & AdminClientOptions) => resizeCommand(options));

program
  .command('disks')
  .description("list a running daemon's disks: capacity, queues, throttle limits, whether a front-end is connected")
  .option(
    '--admin-socket <path>',
    "the daemon's admin socket (default $VUBLK_ADMIN_SOCKET, /run/vublk/DISK.admin.sock or the only one there)",
  )
  .option('--metrics-url <url>', 'use a TCP listener instead: http://HOST:PORT (needs --admin-token-file)')
  .option('--admin-token-file <file>', 'bearer token for --metrics-url')
  .action((options: AdminClientOptions) => disksCommand(options));

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(`vublk: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(error instanceof UsageError ? EXIT_USAGE : 1);
});
