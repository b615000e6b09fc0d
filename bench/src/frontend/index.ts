/**
 * The test front-end: a TypeScript stand-in for QEMU driving any vhost-user-blk back-end.
 *
 *   const frontend = await VhostUserFrontend.connect('/run/vublk.sock', { numQueues: 2 }); // QEMU 7.2 handshake
 *   const blk = new VirtioBlkDriver(frontend);
 *   await blk.write(8, data, { queue: 1, indirect: true });
 *   const back = await blk.read(8, data.length, { placement: { minAddress: 4 * 1024 ** 3 } });
 *   frontend.close();
 *
 * Hostile tests go lower: frontend.sendMessage / receiveMessage / sendBytes for the socket,
 * frontend.queue(i).ring for raw descriptor and index writes, queue.publish / kick({ force: true }).
 * Every wait is bounded and fails with a FrontendTimeoutError subclass naming what it waited for.
 */
export * from './errors.js';
export * from './used-element.js';
export * from './range-allocator.js';
export * from './guest-memory.js';
export * from './descriptor-free-list.js';
export * from './ring-indices.js';
export * from './ring-memory.js';
export * from './memory-fence.js';
export * from './fd-watcher.js';
export * from './vhost-user-channel.js';
export * from './socket-pair.js';
export * from './virtqueue-driver.js';
export * from './frontend-options.js';
export * from './vhost-user-frontend.js';
export * from './blk-chain-plan.js';
export * from './virtio-blk-driver.js';
export * from './qemu-storage-daemon.js';
export * from './inflight-keeper.js';
