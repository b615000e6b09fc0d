// The option table is the single source of the disk flags, --disk keys, config keys, reload plan and
// admin JSON: every row must reach each of them, and the defaults must flow into DiskOptions.
import { describe, expect, it } from 'vitest';
import { DISK_OPTIONS, adminOptionValues, configKeyOf, defaultFields } from '../../src/daemon/disk-options.js';
import { DiskSpecError, parseDiskArgument } from '../../src/daemon/disk-spec.js';
import { parseConfig } from '../../src/daemon/config-file.js';
import { changedDiskKeys } from '../../src/daemon/reload.js';
import { DEFAULT_MAX_DISCARD_SEG, DEFAULT_MAX_WRITE_ZEROES_SEG } from '../../src/dataplane/device-limits.js';

describe('the disk option table', () => {
  it('has unique fields, keys and flags', () => {
    const unique = (values: unknown[]): void => expect(new Set(values).size).toBe(values.length);
    unique(DISK_OPTIONS.map((row) => row.field));
    unique(DISK_OPTIONS.map((row) => row.key));
    unique(DISK_OPTIONS.flatMap((row) => (row.flag === undefined ? [] : [row.flag])));
    unique(DISK_OPTIONS.flatMap((row) => (row.admin === undefined ? [] : [row.admin])));
  });

  it('defaults match QEMU virtio-blk for the range limits (1 discard range, 1 write-zeroes range)', () => {
    expect(DEFAULT_MAX_DISCARD_SEG).toBe(1);
    expect(DEFAULT_MAX_WRITE_ZEROES_SEG).toBe(1);
    const spec = parseDiskArgument('image=/x.img,socket=/x.sock', 0);
    expect(spec.options).toMatchObject({
      maxDiscardSeg: 1,
      maxWriteZeroesSeg: 1,
      numQueues: 1,
      queueSize: 1024,
      ioEngine: 'auto',
      writeback: true,
    });
  });

  it('lets the caller override a default (--io-engine) without a module-global', () => {
    expect(parseDiskArgument('image=/x.img,socket=/x.sock', 0, { ioEngine: 'sync' }).options.ioEngine).toBe('sync');
    expect(parseDiskArgument('image=/x.img,socket=/x.sock,io-engine=io_uring', 0, { ioEngine: 'sync' }).options.ioEngine).toBe('io_uring');
    expect(parseDiskArgument('image=/x.img,socket=/x.sock', 0).options.ioEngine).toBe('auto');
    expect(defaultFields().ioEngine).toBe('auto');
    expect(parseDiskArgument('image=/x.img,socket=/x.sock', 0, { cache: 'none' }).options).toMatchObject({ cache: 'none', pollUs: 0 });
    expect(parseDiskArgument('image=/x.img,socket=/x.sock,cache=directsync,poll-us=20', 0, { cache: 'none' }).options).toMatchObject({
      cache: 'directsync',
      pollUs: 20,
    });
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,cache=fast', 0)).toThrow(/cache/);
  });

  it('reads the range limits from --disk and the config file', () => {
    const spec = parseDiskArgument('image=/x.img,socket=/x.sock,max-discard-seg=8,max-write-zeroes-seg=2', 0);
    expect(spec.options).toMatchObject({ maxDiscardSeg: 8, maxWriteZeroesSeg: 2 });
    const config = parseConfig('disks:\n  - { image: a, socket: b, max-discard-seg: 3 }\n', '/etc/v.yaml');
    expect(config.disks[0]!.options).toMatchObject({ maxDiscardSeg: 3, maxWriteZeroesSeg: 1 });
  });

  it('names the option in --disk errors, as a field', () => {
    let caught: unknown;
    try {
      parseDiskArgument('image=/x.img,socket=/x.sock,max-write-zeroes-seg=0', 0);
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(DiskSpecError);
    const error = caught as DiskSpecError;
    expect(error.code).toBe('VUBLK_ERR_DISK_SPEC');
    expect(error.peerFault).toBe(true);
    expect(error.option?.key).toBe('max-write-zeroes-seg');
    expect(error.detail).toBe('must be between 1 and 256, got 0');
  });

  it('accepts every table key in --disk and (for settable rows) in a config file', () => {
    const samples: Record<string, string | number | boolean> = {
      name: 'n',
      image: '/i',
      'socket-mode': '0660',
      'socket-owner': 0,
      'socket-group': 0,
      size: '1M',
      'num-queues': 2,
      'queue-size': 64,
      'read-only': true,
      serial: 'S',
      'logical-block-size': 4096,
      writeback: false,
      'io-engine': 'sync',
      'max-discard-seg': 2,
      'max-write-zeroes-seg': 2,
      locking: false,
      cache: 'none',
      'poll-us': 50,
      'buffer-align': 4096,
      iops: 10,
      'iops-burst': 20,
      bps: '1M',
      'bps-burst': '2M',
      'connect-timeout': 3,
      'reconnect-timeout': 10,
      'request-timeout': 0,
      connections: 4,
      merge: '512K',
      conf: '/etc/ceph/c.conf',
      id: 'vublk',
      keyring: '/k',
      'mon-host': '127.0.0.1:3300',
      lock: 'none',
      'osd-timeout': 5,
      format: 'qcow2',
      'l2-cache-size': '4M',
    };
    // Network options apply only to their kind of image.
    const rbdKeys = ['conf', 'id', 'keyring', 'mon-host', 'lock', 'osd-timeout'];
    const nbdKeys = ['connect-timeout', 'reconnect-timeout', 'request-timeout', 'connections', 'merge'];
    for (const row of DISK_OPTIONS) {
      if (row.key === 'socket' || row.key === 'socket-fd' || row.key === 'image') continue;
      const sample = samples[row.key];
      expect(sample, `a sample value for ${row.key}`).toBeDefined();
      const text = typeof sample === 'boolean' ? (sample ? 'on' : 'off') : String(sample);
      // Keys that only apply next to another one.
      const burstNeeds =
        row.key === 'iops-burst' ? ',iops=10' : row.key === 'bps-burst' ? ',bps=1M' : row.key === 'buffer-align' ? ',cache=none' : '';
      const image = rbdKeys.includes(row.key) ? 'rbd:pool/img' : nbdKeys.includes(row.key) ? 'nbd://host/e' : '/x.img';
      const spec = parseDiskArgument(`image=${image},socket=/x.sock,${row.key}=${text}${burstNeeds}`, 0);
      expect(spec.fields[row.field], row.key).toBeDefined();
      const needs = burstNeeds.replace(',', ', ').replace('=', ': ');
      const entry =
        row.group === undefined
          ? `${row.key}: ${JSON.stringify(sample)}${needs}`
          : `${row.group}: { ${row.key}: ${JSON.stringify(sample)}${needs} }`;
      const config = parseConfig(`disks:\n  - { image: "${image}", socket: /x.sock, ${entry} }\n`, '/etc/v.yaml');
      expect(config.disks[0]!.fields[row.field], configKeyOf(row)).toEqual(spec.fields[row.field]);
    }
  });

  it('keeps network image locations as written and refuses options of the other kind', () => {
    expect(parseDiskArgument('image=nbd+unix:///e?socket=/run/n.sock,socket=/x.sock', 0).options.imagePath).toBe(
      'nbd+unix:///e?socket=/run/n.sock',
    );
    expect(parseDiskArgument('image=rbd:vms/g1,socket=/x.sock,id=vublk,keyring=k', 0).options.rbdKeyring).toMatch(/^\/.*\/k$/);
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,keyring=/k', 0)).toThrow(/keyring: only applies to rbd: images/);
    expect(() => parseDiskArgument('image=rbd:vms/g1,socket=/x.sock,reconnect-timeout=5', 0)).toThrow(
      /reconnect-timeout: only applies to nbd/,
    );
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,buffer-align=4096', 0)).toThrow(
      /buffer-align: only applies to cache=none and cache=directsync \(O_DIRECT\), not cache=writeback/,
    );
    expect(() => parseDiskArgument('image=rbd:vms/g1,socket=/x.sock,cache=none,buffer-align=4096', 0)).toThrow(
      /buffer-align: only applies to image files and block devices/,
    );
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,cache=none,buffer-align=3000', 0)).toThrow(/power of two/);
    expect(parseDiskArgument('image=/x.img,socket=/x.sock,cache=directsync,buffer-align=4096', 0).options.bufferAlign).toBe(4096);
    expect(() => parseDiskArgument('image=rbd:vms/g1,socket=/x.sock,size=1G', 0)).toThrow(
      /size: a network image has the size its server gives it/,
    );
    expect(() => parseDiskArgument('image=rbd:vms,socket=/x.sock', 0)).toThrow(/image: .*expected rbd:POOL\/IMAGE/);
    expect(() => parseDiskArgument('image=nbds://h/e,socket=/x.sock', 0)).toThrow(/TLS \(nbds\) is not supported/);
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,connections=2', 0)).toThrow(/connections: only applies to nbd/);
    expect(() => parseDiskArgument('image=nbd://h/e,socket=/x.sock,connections=0', 0)).toThrow(/connections/);
    expect(() => parseDiskArgument('image=nbd://h/e,socket=/x.sock,connections=17', 0)).toThrow(/connections/);
    expect(parseDiskArgument('image=nbd://h/e,socket=/x.sock,connections=16', 0).options.connections).toBe(16);
    // merge=: a size or off, for either kind of network image; files have the kernel's merging.
    expect(parseDiskArgument('image=rbd:p/i,socket=/x.sock,merge=2M', 0).options.mergeMaxBytes).toBe(2 * 1024 * 1024);
    expect(parseDiskArgument('image=nbd://h/e,socket=/x.sock,merge=off', 0).options.mergeMaxBytes).toBe(0);
    expect(parseDiskArgument('image=rbd:p/i,socket=/x.sock', 0).options.mergeMaxBytes).toBeUndefined();
    expect(() => parseDiskArgument('image=rbd:p/i,socket=/x.sock,merge=64M', 0)).toThrow(/merge: must be at most 33554432 bytes/);
    expect(() => parseDiskArgument('image=rbd:p/i,socket=/x.sock,merge=lots', 0)).toThrow(/merge:/);
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,merge=1M', 0)).toThrow(/merge: only applies to nbd:\/\/ and rbd: images/);
    expect(
      parseConfig('disks:\n  - { image: "rbd:p/i", socket: /x.sock, merge: off }\n', '/etc/v.yaml').disks[0]!.fields.mergeMaxBytes,
    ).toBe(0);
  });

  it('says where a retired key went', () => {
    expect(() => parseDiskArgument('image=/x.img,socket=/x.sock,threads=2', 0)).toThrow(
      /threads is no longer a disk option.*serve --threads N/,
    );
  });

  it('drives the reload plan: restart-only rows are reported, live rows are not', () => {
    const a = parseDiskArgument('image=/x.img,socket=/x.sock', 0);
    const b = parseDiskArgument('image=/x.img,socket=/y.sock,max-write-zeroes-seg=4,iops=100', 0);
    expect(changedDiskKeys(a, b)).toEqual(['socket', 'max-write-zeroes-seg']);
  });

  it('drives the admin JSON', () => {
    const spec = parseDiskArgument('image=/x.img,socket=/x.sock,name=d,read-only=on', 0);
    expect(adminOptionValues(spec.fields)).toEqual({
      name: 'd',
      image: '/x.img',
      'num-queues': 1,
      'queue-size': 1024,
      'read-only': true,
      'logical-block-size': 512,
      'io-engine': 'auto',
      'max-discard-seg': 1,
      'max-write-zeroes-seg': 1,
      locking: true,
      cache: 'writeback',
      'poll-us': 0,
    });
  });
});
