/**
 * Adaptive polling (`--poll-us N`): before sleeping in epoll_wait, a worker spins for up to N µs checking
 * its rings (avail entries, completions) and its fds, so a request arriving soon after the last one is
 * picked up without a kick and a wake-up. Finding work restarts the spin window; an idle window ends in a
 * blocking wait, so an idle daemon uses no CPU. Off (0) by default: spinning costs a CPU while busy.
 */
import { performance } from 'node:perf_hooks';
import type { EpollSet } from './epoll.js';

export interface Pollable {
  /** Serves whatever is ready; true when something moved. */
  poll(): boolean;
}

/**
 * Like `epoll.wait(ready, timeoutMs)`, spinning first for up to `pollUs` µs. Returns the number of ready fds
 * (0 when the blocking wait timed out).
 */
export function waitPolling(epoll: EpollSet, ready: Int32Array, pollUs: number, rings: Iterable<Pollable>, timeoutMs = -1): number {
  if (pollUs <= 0) return epoll.wait(ready, timeoutMs);
  let deadline = performance.now() + pollUs / 1000;
  // Bounded by the window: every pass either finds work (and restarts it, serving that work) or runs it down.
  for (;;) {
    const n = epoll.wait(ready, 0);
    if (n > 0) return n;
    let moved = false;
    for (const ring of rings) if (ring.poll()) moved = true;
    const now = performance.now();
    if (moved) deadline = now + pollUs / 1000;
    else if (now >= deadline) return epoll.wait(ready, timeoutMs);
  }
}
