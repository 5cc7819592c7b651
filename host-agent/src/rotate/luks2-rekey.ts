/**
 * Rekey of a LUKS2 image with cryptsetup: a new keyslot passphrase, metadata only (the
 * volume key and the data stay as they are).
 *
 * Steps, each guarded so that the image opens with the old or the new key at every instant:
 *   1. `luksHeaderBackup` into a hidden file next to the image, named after the rotation
 *      (`.IMAGE.virtkm-rot-<id>.luks2-hdr`, common.ts' naming), written under a
 *      `luks2-hdr-partial` name, fsynced and renamed, so a backup under the final name is
 *      always complete;
 *   2. `luksAddKey` of the new passphrase into the lowest free keyslot (old passphrase on
 *      stdin, new one on fd 3; PBKDF2 with 1000 iterations like create);
 *   3. `open --test-passphrase` with the new key;
 *   4. `luksKillSlot` of every keyslot the old passphrase opens (found with
 *      `--test-passphrase --key-slot N` for each keyslot of the JSON metadata), the new
 *      passphrase proving that a key remains;
 *   5. the old key must fail and the new must open; then the backup is removed.
 *
 * Resume (the run was killed anywhere): the image itself says where it stopped. Only the
 * old key opens: from step 1 (an existing complete backup is kept). Both open: from step 4.
 * Only the new one: done (the backup is removed if still there). Neither, or a damaged
 * header: restore the backup if there is one that a key opens (`luksHeaderRestore`), then
 * go on; without one, failed_precondition and nothing is touched. LUKS2 writes its JSON
 * metadata in two copies with sequence ids, so a kill inside cryptsetup leaves the previous
 * or the next state, never a mix; the backup is the guard against anything else.
 *
 * A failure with the process still alive (tool error, abort) restores the header from the
 * backup, which brings back the state before the rotation (only the old key opens): the
 * volume key never changes, so an old header is always valid for the data. The backup is
 * zeroed before it is removed (it holds the retired key's keyslot).
 *
 * Keyslots that neither key opens (e.g. an admin's recovery passphrase) are left alone: a
 * rekey replaces the rotated key, nothing else.
 */
