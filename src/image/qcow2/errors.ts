/** Every qcow2 failure carries a stable `code`; the data plane maps all of them to VIRTIO_BLK_S_IOERR. */
export type Qcow2ErrorCode =
  | 'QCOW2_UNSUPPORTED' // a feature vublk does not implement (named in the message)
  | 'QCOW2_INVALID' // the image contradicts the specification (refused at open or at access)
  | 'QCOW2_FORMAT' // format selection / backing chain refused
  | 'QCOW2_IO' // a read or write of the image file failed
  | 'QCOW2_NOSPC' // the image cannot grow further (refcount table full, L1 capacity)
  | 'QCOW2_READONLY'
  | 'QCOW2_RANGE'; // a request outside the virtual disk

export class Qcow2Error extends Error {
  constructor(
    readonly code: Qcow2ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'Qcow2Error';
  }
}
