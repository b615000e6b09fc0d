/**
 * One exported disk, passive (like rust-vmm's VhostUserBackend): its backing image, the features and
 * virtio-blk configuration it presents, its limits, throttle and counters. It runs nothing itself: the
 * control plane's worker pool serves its rings; sessions come and go, the disk stays.
 */
import fs from 'node:fs';
import path from 'node:path';
import { BLK_ID_BYTES, SECTOR_SIZE, encodeBlkConfig, type BlkConfig } from '../../protocol/virtio-blk.js';
import { createCounterBuffer, CounterReader } from '../dataplane/counters.js';
import { DEFAULT_MAX_DISCARD_SECTORS, DEFAULT_SEG_MAX, DEFAULT_SIZE_MAX, type DeviceLimits } from '../dataplane/device-limits.js';
import type { DiskContext, DiskSettings, IoEngineSetting } from '../dataplane/worker-protocol.js';
import { probeIoUring } from '../sys/io-uring.js';
import { offeredVirtioFeatures } from './blk-features.js';
import type { Logger } from '../log.js';
import { DiskThrottle, type DiskLimits } from '../throttle/disk-throttle.js';
import { cachePolicy, type CacheMode } from '../dataplane/request-executor.js';
import { openRawImage, type ImageIoInfo } from '../dataplane/raw-image.js';
import { VublkError } from '../errors.js';
import { LOCK_WAIT_MS, lockImageWaiting } from '../sys/image-lock.js';
import type { NetworkImage, NetworkImageOptions } from './network-image.js';
import { openFlags, O_DIRECT, O_RDONLY } from '../sys/block-io.js';
import { sys } from '../sys/libc.js';
import { hasQcow2Magic } from '../../protocol/qcow2.js';
import { type Qcow2Handle, attachLayer, openImage, type ImageFormat, type LayerDescription } from '../backend/qcow2/index.js';

export interface DiskOptions extends NetworkImageOptions {
  name: string;
  imagePath: string;
  /** Create the image with this size if missing, or grow it to this size; never shrinks. */
  sizeBytes?: number | undefined;
  numQueues: number;
  queueSize: number;
  readOnly: boolean;
  serial?: string | undefined;
  logicalBlockSize: 512 | 4096;
  /** Initial write-cache mode; the guest may flip it through the config space (CONFIG_WCE). */
  writeback: boolean;
  /** Token-bucket limits shared by all queues of the disk; all zero = unlimited. */
  throttle: DiskLimits;
  /** Request engine of the queue workers (`auto`: io_uring when available, else sync). */
  ioEngine: IoEngineSetting;
  /** Ranges one DISCARD / WRITE_ZEROES request may carry (config max_discard_seg / max_write_zeroes_seg). */
  maxDiscardSeg: number;
  maxWriteZeroesSeg: number;
  /** QEMU-compatible image locks (default on); off only where two daemons share an image by design (migration). */
  locking: boolean;
  /** Cache mode, as QEMU's cache= (default writeback). */
  cache?: CacheMode | undefined;
  /** O_DIRECT: the least alignment guest buffers need (raises what statx reports; undefined = as reported). */
  bufferAlign?: number | undefined;
  /** Adaptive polling of the workers serving this disk, µs (0 / undefined = off). */
  pollUs?: number | undefined;
  /** Image format; undefined: probed (with a warning). */
  format?: ImageFormat | undefined;
  /** qcow2: bytes of the shared L2 cache (default: the format layer's). */
  l2CacheBytes?: number | undefined;
}

/** The first bytes decide: qcow2 magic → qcow2, anything else (an empty new file too) → raw. */
function probeImageFormat(imagePath: string): ImageFormat {
  const head = Buffer.alloc(4);
  const fd = fs.openSync(imagePath, 'r');
  try {
    return fs.readSync(fd, head, 0, 4, 0) === 4 && hasQcow2Magic(head) ? 'qcow2' : 'raw';
  } finally {
    fs.closeSync(fd);
  }
}

