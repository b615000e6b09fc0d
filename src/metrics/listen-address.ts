/**
 * Where the metrics/admin HTTP listener binds: `HOST:PORT` (IPv4 or a host name), `[IPv6]:PORT`,
 * `unix:/path`, or `off`. Port 0 asks the kernel for a free port (the bound one is logged). Pure.
 */
import net from 'node:net';
import path from 'node:path';
import { VublkError } from '../errors.js';

export type MetricsAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export const DEFAULT_METRICS_LISTEN = '127.0.0.1:9477';

export class ListenAddressError extends VublkError {
  constructor(input: string, detail: string) {
    super(
      'VUBLK_ERR_LISTEN_ADDRESS',
      `invalid metrics listen address '${input}': ${detail} (expected HOST:PORT, [IPV6]:PORT, unix:/PATH or off)`,
      {
        peerFault: true,
      },
    );
  }
}

const HOST_NAME = /^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$/;

/** Parses a `--metrics-listen` value; `null` means off. Throws ListenAddressError. */
export function parseMetricsListen(text: string): MetricsAddress | null {
  const input = text.trim();
  if (input === 'off' || input === 'none') return null;
  if (input.startsWith('unix:')) {
    const file = input.slice('unix:'.length);
    if (file === '') throw new ListenAddressError(text, 'the unix socket path is empty');
    return { kind: 'unix', path: path.resolve(file) };
  }
  let host: string;
  let portText: string;
  if (input.startsWith('[')) {
    const close = input.indexOf(']');
    if (close < 0 || input[close + 1] !== ':') throw new ListenAddressError(text, 'an IPv6 address must be written [ADDRESS]:PORT');
    host = input.slice(1, close);
    portText = input.slice(close + 2);
    if (net.isIPv6(host) === false) throw new ListenAddressError(text, `'${host}' is not an IPv6 address`);
  } else {
    const colon = input.lastIndexOf(':');
    if (colon < 0) throw new ListenAddressError(text, 'no port');
    host = input.slice(0, colon);
    portText = input.slice(colon + 1);
    if (host === '') throw new ListenAddressError(text, 'no host (use 0.0.0.0:PORT to listen on every interface)');
    if (host.includes(':')) throw new ListenAddressError(text, 'write an IPv6 address in brackets, e.g. [::1]:9477');
    if (!net.isIPv4(host) && !HOST_NAME.test(host))
      throw new ListenAddressError(text, `'${host}' is neither an IPv4 address nor a host name`);
  }
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535)
    throw new ListenAddressError(text, `port '${portText}' is not a number from 0 to 65535`);
  return { kind: 'tcp', host, port: Number(portText) };
}

/**
 * True when only this machine can reach the address: a unix socket, 127.0.0.0/8, ::1 (also IPv4-mapped) or
 * `localhost`. Other host names count as public: what they resolve to is not known here.
 */
export function isLoopback(address: MetricsAddress): boolean {
  if (address.kind === 'unix') return true;
  const host = address.host.toLowerCase();
  if (host === 'localhost') return true;
  const v4 = host.startsWith('::ffff:') ? host.slice('::ffff:'.length) : host;
  if (net.isIPv4(v4)) return v4.startsWith('127.');
  if (net.isIPv6(host)) return normalizeIPv6(host) === '0:0:0:0:0:0:0:1';
  return false;
}

function normalizeIPv6(host: string): string {
  const [head = '', tail] = host.split('::');
  const left = head === '' ? [] : head.split(':');
  const right = tail === undefined || tail === '' ? [] : tail.split(':');
  const zeros = tail === undefined ? [] : Array<string>(8 - left.length - right.length).fill('0');
  return [...left, ...zeros, ...right].map((group) => (Number.parseInt(group, 16) || 0).toString(16)).join(':');
}

/** `127.0.0.1:9477`, `[::1]:9477`, `unix:/run/vublk/metrics.sock` — the form `--metrics-listen` accepts. */
export function formatAddress(address: MetricsAddress): string {
  if (address.kind === 'unix') return `unix:${address.path}`;
  return net.isIPv6(address.host) ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}

/** A base URL for an HTTP client: `http://127.0.0.1:9477` (a unix address has none: use `unix:/path`). */
export function baseUrl(address: MetricsAddress): string {
  return address.kind === 'unix' ? `unix:${address.path}` : `http://${formatAddress(address)}`;
}