import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';
import { errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { runTool, type RunTool } from '../../../shared/src/run-tool.js';
import { fsyncDir, pathExists, unlinkQuietly } from '../images/files.js';
import { createHostImageStore } from '../images/image-store.js';
import type { ImageSpec, ImageStore } from '../images/types.js';
import {
  checkLuks2Job,
  withPassphrases,
  freeKeyslot,
  keyslotAreaBytes,
  largestFreeKeyslotArea,
  luks2Cli,
  reencryptionInProgress,
  reporter,
  type Luks2Cli,
  type Luks2Header,
} from './luks2-cli.js';
import { removeFiles, rotationFilePath } from './common.js';
import type { RotationHooks, RotationJob, RotationMechanism, RotationResult } from './types.js';

/** Options of createLuks2Rekey, with their defaults. */
export interface Luks2RekeyOptions {
  /** Runs the tools (default runTool). */
  run?: RunTool;
  /** Path of cryptsetup (default: looked up in runTool's fixed PATH). */
  cryptsetup?: string;
  /** Used to recognise the image (default: the real store with `run`). */
  images?: ImageStore;
  /** Time limit of each cryptsetup run (default 120 s). */
  toolTimeoutMs?: number;
  logger?: Logger;
}

const NAME = 'luks2-rekey';

/** The header backup of a rotation, and the name it is written under first. */
export function rekeyBackupPaths(imagePath: string, rotationId: string): { backup: string; partial: string } {
  return { backup: rotationFilePath(imagePath, rotationId, 'luks2-hdr'), partial: rotationFilePath(imagePath, rotationId, 'luks2-hdr-partial') };
}

/** fsync through a read-only descriptor (cryptsetup writes backups mode 0400). */
async function fsyncReadOnly(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** What the image looks like now. */
interface ImageState {
  /** undefined when cryptsetup cannot read the header. */
  header: Luks2Header | undefined;
  oldOpens: boolean;
  newOpens: boolean;
}

/** Creates the cryptsetup rekey mechanism for luks2 images. */
export function createLuks2Rekey(options: Luks2RekeyOptions = {}): RotationMechanism {
  const run = options.run ?? runTool;
  const cryptsetup = options.cryptsetup ?? 'cryptsetup';
  const images = options.images ?? createHostImageStore({ run });
  const timeoutMs = options.toolTimeoutMs ?? 120_000;
  const logger = options.logger ?? silentLogger;

  async function readState(cli: Luks2Cli, path: string, oldPass: Uint8Array, newPass: Uint8Array): Promise<ImageState> {
    const info = await images.inspect(path);
    if (!info.exists) throw errors.notFound('image');
    if (info.kind !== 'luks2') throw errors.precondition(`the image is ${info.kind}, not luks2`);
    const header = info.damaged ? undefined : await cli.dump(path);
    if (!header) return { header, oldOpens: false, newOpens: false };
    if (reencryptionInProgress(header)) {
      throw errors.precondition('a LUKS2 re-encryption of the image is in progress', { hint: 'let the reencrypt rotation finish first' });
    }
    if (header.unboundKeyslots.length > 0) {
      throw errors.precondition('the image has a keyslot bound to no data (left by an interrupted re-encryption)', { hint: 'run the reencrypt rotation again, which removes it' });
    }
    return { header, oldOpens: await cli.opens(path, oldPass), newOpens: await cli.opens(path, newPass) };
  }

  /** Makes sure a complete header backup exists under the final name. */
  async function ensureBackup(cli: Luks2Cli, path: string, backup: string, partial: string): Promise<void> {
    if (await pathExists(backup)) return;
    await unlinkQuietly(partial);
    await cli.headerBackup(path, partial);
    await fsyncReadOnly(partial);
    await rename(partial, backup);
    await fsyncDir(dirname(backup));
  }

  /** Removes the backup, zeroed first: it holds the keyslot of the key being retired. */
  async function removeBackup(backup: string, partial: string): Promise<void> {
    await removeFiles([partial, backup], true);
  }

  async function runJob(job: RotationJob, target: ImageSpec, hooks: RotationHooks, oldPass: Buffer, newPass: Buffer): Promise<RotationResult> {
    const path = target.path;
    const cli = luks2Cli({ run, cryptsetup, timeoutMs, signal: hooks.signal });
    // Rollback must run even after an abort: its own helpers carry no signal.
    const rollbackCli = luks2Cli({ run, cryptsetup, timeoutMs });
    const progress = reporter(hooks.onProgress);
    const step = (s: string): void => progress({ step: s, bytesDone: 0n, bytesTotal: 0n, bytesPerSecond: 0 });
    const { backup, partial } = rekeyBackupPaths(path, job.rotationId);

    step('inspecting');
    // A backup still under its partial name was never completed: useless.
    await unlinkQuietly(partial);
    let state = await readState(cli, path, oldPass, newPass);
    if (!state.header || (!state.oldOpens && !state.newOpens)) {
      const usable = (await pathExists(backup)) && ((await cli.opens(backup, oldPass)) || (await cli.opens(backup, newPass)));
      if (!usable) {
        if (!state.header) throw errors.precondition('the image header is damaged', { hint: 'cryptsetup cannot read its LUKS2 metadata' });
        throw errors.precondition('neither the old nor the new key opens the image');
      }
      // A backup describes the same data only if it holds the same volume key (a rekey
      // never changes it; a re-encryption since would make the backup's key wrong for the data).
      const backupHeader = await cli.dump(backup);
      if (state.header && backupHeader?.segmentKeyDigest !== state.header.segmentKeyDigest) {
        throw errors.precondition('neither the old nor the new key opens the image, and the header backup is of another volume key');
      }
      step('restoring header');
      logger.warn('restoring a LUKS2 header from the rotation backup', { rotation_id: job.rotationId });
      await cli.headerRestore(path, backup);
      state = await readState(cli, path, oldPass, newPass);
      if (!state.header || (!state.oldOpens && !state.newOpens)) throw errors.internal(new Error('the restored header opens with neither key'));
    }
    const header = state.header;

    if (!(state.newOpens && !state.oldOpens)) {
      // Room for the new keyslot, checked before anything is written.
      const slot = freeKeyslot(header);
      if (!state.newOpens) {
        if (slot === undefined) throw errors.tooLarge('all 32 LUKS2 keyslots of the image are in use');
        if (largestFreeKeyslotArea(header) < keyslotAreaBytes(target.keySizeBits / 8)) {
          throw errors.tooLarge('the LUKS2 keyslot area of the image has no room for another keyslot');
        }
      }
      try {
        step('header backup');
        await ensureBackup(cli, path, backup, partial);
        if (!state.newOpens && slot !== undefined) {
          step('adding key');
          await cli.addKey(path, oldPass, newPass, slot);
          if (!(await cli.opens(path, newPass, slot))) throw errors.internal(new Error('the new keyslot does not open with the new key'));
        }
        step('removing old keyslot');
        const current = await cli.dump(path);
        if (!current) throw errors.internal(new Error('the header became unreadable'));
        for (const s of await cli.slotsOpenedBy(path, current, oldPass)) await cli.killSlot(path, s, newPass);
      } catch (err) {
        await rollback(rollbackCli, path, backup, partial, oldPass, job.rotationId);
        throw err;
      }
    }

    step('verifying');
    if (await cli.opens(path, oldPass)) throw errors.internal(new Error('the old key still opens the image after the rekey'));
    if (!(await cli.opens(path, newPass))) throw errors.internal(new Error('the new key does not open the image after the rekey'));
    await removeBackup(backup, partial);
    return { opensWith: 'new', verified: true, bytesRewritten: 0n };
  }

  /** Puts the header from before the rotation back (best effort; the error that led here is what the caller sees). */
  async function rollback(cli: Luks2Cli, path: string, backup: string, partial: string, oldPass: Uint8Array, rotationId: string): Promise<void> {
    try {
      if (!(await pathExists(backup))) return;
      await cli.headerRestore(path, backup);
      if (await cli.opens(path, oldPass)) await removeBackup(backup, partial);
    } catch (e) {
      // The backup stays; the next run restores from it if the image needs it.
      logger.error('cannot restore the LUKS2 header after a failed rekey', { rotation_id: rotationId, ...describeError(e) });
    }
  }

  async function runRekey(job: RotationJob, hooks: RotationHooks = {}): Promise<RotationResult> {
    const target = checkLuks2Job(job, 'rekey', NAME);
    return withPassphrases(job, (oldPass, newPass) => runJob(job, target, hooks, oldPass, newPass));
  }

  return { name: NAME, run: runRekey };
}
