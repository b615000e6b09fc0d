// Boots the tiny guest built by build-guest.sh under QEMU (TCG, no KVM needed) and
// captures its serial console, where /init reports "VUBLK-E2E: ..." marker lines.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const QEMU = 'qemu-system-x86_64';
const BUILD_SCRIPT = fileURLToPath(new URL('./build-guest.sh', import.meta.url));
/** Lines of the firmware's debug log shown after a timed-out boot. */
const FIRMWARE_LOG_TAIL_LINES = 30;

export const GUEST_DIR = fileURLToPath(new URL('../../.cache/guest/', import.meta.url));
/** The bytes the rw workload writes and verify expects. */
export const PATTERN_PATH = path.join(GUEST_DIR, 'pattern.bin');
/** Where on the guest disk rw/verify put the pattern (passed to the guest as vublk.offset). */
export const PATTERN_OFFSET = 1024 * 1024;

/**
 * probe: report the disk (or "no-vda") without I/O; rw: write the pattern, flush,
 * drop caches, read back; verify: only read back and compare.
 */
export type Workload = 'probe' | 'rw' | 'verify' | 'unaligned' | 'discard' | 'readonly' | 'resize' | 'reconnect';

export interface GuestOptions {
  /** vhost-user-blk socket of the backend under test. */
  socketPath?: string;
  /** Serve this raw image with QEMU's own virtio-blk instead: a control for the harness itself. */
  imagePath?: string;
  numQueues?: number;
  memoryMiB?: number;
  workload: Workload;
  timeoutMs?: number;
  /** `-chardev socket,…,reconnect=N`: QEMU reconnects N seconds after the back-end went away. */
  reconnectSeconds?: number;
  /** More `key=value` words for the guest kernel command line (e.g. `vublk.rounds=12`). */
  kernelArgs?: string[];
  /** Called with the console output so far whenever more arrives (to react to the guest mid-run). */
  onOutput?: (outputSoFar: string) => void;
}

export interface GuestResult {
  /** Serial console and QEMU's stderr, interleaved, with \n line ends. */
  output: string;
  exitCode: number | null;
  timedOut: boolean;
}

export interface GuestReport {
  /** The "PASS ..." or "FAIL ..." line, null if the guest never got that far. */
  verdict: string | null;
  sizeSectors: number | null;
  readOnly: boolean | null;
  queues: number | null;
}

let guestError: string | null | undefined;

/** Builds the guest once per process (build-guest.sh itself caches across runs); throws if that fails. */
export function ensureGuest(): void {
  if (guestError === undefined) {
    const build = spawnSync('bash', [BUILD_SCRIPT], { encoding: 'utf8', timeout: 600_000 });
    if (build.error) {
      guestError = `build-guest.sh could not run: ${build.error.message}`;
    } else if (build.status !== 0) {
      const log = `${build.stdout}${build.stderr}`.trim().split('\n').slice(-15).join('\n');
      guestError = `build-guest.sh failed (${build.status ?? build.signal}):\n${log}`;
    } else {
      guestError = null;
    }
  }
  if (guestError !== null) throw new Error(guestError);
}

let availability: string | null | undefined;

/**
 * The QEMU command line of the e2e guest (TCG, q35, no devices but `disk`, console on stdio): `kernelArgs`
 * after the fixed ones select the workload. Guest RAM is a shared memfd, which vhost-user back-ends map.
 */
export function guestQemuArgs(options: { cpus: number; memoryKiB: number; disk: string[]; kernelArgs: string[] }): string[] {
  const { cpus, memoryKiB, disk, kernelArgs } = options;
  return [
    '-accel',
    'tcg',
    '-machine',
    'q35',
    '-smp',
    String(cpus),
    '-m',
    `${memoryKiB}K`,
    '-object',
    `memory-backend-memfd,id=mem,size=${memoryKiB}K,share=on`,
    '-numa',
    'node,memdev=mem',
    ...disk,
    '-kernel',
    path.join(GUEST_DIR, 'vmlinuz'),
    '-initrd',
    path.join(GUEST_DIR, 'initramfs.cpio.gz'),
    '-append',
    ['console=ttyS0 panic=-1 quiet', ...kernelArgs].join(' '),
    '-display',
    'none',
    '-nodefaults',
    '-no-reboot',
    '-serial',
    'stdio',
  ];
}

/** null if guests can be booted here, otherwise why not. */
export function qemuAvailable(): string | null {
  if (availability === undefined) {
    availability = checkAvailability();
  }
  return availability;
}

