/**
 * vhost-user wire format (QEMU docs/interop/vhost-user.rst): message codes, the 12-byte header and
 * typed codecs for every payload vublk exchanges. Pure: no sockets, no fds (fds travel beside the bytes).
 * All integers are little-endian (host order on x86).
 */
import { VublkError } from './errors.js';

/** Front-end → back-end requests. */
export const FrontendRequest = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

const requestNames = new Map<number, string>(Object.entries(FrontendRequest).map(([name, code]) => [code, name]));

export function requestName(code: number): string {
  return requestNames.get(code) ?? `UNKNOWN(${code})`;
}

/** Back-end → front-end requests, sent on the channel from SET_BACKEND_REQ_FD. */
export const BackendRequest = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
} as const;

/** Protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Virtio feature bit 30 in GET_FEATURES: "this back-end speaks protocol features". */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;

/** vhost feature bit 26: the front-end asks the back-end to log every guest page it writes (migration). */
export const VHOST_F_LOG_ALL = 26;
/** SET_VRING_ADDR flags bit 0: log writes to the used ring at `log` (the ring's guest address). */
export const VHOST_VRING_F_LOG = 0;
/** One dirty-log bit covers this many bytes of guest-physical memory (VHOST_LOG_PAGE). */
export const VHOST_LOG_PAGE = 0x1000;

export const HEADER_SIZE = 12;
export const HeaderFlag = {
  VERSION_MASK: 0x3,
  VERSION: 0x1,
  REPLY: 0x4,
  NEED_REPLY: 0x8,
} as const;

/** Larger than any payload vublk accepts (the biggest is a memory table of 8 regions: 264 bytes). */
export const MAX_PAYLOAD_SIZE = 4096;
/** Region count limit of SET_MEM_TABLE and the fd limit of one message. */
export const MAX_FDS_PER_MESSAGE = 8;
/** Slots advertised through GET_MAX_MEM_SLOTS under CONFIGURE_MEM_SLOTS. */
export const MAX_MEM_SLOTS = 32;

/** Bits 0–7 of the u64 in SET_VRING_KICK/CALL/ERR are the queue index; bit 8 means "no fd, poll instead". */
export const VRING_INDEX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

/** Thrown for bytes that cannot be a valid message; carries the request so replies and logs can name it. */
export class MalformedMessageError extends VublkError {
  constructor(
    readonly request: number,
    detail: string,
  ) {
    super('VUBLK_ERR_MALFORMED_MESSAGE', `malformed ${requestName(request)}: ${detail}`, { peerFault: true });
  }
}

export interface MessageHeader {
  request: number;
  flags: number;
  size: number;
}

export function decodeHeader(bytes: Uint8Array): MessageHeader {
  const view = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  return { request: view.getUint32(0, true), flags: view.getUint32(4, true), size: view.getUint32(8, true) };
}

export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, request, true);
  view.setUint32(4, flags, true);
  view.setUint32(8, payload.length, true);
  bytes.set(payload, HEADER_SIZE);
  return bytes;
}

export function encodeReply(request: number, payload: Uint8Array): Uint8Array {
  return encodeMessage(request, HeaderFlag.VERSION | HeaderFlag.REPLY, payload);
}

function viewOf(payload: Uint8Array): DataView {
  return new DataView(payload.buffer, payload.byteOffset, payload.length);
}

function expectSize(request: number, payload: Uint8Array, size: number): DataView {
  if (payload.length !== size) {
    throw new MalformedMessageError(request, `payload is ${payload.length} bytes, expected ${size}`);
  }
  return viewOf(payload);
}

/** u64 values (features, addresses) are kept as bigint on the control plane: it is not a hot path. */
export function decodeU64(request: number, payload: Uint8Array): bigint {
  return expectSize(request, payload, 8).getBigUint64(0, true);
}

export function encodeU64(value: bigint | number): Uint8Array {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(value), true);
  return bytes;
}

/** SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE payload. */
export interface VringState {
  index: number;
  num: number;
}

export function decodeVringState(request: number, payload: Uint8Array): VringState {
  const view = expectSize(request, payload, 8);
  return { index: view.getUint32(0, true), num: view.getUint32(4, true) };
}

