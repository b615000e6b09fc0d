import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfigFile, parseConfig } from '../../src/daemon/config-file.js';

const FILE = '/etc/vublk/vublk.yaml';

const GOOD = `
metrics-listen: "[::1]:9500"
admin-public: false
log-level: debug
log-format: json
disks:
  - name: fast
    socket: fast.sock
    image: /var/lib/vublk/fast.img
    size: 10G
    num-queues: 4
    queue-size: 256
    read-only: false
    serial: FAST-1
    logical-block-size: 4096
    writeback: false
    io-engine: sync
    cache: none
    poll-us: 50
    max-discard-seg: 4
    throttle:
      iops: 10k
      iops-burst: 20000
      bps: 100M
      bps-burst: 1073741824
  - image: /var/lib/vublk/slow.img
    socket-fd: 3
    read-only: true
`;

function error(text: string, file = FILE): ConfigError {
  try {
    parseConfig(text, file);
  } catch (caught) {
    expect(caught).toBeInstanceOf(ConfigError);
    return caught as ConfigError;
  }
  throw new Error('expected a ConfigError');
}

describe('parseConfig', () => {
  it('reads every key into disk specs and daemon settings', () => {
    const config = parseConfig(GOOD, FILE);
    expect(config).toMatchObject({ file: FILE, metricsListen: '[::1]:9500', adminPublic: false, logLevel: 'debug', logFormat: 'json' });
    expect(config.disks).toHaveLength(2);
    const [fast, slow] = config.disks;
    expect(fast!.listen).toEqual({ kind: 'path', path: '/etc/vublk/fast.sock' });
    expect(fast!.options).toEqual({
      name: 'fast',
      imagePath: '/var/lib/vublk/fast.img',
      sizeBytes: 10 * 1024 ** 3,
      numQueues: 4,
      queueSize: 256,
      readOnly: false,
      serial: 'FAST-1',
      logicalBlockSize: 4096,
      writeback: false,
      ioEngine: 'sync',
      cache: 'none',
      pollUs: 50,
      maxDiscardSeg: 4,
      maxWriteZeroesSeg: 1,
      locking: true,
      throttle: { iops: 10000, iopsBurst: 20000, bps: 100 * 1024 ** 2, bpsBurst: 1024 ** 3 },
    });
    expect(slow!.listen).toEqual({ kind: 'fd', fd: 3 });
    expect(slow!.options).toMatchObject({ name: 'disk1', readOnly: true, numQueues: 1, throttle: {} });
  });

  it('reads the same from JSON', () => {
    const config = parseConfig(
      JSON.stringify({ disks: [{ image: 'a.img', socket: '/run/a.sock', throttle: { bps: '1M' } }] }),
      '/cfg/v.json',
    );
    expect(config.disks[0]!.options.imagePath).toBe('/cfg/a.img');
    expect(config.disks[0]!.options.throttle.bps).toBe(1 << 20);
  });

  it.each([
    ['disks:\n  - image: a.img\n    socket: a.sock\n    throttle: { bps: fast }\n', 'disks[0].throttle.bps', /invalid rate: "fast"/],
    [
      'disks:\n  - { image: a, socket: a }\n  - { image: b, socket: b, throttle: { bps: "10 furlongs" } }\n',
      'disks[1].throttle.bps',
      /invalid rate/,
    ],
    ['disks:\n  - { image: a, socket: a, throttle: { iops: -5 } }\n', 'disks[0].throttle.iops', /non-negative whole number/],
    ['disks:\n  - { image: a, socket: a, throttle: { iops-burst: 5 } }\n', 'disks[0].throttle.iops-burst', /needs iops/],
    [
      'disks:\n  - { image: a, socket: a, throttle: { iops: 5, colour: red } }\n',
      'disks[0].throttle.colour',
      /unknown key \(known: iops, iops-burst, bps, bps-burst\)/,
    ],
    ['disks:\n  - { image: a, socket: a, throttle: 5 }\n', 'disks[0].throttle', /must be a mapping/],
    ['disks:\n  - { image: a, socket: a, colour: red }\n', 'disks[0].colour', /unknown key/],
    ['disks:\n  - { image: a, socket: a, num-queues: 100 }\n', 'disks[0].num-queues', /^must be between 1 and 64, got 100$/],
    [
      'disks:\n  - { image: a, socket: a, num-queues: two }\n',
      'disks[0].num-queues',
      /must be a non-negative whole number, got string "two"/,
    ],
    ['disks:\n  - { image: a, socket: a, queue-size: 100 }\n', 'disks[0].queue-size', /power of two/],
    ['disks:\n  - { image: a, socket: a, logical-block-size: 1024 }\n', 'disks[0].logical-block-size', /512 or 4096/],
    ['disks:\n  - { image: a, socket: a, size: 1000 }\n', 'disks[0].size', /multiple of 512/],
    ['disks:\n  - { image: a, socket: a, read-only: yes }\n', 'disks[0].read-only', /true or false, got string "yes"/],
    ['disks:\n  - { image: a, socket: a, io-engine: turbo }\n', 'disks[0].io-engine', /must be one of/],
    ['disks:\n  - { image: a, socket: a, threads: 2 }\n', 'disks[0].threads', /no longer a disk option.*--threads/],
    [
      'disks:\n  - { image: a, socket: a, max-write-zeroes-seg: 0 }\n',
      'disks[0].max-write-zeroes-seg',
      /^must be between 1 and 256, got 0$/,
    ],
    ['disks:\n  - { socket: a }\n', 'disks[0].image', /image path is required/],
    ['disks:\n  - { image: a }\n', 'disks[0].socket', /is required/],
    ['disks:\n  - { image: a, socket: a, socket-fd: 3 }\n', 'disks[0]', /not both/],
    ['disks:\n  - { image: a, socket: a, name: "" }\n', 'disks[0].name', /non-empty string/],
    ['disks:\n  - { image: a, socket: a }\n  - { image: b, socket: b, name: disk0 }\n', 'disks', /two disks are named 'disk0'/],
    ['disks:\n  - { image: a, socket: s }\n  - { image: b, socket: s }\n', 'disks', /two disks listen on/],
    ['disks: []\n', 'disks', /is empty/],
    ['disks: {}\n', 'disks', /must be a list/],
    ['log-level: info\n', 'disks', /is required/],
    ['disks: [ 5 ]\n', 'disks[0]', /must be a mapping/],
    ['colour: red\ndisks: []\n', 'colour', /unknown key \(known: disks, metrics-listen/],
    ['log-level: loud\ndisks: []\n', 'log-level', /must be one of fatal, error, warn, info/],
    ['metrics-listen: 9477\ndisks: []\n', 'metrics-listen', /must be a string/],
    ['metrics-listen: "nowhere"\ndisks: []\n', 'metrics-listen', /no port/],
    ['admin-public: 1\ndisks: []\n', 'admin-public', /true or false/],
  ])('%j → %s', (text, keyPath, detail) => {
    const e = error(text);
    expect(e.keyPath).toBe(keyPath);
    expect(e.detail).toMatch(detail);
    expect(e.message).toBe(`${FILE}: ${keyPath}: ${e.detail}`);
  });

  it('reports syntax errors with their position, and unknown formats', () => {
    const yaml = error('disks:\n  - image: a\n   socket: [\n');
    expect(yaml.message).toMatch(/^\/etc\/vublk\/vublk\.yaml: invalid YAML at line \d+, column \d+: /);
    expect(error('disks:\n  - { image: a, image: b }\n').message).toMatch(/invalid YAML.*[Dd]uplicate|unique/);
    expect(error('{ "disks": [', '/x/v.json').message).toMatch(/^\/x\/v\.json: invalid JSON: /);
    expect(error('disks: []', '/x/v.toml').message).toMatch(/unknown config format '\.toml'/);
    expect(error('- a\n- b\n').message).toMatch(/top level must be a mapping/);
  });
});

describe('loadConfigFile', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-cfg-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('reads a file and resolves relative paths against its folder', () => {
    const file = path.join(dir, 'v.yml');
    writeFileSync(file, 'disks:\n  - { image: d.img, socket: d.sock }\n');
    const config = loadConfigFile(file);
    expect(config.file).toBe(file);
    expect(config.disks[0]!.options.imagePath).toBe(path.join(dir, 'd.img'));
    expect(config.disks[0]!.listen).toEqual({ kind: 'path', path: path.join(dir, 'd.sock') });
  });

  it('names a missing file', () => {
    expect(() => loadConfigFile(path.join(dir, 'missing.yaml'))).toThrow(`${path.join(dir, 'missing.yaml')}: no such file`);
  });
});
