/**
 * Re-encryption of a plain dm-crypt volume: it has no header and no keyslots, its data key
 * is the volume secret itself, so a new key means every block rewritten, and the only way
 * to read and write its plaintext is through device-mapper: an old mapping over the image
 * (old key) and a new mapping over a copy (new key), the data copied from one to the other.
 *
 * Steps:
 *   1. refuse at once (failed_precondition, the reason in the hint) when dm-crypt is not
 *      available: nothing is written;
 *   2. check free space for a full copy (resource_exhausted otherwise);
 *   3. record "copying" in the rotation's state file next to the image;
 *   4. create the copy `.IMAGE.virtkm-rot-<id>.plain-copy` (owner only, same size), open
 *      `virtkm-rot-<id>-old` over the image with the old key and `virtkm-rot-<id>-new` over
 *      the copy with the new key, copy every block, fsync the new mapping;
 *   5. verify: read both mappings again and compare every block;
 *   6. close both mappings, mark the copy as this rotation's result (common.ts'
 *      setRotationMark: an extended attribute holding the rotation id), fsync it, record
 *      "copied";
 *   7. rename the copy over the image, fsync the directory, remove the state file and
 *      fsync the directory again.
 *
 * Crash safety: a plain image cannot say which key it is under (any key "opens" it and
 * reads noise), so the state file and the mark are what tell. The mark travels with the
 * copy's inode: the image carries this rotation's id exactly when the rename happened.
 * Run again (after a crash, or because the server has not recorded the result yet):
 *   - no state file, the image marked with this rotation: finished; nothing to do. This is
 *     what lets the state file go after success: a second run is a no-op instead of a
 *     re-encryption of new data with the old key;
 *   - no state file and no such mark, or "copying": the image is untouched under the old
 *     key: start over (a half copy is deleted, stale mappings closed);
 *   - "copied": the copy is complete and verified: rename it if it is still there (else
 *     the rename happened), then remove the state file;
 *   - "done": written by earlier versions (which kept the state file) and here where the
 *     image's file system has no user extended attributes: finished. With marks it is
 *     turned into a mark on the image and removed.
 * The state file holds no secret (one word) and is named like every rotation file
 * (common.ts). Where marks are not supported it stays at "done" after success, as before:
 * without a record the next run could not tell new data from old.
 *
 * The guest must be stopped: the driver checks that (the image must not be open elsewhere
 * while it is copied and replaced).
 */
