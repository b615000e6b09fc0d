import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { baseUrl, formatAddress, isLoopback, ListenAddressError, parseMetricsListen } from '../../src/metrics/listen-address.js';

describe('parseMetricsListen', () => {
  it('reads HOST:PORT, [IPv6]:PORT, unix:PATH and off', () => {
    expect(parseMetricsListen('127.0.0.1:9477')).toEqual({ kind: 'tcp', host: '127.0.0.1', port: 9477 });
    expect(parseMetricsListen('localhost:0')).toEqual({ kind: 'tcp', host: 'localhost', port: 0 });
    expect(parseMetricsListen('[::1]:9477')).toEqual({ kind: 'tcp', host: '::1', port: 9477 });
    expect(parseMetricsListen('0.0.0.0:80')).toEqual({ kind: 'tcp', host: '0.0.0.0', port: 80 });
    expect(parseMetricsListen('unix:/run/vublk/m.sock')).toEqual({ kind: 'unix', path: '/run/vublk/m.sock' });
    expect(parseMetricsListen('unix:rel.sock')).toEqual({ kind: 'unix', path: path.resolve('rel.sock') });
    expect(parseMetricsListen('off')).toBeNull();
  });

  it.each([
    ['9477', /no port/],
    [':9477', /no host/],
    ['127.0.0.1:', /port ''/],
    ['127.0.0.1:65536', /port '65536'/],
    ['127.0.0.1:-1', /port/],
    ['::1:9477', /brackets/],
    ['[::1]9477', /\[ADDRESS\]:PORT/],
    ['[1.2.3.4]:80', /not an IPv6/],
    ['bad host:80', /neither an IPv4 address nor a host name/],
    ['unix:', /path is empty/],
  ])('rejects %s', (text, message) => {
    expect(() => parseMetricsListen(text)).toThrow(ListenAddressError);
    expect(() => parseMetricsListen(text)).toThrow(message);
  });
});

describe('isLoopback', () => {
  it.each([
    ['127.0.0.1:1', true],
    ['127.1.2.3:1', true],
    ['localhost:1', true],
    ['[::1]:1', true],
    ['[0:0:0:0:0:0:0:1]:1', true],
    ['[::ffff:127.0.0.1]:1', true],
    ['unix:/tmp/x.sock', true],
    ['0.0.0.0:1', false],
    ['[::]:1', false],
    ['192.168.1.10:1', false],
    ['[fe80::1]:1', false],
    ['metrics.example:1', false],
  ])('%s → %s', (text, expected) => {
    expect(isLoopback(parseMetricsListen(text)!)).toBe(expected);
  });
});

describe('formatAddress / baseUrl', () => {
  it('writes addresses back in the form --metrics-listen accepts', () => {
    expect(formatAddress({ kind: 'tcp', host: '::1', port: 5 })).toBe('[::1]:5');
    expect(formatAddress({ kind: 'tcp', host: '127.0.0.1', port: 5 })).toBe('127.0.0.1:5');
    expect(baseUrl({ kind: 'tcp', host: '::1', port: 5 })).toBe('http://[::1]:5');
    expect(baseUrl({ kind: 'unix', path: '/x.sock' })).toBe('unix:/x.sock');
  });
});
