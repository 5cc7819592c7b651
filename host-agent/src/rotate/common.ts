/**
 * Helpers every rotation mechanism may use: names of the files a rotation keeps next to
 * its image (derived from the rotation id, so that a run after a crash finds what an
 * earlier run left), the free-space check done before anything is written, throttled
 * progress with a rate, durable header backups of byte ranges, and job checks.
 *
 * Names: `.<image name>.virtkm-rot-<rotation id>.<purpose>` in the image's own directory
 * (same file system, so a rename over the image is atomic). They deliberately do not match
 * images/files.ts' `virtkm-tmp-` pattern: removeStaleTemporaries sweeps those after an
 * hour, and a header backup must survive however long the agent stays down.
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import { lstat, open, readdir, rename, statfs, unlink } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { fsCode, fsError, fsyncDir } from '../images/files.js';
import type { RotationHooks, RotationJob, RotationProgress } from './types.js';

/** Rotation ids usable in file names: the server's UUIDs and similar. */
const ROTATION_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

/** Checks a rotation id (it becomes part of file names). */
export function checkRotationId(id: string): string {
  if (typeof id !== 'string' || !ROTATION_ID_RE.test(id)) {
    throw errors.invalid('invalid rotation id', { hint: '1 to 64 characters: letters, digits, "-" and "_"' });
  }
  return id;
}

/** The common prefix of every file a rotation keeps next to `imagePath`. */
function rotationPrefix(imagePath: string, rotationId: string): string {
  return `.${basename(imagePath)}.virtkm-rot-${checkRotationId(rotationId)}.`;
}

/**
 * The path of a file of rotation `rotationId` next to `imagePath`, e.g. purpose "copy"
 * (the new image being written) or "hdr" (a header backup). purpose: lower-case letters,
 * digits and "-".
 */
export function rotationFilePath(imagePath: string, rotationId: string, purpose: string): string {
  if (!/^[a-z0-9-]{1,32}$/.test(purpose)) throw errors.invalid('invalid rotation file purpose');
  return join(dirname(imagePath), rotationPrefix(imagePath, rotationId) + purpose);
}

/**
 * Purposes starting with this belong to the live copy (live-copy.ts), which removes them
 * itself: after its pivot its destination holds the guest's newest data, so an offline
 * mechanism sweeping the same rotation's leftovers must never delete it.
 */
export const LIVE_COPY_PURPOSE_PREFIX = 'live-';

/**
 * Paths of every file rotation `rotationId` of `imagePath` left in the directory: its own
 * files, and temporaries of an ImageStore.create that was given one of them as its path
 * (those are named `.<file>.virtkm-tmp-...`, i.e. with one more leading dot). The live
 * copy's files are not among them (LIVE_COPY_PURPOSE_PREFIX).
 */
export async function rotationLeftovers(imagePath: string, rotationId: string): Promise<string[]> {
  const dir = dirname(imagePath);
  const prefix = rotationPrefix(imagePath, rotationId);
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    throw fsError(err, 'image directory');
  }
  const ours = (n: string, p: string): boolean => n.startsWith(p) && !n.startsWith(LIVE_COPY_PURPOSE_PREFIX, p.length);
  return names.filter((n) => ours(n, prefix) || ours(n, `.${prefix}`)).sort().map((n) => join(dir, n));
}

/**
 * Removes the given files (missing ones are fine), each overwritten with zeros first when
 * `scrub` is set (header backups hold keyslots of a key being retired; on a file system
 * that rewrites in place this removes them from the disk, elsewhere it does no harm), then
 * flushes the directory.
 */
export async function removeFiles(paths: readonly string[], scrub = false): Promise<void> {
  const dirs = new Set<string>();
  for (const path of paths) {
    try {
      if (scrub) await zeroFile(path);
      await unlink(path);
      dirs.add(dirname(path));
    } catch (err) {
      if (fsCode(err) !== 'ENOENT') throw fsError(err, 'temporary file');
    }
  }
  for (const d of dirs) await fsyncDir(d);
}

