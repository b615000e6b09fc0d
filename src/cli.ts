#!/usr/bin/env node
/** The `vublk` command line. */
import { Command, Option, InvalidArgumentError } from 'commander';
import { buildDiskSpec, checkDistinct, parseDiskArgument, type DiskSpec } from './daemon/disk-spec.js';
import { Daemon } from './daemon/daemon.js';
import { createLogger, LOG_LEVELS, errorFields, type LogLevel } from './log.js';
import { qemuCommandLine } from './daemon/qemu-hint.js';

interface ServeOptions {
  socket?: string;
  socketFd?: string;
  image?: string;
  size?: string;
  numQueues?: string;
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
  logLevel: LogLevel;
}

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
              queueSize: options.queueSize,
              readOnly: options.readOnly,
              serial: options.serial,
              logicalBlockSize: options.logicalBlockSize,
              writeback: options.writethrough ? false : undefined,
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

async function serve(options: ServeOptions): Promise<void> {
  const log = createLogger(options.logLevel);
  let specs: DiskSpec[];
  try {
    specs = diskSpecs(options);
  } catch (error) {
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(2);
  }
  const daemon = new Daemon(log);
  try {
    await daemon.start(specs);
  } catch (error) {
    log.error(errorFields(error), 'startup failed');
    process.stderr.write(`vublk: ${(error as Error).message}\n`);
    process.exit(1);
  }
  daemon.installSignalHandlers((code) => process.exit(code));
  for (const { disk } of daemon.disks) {
    const spec = specs.find((s) => s.options.name === disk.name)!;
    if (spec.listen.kind === 'path') {
      log.info({ disk: disk.name, qemu: qemuCommandLine(spec.listen.path, disk.options.numQueues) }, 'attach with QEMU');
      if (process.stderr.isTTY) process.stderr.write(`\nAttach with QEMU:\n  ${qemuCommandLine(spec.listen.path, disk.options.numQueues)}\n\n`);
    }
  }
}

const program = new Command();
program.name('vublk').description('vhost-user-blk back-end: serves virtio-blk disks to QEMU and cloud-hypervisor guests');

program
  .command('serve')
  .description('serve one or more disks over vhost-user sockets')
  .option('--socket <path>', `Unix socket to listen on (default ./${DEFAULT_SOCKET} with the default image)`)
  .option('--socket-fd <n>', 'serve on an already-listening inherited Unix socket fd instead of --socket')
  .option('--image <path>', `backing image (default ./${DEFAULT_IMAGE}, created sparse at ${DEFAULT_SIZE})`)
  .option('--size <bytes>', 'create the image at this size if missing, or grow it (e.g. 1G, 512M, 1073741824)')
  .option('--num-queues <n>', 'number of virtqueues (one worker thread each)', '1')
  .option('--queue-size <n>', 'largest queue size a front-end may configure (power of two)')
  .option('--read-only', 'export the disk read-only (VIRTIO_BLK_F_RO)')
  .option('--serial <str>', 'serial answered to GET_ID (up to 20 ASCII characters; default from the image name)')
  .option('--logical-block-size <n>', 'logical block size: 512 or 4096', '512')
  .option('--writethrough', 'start with the write cache off (every write is synced before it completes)')
  .option('--iops <n>', 'throttle: requests per second across all queues (e.g. 500, 10k; 0 = unlimited)')
  .option('--iops-burst <n>', 'throttle: request burst (default: one second of --iops)')
  .option('--bps <rate>', 'throttle: bytes per second across all queues (e.g. 100M; 0 = unlimited)')
  .option('--bps-burst <size>', 'throttle: byte burst (default: one second of --bps)')
  .option('--disk <spec>', 'a disk as image=PATH,socket=PATH|socket-fd=N[,num-queues=N][,read-only=on][,serial=STR][,size=BYTES][,name=NAME]; repeatable', collect, [])
  .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default('info'))
  .action((options: ServeOptions) => serve(options));

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(`vublk: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
