/**
 * File system steps of the image layer: crash-safe creation under a temporary name,
 * fsync of files and directories, reading header bytes, and fs errors in the closed error
 * vocabulary (messages never carry paths).
 */
import { randomBytes } from 'node:crypto';
import { link, lstat, open, readdir, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { fsyncDir } from '../../../shared/src/durable-fs.js';

export { fsyncDir };

/** Temporary names look like `.NAME.virtkm-tmp-<12 hex>` in the image's own directory. */
const TEMPORARY_RE = /^\..+\.virtkm-tmp-[0-9a-f]{12}$/;

/** A fresh temporary path next to `path` (same directory, so the final link is atomic). */
export function temporaryPathFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.virtkm-tmp-${randomBytes(6).toString('hex')}`);
}

/** True for names made by temporaryPathFor. */
export function isTemporaryName(name: string): boolean {
  return TEMPORARY_RE.test(name);
}

/** The fs error code of a thrown value, if any. */
export function fsCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

/** An fs failure as a DomainError; `what` names the object without its path. */
export function fsError(err: unknown, what: string): DomainError {
  switch (fsCode(err)) {
    case 'ENOENT':
    case 'ENOTDIR':
      return errors.notFound(what, { cause: err });
    case 'EEXIST':
      return errors.alreadyExists(what, { cause: err });
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return errors.denied(`no permission for the ${what}`, { cause: err });
    case 'ENOSPC':
    case 'EDQUOT':
      return new DomainError('resource_exhausted', `no space left for the ${what}`, { cause: err });
    default:
      return errors.internal(err);
  }
}

/** True when something (a file, an empty file, a link, even a dangling one) is at path. */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (err) {
    if (fsCode(err) === 'ENOENT') return false;
    throw fsError(err, 'image path');
  }
}

/** Flushes a file's data and metadata to stable storage. */
export async function fsyncFile(path: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}


/** Reads up to `length` bytes at `position`; fewer at the end of the file. */
export async function readAt(path: string, position: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, position);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Deletes a file if it is there. */
export async function unlinkQuietly(path: string): Promise<void> {
  try {
    await unlink(path);
  } catch (err) {
    if (fsCode(err) !== 'ENOENT') throw err;
  }
}

/**
 * Publishes a finished temporary file under its final name without ever replacing an
 * existing one: link(2) fails with EEXIST where rename(2) would overwrite silently, so a
 * file that appeared meanwhile (another create, an admin's copy) is left alone. The
 * temporary name is removed afterwards and the directory flushed. A crash between the two
 * leaves a second name of the same, complete image: harmless, and swept by
 * removeStaleTemporaries.
 */
export async function publishNoReplace(temporary: string, final: string): Promise<void> {
  try {
    await link(temporary, final);
  } catch (err) {
    throw fsError(err, 'image');
  }
  await unlink(temporary);
  await fsyncDir(dirname(final));
}

/**
 * Deletes temporary files of interrupted creates in `dir` older than `minAgeMs` (they
 * are never used: a create that is still running owns a younger one). Returns the names
 * removed.
 */
export async function removeStaleTemporaries(dir: string, minAgeMs = 60 * 60 * 1000, now = Date.now()): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(dir)) {
    if (!isTemporaryName(name)) continue;
    const path = join(dir, name);
    try {
      const st = await lstat(path);
      if (!st.isFile() || now - st.mtimeMs < minAgeMs) continue;
      await unlink(path);
      removed.push(name);
    } catch (err) {
      if (fsCode(err) !== 'ENOENT') throw fsError(err, 'temporary image');
    }
  }
  return removed;
}