async function zeroFile(path: string): Promise<void> {
  const st = await lstat(path);
  if (!st.isFile()) return;
  const fh = await open(path, constants.O_WRONLY | constants.O_NOFOLLOW);
  try {
    const zeros = Buffer.alloc(1 << 20);
    for (let at = 0; at < st.size; at += zeros.length) await fh.write(zeros, 0, Math.min(zeros.length, st.size - at), at);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Free bytes for an unprivileged writer on the file system holding `dir`. */
export async function freeBytes(dir: string): Promise<bigint> {
  try {
    const s = await statfs(dir, { bigint: true });
    return s.bavail * s.bsize;
  } catch (err) {
    throw fsError(err, 'image directory');
  }
}

/**
 * Throws resource_exhausted unless the file system holding `dir` has `needed` bytes free.
 * Called before anything is written, so a refusal changes nothing.
 */
export async function checkFreeSpace(dir: string, needed: bigint): Promise<void> {
  const free = await freeBytes(dir);
  if (free < needed) {
    const mib = (b: bigint) => `${(b + (1n << 20n) - 1n) >> 20n} MiB`;
    throw new DomainError('resource_exhausted', `not enough free space for the copy: ${mib(needed)} needed, ${mib(free)} free`, {
      hint: 'free space on the image file system, or rotate with rekey (no copy)',
    });
  }
}

/** What a progress reporter offers a mechanism. */
export interface ProgressReporter {
  /** Reports a step; throttled unless `force` (step changes are always reported). */
  report(step: string, bytesDone: bigint, bytesTotal: bigint, force?: boolean): void;
}

/**
 * Wraps hooks.onProgress: at most one report per `minIntervalMs` (default 250) within a
 * step, every step change at once, and the rate (bytes per second) computed from the
 * bytes done since the step started. A throwing consumer is ignored.
 */
export function progressReporter(hooks: RotationHooks | undefined, minIntervalMs = 250, now: () => number = () => performance.now()): ProgressReporter {
  const onProgress = hooks?.onProgress;
  let lastStep = '';
  let lastAt = -Infinity;
  let stepStartAt = 0;
  let stepStartBytes = 0n;
  return {
    report(step, bytesDone, bytesTotal, force = false) {
      if (!onProgress) return;
      const t = now();
      const newStep = step !== lastStep;
      if (newStep) {
        stepStartAt = t;
        stepStartBytes = bytesDone;
      } else if (!force && t - lastAt < minIntervalMs) {
        return;
      }
      lastStep = step;
      lastAt = t;
      const seconds = (t - stepStartAt) / 1000;
      const bytesPerSecond = seconds > 0 ? Math.max(0, Number(bytesDone - stepStartBytes) / seconds) : 0;
      const p: RotationProgress = { step, bytesDone, bytesTotal, bytesPerSecond };
      try {
        onProgress(p);
      } catch {
        // Progress is advisory; a failing consumer must not stop a rotation half-way.
      }
    },
  };
}

/** Throws unavailable when the run was aborted (checked between steps). */
export function throwIfAborted(hooks: RotationHooks | undefined): void {
  if (hooks?.signal?.aborted) throw new DomainError('unavailable', 'the rotation was cancelled', { cause: hooks.signal.reason });
}

/** True when two secrets are the same bytes (a rotation to the same key is refused). */
export function sameSecret(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

/** Checks the fields every job needs (rotation id, volume id). */
export function checkJobBasics(job: RotationJob): void {
  if (typeof job !== 'object' || job === null) throw errors.invalid('invalid rotation job');
  checkRotationId(job.rotationId);
  if (typeof job.volumeId !== 'string' || job.volumeId.length === 0) throw errors.invalid('invalid volume id');
}

// ---------------------------------------------------------------------------------------
// Header backups: byte ranges of an image, saved in a file of their own before a metadata
// change and written back when the change left an image that no key opens.

/** One saved range of an image. */
export interface ByteRange {
  offset: number;
  length: number;
}

/** What a header backup records besides the bytes. */
export interface HeaderBackupInfo {
  /** Free-form label of the layout, e.g. "luks1" or "qcow2-luks"; checked on restore. */
  layout: string;
  ranges: ByteRange[];
  /** Size of the image file when the backup was taken; a restore requires the same size. */
  imageSize: number;
  /** An identity of the image (e.g. its LUKS UUID) when known; checked on restore when both sides have one. */
  identity?: string;
}

const BACKUP_MAGIC = Buffer.from('VIRTKMHB', 'latin1');
/** The largest backup accepted (QEMU's LUKS1 header is about 2 MiB; qcow2 adds a cluster). */
const MAX_BACKUP_BYTES = 64 << 20;

/**
 * Saves the ranges of `imagePath` to `backupPath`, durably: written under `backupPath`.tmp,
 * fsynced, renamed, directory fsynced. So a file under `backupPath` is always complete; it
 * also carries a SHA-256 of everything, checked before any restore. Owner-only.
 */
export async function saveHeaderBackup(imagePath: string, backupPath: string, info: HeaderBackupInfo): Promise<void> {
  const total = info.ranges.reduce((s, r) => s + r.length, 0);
  if (info.ranges.length === 0 || total > MAX_BACKUP_BYTES || info.ranges.some((r) => r.offset < 0 || r.length <= 0 || r.offset + r.length > info.imageSize)) {
    throw errors.internal(new Error('header backup: bad ranges'));
  }
  const data = Buffer.alloc(total);
  const img = await open(imagePath, 'r').catch((err: unknown) => {
    throw fsError(err, 'image');
  });
  try {
    let at = 0;
    for (const r of info.ranges) {
      const { bytesRead } = await img.read(data, at, r.length, r.offset);
      if (bytesRead !== r.length) throw errors.precondition('the image is shorter than its header says');
      at += r.length;
    }
  } finally {
    await img.close();
  }
  const meta = Buffer.from(JSON.stringify({ v: 1, ...info }), 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(meta.length);
  const body = Buffer.concat([BACKUP_MAGIC, len, meta, data]);
  const digest = createHash('sha256').update(body).digest();
  const tmp = `${backupPath}.tmp`;
  try {
    await unlink(tmp).catch((err: unknown) => {
      if (fsCode(err) !== 'ENOENT') throw err;
    });
    const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    try {
      await fh.writeFile(Buffer.concat([body, digest]));
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, backupPath);
    await fsyncDir(dirname(backupPath));
  } catch (err) {
    throw err instanceof DomainError ? err : fsError(err, 'header backup');
  } finally {
    data.fill(0);
    body.fill(0);
  }
}

/** A backup read back: its description, or undefined when there is none or it is unusable (torn, foreign). */
export async function readHeaderBackup(backupPath: string): Promise<(HeaderBackupInfo & { data: Buffer }) | undefined> {
  let bytes: Buffer;
  try {
    const fh = await open(backupPath, constants.O_RDONLY | constants.O_NOFOLLOW);
    try {
      const st = await fh.stat();
      if (!st.isFile() || st.size > MAX_BACKUP_BYTES + (1 << 20)) return undefined;
      bytes = await fh.readFile();
    } finally {
      await fh.close();
    }
  } catch (err) {
    if (fsCode(err) === 'ENOENT' || fsCode(err) === 'ELOOP') return undefined;
    throw fsError(err, 'header backup');
  }
  if (bytes.length < BACKUP_MAGIC.length + 4 + 32 || !bytes.subarray(0, BACKUP_MAGIC.length).equals(BACKUP_MAGIC)) return undefined;
  const body = bytes.subarray(0, bytes.length - 32);
  if (!createHash('sha256').update(body).digest().equals(bytes.subarray(bytes.length - 32))) return undefined;
  const metaLen = body.readUInt32BE(BACKUP_MAGIC.length);
  const metaStart = BACKUP_MAGIC.length + 4;
  if (metaStart + metaLen > body.length) return undefined;
  let meta: HeaderBackupInfo & { v?: number };
  try {
    meta = JSON.parse(body.subarray(metaStart, metaStart + metaLen).toString('utf8')) as HeaderBackupInfo & { v?: number };
  } catch {
    return undefined;
  }
  const data = Buffer.from(body.subarray(metaStart + metaLen));
  bytes.fill(0);
  if (meta.v !== 1 || !Array.isArray(meta.ranges) || meta.ranges.reduce((s, r) => s + r.length, 0) !== data.length) {
    data.fill(0);
    return undefined;
  }
  const out: HeaderBackupInfo & { data: Buffer } = { layout: meta.layout, ranges: meta.ranges, imageSize: meta.imageSize, data };
  if (meta.identity !== undefined) out.identity = meta.identity;
  return out;
}

/**
 * Writes a backup's ranges back into `imagePath` and fsyncs it. Refuses
 * (failed_precondition) when the backup does not fit the image: another layout, another
 * file size, another identity (`identity` is what the image's header says now, if it can
 * still be read).
 */
export async function restoreHeaderBackup(imagePath: string, backup: HeaderBackupInfo & { data: Buffer }, layout: string, identity: string | undefined): Promise<void> {
  const fh = await open(imagePath, constants.O_WRONLY | constants.O_NOFOLLOW).catch((err: unknown) => {
    throw fsError(err, 'image');
  });
  try {
    const st = await fh.stat();
    if (backup.layout !== layout || st.size !== backup.imageSize || (identity !== undefined && backup.identity !== undefined && identity !== backup.identity)) {
      throw errors.precondition('the header backup does not belong to this image', { hint: 'the image was left as it is' });
    }
    let at = 0;
    for (const r of backup.ranges) {
      await fh.write(backup.data, at, r.length, r.offset);
      at += r.length;
    }
    await fh.sync();
  } catch (err) {
    throw err instanceof DomainError ? err : fsError(err, 'image');
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------
// Completion marks: an image a rotation produced says so itself, in an extended attribute,
// for formats that cannot tell from their own bytes which key they are under (plain
// dm-crypt: every key "opens" it). The mark holds the rotation id only, no secret; it
// moves with the inode (a rename over the canonical path keeps it) and is replaced by the
// next rotation's mark.

/** The extended attribute of the mark. */
export const ROTATION_MARK_XATTR = 'user.virtkm.rotation';
/** errno values of a file system without user extended attributes (ENOTSUP = EOPNOTSUPP on Linux). */
const XATTR_UNSUPPORTED = new Set([95]);
const ENODATA = 61;

interface XattrCalls {
  set(path: string, name: string, value: Buffer): number;
  get(path: string, name: string, out: Buffer): number;
  errno(): number;
}

let xattrLoader: Promise<XattrCalls | undefined> | undefined;

/** setxattr(2)/getxattr(2) through koffi (Node has no API for them), loaded on first use only. */
function loadXattr(): Promise<XattrCalls | undefined> {
  xattrLoader ??= (async () => {
    try {
      const koffi = (await import('koffi')).default;
      const libc = koffi.load('libc.so.6');
      const setx = libc.func('int setxattr(const char *path, const char *name, const void *value, size_t size, int flags)');
      const getx = libc.func('intptr_t getxattr(const char *path, const char *name, _Out_ void *value, size_t size)');
      return {
        set: (path, name, value) => setx(path, name, value, value.length, 0) as number,
        get: (path, name, out) => Number(getx(path, name, out, out.length)),
        errno: () => koffi.errno(),
      };
    } catch {
      return undefined;
    }
  })();
  return xattrLoader;
}

function errnoError(code: number, what: string): DomainError {
  const name = Object.entries(osConstants.errno).find(([, v]) => v === code)?.[0] ?? `errno ${code}`;
  return fsError(Object.assign(new Error(`${what}: ${name}`), { code: name, errno: -code }), 'image');
}

/**
 * Marks the file `path` as the result of rotation `rotationId` and fsyncs it, so the mark
 * is durable before the caller's next step. Returns false when marks cannot be kept here
 * (the file system has no user extended attributes, or libc cannot be loaded): the caller
 * must then keep its own record of completion.
 */
export async function setRotationMark(path: string, rotationId: string): Promise<boolean> {
  const calls = await loadXattr();
  if (!calls) return false;
  if (calls.set(path, ROTATION_MARK_XATTR, Buffer.from(checkRotationId(rotationId), 'utf8')) !== 0) {
    const code = calls.errno();
    if (XATTR_UNSUPPORTED.has(code)) return false;
    throw errnoError(code, 'cannot mark the image');
  }
  const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW).catch((err: unknown) => {
    throw fsError(err, 'image');
  });
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  return true;
}

/** The rotation id `path` is marked with; undefined when it has no mark (or marks are not supported here). */
export async function readRotationMark(path: string): Promise<string | undefined> {
  const calls = await loadXattr();
  if (!calls) return undefined;
  const out = Buffer.alloc(256);
  const n = calls.get(path, ROTATION_MARK_XATTR, out);
  if (n < 0) {
    const code = calls.errno();
    if (code === ENODATA || XATTR_UNSUPPORTED.has(code)) return undefined;
    throw errnoError(code, 'cannot read the mark of the image');
  }
  return out.subarray(0, n).toString('utf8');
}
