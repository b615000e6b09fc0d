/**
 * A full memory barrier for JS code sharing memory with another process. Guest memory is an external
 * ArrayBuffer, where Atomics are not allowed, but on x86 any locked instruction orders ALL loads and stores;
 * an Atomics op on a private SharedArrayBuffer compiles to one. Needed where a store must be visible before a
 * following load (publish avail.idx, then read used.flags / avail_event — virtio's "mb()").
 */
const cell = new Int32Array(new SharedArrayBuffer(4));

export function memoryFence(): void {
  Atomics.add(cell, 0, 0);
}