/** What the guest is offered: the fixed request limits, and the disk's block size, read-only flag, serial and range segments. */
function deviceLimits(options: DiskOptions, block: number, readOnly: boolean, serial: string): DeviceLimits {
  return {
    sizeMax: DEFAULT_SIZE_MAX,
    segMax: DEFAULT_SEG_MAX,
    logicalBlockSize: block,
    readOnly,
    serial: serialBytes(serial),
    maxDiscardSectors: DEFAULT_MAX_DISCARD_SECTORS,
    maxDiscardSeg: options.maxDiscardSeg,
    maxWriteZeroesSectors: DEFAULT_MAX_DISCARD_SECTORS,
    maxWriteZeroesSeg: options.maxWriteZeroesSeg,
  };
}

export class DiskSetupError extends VublkError {
  constructor(disk: string, detail: string) {
    super('VUBLK_ERR_DISK_SETUP', `disk ${disk}: ${detail}`, { peerFault: true, fatal: true });
  }
}

/** GET_ID answer: printable ASCII, at most 20 bytes, zero padded. */
export function serialBytes(serial: string): Uint8Array {
  const bytes = new Uint8Array(BLK_ID_BYTES);
  const ascii = serial.replace(/[^\x20-\x7e]/g, '_').slice(0, BLK_ID_BYTES);
  bytes.set(Buffer.from(ascii, 'ascii'));
  return bytes;
}

export function defaultSerial(imagePath: string): string {
  const base = path.basename(imagePath).replace(/\.[^.]*$/, '');
  return (base || 'vublk').slice(0, BLK_ID_BYTES);
}

export class BlkDisk {
  readonly fd: number;
  readonly limits: DeviceLimits;
  readonly counterBuffer: SharedArrayBuffer;
  readonly counters: CounterReader;
  readonly offeredFeatures: bigint;
  /** How the image was opened (cache mode, O_DIRECT alignment, block device), for the workers. */
  readonly imageIo: ImageIoInfo;
  private capacity: number;
  private writebackEnabled: boolean;
  /** format=qcow2: the shared state workers attach to, this thread's handle (resize, close) and the backing files' lock fds. */
  readonly qcow2: LayerDescription | undefined;
  private readonly qcow2Handle: Qcow2Handle | undefined;
  private readonly backingLockFds: number[] = [];
  /** Always present (unlimited is a no-clock fast path) so limits can be changed live. */
  readonly throttle: DiskThrottle;

