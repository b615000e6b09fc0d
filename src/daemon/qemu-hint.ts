/** The QEMU command-line fragment that attaches a vublk disk (printed at start for copy-paste). */
export function qemuCommandLine(socketPath: string, numQueues: number, memory = '1G'): string {
  return [
    'qemu-system-x86_64 -machine q35 -m ' + memory,
    `-object memory-backend-memfd,id=mem,size=${memory},share=on -numa node,memdev=mem`,
    `-chardev socket,id=vublk0,path=${socketPath}`,
    `-device vhost-user-blk-pci,chardev=vublk0,num-queues=${numQueues}`,
  ].join(' ');
}
