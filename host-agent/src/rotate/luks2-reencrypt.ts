/**
 * Re-encryption of a LUKS2 image in place with `cryptsetup reencrypt`: a new volume (data)
 * key, every block of the payload rewritten, on the image file itself with
 * `--force-offline-reencrypt` (no loop device: cryptsetup reads and writes the file with
 * its own user-space crypto, and a loop device would add a step that can leak, a
 * /dev/loopN to detach after a crash, for no gain while no guest uses the image).
 *
 * Why this sequence:
 *   1. `luksAddKey` the new passphrase into a free keyslot N (old passphrase on stdin, new
 *      on fd 3); both keys now open the image.
 *   2. `cryptsetup reencrypt --key-slot N` with the new passphrase. cryptsetup creates the
 *      new volume key and a keyslot for it under the new passphrase only, and when the
 *      re-encryption finishes it removes every other keyslot (cryptsetup-reencrypt(8),
 *      --key-slot). So the end state is "only the new key opens, with the new volume key",
 *      reached in cryptsetup's own final metadata commit, with no window where only the old
 *      passphrase guards the new volume key (which "reencrypt, then change the passphrase"
 *      would have: the old, retiring key would open the new volume key) and no separate
 *      keyslot surgery after the data is rewritten.
 *   While the re-encryption runs, the new passphrase opens the image (it has keyslots for
 *   both volume keys, which a header in re-encryption needs: `open --test-passphrase`
 *   with the old passphrase fails from the moment the re-encryption is initialised, checked
 *   with cryptsetup 2.6.1), and it is the passphrase that resumes.
 *
 * Crash safety and resume (kill -9 of the agent or of cryptsetup at any moment):
 *   - a passphrase keyslot bound to no data segment (cryptsetup killed while initialising
 *     the re-encryption: the new volume key's keyslot exists, the re-encryption is not
 *     recorded) is removed first: no data uses its key, and it makes `--test-passphrase`
 *     with the new key fail;
 *   - old key only: from step 1;
 *   - both keys, no re-encryption in the header: from step 2 (the kill came before
 *     cryptsetup initialised the re-encryption);
 *   - a re-encryption in the header (config.requirements.mandatory holds
 *     "online-reencrypt-v2", plus a keyslot of type "reencrypt"), data phase not finished:
 *     `cryptsetup repair` with the new passphrase first, then `cryptsetup reencrypt
 *     --resume-only` if the header still says so. Found by experiment with 2.6.1: after a
 *     kill -9 in the middle of the data, --resume-only refuses ("Device requires
 *     reencryption recovery. Run repair first."); `repair` with the passphrase replays the
 *     hotzone from its checksums (or journal) and, for an offline re-encryption, finishes
 *     the rest of it; when the kill came right after initialisation (nothing to recover)
 *     repair does nothing and --resume-only carries it out;
 *   - a re-encryption in the header whose data phase is finished (killed between the last
 *     hotzone's commit and cryptsetup's final metadata update, or half-way through that
 *     update): NOT --resume-only, which in 2.6.1 starts over at offset 0 and garbles every
 *     block; virtkm performs the final metadata update itself, after trying the finished
 *     header on a scratch copy (luks2-finalize.ts, where the details are). In that state
 *     `open --test-passphrase` may refuse both keys until the update is done;
 *   - new key only, no re-encryption in the header: done, nothing to do (running twice is a
 *     no-op).
 * The hotzone is protected by the resilience mode: `checksum` by default (a checksum per
 *   block in the reencrypt keyslot's area lets recovery tell which blocks were written),
 *   `journal` as an option (the hotzone is copied to the area first: slower, and it does
 *   not depend on the device writing sectors atomically).
 *
 * Failures with the process alive: if cryptsetup failed before initialising the
 * re-encryption, the keyslot this run added is removed again, so nothing is changed. Once
 * the re-encryption is initialised it can only go forward: the error is reported and the
 * next run resumes.
 *
 * Space: an in-place re-encryption needs no copy of the data. It needs room in the LUKS2
 * keyslot area (16 MiB with virtkm's data offset) for the new passphrase's keyslot, the
 * new volume key's keyslot and the re-encryption area (checksums or journal); this is
 * checked before anything is written (resource_exhausted).
 *
 * Verification: without device-mapper no plaintext can be read here, and an in-place
 * re-encryption leaves no source to compare with, so `verified` is false: what is checked
 * is the header (single segment, no re-encryption pending, the old key refused, the new
 * accepted); the data's integrity during the rewrite rests on cryptsetup's resilience.
 *
 * Progress: `--progress-json --progress-frequency 1` prints one JSON object a second on
 * stdout ({"device_bytes","device_size","speed",...}); each becomes an onProgress call.
 *
 * Speed (measured with bench/rotation.ts, docs/benchmarks.md, issue 4): cryptsetup is
 * CPU-bound here (about 2 s of CPU per GiB with checksums at 512-byte sectors, most of it
 * OpenSSL's per-sector call overhead), not disk-bound. Its default hotzone is already the
 * largest possible (checksum: up to its 1 GiB hard limit, held in memory; journal: the free
 * keyslot area), and neither a smaller `--hotzone-size` nor another resilience hash was
 * consistently faster, so none is passed unless hotzoneSizeBytes asks for one (to bound
 * memory). What the mechanism itself adds is kept small: after its own luksAddKey it uses
 * the slot it chose instead of re-reading the header and probing every keyslot.
 * Online re-encryption of a running guest's mapping is luks2-online.ts.
 */
