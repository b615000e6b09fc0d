/**
 * A tiny NBD server that misbehaves on purpose, for testing that the client never trusts the server. It runs
 * in a worker thread (NbdClient.open blocks the test's thread during the handshake). The export is 1 MiB of a
 * known pattern (`fakeDiskByte`). Handshake modes (`hs-*`) misbehave on every connection; transmission modes
 * misbehave on the first READ of the first connection only, and the server is correct afterwards, so a test
 * can watch the client reset, reconnect, resend and succeed.
 */
import { Worker } from 'node:worker_threads';

export const FAKE_DISK_SIZE = 1 << 20;
export const fakeDiskByte = (i: number): number => (i * 7 + 3) & 0xff;

export type FakeMode =
  | 'good'
  | 'hs-oldstyle'
  | 'hs-garbage'
  | 'hs-unknown-export'
  | 'hs-bad-info'
  | 'hs-close'
  | 'bad-magic'
  | 'unknown-handle'
  | 'chunk-outside'
  | 'overlap'
  | 'short-done'
  | 'huge-chunk'
  | 'data-too-big'
  | 'simple-read-with-sr'
  | 'eof-mid-data'
  | 'hole-zero'
  | 'none-without-done'
  | 'error-message-overflow'
  | 'block-status-chunk'
  | 'eshutdown'
  | 'error-chunk'
  | 'always-bad-magic'
  | 'gappy';

const SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const net = require('node:net');
const { path, mode, size } = workerData;
const disk = Buffer.alloc(size);
for (let i = 0; i < size; i++) disk[i] = (i * 7 + 3) & 0xff;
let connections = 0;
const u16 = (v) => { const b = Buffer.alloc(2); b.writeUInt16BE(v); return b; };
const u32 = (v) => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; };
const u64 = (v) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(v)); return b; };
const optReply = (opt, type, payload = Buffer.alloc(0)) => Buffer.concat([u64(0x3e889045565a9n), u32(opt), u32(type), u32(payload.length), payload]);
const simple = (err, handle, data) => Buffer.concat([u32(0x67446698), u32(err), handle, data || Buffer.alloc(0)]);
const chunk = (flags, type, handle, payload, lengthOverride) =>
  Buffer.concat([u32(0x668e33ef), u16(flags), u16(type), handle, u32(lengthOverride ?? payload.length), payload]);

