// Child process of the qcow2 crash test: a write-heavy loop on one image until it is killed (SIGKILL).
// Before each operation it prints what it is about to do; after each completed flush it prints "F <op>",
// meaning every operation with a smaller id completed before the flush. 4 KiB blocks carry their op id.
// Usage: node qcow2-crash-child.mjs <image> <seed> <firstOpId>
import * as fs from 'node:fs';
import { attachLayer, openImage, RETRY } from '../../dist/src/backend/qcow2/index.js';
import { mulberry32 } from './mulberry32.mjs';

const [image, seedText, firstText] = process.argv.slice(2);
const BLOCK = 4096;
const u32 = mulberry32(Number(seedText));
const say = (line) => fs.writeSync(1, `${line}\n`);
const handle = attachLayer(openImage(image, { format: 'qcow2', warn: () => {} }));
const blocks = handle.size / BLOCK;
const cluster = handle.geometry.clusterSize;
let op = Number(firstText);
say('READY');
for (;;) {
  op++;
  const kind = u32() % 20;
  if (kind < 15) {
    const count = 1 + (u32() % 32);
    const first = u32() % (blocks - count);
    say(`W ${op} ${first} ${count}`);
    const data = Buffer.alloc(count * BLOCK);
    for (let b = 0; b < count; b++) {
      const words = new Uint32Array(data.buffer, data.byteOffset + b * BLOCK, BLOCK / 4);
      words.fill((op * 2654435761 + first + b) >>> 0);
      words[0] = op;
      words[1] = first + b;
    }
    const extents = [];
    const ticket = handle.prepareWrite(first * BLOCK, data.length, extents);
    if (ticket === RETRY) throw new Error('RETRY with a single writer');
    let at = 0;
    for (const e of extents) {
      fs.writeSync(e.fd, data, at, e.length, e.hostOffset);
      at += e.length;
    }
    handle.commitWrite(ticket);
  } else if (kind < 16) {
    const count = 1 + (u32() % 64);
    const first = u32() % (blocks - count);
    const unmap = u32() % 2 === 0;
    say(`Z ${op} ${first} ${count}`);
    handle.writeZeroes(first * BLOCK, count * BLOCK, unmap);
  } else if (kind < 17) {
    const perCluster = cluster / BLOCK;
    const clusters = handle.size / cluster;
    const count = 1 + (u32() % 4);
    const firstCluster = u32() % (clusters - count);
    say(`D ${op} ${firstCluster * perCluster} ${count * perCluster}`);
    handle.discard(firstCluster * cluster, count * cluster);
  } else {
    handle.flush();
    say(`F ${op}`);
  }
}