function checkAvailability(): string | null {
  const devices = spawnSync(QEMU, ['-device', 'help'], { encoding: 'utf8' });
  if (devices.error) return `${QEMU} cannot be run: ${devices.error.message}`;
  if (!devices.stdout.includes('"vhost-user-blk-pci"')) return `${QEMU} has no vhost-user-blk-pci device`;
  try {
    ensureGuest();
  } catch (err: unknown) {
    return `the test guest could not be built: ${err instanceof Error ? err.message : String(err)}`;
  }
  return null;
}

export function runGuest(options: GuestOptions): Promise<GuestResult> {
  const { socketPath, imagePath, numQueues = 1, memoryMiB = 256, workload, timeoutMs = 90_000 } = options;
  if (socketPath !== undefined && imagePath !== undefined) {
    throw new Error('runGuest: give socketPath or imagePath, not both');
  }
  ensureGuest();

  // The guest's own watchdog fires first, so a stuck guest still says where it was stuck.
  const guestTimeoutS = Math.max(5, Math.floor((timeoutMs * 0.75) / 1000));
  const disk: string[] = [];
  if (socketPath !== undefined) {
    disk.push(
      '-chardev',
      `socket,id=vu0,path=${optionValue(socketPath)}${options.reconnectSeconds !== undefined ? `,reconnect=${options.reconnectSeconds}` : ''}`,
      '-device',
      `vhost-user-blk-pci,chardev=vu0,num-queues=${numQueues}`,
    );
  } else if (imagePath !== undefined) {
    disk.push(
      '-drive',
      `file=${optionValue(imagePath)},if=none,id=d0,format=raw`,
      '-device',
      `virtio-blk-pci,drive=d0,num-queues=${numQueues}`,
    );
  }
  // SeaBIOS's debug port (0x402): after a boot that timed out with an empty console, its last lines say
  // whether the firmware stopped (e.g. waiting for a disk request) or handed over to the kernel.
  const firmwareLog = path.join(os.tmpdir(), `vublk-e2e-seabios-${process.pid}-${randomBytes(4).toString('hex')}.log`);
  const args = guestQemuArgs({
    // virtio_blk uses min(num-queues, CPUs) queues, so multi-queue needs as many vCPUs.
    cpus: numQueues,
    memoryKiB: memoryMiB * 1024,
    disk,
    kernelArgs: [
      `vublk.test=${workload}`,
      `vublk.offset=${PATTERN_OFFSET}`,
      `vublk.timeout=${guestTimeoutS}`,
      ...(options.kernelArgs ?? []),
    ],
  });
  args.push('-chardev', `file,id=fwlog,path=${optionValue(firmwareLog)}`, '-device', 'isa-debugcon,iobase=0x402,chardev=fwlog');

  return new Promise((resolve, reject) => {
    const qemu = spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    let timedOut = false;
    qemu.stdout.setEncoding('utf8');
    qemu.stderr.setEncoding('utf8');
    qemu.stdout.on('data', (text: string) => {
      output += text;
      options.onOutput?.(output);
    });
    qemu.stderr.on('data', (text: string) => (output += text));
    const timer = setTimeout(() => {
      timedOut = true;
      qemu.kill('SIGKILL');
    }, timeoutMs);
    qemu.on('error', (err) => {
      clearTimeout(timer);
      rmSync(firmwareLog, { force: true });
      reject(err);
    });
    qemu.on('close', (exitCode) => {
      clearTimeout(timer);
      if (timedOut) output += firmwareLogTail(firmwareLog);
      rmSync(firmwareLog, { force: true });
      resolve({ output: output.replace(/\r\n/g, '\n'), exitCode, timedOut });
    });
  });
}

/** The end of the firmware's debug log, as a block to append to the console output. */
function firmwareLogTail(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    return `\n--- SeaBIOS debug log unreadable: ${error instanceof Error ? error.message : String(error)} ---\n`;
  }
  const lines = text.replace(/\r\n/g, '\n').trimEnd().split('\n');
  return `\n--- SeaBIOS debug log, last ${Math.min(lines.length, FIRMWARE_LOG_TAIL_LINES)} of ${lines.length} lines ---\n${lines.slice(-FIRMWARE_LOG_TAIL_LINES).join('\n')}\n--- end of SeaBIOS debug log ---\n`;
}

/** QEMU option values end at a comma unless it is doubled. */
function optionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/** Picks the marker lines /init prints out of the console output. */
export function guestReport(output: string): GuestReport {
  const verdict = /^VUBLK-E2E: ((?:PASS|FAIL) .*)$/m.exec(output);
  const disk = /^VUBLK-E2E: size=(\d+) ro=([01]) queues=(\d+)$/m.exec(output);
  return {
    verdict: verdict?.[1] ?? null,
    sizeSectors: disk ? Number(disk[1]) : null,
    readOnly: disk ? disk[2] === '1' : null,
    queues: disk ? Number(disk[3]) : null,
  };
}