import { open, readFile, rename, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { errors, isDomainError } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { fsCode, fsError, fsyncDir, pathExists, unlinkQuietly } from '../images/files.js';
import { checkPlainKey } from '../images/passphrase.js';
import { checkImageSpec } from '../images/spec.js';
import type { DmCryptMapper, ImageSpec } from '../images/types.js';
import {
  checkFreeSpace,
  checkJobBasics,
  progressReporter,
  readRotationMark,
  removeFiles,
  rotationFilePath,
  sameSecret,
  setRotationMark,
  throwIfAborted,
  type ProgressReporter,
} from './common.js';
import type { RotationHooks, RotationJob, RotationMechanism, RotationResult } from './types.js';

/** Options of createPlainReencrypt. */
export interface PlainReencryptOptions {
  /** Opens and closes the two dm-crypt mappings. */
  mapper: DmCryptMapper;
  /** Bytes per read/write (default 4 MiB). */
  chunkBytes?: number;
  logger?: Logger;
}

const NAME = 'plain-reencrypt';
const DEFAULT_CHUNK = 4 << 20;

/** What the state file says. */
export type PlainRotationState = 'copying' | 'copied' | 'done';
const STATES: readonly PlainRotationState[] = ['copying', 'copied', 'done'];

/** The files and mapping names of one rotation. */
export function plainRotationNames(imagePath: string, rotationId: string): { copy: string; state: string; stateNext: string; oldMapping: string; newMapping: string } {
  return {
    copy: rotationFilePath(imagePath, rotationId, 'plain-copy'),
    state: rotationFilePath(imagePath, rotationId, 'plain-state'),
    stateNext: rotationFilePath(imagePath, rotationId, 'plain-state-next'),
    oldMapping: `virtkm-rot-${rotationId}-old`,
    newMapping: `virtkm-rot-${rotationId}-new`,
  };
}

async function readState(path: string): Promise<PlainRotationState | undefined> {
  let text: string;
  try {
    text = (await readFile(path, 'utf8')).trim();
  } catch (err) {
    if (fsCode(err) === 'ENOENT') return undefined;
    throw fsError(err, 'rotation state');
  }
  const s = STATES.find((x) => x === text);
  if (!s) throw errors.precondition('the rotation state file is damaged', { hint: 'check the image by hand before retrying' });
  return s;
}

/** Writes the state durably: a new file, fsynced, renamed over the old one, directory fsynced. */
async function writeState(names: { state: string; stateNext: string }, state: PlainRotationState): Promise<void> {
  const fh = await open(names.stateNext, 'w', 0o600);
  try {
    await fh.writeFile(`${state}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(names.stateNext, names.state);
  await fsyncDir(dirname(names.state));
}

/** Creates the plain dm-crypt re-encryption over a DmCryptMapper. */
export function createPlainReencrypt(options: PlainReencryptOptions): RotationMechanism {
  const { mapper } = options;
  const chunk = options.chunkBytes ?? DEFAULT_CHUNK;
  const logger = options.logger ?? silentLogger;
  if (!Number.isInteger(chunk) || chunk < 4096 || chunk % 4096 !== 0) throw errors.invalid('chunkBytes must be a positive multiple of 4096');

  function check(job: RotationJob): ImageSpec {
    if (job.kind !== 'reencrypt') throw errors.invalid(`${NAME} performs reencrypt rotations, not ${job.kind}`);
    checkJobBasics(job);
    const target = job.target;
    if (job.fromFormat !== 'plain' || target.format !== 'plain') throw errors.invalid(`${NAME} handles plain dm-crypt images only`);
    checkImageSpec(target);
    if (!job.oldKey || !job.newKey) throw errors.invalid(`${NAME} needs the old and the new key`);
    checkPlainKey(job.oldKey, target.keySizeBits);
    checkPlainKey(job.newKey, target.keySizeBits);
    if (sameSecret(job.oldKey, job.newKey)) throw errors.invalid('the new key is the same as the old key');
    return target;
  }

  /** Copies `size` bytes from one device to the other, then reads both again and compares. */
  async function copyAndVerify(from: string, to: string, size: number, progress: ProgressReporter, hooks: RotationHooks): Promise<void> {
    const src = await open(from, 'r');
    try {
      const dst = await open(to, 'r+');
      try {
        const buf = Buffer.alloc(chunk);
        progress.report('copying', 0n, BigInt(size), true);
        for (let at = 0; at < size; at += chunk) {
          throwIfAborted(hooks);
          const n = Math.min(chunk, size - at);
          const { bytesRead } = await src.read(buf, 0, n, at);
          if (bytesRead !== n) throw errors.internal(new Error('short read from the old mapping'));
          await dst.write(buf, 0, n, at);
          progress.report('copying', BigInt(at + n), BigInt(size));
        }
        await dst.sync();
        const other = Buffer.alloc(chunk);
        progress.report('verifying', 0n, BigInt(size), true);
        for (let at = 0; at < size; at += chunk) {
          throwIfAborted(hooks);
          const n = Math.min(chunk, size - at);
          const a = await src.read(buf, 0, n, at);
          const b = await dst.read(other, 0, n, at);
          if (a.bytesRead !== n || b.bytesRead !== n || !buf.subarray(0, n).equals(other.subarray(0, n))) {
            throw errors.internal(new Error('the copy under the new key differs from the data under the old key'));
          }
          progress.report('verifying', BigInt(at + n), BigInt(size));
        }
        buf.fill(0);
        other.fill(0);
      } finally {
        await dst.close();
      }
    } finally {
      await src.close();
    }
  }

  async function closeQuietly(name: string): Promise<void> {
    try {
      await mapper.close(name);
    } catch (e) {
      logger.error('cannot close a dm-crypt mapping of a rotation', { mapping: name, ...describeError(e) });
    }
  }

  async function run(job: RotationJob, hooks: RotationHooks = {}): Promise<RotationResult> {
    const target = check(job);
    const reason = await mapper.unavailableReason();
    if (reason) throw errors.precondition('rotating a plain dm-crypt volume needs device-mapper, which this host does not have', { hint: reason });
    const path = target.path;
    const names = plainRotationNames(path, job.rotationId);
    const progress = progressReporter(hooks);
    const oldKey = job.oldKey ?? new Uint8Array(0);
    const newKey = job.newKey ?? new Uint8Array(0);

    let state = await readState(names.state);
    if (state === 'done') {
      // Finished (by an earlier version, or on a file system without marks): the record
      // moves into a mark on the image when it can, else the state file stays.
      await finishRecord(path, job.rotationId, names);
      return { opensWith: 'new', verified: true, bytesRewritten: 0n };
    }
    if (state === 'copied') {
      progress.report('replacing', 0n, 0n, true);
      // The copy, or the image when the rename happened before the crash, is the result.
      // An earlier version did not mark it: mark it now, before the rename.
      const result = (await pathExists(names.copy)) ? names.copy : path;
      await setRotationMark(result, job.rotationId);
      try {
        await rename(names.copy, path);
      } catch (err) {
        // ENOENT: the rename happened before the crash.
        if (fsCode(err) !== 'ENOENT') throw fsError(err, 'image');
      }
      await fsyncDir(dirname(path));
      await finishRecord(path, job.rotationId, names);
      return { opensWith: 'new', verified: true, bytesRewritten: 0n };
    }
    if (state === undefined && (await readRotationMark(path)) === job.rotationId) {
      // The state file went after success: this rotation's result is the image already.
      return { opensWith: 'new', verified: true, bytesRewritten: 0n };
    }

    // No state, or "copying": the image is untouched; (re)start from a clean slate.
    let size: number;
    try {
      const st = await stat(path);
      if (!st.isFile()) throw errors.precondition('a plain dm-crypt image must be a file to be re-encrypted');
      size = st.size;
    } catch (err) {
      throw isDomainError(err) ? err : fsError(err, 'image');
    }
    await closeQuietly(names.oldMapping);
    await closeQuietly(names.newMapping);
    await unlinkQuietly(names.copy);
    await checkFreeSpace(dirname(path), BigInt(size));
    state = 'copying';
    await writeState(names, state);
    try {
      const fh = await open(names.copy, 'wx', 0o600);
      try {
        await fh.truncate(size);
      } finally {
        await fh.close();
      }
      const from = await mapper.open({ ...target, path }, names.oldMapping, oldKey);
      const to = await mapper.open({ ...target, path: names.copy }, names.newMapping, newKey);
      await copyAndVerify(from, to, size, progress, hooks);
      await mapper.close(names.newMapping);
      await mapper.close(names.oldMapping);
      // The mark says "this inode is rotation X's result" once the rename made it the
      // image; setRotationMark fsyncs the copy (data and mark) either way.
      if (!(await setRotationMark(names.copy, job.rotationId))) {
        logger.warn('no user extended attributes on the image file system: the plain rotation keeps its state file after success', { rotation_id: job.rotationId });
        const copy = await open(names.copy, 'r+');
        try {
          await copy.sync();
        } finally {
          await copy.close();
        }
      }
      await writeState(names, 'copied');
    } catch (err) {
      // Nothing of the image was touched: drop the copy and the state, close the mappings.
      await closeQuietly(names.newMapping);
      await closeQuietly(names.oldMapping);
      await removeFiles([names.copy, names.state, names.stateNext]).catch((e: unknown) => logger.error('cannot remove the files of a failed rotation', describeError(e)));
      throw err;
    }
    progress.report('replacing', BigInt(size), BigInt(size), true);
    await rename(names.copy, path);
    await fsyncDir(dirname(path));
    await finishRecord(path, job.rotationId, names);
    return { opensWith: 'new', verified: true, bytesRewritten: BigInt(size) };
  }

  /**
   * The rotation is finished and `path` is its result: with the image marked, the state
   * file goes (unlink, directory fsync: removeFiles); where marks are not supported the
   * state file is what says "finished", so it stays (or becomes) "done".
   */
  async function finishRecord(path: string, rotationId: string, names: { state: string; stateNext: string }): Promise<void> {
    if (await setRotationMark(path, rotationId)) {
      await removeFiles([names.stateNext, names.state]);
      return;
    }
    if ((await readState(names.state)) !== 'done') await writeState(names, 'done');
  }

  return { name: NAME, run };
}
