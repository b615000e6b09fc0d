/**
 * Test-side handle on micro-cluster.sh: a real single-node Ceph cluster (one mon, one mgr, one BlueStore OSD
 * on 127.0.0.1) started in a temp directory and stopped cleanly. A watchdog in the script stops the cluster
 * if this process dies, so an aborted test run leaves no daemons behind.
 */
import { execFile, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SCRIPT = fileURLToPath(new URL('./micro-cluster.sh', import.meta.url));
const TOOLS = ['ceph-mon', 'ceph-mgr', 'ceph-osd', 'ceph', 'rbd', 'ceph-authtool', 'monmaptool'];

/** Why a cluster cannot be started here (a tool missing), or null. */
export function cephMissing(): string | null {
  const missing = TOOLS.filter((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0);
  if (missing.length === 0) return null;
  return `${missing.join(', ')} not installed (Debian: apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)`;
}

export interface DaemonUsage {
  rssKiB: number;
  peakRssKiB: number;
  cpuSeconds: number;
}

export interface MicroCluster {
  dir: string;
  conf: string;
  monAddr: string;
  monPort: number;
  adminKeyring: string;
  /** client.vublk: mon 'profile rbd', osd 'profile rbd pool=rbd'. */
  vublkKeyring: string;
  /** client.reader: osd 'profile rbd-read-only pool=rbd'. */
  readerKeyring: string;
  startSeconds: number;
  /** Runs a ceph CLI (`rbd`, `ceph`, `rados`) as client.admin against this cluster; rejects on failure. */
  run(tool: string, args: string[], timeoutMs?: number): Promise<Buffer>;
  usage(): Promise<Record<'mon' | 'mgr' | 'osd', DaemonUsage>>;
  stop(): Promise<void>;
}

function runFile(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(
      file,
      args,
      { env, timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'buffer', maxBuffer: 256 << 20 },
      (error, stdout, stderr) => {
        if (error) reject(new Error(`${file} ${args.join(' ')} failed: ${error.message}\n${stderr.toString().slice(-2000)}`));
        else resolve(stdout);
      },
    );
  });
}

function keyValues(text: string): Map<string, string> {
  const values = new Map<string, string>();
  for (const line of text.split('\n')) {
    const match = /^([A-Z_0-9a-z]+)=(.*)$/.exec(line.trim());
    if (match) values.set(match[1]!, match[2]!);
  }
  return values;
}

/** Starts a cluster (deadline `deadlineSeconds`, including pool `rbd` created and usable). */
export async function startMicroCluster(deadlineSeconds = 240): Promise<MicroCluster> {
  const parent = mkdtempSync(path.join(os.tmpdir(), 'vublk-ceph-'));
  const dir = path.join(parent, 'cluster');
  const env = { ...process.env, CEPH_CONF: path.join(dir, 'ceph.conf') };
  let out: Buffer;
  try {
    out = await runFile(
      'bash',
      [SCRIPT, 'start', dir, '--watch-pid', String(process.pid), '--deadline', String(deadlineSeconds)],
      env,
      (deadlineSeconds + 30) * 1000,
    );
  } catch (error) {
    await runFile('bash', [SCRIPT, 'stop', dir], env, 60_000).catch(() => undefined);
    rmSync(parent, { recursive: true, force: true });
    throw error;
  }
  const values = keyValues(out.toString());
  const get = (key: string): string => {
    const value = values.get(key);
    if (value === undefined) throw new Error(`micro-cluster.sh did not report ${key}:\n${out.toString()}`);
    return value;
  };
  let stopped = false;
  return {
    dir,
    conf: get('CEPH_CONF'),
    monAddr: get('CEPH_MON_ADDR'),
    monPort: Number(get('CEPH_MON_PORT')),
    adminKeyring: get('CEPH_ADMIN_KEYRING'),
    vublkKeyring: get('CEPH_VUBLK_KEYRING'),
    readerKeyring: get('CEPH_READER_KEYRING'),
    startSeconds: Number(get('CEPH_START_SECONDS')),
    run: (tool, args, timeoutMs = 60_000) => runFile(tool, ['--conf', env.CEPH_CONF, ...args], env, timeoutMs),
    async usage() {
      const v = keyValues((await runFile('bash', [SCRIPT, 'usage', dir], env, 10_000)).toString());
      const daemon = (prefix: string): DaemonUsage => ({
        rssKiB: Number(v.get(`${prefix}_RSS_KIB`) ?? 0),
        peakRssKiB: Number(v.get(`${prefix}_HWM_KIB`) ?? 0),
        cpuSeconds: Number(v.get(`${prefix}_CPU_S`) ?? 0),
      });
      return { mon: daemon('mon_a'), mgr: daemon('mgr_x'), osd: daemon('osd_0') };
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      try {
        await runFile('bash', [SCRIPT, 'stop', dir], env, 60_000);
      } finally {
        rmSync(parent, { recursive: true, force: true });
      }
    },
  };
}
