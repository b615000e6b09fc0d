/**
 * The running daemon: opens every disk, listens on every socket, and shuts down cleanly on SIGTERM/SIGINT
 * (close sessions, stop workers, sync images, remove the socket files it created, exit 0). A second signal
 * exits at once.
 */
import { BlkDisk } from '../device/blk-disk.js';
import { ExportListener } from '../control/export-listener.js';
import type { DiskSpec } from './disk-spec.js';
import { errorFields, type Logger } from '../log.js';

export interface RunningDisk {
  disk: BlkDisk;
  listener: ExportListener;
}

export class Daemon {
  readonly disks: RunningDisk[] = [];
  private stopping: Promise<void> | null = null;

  constructor(private readonly log: Logger) {}

  /** Opens and serves every disk; on any failure, what was already opened is closed again. */
  async start(specs: readonly DiskSpec[]): Promise<void> {
    try {
      for (const spec of specs) {
        const log = this.log.child({ disk: spec.options.name });
        const disk = new BlkDisk(spec.options, log);
        try {
          const listener = new ExportListener(disk, spec.listen, log);
          this.disks.push({ disk, listener });
        } catch (error) {
          await disk.close();
          throw error;
        }
        log.info(
          { image: spec.options.imagePath, capacityBytes: disk.capacityBytes, numQueues: spec.options.numQueues, readOnly: spec.options.readOnly },
          'disk ready',
        );
      }
    } catch (error) {
      await this.stop();
      throw error;
    }
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
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      for (const { listener } of this.disks) await listener.close();
      for (const { disk } of this.disks) await disk.close();
      this.log.info('stopped');
    })();
    return this.stopping;
  }
}
