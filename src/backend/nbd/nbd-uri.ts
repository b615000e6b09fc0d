/**
 * NBD URIs (doc/uri.md of the NBD project): `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`.
 * The export name is the percent-decoded path without its leading `/` (empty = the default export). TLS
 * schemes (`nbds`, `nbds+unix`) and TLS query parameters are refused: this client does not speak TLS, and a
 * URI asking for it must not silently fall back to plain text.
 */
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { NBD_DEFAULT_PORT, NBD_MAX_STRING } from '../../../protocol/nbd.js';
import type { StreamEndpoint } from '../../sys/net-socket.js';
import { VublkError } from '../../errors.js';

export class NbdUriError extends VublkError {
  constructor(uri: string, reason: string) {
    super('NBD_URI', `NBD URI '${uri}': ${reason}`, { peerFault: true });
  }
}

export interface NbdTarget {
  endpoint: StreamEndpoint;
  exportName: string;
}

export function parseNbdUri(uri: string): NbdTarget {
  const schemeEnd = uri.indexOf('://');
  if (schemeEnd < 0) throw new NbdUriError(uri, 'expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH');
  const scheme = uri.slice(0, schemeEnd).toLowerCase();
  if (scheme === 'nbds' || scheme === 'nbds+unix') throw new NbdUriError(uri, 'TLS (nbds) is not supported');
  if (scheme !== 'nbd' && scheme !== 'nbd+unix') throw new NbdUriError(uri, `unknown scheme '${scheme}'`);
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new NbdUriError(uri, 'is not a valid URI');
  }
  if (url.username || url.password) throw new NbdUriError(uri, 'user information is only used with TLS, which is not supported');
  if (url.hash) throw new NbdUriError(uri, 'a fragment (#...) has no meaning in an NBD URI');
  const exportName = decodeComponent(uri, url.pathname.startsWith('/') ? url.pathname.slice(1) : url.pathname);
  if (Buffer.byteLength(exportName) > NBD_MAX_STRING) throw new NbdUriError(uri, `export name is longer than ${NBD_MAX_STRING} bytes`);
  if (exportName.includes('\0')) throw new NbdUriError(uri, 'export name contains a NUL');

  const params = new Map<string, string>();
  for (const [key, value] of url.searchParams) {
    if (params.has(key)) throw new NbdUriError(uri, `query parameter '${key}' is repeated`);
    params.set(key, value);
  }
  for (const key of params.keys()) {
    if (key.startsWith('tls-')) throw new NbdUriError(uri, `'${key}': TLS is not supported`);
    if (key !== 'socket') throw new NbdUriError(uri, `unknown query parameter '${key}'`);
  }

  if (scheme === 'nbd+unix') {
    if (url.host) throw new NbdUriError(uri, 'nbd+unix takes no host (write nbd+unix:///EXPORT?socket=PATH)');
    const socket = params.get('socket');
    if (!socket) throw new NbdUriError(uri, "nbd+unix needs a 'socket' query parameter");
    // A leading NUL (%00) names an abstract socket; '@name' is how the rest of vublk spells that.
    const path = socket.startsWith('\0') ? `@${socket.slice(1)}` : socket;
    if (path === '@' || path.includes('\0')) throw new NbdUriError(uri, 'socket path is malformed');
    return { endpoint: { kind: 'unix', path }, exportName };
  }

  if (params.has('socket')) throw new NbdUriError(uri, "'socket' is only valid with nbd+unix");
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  if (!host) throw new NbdUriError(uri, 'nbd:// needs a host');
  const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new NbdUriError(uri, `port '${url.port}' is out of range`);
  return { endpoint: { kind: 'tcp', host, port }, exportName };
}

function decodeComponent(uri: string, text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new NbdUriError(uri, 'bad percent-encoding in the export name');
  }
}

/**
 * Resolves a TCP endpoint's host name to a numeric address (the socket layer takes numbers only, so it never
 * blocks a worker on DNS). Run it on the control thread before opening the client.
 */
export async function resolveEndpoint(endpoint: StreamEndpoint): Promise<StreamEndpoint> {
  if (endpoint.kind !== 'tcp' || isIP(endpoint.host) !== 0) return endpoint;
  const { address } = await lookup(endpoint.host);
  return { kind: 'tcp', host: address, port: endpoint.port };
}
