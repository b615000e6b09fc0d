/** Compressed clusters: one raw-deflate stream per guest cluster, at a byte offset (qcow2.txt). */
import { constants, inflateRawSync } from 'node:zlib';
import { Qcow2Error } from './errors.js';
import { preadFull } from './file-io.js';

/** Inflates the cluster whose stream starts at `hostOffset` (at most `maxLength` bytes) into `into`. */
export function inflateCluster(fd: number, hostOffset: number, maxLength: number, fileBytes: number, into: Uint8Array): void {
  if (hostOffset <= 0 || hostOffset >= fileBytes)
    throw new Qcow2Error('QCOW2_INVALID', `compressed cluster at ${hostOffset} lies outside the image`);
  const length = Math.min(maxLength, fileBytes - hostOffset);
  const stream = Buffer.alloc(length);
  preadFull(fd, stream, hostOffset);
  let output: Buffer;
  try {
    output = inflateRawSync(stream, { finishFlush: constants.Z_SYNC_FLUSH, maxOutputLength: into.length });
  } catch (error) {
    throw new Qcow2Error('QCOW2_INVALID', `compressed cluster at ${hostOffset} does not inflate: ${(error as Error).message}`);
  }
  if (output.length !== into.length) {
    throw new Qcow2Error('QCOW2_INVALID', `compressed cluster at ${hostOffset} inflates to ${output.length} bytes, not ${into.length}`);
  }
  into.set(output);
}