import { stat } from 'node:fs/promises';
import { errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { CRYPTSETUP_EXIT_KINDS, runTool, toolError, type RunTool, type RunToolOptions } from '../../../shared/src/run-tool.js';
import { createHostImageStore, LUKS2_DATA_OFFSET_BYTES } from '../images/image-store.js';
import type { ImageSpec, ImageStore } from '../images/types.js';
import { removeFiles, rotationFilePath } from './common.js';
import { finaliseReencryption, finishedDataPhase, readLuks2Metadata } from './luks2-finalize.js';
import {
  checkLuks2Job,
  withPassphrases,
  dropUnboundKeyslots,
  freeKeyslot,
  keyslotAreaBytes,
  largestFreeKeyslotArea,
  luks2Cli,
  PBKDF_ARGS,
  reencryptionInProgress,
  undoAddedKeyslot,
  reporter,
  type Luks2Cli,
  type Luks2Header,
} from './luks2-cli.js';
import type { RotationHooks, RotationJob, RotationMechanism, RotationProgress, RotationResult } from './types.js';

/** Hotzone resilience of `cryptsetup reencrypt`. */
export type Luks2Resilience = 'checksum' | 'journal';

/** Options of createLuks2Reencrypt, with their defaults. */
export interface Luks2ReencryptOptions {
  /** Resilience mode (default 'checksum'). */
  resilience?: Luks2Resilience;
  /** Runs the tools (default runTool). */
  run?: RunTool;
  /** Path of cryptsetup (default: looked up in runTool's fixed PATH). */
  cryptsetup?: string;
  /** Used to recognise the image (default: the real store with `run`). */
  images?: ImageStore;
  /** Time limit of each metadata command (default 120 s). */
  toolTimeoutMs?: number;
  /** Time limit of the re-encryption itself (default 24 h; abort with the hook's signal). */
  reencryptTimeoutMs?: number;
  /**
   * Upper limit of the hotzone (`--hotzone-size`, bytes, a multiple of 4096; default:
   * cryptsetup's own choice). See "Speed" in the module comment: cryptsetup's default was
   * measured to be as fast as any limit, so this exists for hosts that must bound the
   * memory cryptsetup takes (the hotzone is held in memory) and for the benchmark.
   */
  hotzoneSizeBytes?: bigint;
  logger?: Logger;
}

const NAME = 'luks2-reencrypt';

/**
 * Room the re-encryption needs in the keyslot area beyond the keyslots: the hotzone's
 * checksums or journal. cryptsetup sizes the hotzone to what is free; 1 MiB is a floor
 * under which it would crawl or refuse.
 */
export const MIN_REENCRYPT_AREA_BYTES = 1n << 20n;
/** Bounds of hotzoneSizeBytes: cryptsetup's own hard limit is 1 GiB. */
const MIN_HOTZONE_BYTES = 1n << 20n;
const MAX_HOTZONE_BYTES = 1n << 30n;

/** One line of `--progress-json`. */
interface ProgressLine {
  device_bytes?: string | number;
  device_size?: string | number;
  speed?: string | number;
}

function toBigInt(v: string | number | undefined): bigint | undefined {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === 'string' && /^\d{1,19}$/.test(v)) return BigInt(v);
  return undefined;
}

/**
 * Turns the stream of `--progress-json` output into progress reports. Lines may arrive
 * split across chunks; anything that is not a JSON object with byte counts is ignored.
 */
export function progressJsonParser(step: string, emit: (p: RotationProgress) => void): (chunk: Buffer) => void {
  let pending = '';
  return (chunk) => {
    pending += chunk.toString('utf8');
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (!line.startsWith('{')) continue;
      let p: ProgressLine;
      try {
        p = JSON.parse(line) as ProgressLine;
      } catch {
        continue;
      }
      const done = toBigInt(p.device_bytes);
      const total = toBigInt(p.device_size);
      if (done === undefined || total === undefined) continue;
      const speed = toBigInt(p.speed);
      emit({ step, bytesDone: done, bytesTotal: total, bytesPerSecond: speed === undefined ? 0 : Number(speed) });
    }
    // A progress line is short: never let garbage without newlines grow the buffer.
    if (pending.length > 4096) pending = '';
  };
}

