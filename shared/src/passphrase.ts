/**
 * Reading a passphrase from the terminal without echo, as bytes. (Passphrase files are
 * read by server/src/master-key/sealers.ts.) Never from argv or the environment.
 */
import { openSync, closeSync } from 'node:fs';
import { ReadStream } from 'node:tty';
import { errors } from './errors.js';

/** Prompts on the controlling terminal without echo; fails when there is none. */
export async function promptPassphrase(prompt: string): Promise<Buffer> {
  let fd: number;
  try {
    fd = openSync('/dev/tty', 'r+');
  } catch {
    throw errors.invalid('no terminal to ask for the passphrase', { hint: 'use --passphrase-file FILE' });
  }
  const input = new ReadStream(fd);
  const chunks: Buffer[] = [];
  process.stderr.write(prompt);
  input.setRawMode(true);
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      input.on('data', (d: Buffer) => {
        for (const byte of d) {
          if (byte === 0x0d || byte === 0x0a) {
            const out = Buffer.concat(chunks);
            for (const c of chunks) c.fill(0);
            d.fill(0);
            resolve(out);
            return;
          }
          if (byte === 0x03) return reject(errors.invalid('cancelled'));
          chunks.push(Buffer.from([byte]));
        }
        d.fill(0);
      });
    });
  } finally {
    input.setRawMode(false);
    input.destroy();
    process.stderr.write('\n');
    try {
      closeSync(fd);
    } catch {
      /* already closed by the stream */
    }
  }
}