  constructor(
    readonly options: DiskOptions,
    private readonly log: Logger,
    /** An NBD export or RBD image opened by the daemon (network-image.ts); absent for files and block devices. */
    readonly network?: NetworkImage,
  ) {
    if (network !== undefined) {
      // The server decides what the disk can do: read-only exports are read-only disks, and only the
      // operations it supports are offered to the guest.
      const readOnly = options.readOnly || network.readOnly;
      const block = Math.max(options.logicalBlockSize, network.minimumBlockSize);
      if (block > 4096)
        throw new DiskSetupError(
          options.name,
          `${network.location} needs ${block}-byte aligned I/O; vublk offers at most 4096-byte logical blocks`,
        );
      this.fd = -1;
      this.imageIo = { cache: options.cache ?? 'writeback', memAlign: 1, offsetAlign: 1, blockDevice: false };
      this.capacity = Math.floor(network.sizeBytes / block) * block;
      if (this.capacity === 0) throw new DiskSetupError(options.name, `${network.location} is smaller than one ${block}-byte block`);
      this.writebackEnabled = options.writeback && cachePolicy(this.imageIo.cache).writeback;
      this.limits = deviceLimits(options, block, readOnly, options.serial ?? network.defaultSerial);
      this.counterBuffer = createCounterBuffer(options.numQueues);
      this.counters = new CounterReader(this.counterBuffer);
      this.offeredFeatures = offeredVirtioFeatures(readOnly, { discard: network.canDiscard, writeZeroes: network.canWriteZeroes });
      this.throttle = DiskThrottle.create(options.throttle);
      return;
    }
    const { name, imagePath, sizeBytes, readOnly } = options;
    if (options.ioEngine === 'io_uring') {
      const unavailable = probeIoUring();
      if (unavailable !== null)
        throw new DiskSetupError(name, `io engine io_uring was asked for, but io_uring is unavailable: ${unavailable}`);
    }
    let exists = fs.existsSync(imagePath);
    if (!exists && sizeBytes === undefined) {
      throw new DiskSetupError(name, `image ${imagePath} does not exist (pass --size to create it)`);
    }
    if (!exists && options.format === 'qcow2')
      throw new DiskSetupError(name, `qcow2 image ${imagePath} does not exist (create it with qemu-img create -f qcow2)`);
    if (!exists && readOnly) throw new DiskSetupError(name, `image ${imagePath} does not exist and the disk is read-only`);
    const createdNow = !exists;
    if (!exists) {
      fs.writeFileSync(imagePath, '', { flag: 'wx', mode: 0o600 });
      exists = true;
    }
    const stat = fs.statSync(imagePath);
    if (!stat.isFile() && !stat.isBlockDevice())
      throw new DiskSetupError(name, `${imagePath} is neither a regular file nor a block device`);
    const cache = options.cache ?? 'writeback';
    // An image vublk just created is raw: nothing to probe.
    let format = options.format ?? (createdNow ? 'raw' : undefined);
    if (format === undefined) {
      format = probeImageFormat(imagePath);
      log.warn(
        { disk: name, image: imagePath, format },
        `no format given for ${imagePath}: probed '${format}'; pass format=${format} (probing a guest-writable image is unsafe)`,
      );
    }
    if (format === 'qcow2') {
      try {
        // An explicit format is passed on; a probed one is not, so the format layer applies its probing rules to the backing chain.
        this.qcow2 = openImage(imagePath, {
          ...(options.format === undefined ? {} : { format: options.format }),
          readOnly,
          ...(options.l2CacheBytes === undefined ? {} : { l2CacheBytes: options.l2CacheBytes }),
          warn: (message) => log.warn({ disk: name }, message),
        });
      } catch (error) {
        throw new DiskSetupError(name, (error as Error).message);
      }
      if (this.qcow2.format !== 'qcow2') throw new DiskSetupError(name, `${imagePath} is not a qcow2 image`);
    }
    let opened: ReturnType<typeof openRawImage>;
    try {
      opened = openRawImage(imagePath, readOnly, cache, options.bufferAlign);
    } catch (error) {
      throw new DiskSetupError(name, (error as Error).message);
    }
    this.fd = opened.fd;
    this.imageIo = opened.io;
    try {
      if (options.locking) lockImageWaiting(this.fd, imagePath, { write: !readOnly }, LOCK_WAIT_MS);
    } catch (error) {
      fs.closeSync(this.fd);
      throw new DiskSetupError(name, (error as Error).message);
    }
    let size = opened.sizeBytes;
    if (this.qcow2 !== undefined) {
      try {
        this.lockBackingChain(this.qcow2, options.locking, cachePolicy(cache).direct);
        this.qcow2Handle = attachLayer(this.qcow2) as Qcow2Handle;
        size = this.qcow2Handle.size;
        if (sizeBytes !== undefined && size < sizeBytes) {
          if (readOnly) throw new Error(`virtual size ${size} is smaller than --size, and the disk is read-only`);
          this.qcow2Handle.resize(sizeBytes);
          size = sizeBytes;
        }
      } catch (error) {
        this.qcow2Handle?.close();
        for (const fd of this.backingLockFds) fs.closeSync(fd);
        fs.closeSync(this.fd);
        throw new DiskSetupError(name, (error as Error).message);
      }
    } else if (sizeBytes !== undefined && stat.isFile() && size < sizeBytes) {
      if (readOnly) throw new DiskSetupError(name, `image is ${size} bytes, smaller than --size, and the disk is read-only`);
      fs.ftruncateSync(this.fd, sizeBytes);
      size = sizeBytes;
    }
    // A block device's sectors and O_DIRECT's offset alignment set the smallest block the guest may use.
    const block = Math.max(options.logicalBlockSize, opened.deviceBlockSize, opened.io.offsetAlign);
    if (block > 4096)
      throw new DiskSetupError(name, `the image needs ${block}-byte aligned I/O; vublk offers at most 4096-byte logical blocks`);
    this.capacity = Math.floor(size / block) * block;
    if (this.capacity === 0) throw new DiskSetupError(name, `image ${imagePath} is smaller than one ${block}-byte block`);
    // writethrough / directsync start with the write cache off, like --writethrough.
    this.writebackEnabled = options.writeback && cachePolicy(cache).writeback;
    this.limits = deviceLimits(options, block, readOnly, options.serial ?? defaultSerial(imagePath));
    this.counterBuffer = createCounterBuffer(options.numQueues);
    this.counters = new CounterReader(this.counterBuffer);
    this.offeredFeatures = offeredVirtioFeatures(readOnly);
    this.throttle = DiskThrottle.create(options.throttle);
  }