export function encodeVringState(state: VringState): Uint8Array {
  const bytes = new Uint8Array(8);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, state.index, true);
  view.setUint32(4, state.num, true);
  return bytes;
}

/** SET_VRING_ADDR payload: ring addresses are front-end virtual addresses, not guest-physical ones. */
export interface VringAddress {
  index: number;
  flags: number;
  descUserAddr: bigint;
  usedUserAddr: bigint;
  availUserAddr: bigint;
  logGuestAddr: bigint;
}

export const VRING_ADDRESS_SIZE = 40;

export function decodeVringAddress(request: number, payload: Uint8Array): VringAddress {
  const view = expectSize(request, payload, VRING_ADDRESS_SIZE);
  return {
    index: view.getUint32(0, true),
    flags: view.getUint32(4, true),
    descUserAddr: view.getBigUint64(8, true),
    usedUserAddr: view.getBigUint64(16, true),
    availUserAddr: view.getBigUint64(24, true),
    logGuestAddr: view.getBigUint64(32, true),
  };
}

export function encodeVringAddress(address: VringAddress): Uint8Array {
  const bytes = new Uint8Array(VRING_ADDRESS_SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, address.index, true);
  view.setUint32(4, address.flags, true);
  view.setBigUint64(8, address.descUserAddr, true);
  view.setBigUint64(16, address.usedUserAddr, true);
  view.setBigUint64(24, address.availUserAddr, true);
  view.setBigUint64(32, address.logGuestAddr, true);
  return bytes;
}

/** SET_VRING_KICK / CALL / ERR payload. */
export interface VringFdRequest {
  index: number;
  noFd: boolean;
}

export function decodeVringFdRequest(request: number, payload: Uint8Array): VringFdRequest {
  const value = decodeU64(request, payload);
  if ((value & ~BigInt(VRING_INDEX_MASK | VRING_NOFD_MASK)) !== 0n) {
    throw new MalformedMessageError(request, `reserved bits set in 0x${value.toString(16)}`);
  }
  return { index: Number(value & BigInt(VRING_INDEX_MASK)), noFd: (value & BigInt(VRING_NOFD_MASK)) !== 0n };
}

export function encodeVringFdRequest(request: VringFdRequest): Uint8Array {
  return encodeU64(request.index | (request.noFd ? VRING_NOFD_MASK : 0));
}

