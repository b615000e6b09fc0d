// The QEMU command line printed at start: QEMU's comma escaping inside option values, then shell quoting.
// The shell quoting is checked by handing the line to a real sh and reading back the words it splits.
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { qemuCommandLine, qemuCommandLineForDisks, qemuOptionValue, shellWord } from '../../src/daemon/qemu-hint.js';

/** The words a POSIX shell makes of `line` (NUL-separated, so a word may hold newlines). */
function shellWords(line: string): string[] {
  const out = execFileSync('sh', ['-c', `printf '%s\\0' ${line}`], { encoding: 'utf8', timeout: 10_000 });
  return out.split('\0').slice(0, -1);
}

function optionAfter(words: string[], flag: string, nth = 0): string {
  const at = words.flatMap((w, i) => (w === flag ? [i] : []))[nth];
  expect(at, `${flag} #${nth}`).toBeDefined();
  return words[at! + 1]!;
}

describe('qemu command line hint', () => {
  it('shares guest memory, reconnects, and names the socket and queue count', () => {
    const line = qemuCommandLine('/run/vublk/disk0.sock', 2);
    expect(line).toBe(
      'qemu-system-x86_64 -machine q35 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem ' +
        '-chardev socket,id=vublk0,path=/run/vublk/disk0.sock,reconnect=1 -device vhost-user-blk-pci,chardev=vublk0,num-queues=2',
    );
  });

  it('doubles commas in a socket path, as QEMU option values need', () => {
    expect(qemuOptionValue('/tmp/a,b,,c')).toBe('/tmp/a,,b,,,,c');
    const words = shellWords(qemuCommandLine('/tmp/a,b/vublk.sock', 1));
    expect(optionAfter(words, '-chardev')).toBe('socket,id=vublk0,path=/tmp/a,,b/vublk.sock,reconnect=1');
  });

  it('quotes paths with blanks, quotes and shell metacharacters so sh hands QEMU the exact word', () => {
    const nasty = '/tmp/it\'s a dir/$HOME `x` *;|&<>(){}"\\\n,end.sock';
    const words = shellWords(qemuCommandLine(nasty, 4));
    expect(words[0]).toBe('qemu-system-x86_64');
    expect(optionAfter(words, '-chardev')).toBe(`socket,id=vublk0,path=${nasty.replaceAll(',', ',,')},reconnect=1`);
    expect(optionAfter(words, '-device')).toBe('vhost-user-blk-pci,chardev=vublk0,num-queues=4');
  });

  it('leaves plain words unquoted and quotes the empty word', () => {
    expect(shellWord('socket,id=vublk0,path=/run/x.sock')).toBe('socket,id=vublk0,path=/run/x.sock');
    expect(shellWord('')).toBe("''");
    expect(shellWord("a'b")).toBe("'a'\\''b'");
  });

  it('puts every disk on one command line with its own chardev id', () => {
    const words = shellWords(
      qemuCommandLineForDisks([
        { socketPath: '/run/vublk/a.sock', numQueues: 1 },
        { socketPath: '/run/vublk/b c.sock', numQueues: 2 },
      ]),
    );
    expect(words.filter((w) => w === 'qemu-system-x86_64')).toHaveLength(1);
    expect(optionAfter(words, '-chardev', 0)).toBe('socket,id=vublk0,path=/run/vublk/a.sock,reconnect=1');
    expect(optionAfter(words, '-chardev', 1)).toBe('socket,id=vublk1,path=/run/vublk/b c.sock,reconnect=1');
    expect(optionAfter(words, '-device', 1)).toBe('vhost-user-blk-pci,chardev=vublk1,num-queues=2');
  });
});
