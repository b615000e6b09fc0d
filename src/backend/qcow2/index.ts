/** The qcow2 format layer: open on the control thread, attach a handle on each worker thread. */
export { openImage, type OpenImageOptions } from './image-open.js';
export { Qcow2Handle, attachLayer } from './qcow2-handle.js';
export { RawLayer, type ReadLayer } from './raw-layer.js';
export { Qcow2Error, type Qcow2ErrorCode } from './errors.js';
export { IMAGE_FORMATS, parseImageFormat, type ImageFormat } from './format-probe.js';
export type { LayerDescription, Qcow2SharedState, Qcow2Geometry } from './shared-state.js';
export {
  NO_COMMIT,
  RETRY,
  type CompressedExtent,
  type CompressedSource,
  type DataExtent,
  type ReadExtent,
  type WriteExtent,
  type ZeroExtent,
} from './extents.js';
