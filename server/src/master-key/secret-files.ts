/**
 * Small file helpers for secrets at rest (key files, passphrase files): opening with a
 * permission check on the open descriptor, bounded reads into unpooled buffers, and
 * directory fsync for durable creates and renames.
 */
import { constants as fsConstants } from 'node:fs';
import { open as openFile, type FileHandle } from 'node:fs/promises';
import { DomainError } from '../../../shared/src/errors.js';

/** The result of readBounded. `buf` may hold secret bytes: the caller wipes it. */
export interface BoundedRead {
  buf: Buffer;
  /** Bytes of `buf` that belong to the file (at most the requested maximum). */
  length: number;
  /** True when the file holds more than the requested maximum. */
  tooLong: boolean;
}

/**
 * Opens a secret file for reading and checks, on the open descriptor (so a chmod or
 * rename in between cannot fool it), that it is a regular file that neither group nor
 * others can access. `what` names the file in messages ("key file"); paths never appear.
 * Missing file: not_found; loose mode or unreadable: failed_precondition.
 */
export async function openSecretFile(path: string, what: string): Promise<{ handle: FileHandle; size: number }> {
  let handle: FileHandle;
  try {
    handle = await openFile(path, fsConstants.O_RDONLY | fsConstants.O_NOCTTY);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new DomainError('not_found', `${what} not found`, { cause: err });
    if (code === 'EACCES' || code === 'EPERM') throw new DomainError('failed_precondition', `${what} cannot be read (permission denied)`, { cause: err });
    throw new DomainError('failed_precondition', `${what} cannot be opened`, { cause: err });
  }
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw new DomainError('failed_precondition', `${what} is not a regular file`);
    if ((stat.mode & 0o077) !== 0) {
      const mode = (stat.mode & 0o777).toString(8).padStart(3, '0');
      throw new DomainError('failed_precondition', `${what} is accessible by group or others (mode ${mode})`, {
        hint: `restrict it to its owner: chmod 600 on the ${what}`,
      });
    }
    return { handle, size: stat.size };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

/**
 * Reads at most `max` bytes (and one more, to detect a longer file) of an open file into a
 * fresh unpooled buffer, so wiping it wipes every copy this function made.
 */
export async function readBounded(handle: FileHandle, max: number): Promise<BoundedRead> {
  const buf = Buffer.allocUnsafeSlow(max + 1);
  let length = 0;
  for (;;) {
    const { bytesRead } = await handle.read(buf, length, buf.length - length, null);
    if (bytesRead === 0) break;
    length += bytesRead;
    if (length === buf.length) break;
  }
  return { buf, length: Math.min(length, max), tooLong: length > max };
}

