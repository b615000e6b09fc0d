import { VublkError } from '../../errors.js';

/** Every qcow2 failure carries a stable `code`; the data plane maps all of them to VIRTIO_BLK_S_IOERR. */
export type Qcow2ErrorCode =
  | 'VUBLK_ERR_QCOW2_UNSUPPORTED' // a feature vublk does not implement (named in the message)
  | 'VUBLK_ERR_QCOW2_INVALID' // the image contradicts the specification (refused at open or at access)
  | 'VUBLK_ERR_QCOW2_FORMAT' // format selection / backing chain refused
  | 'VUBLK_ERR_QCOW2_IO' // a read or write of the image file failed
  | 'VUBLK_ERR_QCOW2_NOSPC' // the image cannot grow further (refcount table full, L1 capacity)
  | 'VUBLK_ERR_QCOW2_READONLY'
  | 'VUBLK_ERR_QCOW2_RANGE'; // a request outside the virtual disk

type ShortCode = Qcow2ErrorCode extends `VUBLK_ERR_${infer S}` ? S : never;

/** The image (its content, its features, its chain) is to blame for these: peerFault, logged as warnings. */
const IMAGE_FAULTS = new Set<ShortCode>(['QCOW2_UNSUPPORTED', 'QCOW2_INVALID', 'QCOW2_FORMAT']);

export class Qcow2Error extends VublkError {
  declare readonly code: Qcow2ErrorCode;

  constructor(code: ShortCode, message: string, options: { cause?: unknown } = {}) {
    super(`VUBLK_ERR_${code}`, message, { ...options, peerFault: IMAGE_FAULTS.has(code) });
  }
}