/** One guest memory region; its fd travels as ancillary data in the same message. */
export interface MemoryRegion {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

export const MEMORY_REGION_SIZE = 32;

function decodeRegion(view: DataView, offset: number): MemoryRegion {
  return {
    guestPhysAddr: view.getBigUint64(offset, true),
    memorySize: view.getBigUint64(offset + 8, true),
    userAddr: view.getBigUint64(offset + 16, true),
    mmapOffset: view.getBigUint64(offset + 24, true),
  };
}

function encodeRegion(view: DataView, offset: number, region: MemoryRegion): void {
  view.setBigUint64(offset, region.guestPhysAddr, true);
  view.setBigUint64(offset + 8, region.memorySize, true);
  view.setBigUint64(offset + 16, region.userAddr, true);
  view.setBigUint64(offset + 24, region.mmapOffset, true);
}

/** SET_MEM_TABLE payload: le32 nregions, le32 padding, regions[nregions] (front-ends may send all 8 slots). */
export function decodeMemoryTable(request: number, payload: Uint8Array): MemoryRegion[] {
  if (payload.length < 8) throw new MalformedMessageError(request, `payload is ${payload.length} bytes, too short for a region count`);
  const view = viewOf(payload);
  const count = view.getUint32(0, true);
  if (count > MAX_FDS_PER_MESSAGE) {
    throw new MalformedMessageError(request, `${count} regions, at most ${MAX_FDS_PER_MESSAGE} allowed`);
  }
  if (payload.length < 8 + count * MEMORY_REGION_SIZE) {
    throw new MalformedMessageError(request, `payload is ${payload.length} bytes, too short for ${count} regions`);
  }
  const regions: MemoryRegion[] = [];
  for (let i = 0; i < count; i++) regions.push(decodeRegion(view, 8 + i * MEMORY_REGION_SIZE));
  return regions;
}

export function encodeMemoryTable(regions: readonly MemoryRegion[]): Uint8Array {
  const bytes = new Uint8Array(8 + regions.length * MEMORY_REGION_SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, regions.length, true);
  regions.forEach((region, i) => encodeRegion(view, 8 + i * MEMORY_REGION_SIZE, region));
  return bytes;
}

/** ADD_MEM_REG / REM_MEM_REG payload: le64 padding, one region. */
export const SINGLE_REGION_SIZE = 8 + MEMORY_REGION_SIZE;

export function decodeSingleRegion(request: number, payload: Uint8Array): MemoryRegion {
  return decodeRegion(expectSize(request, payload, SINGLE_REGION_SIZE), 8);
}

export function encodeSingleRegion(region: MemoryRegion): Uint8Array {
  const bytes = new Uint8Array(SINGLE_REGION_SIZE);
  encodeRegion(new DataView(bytes.buffer), 8, region);
  return bytes;
}

/** GET_CONFIG / SET_CONFIG payload: le32 offset, le32 size, le32 flags, then `size` bytes of config space. */
export interface ConfigSpaceMessage {
  offset: number;
  size: number;
  flags: number;
  data: Uint8Array;
}

export const CONFIG_HEADER_SIZE = 12;
/** Config space limit of vhost-user (VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;

export function decodeConfigMessage(request: number, payload: Uint8Array): ConfigSpaceMessage {
  if (payload.length < CONFIG_HEADER_SIZE) {
    throw new MalformedMessageError(request, `payload is ${payload.length} bytes, shorter than the config header`);
  }
  const view = viewOf(payload);
  const offset = view.getUint32(0, true);
  const size = view.getUint32(4, true);
  if (size > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE) {
    throw new MalformedMessageError(request, `config range offset ${offset} size ${size} exceeds ${MAX_CONFIG_SIZE} bytes`);
  }
  if (payload.length !== CONFIG_HEADER_SIZE + size) {
    throw new MalformedMessageError(request, `payload is ${payload.length} bytes, expected ${CONFIG_HEADER_SIZE + size}`);
  }
  return { offset, size, flags: view.getUint32(8, true), data: payload.subarray(CONFIG_HEADER_SIZE) };
}

export function encodeConfigMessage(message: Omit<ConfigSpaceMessage, 'size'>): Uint8Array {
  const bytes = new Uint8Array(CONFIG_HEADER_SIZE + message.data.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, message.offset, true);
  view.setUint32(4, message.data.length, true);
  view.setUint32(8, message.flags, true);
  bytes.set(message.data, CONFIG_HEADER_SIZE);
  return bytes;
}

/** GET_INFLIGHT_FD / SET_INFLIGHT_FD payload. */
export interface InflightDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

export const INFLIGHT_SIZE = 24;

export function decodeInflight(request: number, payload: Uint8Array): InflightDescription {
  const view = expectSize(request, payload, INFLIGHT_SIZE);
  return {
    mmapSize: view.getBigUint64(0, true),
    mmapOffset: view.getBigUint64(8, true),
    numQueues: view.getUint16(16, true),
    queueSize: view.getUint16(18, true),
  };
}

export function encodeInflight(inflight: InflightDescription): Uint8Array {
  const bytes = new Uint8Array(INFLIGHT_SIZE);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, inflight.mmapSize, true);
  view.setBigUint64(8, inflight.mmapOffset, true);
  view.setUint16(16, inflight.numQueues, true);
  view.setUint16(18, inflight.queueSize, true);
  return bytes;
}

/** SET_LOG_BASE payload under LOG_SHMFD: the log's size and its offset in the fd sent beside it. */
export interface LogDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
}

export const LOG_DESCRIPTION_SIZE = 16;

export function decodeLogDescription(request: number, payload: Uint8Array): LogDescription {
  const view = expectSize(request, payload, LOG_DESCRIPTION_SIZE);
  return { mmapSize: view.getBigUint64(0, true), mmapOffset: view.getBigUint64(8, true) };
}

export function encodeLogDescription(log: LogDescription): Uint8Array {
  const bytes = new Uint8Array(LOG_DESCRIPTION_SIZE);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, log.mmapSize, true);
  view.setBigUint64(8, log.mmapOffset, true);
  return bytes;
}
