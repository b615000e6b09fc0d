// One error shape: every error class of the daemon derives from VublkError with a stable code, and the log
// serializer reports code and classification instead of guessing from properties.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { VublkError } from '../../src/errors.js';
import { errorFields } from '../../src/log.js';
import { InvalidSizeError, parseSize } from '../../src/throttle/size.js';
import { SyscallError, Errno } from '../../src/sys/errors.js';
import { MalformedMessageError } from '../../protocol/vhost-user.js';
import { ConfigError, parseConfig } from '../../src/daemon/config-file.js';
import { TruncatedFdsError } from '../../src/sys/unix-socket.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) return sources(full);
    return name.endsWith('.ts') ? [full] : [];
  });
}

describe('VublkError', () => {
  it('is the base of every error class in src/ and protocol/ (the test front-end and bench aside)', () => {
    const offenders = [...sources(path.join(ROOT, 'src')), ...sources(path.join(ROOT, 'protocol'))]
      .filter((file) => !/[/\\]src[/\\](frontend|bench)[/\\]/.test(file))
      .filter((file) => path.relative(ROOT, file) !== path.join('protocol', 'errors.ts'))
      .filter((file) => /class \w+ extends (Error|RangeError|TypeError)\b/.test(readFileSync(file, 'utf8')));
    expect(offenders.map((file) => path.relative(ROOT, file))).toEqual([]);
  });

  it('carries a stable code, its class name and its classification', () => {
    let caught: unknown;
    try {
      parseSize('12X');
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(InvalidSizeError);
    expect(caught).toBeInstanceOf(VublkError);
    expect(caught).toMatchObject({ code: 'VUBLK_ERR_INVALID_SIZE', name: 'InvalidSizeError', peerFault: true, fatal: false });
    expect(new TruncatedFdsError()).toMatchObject({ code: 'VUBLK_ERR_TRUNCATED_FDS', peerFault: true, fatal: true });
    expect(new MalformedMessageError(1, 'short')).toMatchObject({ code: 'VUBLK_ERR_MALFORMED_MESSAGE', peerFault: true, fatal: false });
  });

  it('config errors carry the key path as a field', () => {
    let caught: unknown;
    try {
      parseConfig('disks:\n  - { image: a, socket: b, throttle: { bps: lots } }\n', '/etc/v.yaml');
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(ConfigError);
    expect(caught).toMatchObject({ code: 'VUBLK_ERR_CONFIG', keyPath: 'disks[0].throttle.bps', file: '/etc/v.yaml' });
    expect((caught as ConfigError).detail).toMatch(/^invalid rate: "lots"/);
  });
});

describe('errorFields (the log serializer)', () => {
  it('logs a VublkError by code and classification, not as an errno', () => {
    const fields = errorFields(new InvalidSizeError('12X', 'size', 'e.g. 4096'));
    expect(fields).toMatchObject({ errType: 'InvalidSizeError', code: 'VUBLK_ERR_INVALID_SIZE', peerFault: true });
    expect(fields).not.toHaveProperty('errno');
  });

  it('keeps the call and errno name of a failed syscall', () => {
    expect(errorFields(new SyscallError('open', Errno.ENOENT, '/x'))).toMatchObject({
      code: 'VUBLK_ERR_SYSCALL',
      call: 'open',
      errno: 'ENOENT',
    });
  });

  it('keeps the errno code of a Node.js system error, and handles non-errors', () => {
    const nodeError = Object.assign(new Error('ENOENT: no such file'), { code: 'ENOENT', syscall: 'open' });
    expect(errorFields(nodeError)).toMatchObject({ errno: 'ENOENT', call: 'open' });
    expect(errorFields('text')).toEqual({ err: 'text' });
  });
});
