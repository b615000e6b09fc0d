/**
 * A minimal QMP client over a Unix socket (QEMU's `-qmp unix:PATH,server=on,wait=off`): greeting,
 * qmp_capabilities, then one command at a time with an id. Events are collected, not interpreted.
 * Every wait has a deadline; a command that gets no answer rejects instead of hanging.
 */
import net from 'node:net';

export class QmpError extends Error {
  readonly code = 'QMP_ERROR';
  constructor(
    readonly command: string,
    detail: string,
  ) {
    super(`QMP ${command}: ${detail}`);
    this.name = 'QmpError';
  }
}

type QmpReply = { return?: unknown; error?: { class: string; desc: string }; id?: number; event?: string; QMP?: unknown };

export class QmpClient {
  readonly events: { event: string; data?: unknown }[] = [];
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void; command: string }>();
  private greeting: ((reply: QmpReply) => void) | null = null;
  private closedError: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.onData(text));
    const fail = (error: Error): void => {
      this.closedError = error;
      for (const { reject } of this.pending.values()) reject(error);
      this.pending.clear();
    };
    socket.on('error', (error) => fail(error));
    socket.on('close', () => fail(new Error('QMP connection closed')));
  }

  /** Connects (retrying while QEMU creates the socket) and negotiates capabilities. */
  static async connect(socketPath: string, timeoutMs = 30_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(socketPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const client = new QmpClient(socket);
        await client.handshake(Math.max(1_000, deadline - Date.now()));
        return client;
      } catch (error) {
        if (Date.now() > deadline)
          throw new Error(`QMP connect to ${socketPath} failed: ${error instanceof Error ? error.message : String(error)}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }

  private async handshake(timeoutMs: number): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no QMP greeting')), timeoutMs);
      this.greeting = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    await this.execute('qmp_capabilities');
  }

  private onData(text: string): void {
    this.buffer += text;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line === '') continue;
      const reply = JSON.parse(line) as QmpReply;
      if (reply.QMP !== undefined) {
        this.greeting?.(reply);
        this.greeting = null;
      } else if (reply.event !== undefined) {
        this.events.push({ event: reply.event, data: (reply as { data?: unknown }).data });
      } else if (reply.id !== undefined) {
        const waiter = this.pending.get(reply.id);
        if (waiter === undefined) continue;
        this.pending.delete(reply.id);
        if (reply.error !== undefined) waiter.reject(new QmpError(waiter.command, `${reply.error.class}: ${reply.error.desc}`));
        else waiter.resolve(reply.return);
      }
    }
  }

  /** Runs a command; resolves with its `return`, rejects with QmpError or after `timeoutMs`. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    if (this.closedError !== null) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpError(command, `no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        command,
        resolve: (value) => {
          clearTimeout(timer);
          resolve(value as T);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      this.socket.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`);
    });
  }

  close(): void {
    this.socket.destroy();
  }
}
