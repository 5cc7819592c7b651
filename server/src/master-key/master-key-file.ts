/**
 * DIR/master-key.json: the sealed master key record (sealers.ts) on disk.
 *
 * Written once, atomically and without ever replacing an existing record: the JSON goes
 * to a temporary file (0600, exclusive), is fsynced, and is then hard-linked to the final
 * name, which fails if that name exists (rename would silently replace it). The temporary
 * name is removed and the directory fsynced. On file systems without hard links the code
 * falls back to "check, then rename".
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { link, open as openFile, readFile, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { fsyncDir } from '../../../shared/src/durable-fs.js';
import { DomainError } from '../../../shared/src/errors.js';
import { parseSealedMasterKey, type SealedMasterKey } from './sealers.js';

/** File name of the sealed master key inside a data directory. */
export const MASTER_KEY_FILE_NAME = 'master-key.json';

/** Largest master-key.json accepted (a record is a few hundred bytes). */
const MAX_RECORD_BYTES = 64 * 1024;

/** Errors of link(2) that mean "this file system has no hard links", not a real failure. */
const NO_HARD_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS', 'EXDEV', 'EMLINK']);

/** Path of the sealed master key in data directory `dir`. */
export function masterKeyFilePath(dir: string): string {
  return join(dir, MASTER_KEY_FILE_NAME);
}

/** The JSON text stored for a record (stable key order, two-space indent, final newline). */
export function serializeSealedMasterKey(sealed: SealedMasterKey): string {
  const clean = parseSealedMasterKey(sealed);
  return `${JSON.stringify(clean, null, 2)}\n`;
}

/** True when `dir` holds a master-key.json (of any content). */
export async function masterKeyFileExists(dir: string): Promise<boolean> {
  try {
    await stat(masterKeyFilePath(dir));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

function alreadyExists(cause?: unknown): DomainError {
  return new DomainError('already_exists', 'master key file already exists', { cause, hint: 'an existing sealed master key is never overwritten' });
}

/**
 * Writes the record to DIR/master-key.json atomically (see module comment); refuses with
 * already_exists when the file exists. Returns the path written.
 */
export async function writeMasterKeyFile(dir: string, sealed: SealedMasterKey): Promise<string> {
  const text = serializeSealedMasterKey(sealed);
  const finalPath = masterKeyFilePath(dir);
  if (await masterKeyFileExists(dir)) throw alreadyExists();
  const tmpPath = join(dir, `.${MASTER_KEY_FILE_NAME}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
  let handle: FileHandle | undefined;
  let tmpExists = false;
  try {
    handle = await openFile(tmpPath, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOCTTY, 0o600);
    tmpExists = true;
    await handle.chmod(0o600);
    await handle.writeFile(text, 'utf8');
    await handle.sync();
    await handle.close();
    handle = undefined;
    try {
      await link(tmpPath, finalPath);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (code === 'EEXIST') throw alreadyExists(err);
      if (!NO_HARD_LINKS.has(code)) throw err;
      // No hard links here: check and rename (a concurrent writer could slip in between).
      if (await masterKeyFileExists(dir)) throw alreadyExists();
      await rename(tmpPath, finalPath);
      tmpExists = false;
    }
  } catch (err) {
    if (err instanceof DomainError) throw err;
    throw new DomainError('failed_precondition', 'master key file cannot be written', { cause: err });
  } finally {
    await handle?.close().catch(() => undefined);
    if (tmpExists) await unlink(tmpPath).catch(() => undefined);
  }
  await fsyncDir(dir);
  return finalPath;
}

/**
 * Reads and validates DIR/master-key.json. Missing: not_found (hint: initialise first);
 * unreadable, not JSON or not a valid record: failed_precondition.
 */
export async function readMasterKeyFile(dir: string): Promise<SealedMasterKey> {
  let raw: Buffer;
  try {
    const info = await stat(masterKeyFilePath(dir));
    if (!info.isFile() || info.size > MAX_RECORD_BYTES) throw new DomainError('failed_precondition', 'master key file is not a sealed master key record');
    raw = await readFile(masterKeyFilePath(dir));
  } catch (err) {
    if (err instanceof DomainError) throw err;
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new DomainError('not_found', 'master key file not found', { cause: err, hint: 'initialise the data directory first' });
    }
    throw new DomainError('failed_precondition', 'master key file cannot be read', { cause: err });
  }
  let value: unknown;
  try {
    value = JSON.parse(raw.toString('utf8'));
  } catch (err) {
    throw new DomainError('failed_precondition', 'master key file is not valid JSON', { cause: err });
  }
  return parseSealedMasterKey(value);
}

/**
 * Writes a record to `path` (master-key.json, or master-key.next.json during a rotation),
 * REPLACING whatever is there, atomically and durably: temporary file (0600, exclusive),
 * fsync, rename over the final name, fsync of the directory. A reader sees the old record
 * or the new one, never a mix; after a crash at any point, the same. Used by reseal and
 * rotate-master-key, which run under the data directory's lock.
 */
export async function replaceSealedRecordFile(path: string, sealed: SealedMasterKey): Promise<void> {
  const text = serializeSealedMasterKey(sealed);
  const dir = dirname(path);
  const tmpPath = join(dir, `.${basename(path)}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
  let handle: FileHandle | undefined;
  try {
    handle = await openFile(tmpPath, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOCTTY, 0o600);
    await handle.chmod(0o600);
    await handle.writeFile(text, 'utf8');
    await handle.sync();
    await handle.close();
    handle = undefined;
    await rename(tmpPath, path);
  } catch (err) {
    await handle?.close().catch(() => undefined);
    await unlink(tmpPath).catch(() => undefined);
    throw new DomainError('failed_precondition', 'master key file cannot be written', { cause: err });
  }
  await fsyncDir(dir);
}

/** Reads and validates a record at `path`; undefined when there is no such file. */
export async function readSealedRecordFileIfExists(path: string): Promise<SealedMasterKey | undefined> {
  let raw: Buffer;
  try {
    const info = await stat(path);
    if (!info.isFile() || info.size > MAX_RECORD_BYTES) throw new DomainError('failed_precondition', 'master key file is not a sealed master key record');
    raw = await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    if (err instanceof DomainError) throw err;
    throw new DomainError('failed_precondition', 'master key file cannot be read', { cause: err });
  }
  try {
    return parseSealedMasterKey(JSON.parse(raw.toString('utf8')));
  } catch (err) {
    if (err instanceof DomainError) throw err;
    throw new DomainError('failed_precondition', 'master key file is not valid JSON', { cause: err });
  }
}