  /** Backing files are locked read-only (QEMU's rule: nobody writes a base while an overlay uses it). */
  private lockBackingChain(description: LayerDescription, locking: boolean, direct: boolean): void {
    let layer = description.format === 'qcow2' ? description.shared.backing : null;
    for (let depth = 0; layer !== null && depth < 64; depth++) {
      const fd = fs.openSync(layer.path, 'r');
      this.backingLockFds.push(fd);
      if (direct) {
        // The workers read backing files with O_DIRECT too: refuse now rather than fail every read.
        try {
          sys.close(openFlags(layer.path, O_RDONLY | O_DIRECT));
        } catch (error) {
          throw new Error(
            `cache=${this.options.cache ?? 'writeback'} reads the backing file ${layer.path} with O_DIRECT, which its file system refuses: ${(error as Error).message}`,
          );
        }
      }
      if (locking) lockImageWaiting(fd, layer.path, { write: false }, LOCK_WAIT_MS);
      layer = layer.format === 'qcow2' ? layer.shared.backing : null;
    }
  }

  get name(): string {
    return this.options.name;
  }

  get capacityBytes(): number {
    return this.capacity;
  }

  get writeback(): boolean {
    return this.writebackEnabled;
  }

  config(): BlkConfig {
    const block = this.limits.logicalBlockSize;
    const l = this.limits;
    return {
      capacity: this.capacity / SECTOR_SIZE,
      sizeMax: l.sizeMax,
      segMax: l.segMax,
      blkSize: block,
      physicalBlockExp: 0,
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: this.writebackEnabled ? 1 : 0,
      numQueues: this.options.numQueues,
      maxDiscardSectors: l.maxDiscardSectors,
      maxDiscardSeg: l.maxDiscardSeg,
      discardSectorAlignment: block / SECTOR_SIZE,
      maxWriteZeroesSectors: l.maxWriteZeroesSectors,
      maxWriteZeroesSeg: l.maxWriteZeroesSeg,
      writeZeroesMayUnmap: 1,
    };
  }

  configSpace(): Uint8Array {
    return encodeBlkConfig(this.config());
  }

  /** Switches write cache mode (SET_CONFIG of the writeback byte); the control plane tells the rings. */
  setWriteback(enabled: boolean): void {
    this.writebackEnabled = enabled;
  }