/** Creates the cryptsetup re-encryption mechanism for luks2 images. */
export function createLuks2Reencrypt(options: Luks2ReencryptOptions = {}): RotationMechanism {
  const resilience = options.resilience ?? 'checksum';
  if (resilience !== 'checksum' && resilience !== 'journal') throw errors.invalid('resilience is checksum or journal');
  const run = options.run ?? runTool;
  const cryptsetup = options.cryptsetup ?? 'cryptsetup';
  const images = options.images ?? createHostImageStore({ run });
  const timeoutMs = options.toolTimeoutMs ?? 120_000;
  const longTimeoutMs = options.reencryptTimeoutMs ?? 24 * 60 * 60 * 1000;
  const logger = options.logger ?? silentLogger;
  const hotzone = options.hotzoneSizeBytes;
  if (hotzone !== undefined && (typeof hotzone !== 'bigint' || hotzone < MIN_HOTZONE_BYTES || hotzone > MAX_HOTZONE_BYTES || hotzone % 4096n !== 0n)) {
    throw errors.invalid('hotzoneSizeBytes must be a multiple of 4096 from 1 MiB to 1 GiB');
  }
  const hotzoneArgs = hotzone === undefined ? [] : ['--hotzone-size', hotzone.toString()];

  /** A long cryptsetup run (reencrypt, repair) with progress on stdout. */
  async function longRun(args: string[], passphrase: Uint8Array, hooks: RotationHooks, onStdout?: (c: Buffer) => void): Promise<void> {
    const opts: RunToolOptions = { stdin: passphrase, timeoutMs: longTimeoutMs };
    if (hooks.signal) opts.signal = hooks.signal;
    if (onStdout) opts.onStdout = onStdout;
    const r = await run(cryptsetup, args, opts);
    if (r.code === 2) throw errors.precondition('the new key does not open the image');
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function readHeader(cli: Luks2Cli, path: string): Promise<Luks2Header> {
    const info = await images.inspect(path);
    if (!info.exists) throw errors.notFound('image');
    if (info.kind !== 'luks2') throw errors.precondition(`the image is ${info.kind}, not luks2`);
    const header = info.damaged ? undefined : await cli.dump(path);
    if (!header) throw errors.precondition('the image header is damaged', { hint: 'cryptsetup cannot read its LUKS2 metadata' });
    return header;
  }

  /** Bytes of the payload: the file minus the data offset. */
  async function payloadBytes(path: string): Promise<bigint> {
    const size = BigInt((await stat(path)).size);
    return size > LUKS2_DATA_OFFSET_BYTES ? size - LUKS2_DATA_OFFSET_BYTES : 0n;
  }

  async function runJob(job: RotationJob, target: ImageSpec, hooks: RotationHooks, oldPass: Buffer, newPass: Buffer): Promise<RotationResult> {
    const path = target.path;
    const cli = luks2Cli({ run, cryptsetup, timeoutMs, signal: hooks.signal });
    const progress = reporter(hooks.onProgress);
    const step = (s: string, done = 0n, total = 0n): void => progress({ step: s, bytesDone: done, bytesTotal: total, bytesPerSecond: 0 });
    const progressArgs = ['--progress-json', '--progress-frequency', '1'];

    step('inspecting');
    const scratch = rotationFilePath(path, job.rotationId, 'luks2-final');
    // A scratch header of a finalisation killed after it wrote the image (luks2-finalize.ts).
    await removeFiles([scratch], true);
    let header = await readHeader(cli, path);
    let rewritten = 0n;

    if (reencryptionInProgress(header)) {
      logger.info('resuming an interrupted LUKS2 re-encryption', { rotation_id: job.rotationId });
      const finalise = async (): Promise<void> => {
        step('finalising');
        await finaliseReencryption(path, scratch, (file) => cli.opens(file, newPass));
        header = await readHeader(cli, path);
      };
      // Data phase complete, final metadata update missing: cryptsetup would start over and
      // garble the data (luks2-finalize.ts), so virtkm finishes it.
      if (finishedDataPhase(await readLuks2Metadata(path))) {
        await finalise();
      } else {
        // Killed during the data phase: only the passphrase with keyslots for both volume
        // keys (the new one) can recover and finish it.
        if (!(await cli.opens(path, newPass))) {
          throw errors.precondition('a LUKS2 re-encryption of the image is in progress and the new key does not open it', { hint: 'it was not started by this rotation' });
        }
        step('recovering');
        await longRun(['repair', '--batch-mode', '--key-file', '-', path], newPass, hooks);
        header = await readHeader(cli, path);
        if (reencryptionInProgress(header) && finishedDataPhase(await readLuks2Metadata(path))) await finalise();
      }
      if (reencryptionInProgress(header)) {
        await longRun(
          ['reencrypt', '--resume-only', '--batch-mode', '--force-offline-reencrypt', '--key-file', '-', ...hotzoneArgs, ...progressArgs, path],
          newPass,
          hooks,
          progressJsonParser('reencrypting', progress),
        );
      }
      rewritten = await payloadBytes(path);
    } else {
      header = await dropUnboundKeyslots(cli, path, header, oldPass);
      const oldOpens = await cli.opens(path, oldPass);
      const newOpens = await cli.opens(path, newPass);
      if (!oldOpens && !newOpens) throw errors.precondition('neither the old nor the new key opens the image');
      if (oldOpens) {
        // Room for: the new passphrase's keyslot (unless there), the new volume key's
        // keyslot, and the hotzone area; checked before anything is written.
        const slotBytes = keyslotAreaBytes(target.keySizeBits / 8);
        const need = (newOpens ? slotBytes : 2n * slotBytes) + MIN_REENCRYPT_AREA_BYTES;
        if (largestFreeKeyslotArea(header) < need) throw errors.tooLarge('the LUKS2 keyslot area of the image has no room for the re-encryption');
        let added: number | undefined;
        if (!newOpens) {
          added = freeKeyslot(header);
          if (added === undefined || header.keyslots.length + 2 > 32) throw errors.tooLarge('too many LUKS2 keyslots of the image are in use');
          step('adding key');
          await cli.addKey(path, oldPass, newPass, added);
        }
        // The slot just added needs no probing and no fresh header (three or four cryptsetup
        // runs fewer per rotation); when the new key was already there (a run that stopped
        // between luksAddKey and the re-encryption), the header read above is current.
        const [slot] = added !== undefined ? [added] : await cli.slotsOpenedBy(path, header, newPass);
        if (slot === undefined) throw errors.internal(new Error('no keyslot opens with the new key'));
        const total = await payloadBytes(path);
        step('reencrypting', 0n, total);
        const args = [
          'reencrypt',
          '--batch-mode',
          '--force-offline-reencrypt',
          '--key-file', '-',
          '--key-slot', String(slot),
          '--resilience', resilience,
          ...hotzoneArgs,
          '--cipher', target.cipher,
          '--key-size', String(target.keySizeBits),
          // Explicit: cryptsetup 2.6 would otherwise move a 512-byte-sector image to 4096.
          '--sector-size', String(target.sectorSize),
          ...PBKDF_ARGS,
          ...progressArgs,
          path,
        ];
        try {
          await longRun(args, newPass, hooks, progressJsonParser('reencrypting', progress));
        } catch (err) {
          await undoAddedKey(path, added, oldPass, job.rotationId);
          throw err;
        }
        rewritten = total;
      }
      // newOpens && !oldOpens: finished by an earlier run.
    }

    step('verifying');
    // The image was recognised above: the metadata alone (one luksDump, not inspect's too).
    const after = await cli.dump(path);
    if (!after || reencryptionInProgress(after) || after.segments !== 1) throw errors.internal(new Error('the re-encryption did not finish'));
    if (await cli.opens(path, oldPass)) throw errors.internal(new Error('the old key still opens the image after the re-encryption'));
    if (!(await cli.opens(path, newPass))) throw errors.internal(new Error('the new key does not open the image after the re-encryption'));
    return { opensWith: 'new', verified: false, bytesRewritten: rewritten };
  }

  /** After a failed run: the keyslot it added goes again unless a re-encryption began (undoAddedKeyslot). */
  async function undoAddedKey(path: string, added: number | undefined, oldPass: Uint8Array, rotationId: string): Promise<void> {
    try {
      await undoAddedKeyslot(luks2Cli({ run, cryptsetup, timeoutMs }), path, added, oldPass);
    } catch (e) {
      logger.error('cannot remove the keyslot added for a failed re-encryption', { rotation_id: rotationId, ...describeError(e) });
    }
  }

  async function runReencrypt(job: RotationJob, hooks: RotationHooks = {}): Promise<RotationResult> {
    const target = checkLuks2Job(job, 'reencrypt', NAME);
    return withPassphrases(job, (oldPass, newPass) => runJob(job, target, hooks, oldPass, newPass));
  }

  return { name: NAME, run: runReencrypt };
}