const server = net.createServer((sock) => {
  const first = connections++ === 0;
  const hs = mode.startsWith('hs-') || mode.startsWith('always-');
  let bad = hs || first ? mode : 'good';
  let buf = Buffer.alloc(0);
  let phase = 'flags';
  let structured = false;
  sock.on('error', () => {});
  if (bad === 'hs-oldstyle') { sock.write(Buffer.concat([Buffer.from('NBDMAGIC'), u64(0x00420281861253n), u64(size), u32(1), Buffer.alloc(124)])); return; }
  if (bad === 'hs-garbage') { sock.write(Buffer.from('this is not an NBD server at all')); return; }
  if (bad === 'hs-close') { sock.destroy(); return; }
  sock.write(Buffer.concat([Buffer.from('NBDMAGIC'), Buffer.from('IHAVEOPT'), u16(3)]));
  sock.on('data', (data) => {
    buf = Buffer.concat([buf, data]);
    for (;;) {
      if (phase === 'flags') {
        if (buf.length < 4) return;
        buf = buf.subarray(4);
        phase = 'options';
      } else if (phase === 'options') {
        if (buf.length < 16) return;
        const opt = buf.readUInt32BE(8);
        const len = buf.readUInt32BE(12);
        if (buf.length < 16 + len) return;
        buf = buf.subarray(16 + len);
        if (opt === 8) { structured = true; sock.write(optReply(8, 1)); continue; }
        if (opt !== 7) { sock.write(optReply(opt, 0x80000001)); continue; }
        if (bad === 'hs-unknown-export') { sock.write(optReply(7, 0x80000006, Buffer.from('nope'))); continue; }
        const info = Buffer.concat([u16(0), u64(size), u16(1 | 4)]);
        sock.write(optReply(7, 3, bad === 'hs-bad-info' ? info.subarray(0, 11) : info));
        sock.write(optReply(7, 1));
        phase = 'transmission';
      } else {
        if (buf.length < 28) return;
        const type = buf.readUInt16BE(6);
        const handle = Buffer.from(buf.subarray(8, 16));
        const offset = Number(buf.readBigUInt64BE(16));
        const length = buf.readUInt32BE(24);
        const payload = type === 1 ? length : 0;
        if (buf.length < 28 + payload) return;
        const data = Buffer.from(buf.subarray(28, 28 + payload));
        buf = buf.subarray(28 + payload);
        if (type === 2) { sock.end(); return; }
        if (type === 1) { data.copy(disk, offset); sock.write(simple(0, handle)); continue; }
        if (type !== 0) { sock.write(simple(0, handle)); continue; }
        const content = disk.subarray(offset, offset + length);
        const m = bad;
        bad = 'good';
        const half = length / 2;
        switch (m) {
          case 'bad-magic': case 'always-bad-magic': sock.write(Buffer.alloc(16, 0x41)); break;
          case 'unknown-handle': { const h = Buffer.from(handle); h[7] ^= 0x55; sock.write(chunk(1, 0, h, Buffer.alloc(0))); break; }
          case 'chunk-outside': sock.write(chunk(1, 1, handle, Buffer.concat([u64(offset + length), content]))); break;
          case 'overlap':
            sock.write(chunk(0, 1, handle, Buffer.concat([u64(offset), content.subarray(0, half)])));
            sock.write(chunk(1, 1, handle, Buffer.concat([u64(offset + half - 512), content.subarray(half - 512)])));
            break;
          case 'short-done':
            sock.write(chunk(0, 1, handle, Buffer.concat([u64(offset), content.subarray(0, half)])));
            sock.write(chunk(1, 0, handle, Buffer.alloc(0)));
            break;
          case 'huge-chunk': sock.write(chunk(1, 0x8001, handle, Buffer.alloc(0), 0x7fffffff)); break;
          case 'data-too-big': sock.write(chunk(1, 1, handle, Buffer.concat([u64(offset), content, Buffer.alloc(4096)]))); break;
          case 'simple-read-with-sr': sock.write(simple(0, handle, content)); break;
          case 'eof-mid-data': sock.write(Buffer.concat([chunk(1, 1, handle, Buffer.alloc(0), length + 8), u64(offset), content.subarray(0, 100)])); sock.destroy(); return;
          case 'hole-zero': sock.write(chunk(1, 2, handle, Buffer.concat([u64(offset), u32(0)]))); break;
          case 'none-without-done':
            sock.write(chunk(0, 1, handle, Buffer.concat([u64(offset), content])));
            sock.write(chunk(0, 0, handle, Buffer.alloc(0)));
            break;
          case 'error-message-overflow': sock.write(chunk(1, 0x8001, handle, Buffer.concat([u32(5), u16(200), Buffer.from('short')]))); break;
          case 'block-status-chunk': sock.write(chunk(1, 5, handle, Buffer.concat([u32(0), u32(length), u32(0)]))); break;
          case 'eshutdown': sock.write(simple(108, handle)); break;
          case 'error-chunk': sock.write(chunk(1, 0x8001, handle, Buffer.concat([u32(28), u16(4), Buffer.from('full')]))); break;
          default:
            if (!structured) { sock.write(simple(0, handle, content)); break; }
            if (mode === 'gappy') {
              // Legal but nasty: one-byte chunks at even offsets first, then the odd ones filling every gap.
              const parts = [];
              for (let pass = 0; pass < 2; pass++)
                for (let i = pass; i < length; i += 2) parts.push(chunk(0, 1, handle, Buffer.concat([u64(offset + i), content.subarray(i, i + 1)])));
              parts.push(chunk(1, 0, handle, Buffer.alloc(0)));
              sock.write(Buffer.concat(parts));
              break;
            }
            // Correct but fragmented: a hole-free data chunk per half, in reverse order, then NONE.
            sock.write(chunk(0, 1, handle, Buffer.concat([u64(offset + half), content.subarray(half)])));
            sock.write(chunk(0, 1, handle, Buffer.concat([u64(offset), content.subarray(0, half)])));
            sock.write(chunk(1, 0, handle, Buffer.alloc(0)));
        }
      }
    }
  });
});
server.listen(path, () => parentPort.postMessage('ready'));
parentPort.on('message', (m) => { if (m === 'stop') server.close(() => process.exit(0)); });
`;

export interface FakeServer {
  connections(): Promise<number>;
  stop(): Promise<void>;
}

export async function startFakeServer(path: string, mode: FakeMode): Promise<{ stop(): Promise<void> }> {
  const worker = new Worker(SOURCE, { eval: true, workerData: { path, mode, size: FAKE_DISK_SIZE } });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('fake NBD server did not start')), 10_000);
    worker.once('message', () => {
      clearTimeout(timer);
      resolve();
    });
    worker.once('error', reject);
  });
  return {
    stop: async () => {
      worker.postMessage('stop');
      await Promise.race([new Promise((resolve) => worker.once('exit', resolve)), new Promise((resolve) => setTimeout(resolve, 3000))]);
      await worker.terminate();
    },
  };
}
