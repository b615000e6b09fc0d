// Live migration between two hosts over shared Ceph RBD storage (docs/rbd.md, "Live migration with shared
// RBD storage"): one micro cluster (test/support/ceph/micro-cluster.sh), one image, two vublk daemons serving
// it with lock=migratable. A real guest doing O_DIRECT write/read-back rounds moves from a QEMU on vublk A to a
// QEMU started with -incoming on vublk B, then back to a fresh QEMU on A; a migration cancelled in pre-copy
// sits in between. Checked: no I/O error or mismatch in the guest before and after each switch-over, guest
// RAM equal page by page between the source and the paused destination at each switch-over, the
// sentinel only the dirty log carries, the exclusive lock's owner (`rbd lock ls`) is nobody before a guest
// runs, the running guest's daemon from its boot on (a third client's write is refused meanwhile), the
// destination's after each switch-over and still the source's after the cancel, and `rbd export` holds the
// guest's patterns where it wrote them and nothing elsewhere. Skips with the reason when Ceph or QEMU is
// missing (fails under VUBLK_E2E_REQUIRED=1). The cluster is shut down cleanly at the end.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PATTERN_OFFSET, PATTERN_PATH, qemuAvailable } from './qemu.js';
import type { DaemonProcess } from '../support/daemon-process.js';
import { cephMissing, startMicroCluster, type MicroCluster } from '../support/ceph/micro-cluster.js';
import { rbdLockOwners, rbdWatchers } from '../support/ceph/rbd-clients.js';
import {
  cancelledHop,
  dirtyPagesLogged,
  failures,
  hopTo,
  migrationContext,
  pauseVm,
  sleep,
  startServingDaemon,
  startVm,
  vhostUserDisk,
  waitForBoot,
  type Vm,
} from './migration-harness.js';

const MiB = 1024 * 1024;
const IMAGE = 'rbd/migrating';
const IMAGE_BYTES = 64 * MiB;
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';
const missing = cephMissing() ?? qemuAvailable();
if (missing !== null) console.warn(`RBD live-migration test ${required ? 'cannot run' : 'skipped'}: ${missing}`);

/** The pattern in upper case, as the guest's odd rounds and its first sentinel block write it. */
function upperCase(data: Buffer): Buffer {
  return Buffer.from(data.map((byte) => (byte >= 0x61 && byte <= 0x7a ? byte - 0x20 : byte)));
}

/** Offsets of the 512-byte sectors of `actual` that match neither candidate at the same place. */
function sectorsMatchingNeither(actual: Buffer, a: Buffer, b: Buffer): number[] {
  const bad: number[] = [];
  for (let at = 0; at < actual.length; at += 512) {
    const sector = actual.subarray(at, at + 512);
    if (!sector.equals(a.subarray(at, at + 512)) && !sector.equals(b.subarray(at, at + 512))) bad.push(at);
  }
  return bad;
}

