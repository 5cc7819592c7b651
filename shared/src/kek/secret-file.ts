/**
 * Reading small secret files (a token PIN) for the key-encryption-key backends: the file
 * must be a regular file that neither group nor others can access (checked on the open
 * descriptor, so a chmod or rename in between cannot fool it), and its bytes land in an
 * unpooled buffer the caller wipes. The same rules as the server's key-file sealer; shared/
 * cannot import server/, hence this small file of its own.
 */
import { constants as fsConstants } from 'node:fs';
import { open as openFile, type FileHandle } from 'node:fs/promises';
import { DomainError } from '../errors.js';
import { ownedCopy, wipe } from '../secret-bytes.js';

/**
 * Reads a secret text file of at most `max` bytes; one trailing "\n" or "\r\n" is removed.
 * `what` names the file in messages ("PIN file"); paths never appear in them. Missing:
 * not_found; loose mode, not a regular file, empty or too long: failed_precondition or
 * invalid_argument. The caller owns and wipes the result.
 */
export async function readSecretTextFile(path: string, what: string, max: number): Promise<Buffer> {
  let handle: FileHandle;
  try {
    handle = await openFile(path, fsConstants.O_RDONLY | fsConstants.O_NOCTTY);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new DomainError('not_found', `${what} not found`, { cause: err });
    if (code === 'EACCES' || code === 'EPERM') throw new DomainError('failed_precondition', `${what} cannot be read (permission denied)`, { cause: err });
    throw new DomainError('failed_precondition', `${what} cannot be opened`, { cause: err });
  }
  const buf = Buffer.allocUnsafeSlow(max + 3);
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw new DomainError('failed_precondition', `${what} is not a regular file`);
    if ((stat.mode & 0o077) !== 0) {
      const mode = (stat.mode & 0o777).toString(8).padStart(3, '0');
      throw new DomainError('failed_precondition', `${what} is accessible by group or others (mode ${mode})`, { hint: `restrict it to its owner: chmod 600 on the ${what}` });
    }
    let length = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buf, length, buf.length - length, null);
      if (bytesRead === 0 || length + bytesRead === buf.length) {
        length += bytesRead;
        break;
      }
      length += bytesRead;
    }
    if (length > 0 && buf[length - 1] === 0x0a) length -= length > 1 && buf[length - 2] === 0x0d ? 2 : 1;
    if (length === 0) throw new DomainError('invalid_argument', `${what} is empty`);
    if (length > max) throw new DomainError('invalid_argument', `${what} holds more than ${max} bytes`);
    return ownedCopy(buf.subarray(0, length));
  } finally {
    wipe(buf);
    await handle.close();
  }
}
