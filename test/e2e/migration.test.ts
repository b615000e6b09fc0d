// Live migration on one host: a guest writing and reading back with O_DIRECT throughout moves from a QEMU
// attached to one vublk to a QEMU attached to another vublk on the same image (shared storage), then back.
// Under TCG the guest keeps writing during pre-copy, so guest buffers the device fills after their page was
// sent reach the destination only through vublk's dirty log: a missing bit shows as a mismatch (or a stuck
// request) in the guest after the switch-over, and, more directly, as guest RAM that differs between the source
// and the paused destination (migration-harness.ts compares them page by page at every switch-over). (The
// same on a shared Ceph RBD image: rbd-migration.test.ts.)
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuAvailable } from './qemu.js';
import type { DaemonProcess } from '../support/daemon-process.js';
import {
  dirtyPagesLogged,
  failures,
  hopTo,
  migrationContext,
  startServingDaemon,
  startVm,
  vhostUserDisk,
  waitForBoot,
  type Vm,
} from './migration-harness.js';

/** VUBLK_MIGRATION_QUEUES=2 runs the same test with two queues (and two vCPUs, so the guest uses both). */
const NUM_QUEUES = Number(process.env.VUBLK_MIGRATION_QUEUES ?? 1);
/** VUBLK_MIGRATION_CONTROL=1: harness control, QEMU's own virtio-blk on the shared image instead of vublk. */
const CONTROL = process.env.VUBLK_MIGRATION_CONTROL === '1';
const DISK_BYTES = 64 * 1024 * 1024;

const unavailable = qemuAvailable();
const required = process.env.VUBLK_E2E_REQUIRED === '1';
if (unavailable !== null) console.warn(`live-migration tests ${required ? 'cannot run' : 'skipped'}: ${unavailable}`);
if (unavailable !== null && required) {
  it('QEMU and the test guest are available (VUBLK_E2E_REQUIRED=1)', () => {
    expect.fail(unavailable);
  });
}

describe.skipIf(unavailable !== null)('live migration between two vublk daemons on one image', () => {
  let dir: string;
  let imagePath: string;
  const daemons: DaemonProcess[] = [];
  const sockets: string[] = [];
  const vms: Vm[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'vublk-migration-'));
    imagePath = path.join(dir, 'shared.img');
    await writeFile(imagePath, '');
    await truncate(imagePath, DISK_BYTES);
    for (const name of ['vublk-a', 'vublk-b']) {
      const socketPath = path.join(dir, `${name}.sock`);
      // Two daemons on one image by design (shared storage), so image locking is off; each serves its own QEMU.
      daemons.push(await startServingDaemon(`image=${imagePath},socket=${socketPath},locking=off,num-queues=${NUM_QUEUES}`, socketPath));
      sockets.push(socketPath);
    }
  }, 30_000);

  afterAll(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
    await Promise.all(daemons.map((d) => d.stop()));
    if (dir) await rm(dir, { recursive: true, force: true });
  }, 60_000);

  const disk = (socketPath: string): string[] =>
    CONTROL
      ? ['-drive', `file=${imagePath},if=none,id=d0,format=raw,file.locking=off`, '-device', 'virtio-blk-pci,drive=d0']
      : vhostUserDisk(socketPath, NUM_QUEUES);

  it('moves a guest doing O_DIRECT I/O to the other daemon and back with no I/O error and no mismatch', { timeout: 900_000 }, async () => {
    const context = migrationContext(vms, daemons);
    const first = await startVm({ name: 'qemu-1', dir, disk: disk(sockets[0]!), incomingPort: null, cpus: NUM_QUEUES });
    vms.push(first);
    await waitForBoot(first, context);

    const report: string[] = [];
    // Source on daemon A → destination on daemon B, then back to a fresh QEMU on daemon A.
    const hops: [string, string][] = [
      ['qemu-2', sockets[1]!],
      ['qemu-3', sockets[0]!],
    ];
    let source = first;
    for (const [index, [name, socketPath]] of hops.entries()) {
      const hop = await hopTo(source, index + 1, { dir, name, disk: disk(socketPath), cpus: NUM_QUEUES, vms, context });
      report.push(hop.summary);
      source = hop.destination;
    }
    const logged = dirtyPagesLogged(daemons);
    console.log(
      `live migration: ${report.join('; ')}; dirty pages logged (lifetime, at each ring stop): daemon A ${JSON.stringify(logged[0])}, daemon B ${JSON.stringify(logged[1])}`,
    );
    for (const vm of vms) expect(failures(vm), context()).toEqual([]);
    // (The control run uses QEMU's own virtio-blk: the daemons sit idle.)
    for (const daemon of CONTROL ? [] : daemons) {
      expect(daemon.running(), context()).toBe(true);
      expect(
        daemon.logs().some((line) => line.msg === 'dirty logging on'),
        context(),
      ).toBe(true);
    }
  });
});
