/** Tells what an fd received from a peer is, from /proc/self/fd (eventfds show as "anon_inode:[eventfd]"). */
import fs from 'node:fs';

export function fdTarget(fd: number): string {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return '(unknown)';
  }
}