describe('live migration between two vublk daemons on one Ceph RBD image (lock=migratable)', () => {
  if (missing !== null) {
    if (required) it('Ceph and QEMU are available (VUBLK_E2E_REQUIRED=1)', () => expect.fail(missing));
    else it.skip(`not available: ${missing}`, () => undefined);
    return;
  }

  let cluster: MicroCluster;
  let dir: string;
  const daemons: DaemonProcess[] = [];
  const sockets: string[] = [];
  /** The Ceph global id of each daemon's client (its header watch). */
  const clients: number[] = [];
  const vms: Vm[] = [];

  beforeAll(async () => {
    cluster = await startMicroCluster();
    dir = path.dirname(cluster.dir);
    await cluster.run('rbd', ['create', '--size', String(IMAGE_BYTES / MiB), IMAGE]);
    for (const name of ['vublk-a', 'vublk-b']) {
      const socket = path.join(dir, `${name}.sock`);
      const disk = `image=rbd:${IMAGE},lock=migratable,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=${socket}`;
      daemons.push(await startServingDaemon(disk, socket, 60_000));
      sockets.push(socket);
      // The daemon opened the image before it listened: its client is the watcher not seen before.
      const deadline = Date.now() + 30_000;
      for (;;) {
        const fresh = (await rbdWatchers(cluster, IMAGE)).filter((id) => !clients.includes(id));
        if (fresh.length === 1) {
          clients.push(fresh[0]!);
          break;
        }
        if (Date.now() > deadline) throw new Error(`no single new watcher on ${IMAGE} for ${name}: ${JSON.stringify(fresh)}`);
        await sleep(500);
      }
    }
    // lock=migratable: a daemon takes the lock when a guest's device starts, not at open.
    expect(await rbdLockOwners(cluster, IMAGE)).toEqual([]);
  }, 360_000);

  afterAll(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
    await Promise.all(daemons.map((d) => d.stop()));
    await cluster?.stop();
  }, 120_000);

  it('moves a guest doing O_DIRECT I/O to the other daemon and back; the lock follows the writer; a cancelled migration leaves the source writing', {
    timeout: 1_500_000,
  }, async () => {
    const context = migrationContext(vms, daemons);
    const owner = async (): Promise<string> => {
      const owners = await rbdLockOwners(cluster, IMAGE);
      return owners.map((id) => (id === clients[0] ? 'vublk A' : id === clients[1] ? 'vublk B' : `client.${id}`)).join(',') || 'none';
    };
    const report: string[] = [];

    const first = await startVm({ name: 'qemu-1', dir, disk: vhostUserDisk(sockets[0]!), incomingPort: null });
    vms.push(first);
    await waitForBoot(first, context);
    expect(await owner(), `the source took the lock when the guest's device started\n${context()}`).toBe('vublk A');
    // The lock is pinned while the guest runs: a third client's write is refused (with lock=none it would
    // simply take the lock and write).
    const intruder = await cluster
      .run('rbd', ['bench', '--io-type', 'write', '--io-size', '4096', '--io-total', '4096', IMAGE], 60_000)
      .then(
        () => 'written',
        (error: Error) => error.message,
      );
    expect(intruder, `a third writer is refused while the guest runs on A\n${context()}`).toMatch(/Read-only file system/);
    expect(await owner(), `the lock stays with the running guest's daemon\n${context()}`).toBe('vublk A');

    // A → B: the source gives the lock up when QEMU stops its device at switch-over (before it answers the last
    // GET_VRING_BASE), and the destination takes it when its device starts.
    const there = await hopTo(first, 1, { dir, name: 'qemu-2', disk: vhostUserDisk(sockets[1]!), vms, context });
    report.push(there.summary);
    expect(await owner(), `the lock follows the guest to the destination\n${context()}`).toBe('vublk B');

    // A migration B → A cancelled in pre-copy (docs/rbd.md step 6): the source guest writes on, the lock stays.
    const logSince = daemons[1]!.logs().length;
    const cancelled = await cancelledHop(there.destination, { dir, name: 'qemu-x', disk: vhostUserDisk(sockets[0]!), vms, context });
    report.push(cancelled.summary);
    // The source QEMU turned vublk B's dirty log on for the pre-copy and off again at the cancel.
    await daemons[1]!.waitForLog((line) => line.msg === 'dirty logging on', 30_000, logSince);
    await daemons[1]!.waitForLog((line) => line.msg === 'dirty logging off', 30_000, logSince);
    expect(await owner(), `the lock stays with the source after a cancelled migration\n${context()}`).toBe('vublk B');

    // B → A, to a fresh QEMU on the first daemon.
    const back = await hopTo(there.destination, 2, { dir, name: 'qemu-3', disk: vhostUserDisk(sockets[0]!), vms, context });
    report.push(back.summary);
    expect(await owner(), `the lock follows the guest back\n${context()}`).toBe('vublk A');

    // Paused (its rings drained), the guest's writes are all in the cluster: every sector of the four round
    // regions holds one of the two alternating patterns (a round may have been cut short between requests),
    // the sentinel blocks written once before the first migration are intact, and nothing else was written.
    const lastRound = await pauseVm(back.destination, context);
    const image = await cluster.run('rbd', ['export', IMAGE, '-'], 120_000);
    expect(image.length).toBe(IMAGE_BYTES);
    const lower = readFileSync(PATTERN_PATH);
    const upper = upperCase(lower);
    const length = lower.length;
    for (let writer = 0; writer < 4; writer++) {
      const at = PATTERN_OFFSET + writer * length;
      const bad = sectorsMatchingNeither(image.subarray(at, at + length), lower, upper);
      expect(bad.slice(0, 8), `region ${writer} at ${at}: sectors matching neither round pattern`).toEqual([]);
    }
    const sentinel = PATTERN_OFFSET + 4 * length;
    expect(image.subarray(sentinel, sentinel + length).equals(upper), 'sentinel block A').toBe(true);
    expect(image.subarray(sentinel + length, sentinel + 2 * length).equals(lower), 'sentinel block S').toBe(true);
    const zeros = (from: number, to: number): boolean => image.subarray(from, to).every((byte) => byte === 0);
    expect(zeros(0, PATTERN_OFFSET), 'nothing written before the pattern offset').toBe(true);
    expect(zeros(sentinel + 2 * length, IMAGE_BYTES), 'nothing written after the sentinel').toBe(true);

    const logged = dirtyPagesLogged(daemons);
    console.log(
      `RBD live migration: ${report.join('; ')}; last round ${lastRound}; lock owners as expected (A, B, B after the cancel, A); ` +
        `dirty pages logged at each ring stop: daemon A ${JSON.stringify(logged[0])}, daemon B ${JSON.stringify(logged[1])}`,
    );
    for (const vm of vms) expect(failures(vm), context()).toEqual([]);
    for (const daemon of daemons) {
      expect(daemon.running(), context()).toBe(true);
      expect(
        daemon.logs().some((line) => line.msg === 'dirty logging on'),
        context(),
      ).toBe(true);
    }
  });
});
