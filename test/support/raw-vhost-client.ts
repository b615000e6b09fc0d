/** A bare vhost-user client for protocol-abuse tests: sends arbitrary bytes and fds, reads replies with deadlines. */
import { connectUnix, recvWithFds, sendWithFds } from '../../src/sys/unix-socket.js';
import { waitReadable } from '../../src/sys/poll-wait.js';
import { closeFd } from '../../src/sys/fd.js';
import { expect } from 'vitest';
import { FrontendRequest, HEADER_SIZE, HeaderFlag, decodeHeader, encodeMessage, type MessageHeader } from '../../protocol/vhost-user.js';

export class RawVhostClient {
  readonly fd: number;
  constructor(socketPath: string) {
    this.fd = connectUnix(socketPath);
  }

  sendBytes(bytes: Uint8Array, fds: number[] = []): void {
    let offset = 0;
    while (offset < bytes.length) {
      const sent = sendWithFds(this.fd, bytes, offset, offset === 0 ? fds : []);
      if (sent === null) throw new Error('socket full');
      offset += sent;
    }
  }

  send(request: number, flags: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = []): void {
    this.sendBytes(encodeMessage(request, flags, payload), fds);
  }

  /** Reads exactly n bytes, or returns what arrived before EOF; throws after the deadline. */
  private readExactly(n: number, timeoutMs: number): Buffer {
    const buffer = Buffer.alloc(n);
    let got = 0;
    const deadline = Date.now() + timeoutMs;
    while (got < n) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${n - got} more bytes`);
      if (!waitReadable(this.fd, Math.min(left, 100))) continue;
      const r = recvWithFds(this.fd, buffer, got, n - got);
      if (r === null) continue;
      r.fds.forEach(closeFd);
      if (r.bytes === 0) return buffer.subarray(0, got);
      got += r.bytes;
    }
    return buffer;
  }

  /** The next reply, or null if the daemon closed the connection. */
  receive(timeoutMs = 5_000): { header: MessageHeader; payload: Buffer } | null {
    const head = this.readExactly(HEADER_SIZE, timeoutMs);
    if (head.length < HEADER_SIZE) return null;
    const header = decodeHeader(head);
    return { header, payload: this.readExactly(header.size, timeoutMs) };
  }

  /** True once the peer has closed (EOF), false if still open after the deadline. */
  closedByPeer(timeoutMs = 5_000): boolean {
    try {
      return this.readExactly(1, timeoutMs).length === 0;
    } catch {
      return false;
    }
  }

  close(): void {
    closeFd(this.fd);
  }
}

/** The daemon is still running and answers a fresh front-end (GET_FEATURES on a new connection). */
export function expectServing(daemon: { socketPath: string; running(): boolean }): void {
  const client = new RawVhostClient(daemon.socketPath);
  client.send(FrontendRequest.GET_FEATURES, HeaderFlag.VERSION);
  const reply = client.receive();
  client.close();
  expect(reply?.payload.length).toBe(8);
  expect(daemon.running()).toBe(true);
}