  /**
   * Grows the image and the capacity the guest sees (never shrinks: data past the new end would vanish).
   * Returns the previous capacity, or null when the size is unchanged. The control plane then switches the
   * rings to the new capacity before the front-end is told, so the guest can use it at once.
   */
  grow(sizeBytes: number): number | null {
    const block = this.limits.logicalBlockSize;
    if (this.limits.readOnly) throw new DiskSetupError(this.name, 'a read-only disk cannot be resized');
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes % block !== 0) {
      throw new DiskSetupError(this.name, `new size ${sizeBytes} is not a multiple of the ${block}-byte block`);
    }
    if (sizeBytes < this.capacity)
      throw new DiskSetupError(this.name, `new size ${sizeBytes} is smaller than the current ${this.capacity}; shrinking is refused`);
    if (sizeBytes === this.capacity) return null;
    // Network images grew where they live (growNetworkImage) before this is called.
    if (this.qcow2Handle !== undefined) {
      // Grows the (shared) L1 table; every worker's handle sees the new size.
      try {
        this.qcow2Handle.resize(sizeBytes);
      } catch (error) {
        throw new DiskSetupError(this.name, (error as Error).message);
      }
    } else if (this.network === undefined) {
      const stat = fs.fstatSync(this.fd);
      if (stat.isFile() && stat.size < sizeBytes) fs.ftruncateSync(this.fd, sizeBytes);
    }
    const previous = this.capacity;
    this.capacity = sizeBytes;
    return previous;
  }

  /**
   * A network image grows where it lives (rbd_resize) before `grow` tells the rings; checked like `grow`
   * first, so a refused size never reaches the cluster. Nothing to do for files (`grow` truncates them).
   */
  async growNetworkImage(sizeBytes: number): Promise<void> {
    if (this.network === undefined) return;
    const capacity = this.capacity;
    if (this.grow(sizeBytes) === null) return;
    // Checked: put the capacity back until the image really has grown.
    this.capacity = capacity;
    try {
      await this.network.resize(sizeBytes);
    } catch (error) {
      throw new DiskSetupError(this.name, `resizing ${this.network.location} failed: ${(error as Error).message}`);
    }
  }

  /**
   * Whether the daemon holds the image's exclusive lock (RBD); null for images without one, or when the
   * question cannot be answered (the image closing).
   */
  lockOwner(): boolean | null {
    if (this.network?.lockOwner === undefined) return null;
    try {
      return this.network.lockOwner();
    } catch {
      return null;
    }
  }

  /**
   * The guest's device starts (first ring of a session): what the image needs then (RBD lock=migratable).
   * `abandoned` says the start is no longer wanted (the front-end left): a wait in progress ends early.
   */
  async deviceStarted(abandoned: () => boolean = () => false): Promise<string | null> {
    return (await this.network?.deviceStarted?.(abandoned)) ?? null;
  }

  /** The front-end stopped the device, reset it or left (RBD lock=migratable gives its lock up). */
  async deviceStopped(): Promise<string | null> {
    return (await this.network?.deviceStopped?.()) ?? null;
  }

  /** Whether every queue of the disk must run on one worker (the network image has one connection). */
  get pinQueues(): boolean {
    return this.network?.pinQueues ?? false;
  }

  /** What changes at run time, as the rings need it. */
  settings(): DiskSettings {
    return { capacityBytes: this.capacity, writeback: this.writebackEnabled };
  }

  /** What a ring needs of this disk on whichever worker thread serves it. */
  ringContext(): DiskContext {
    return {
      disk: this.name,
      imageFd: this.fd,
      limits: this.limits,
      counters: this.counterBuffer,
      throttle: this.throttle.buffer,
      ioEngine: this.options.ioEngine,
      image: this.imageIo,
      pollUs: this.options.pollUs ?? 0,
      ...(this.network !== undefined ? { network: this.network.backend } : {}),
      ...(this.qcow2 === undefined ? {} : { qcow2: this.qcow2 }),
    };
  }

  /** Syncs and closes the image; every ring of the disk must be stopped first. */
  close(): void | Promise<void> {
    if (this.network !== undefined) return this.network.close();
    if (this.qcow2Handle !== undefined) {
      // The last handle of the image: returns the unused cluster reserve, so a clean stop leaves no leaks.
      try {
        this.qcow2Handle.close();
      } catch (error) {
        this.log.error({ err: (error as Error).message }, 'closing the qcow2 image failed at shutdown');
      }
      for (const fd of this.backingLockFds) fs.closeSync(fd);
    }
    if (!this.options.readOnly) {
      try {
        fs.fdatasyncSync(this.fd);
      } catch (error) {
        this.log.error({ err: (error as Error).message }, 'fdatasync of the image failed at shutdown');
      }
    }
    fs.closeSync(this.fd);
  }
}
