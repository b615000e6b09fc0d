/**
 * The QEMU command line that attaches vublk's disks, printed at start for copy-paste.
 *
 * Two layers of quoting, in this order: QEMU's option parser splits `-chardev`/`-device` values into
 * `key=value` pairs at commas, so a comma inside a value is written `,,`; then the shell splits words at
 * blanks and interprets quotes, `$`, `*`, …, so a word with any such character is single-quoted.
 */

export interface QemuHintDisk {
  socketPath: string;
  numQueues: number;
}

/** A value inside a QEMU `key=value,key=value` option: commas doubled. */
export function qemuOptionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/** One shell word: as is when it holds only characters no POSIX shell interprets, else single-quoted. */
export function shellWord(word: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(word)) return word;
  return `'${word.replaceAll("'", `'\\''`)}'`;
}

/**
 * One QEMU command line with every disk (chardev ids vublk0, vublk1, …): guest RAM shared with the back-end
 * (without `share=on` memory QEMU never sends the memory table and the guest hangs at boot), and
 * `reconnect=1` so QEMU reconnects when vublk restarts.
 */
export function qemuCommandLineForDisks(disks: readonly QemuHintDisk[], memory = '1G'): string {
  const words = ['qemu-system-x86_64', '-machine', 'q35', '-m', memory];
  words.push('-object', `memory-backend-memfd,id=mem,size=${memory},share=on`, '-numa', 'node,memdev=mem');
  disks.forEach((disk, i) => {
    words.push('-chardev', `socket,id=vublk${i},path=${qemuOptionValue(disk.socketPath)},reconnect=1`);
    words.push('-device', `vhost-user-blk-pci,chardev=vublk${i},num-queues=${disk.numQueues}`);
  });
  return words.map(shellWord).join(' ');
}

/** The command line for one disk. */
export function qemuCommandLine(socketPath: string, numQueues: number, memory = '1G'): string {
  return qemuCommandLineForDisks([{ socketPath, numQueues }], memory);
}
