/**
 * Which Ceph clients have an RBD image open and which one owns its exclusive lock, read with the rbd CLI
 * (`rbd status`: the header watchers; `rbd lock ls`: the lock's owner — the CLI side of rbd_lock_get_owners).
 * A client is named by its global id (`client.4160` → 4160); each vublk daemon is one client.
 */
import type { MicroCluster } from './micro-cluster.js';

/** The global ids of the clients watching the image's header (every writable open of it). */
export async function rbdWatchers(cluster: MicroCluster, image: string): Promise<number[]> {
  const out = await cluster.run('rbd', ['status', '--format', 'json', image]);
  const status = JSON.parse(out.toString()) as { watchers?: { client: number }[] };
  return (status.watchers ?? []).map((w) => w.client);
}

/** The global ids of the clients holding a lock on the image (the exclusive lock: at most one). */
export async function rbdLockOwners(cluster: MicroCluster, image: string): Promise<number[]> {
  const out = await cluster.run('rbd', ['lock', 'ls', '--format', 'json', image]);
  const text = out.toString().trim();
  if (text === '') return [];
  // An array of {id, locker, address} (Octopus and later) or an object keyed by lock id (older releases).
  const parsed = JSON.parse(text) as { locker: string }[] | Record<string, { locker: string }>;
  const locks = Array.isArray(parsed) ? parsed : Object.values(parsed);
  return locks.map((lock) => {
    const match = /^client\.(\d+)$/.exec(lock.locker);
    if (match === null) throw new Error(`rbd lock ls: unexpected locker '${lock.locker}' in ${text}`);
    return Number(match[1]);
  });
}
