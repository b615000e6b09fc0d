// What a new user sees first: `vublk --version`, and the QEMU command line `vublk serve` prints in plain text
// on stderr even when stderr is not a terminal (here: a pipe), quoted for QEMU and for the shell.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, startDaemon } from '../support/daemon-process.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-first-run-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function waitFor<T>(probe: () => T | undefined, what: string, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

describe('first run', () => {
  it('vublk --version prints the package version', () => {
    const { version } = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
    for (const flag of ['--version', '-v']) {
      const result = spawnSync(process.execPath, [CLI, flag], { encoding: 'utf8', timeout: 15_000 });
      expect(result.status, result.stderr).toBe(0);
      expect(result.stdout).toBe(`${version}\n`);
    }
  });

  it('vublk serve prints the QEMU command line plainly on a non-terminal stderr, commas and blanks quoted', async () => {
    const socketDir = path.join(dir, "my disks, it's here");
    mkdirSync(socketDir);
    const socketPath = path.join(socketDir, 'vublk.sock');
    const daemon = await startDaemon({
      rawArgs: [
        'serve',
        '--socket',
        socketPath,
        '--image',
        path.join(dir, 'disk.img'),
        '--size',
        '16M',
        '--num-queues',
        '2',
        '--metrics-listen',
        'off',
      ],
      waitForSocket: false,
    });
    try {
      const line = await waitFor(() => /\nAttach with QEMU:\n {2}(.*)\n/.exec(daemon.output())?.[1], 'the QEMU command line');
      // A shell splits the printed line into exactly the words QEMU must receive.
      const words = execFileSync('sh', ['-c', `printf '%s\\0' ${line}`], { encoding: 'utf8', timeout: 10_000 })
        .split('\0')
        .slice(0, -1);
      expect(words[0]).toBe('qemu-system-x86_64');
      expect(words[words.indexOf('-chardev') + 1]).toBe(`socket,id=vublk0,path=${socketPath.replaceAll(',', ',,')},reconnect=1`);
      expect(words[words.indexOf('-device') + 1]).toBe('vhost-user-blk-pci,chardev=vublk0,num-queues=2');
      expect(words).toContain('memory-backend-memfd,id=mem,size=1G,share=on');
      // Not inside the JSON log: stdout lines all parse as JSON.
      expect(daemon.logs().length).toBeGreaterThan(0);
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
  });
});
