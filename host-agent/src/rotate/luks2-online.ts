/**
 * Online re-encryption of a LUKS2 volume whose guest runs: `cryptsetup reencrypt
 * --active-name NAME` on the volume's open dm-crypt mapping (the one the reconciler opened
 * for the guest, /dev/mapper/virtkm-<volume id>). cryptsetup rewrites the data under a new
 * volume key while the guest keeps reading and writing through the mapping: it stacks two
 * helper devices under it (NAME-overlay, NAME-hotzone-forward, dm uuids "CRYPT-SUBDEV-...")
 * that route each part of the volume to the old key, the new key, or the hotzone being
 * rewritten, and puts the mapping back on a single dm-crypt table with the new key at the
 * end. The guest never stops.
 *
 * The key handling is the offline mechanism's (luks2-reencrypt.ts): `luksAddKey` of the
 * new passphrase into a free keyslot N, then `cryptsetup reencrypt --key-slot N`, so that at
 * the end only the new passphrase opens the volume, with the new volume key, reached in
 * cryptsetup's own final commit. The same checks come before (which key opens the image,
 * room in the keyslot area, unbound keyslots of an interrupted initialisation) and after
 * (one data segment, no re-encryption pending, old key refused, new key accepted), all with
 * `open --test-passphrase` on the image file, which reads the header only and works while
 * the mapping is open. Same resilience (checksum by default, or journal; never none), same
 * progress (`--progress-json`).
 *
 * The mapping must be the volume's: it must exist, be a LUKS2 mapping (dm uuid
 * "CRYPT-LUKS2-<the image's LUKS UUID without dashes>-NAME") and have the image file (through
 * its loop device, possibly under cryptsetup's helper devices) or the image's block device
 * below it, all read from sysfs; anything else is refused before a byte changes. Without
 * device-mapper the mechanism refuses with `unavailable` (and the reason).
 *
 * Crash safety (kill -9 of the agent or of cryptsetup). cryptsetup keeps the state of an
 * online re-encryption in the LUKS2 header exactly as offline, so the same cases arise, and
 * one more, the device stack:
 *   - killed before the re-encryption was initialised (new key in a keyslot or not, or an
 *     unbound keyslot left by an interrupted initialisation): the next run starts again as
 *     above; the mapping was never touched;
 *   - a re-encryption in the header and no helper device under the mapping (killed right
 *     after initialising, before cryptsetup built the device stack): `reencrypt
 *     --resume-only --active-name NAME` carries it out online;
 *   - a re-encryption in the header and helper devices present: cryptsetup died in the
 *     middle of the data phase, possibly with the hotzone device suspended (it leaves it so
 *     on purpose after a failure: "Do not resume the device unless replaced with error
 *     target manually", cryptsetup 2.6, since the guest would otherwise read half-rewritten
 *     sectors with the wrong key). That stack cannot be taken over safely: the run refuses
 *     (failed_precondition, "stop the guest") and changes nothing. Once the guest is stopped
 *     and its mapping closed (`cryptsetup close` removes the helper devices with it), the
 *     driver picks the offline mechanism, whose `repair` replays the hotzone from its
 *     checksums or journal and finishes the data offline, or finalises a finished data
 *     phase (luks2-finalize.ts). No data is lost and the server keeps both keys meanwhile
 *     (the driver reports "needs attention" while neither key opens the image);
 *   - a finished data phase whose final metadata update is missing (the window
 *     luks2-finalize.ts describes): `--resume-only` would start over and garble the data, so
 *     it is never run; the run refuses the same way and the offline mechanism finalises.
 * What cryptsetup's own online recovery does after such a crash could not be tried here
 * (no device-mapper on the development machines); the refusal keeps virtkm off it.
 *
 * Verification: as offline, the header and both keys (the plaintext is the guest's, in
 * use; nothing to compare with after an in-place rewrite), so `verified` is false.
 */
import { readFile, readdir, realpath, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { CRYPTSETUP_EXIT_KINDS, runTool, toolError, type RunTool, type RunToolOptions } from '../../../shared/src/run-tool.js';
import { checkMappingName, createDmCryptMapper } from '../images/dm-crypt.js';
import { createHostImageStore, LUKS2_DATA_OFFSET_BYTES } from '../images/image-store.js';
import type { DmCryptMapper, ImageSpec, ImageStore } from '../images/types.js';
import { finishedDataPhase } from './luks2-finalize.js';
import { progressJsonParser, MIN_REENCRYPT_AREA_BYTES, type Luks2Resilience } from './luks2-reencrypt.js';
import {
  checkLuks2Job,
  dropUnboundKeyslots,
  freeKeyslot,
  keyslotAreaBytes,
  largestFreeKeyslotArea,
  luks2Cli,
  PBKDF_ARGS,
  reencryptionInProgress,
  undoAddedKeyslot,
  reporter,
  withPassphrases,
  type Luks2Cli,
  type Luks2Header,
} from './luks2-cli.js';
import type { RotationHooks, RotationJob, RotationMechanism, RotationResult } from './types.js';

/** Options of createLuks2OnlineReencrypt, with their defaults. */
export interface Luks2OnlineOptions {
  /** The name of the volume's open dm-crypt mapping (the composition root knows the reconciler's naming). */
  mappingName: (job: RotationJob) => string;
  /** Resilience mode (default 'checksum'). */
  resilience?: Luks2Resilience;
  /** Upper limit of the hotzone in bytes (`--hotzone-size`; default cryptsetup's). */
  hotzoneSizeBytes?: bigint;
  /** Runs the tools (default runTool). */
  run?: RunTool;
  /** Path of cryptsetup (default: looked up in runTool's fixed PATH). */
  cryptsetup?: string;
  /** Used to recognise the image (default: the real store with `run`). */
  images?: ImageStore;
  /** Says whether device-mapper is there (default: the real mapper). */
  mapper?: Pick<DmCryptMapper, 'unavailableReason'>;
  /** sysfs block directory, for tests (default /sys/block). */
  sysBlockDir?: string;
  /** Time limit of each metadata command (default 120 s). */
  toolTimeoutMs?: number;
  /** Time limit of the re-encryption itself (default 24 h; abort with the hook's signal). */
  reencryptTimeoutMs?: number;
  logger?: Logger;
}

const NAME = 'luks2-online-reencrypt';
/** cryptsetup's dm uuid prefixes: the volume's own mapping, and its helper devices. */
const LUKS2_UUID_PREFIX = 'CRYPT-LUKS2-';
const SUBDEV_UUID_PREFIX = 'CRYPT-SUBDEV-';
/** How deep the walk down a device stack goes (mapping, overlay, hotzone, loop). */
const MAX_STACK_DEPTH = 6;

/**
 * The arguments of the online `cryptsetup reencrypt` that starts a re-encryption (no
 * `--force-offline-reencrypt`: the mapping is what makes it online; the image path is not
 * given, the active name is).
 */
export function onlineReencryptArgs(o: { mapping: string; slot: number; resilience: Luks2Resilience; target: Pick<ImageSpec, 'cipher' | 'keySizeBits' | 'sectorSize'>; hotzoneSizeBytes?: bigint | undefined }): string[] {
  checkMappingName(o.mapping);
  if (o.resilience !== 'checksum' && o.resilience !== 'journal') throw errors.invalid('resilience is checksum or journal');
  if (!Number.isInteger(o.slot) || o.slot < 0 || o.slot > 31) throw errors.invalid('invalid keyslot');
  return [
    'reencrypt',
    '--batch-mode',
    '--key-file', '-',
    '--key-slot', String(o.slot),
    '--resilience', o.resilience,
    ...(o.hotzoneSizeBytes === undefined ? [] : ['--hotzone-size', o.hotzoneSizeBytes.toString()]),
    '--cipher', o.target.cipher,
    '--key-size', String(o.target.keySizeBits),
    // Same sector size as the image: a change would change what the guest sees.
    '--sector-size', String(o.target.sectorSize),
    ...PBKDF_ARGS,
    '--progress-json', '--progress-frequency', '1',
    '--active-name', o.mapping,
  ];
}

/** The arguments that resume an initialised re-encryption online. */
export function onlineResumeArgs(mapping: string, hotzoneSizeBytes?: bigint): string[] {
  checkMappingName(mapping);
  return ['reencrypt', '--resume-only', '--batch-mode', '--key-file', '-', ...(hotzoneSizeBytes === undefined ? [] : ['--hotzone-size', hotzoneSizeBytes.toString()]), '--progress-json', '--progress-frequency', '1', '--active-name', mapping];
}

/** What sysfs says about a mapping and the devices below it. */
export interface MappingState {
  /** dm uuid of the mapping. */
  uuid: string;
  /** Names of cryptsetup helper devices (dm uuid CRYPT-SUBDEV-...) in the stack below it. */
  helpers: string[];
  /** Helper devices or the mapping itself currently suspended. */
  suspended: string[];
  /** Backing files of the loop devices at the bottom of the stack. */
  backingFiles: string[];
  /** major:minor of the non-dm, non-loop devices at the bottom. */
  devices: string[];
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return (await readFile(path, 'utf8')).trim();
  } catch {
    return undefined;
  }
}

/** Reads the state of mapping `name` from sysfs, or undefined when it is not open. */
export async function mappingState(sysBlock: string, name: string): Promise<MappingState | undefined> {
  let entries: string[];
  try {
    entries = await readdir(sysBlock);
  } catch {
    return undefined;
  }
  let top: string | undefined;
  for (const e of entries) {
    if (e.startsWith('dm-') && (await readText(join(sysBlock, e, 'dm', 'name'))) === name) top = e;
  }
  if (top === undefined) return undefined;
  const state: MappingState = { uuid: (await readText(join(sysBlock, top, 'dm', 'uuid'))) ?? '', helpers: [], suspended: [], backingFiles: [], devices: [] };
  const seen = new Set<string>();
  // Through the slaves/ links themselves: they lead to the device's own sysfs directory,
  // also for a partition, which has none directly under /sys/block.
  const walk = async (dir: string, depth: number): Promise<void> => {
    const entry = basename(dir);
    if (seen.has(entry) || depth > MAX_STACK_DEPTH) return;
    seen.add(entry);
    if (entry.startsWith('dm-')) {
      const n = (await readText(join(dir, 'dm', 'name'))) ?? entry;
      if (depth > 0 && (await readText(join(dir, 'dm', 'uuid')))?.startsWith(SUBDEV_UUID_PREFIX)) state.helpers.push(n);
      if ((await readText(join(dir, 'dm', 'suspended'))) === '1') state.suspended.push(n);
      const slaves = await readdir(join(dir, 'slaves')).catch(() => [] as string[]);
      for (const s of slaves) await walk(join(dir, 'slaves', s), depth + 1);
      return;
    }
    const backing = await readText(join(dir, 'loop', 'backing_file'));
    if (backing !== undefined) state.backingFiles.push(backing);
    else {
      const dev = await readText(join(dir, 'dev'));
      if (dev !== undefined) state.devices.push(dev);
    }
  };
  await walk(join(sysBlock, top), 0);
  return state;
}

/** major:minor of a block device, as sysfs writes it. */
function majorMinor(rdev: number): string {
  const major = (Math.floor(rdev / 0x100) & 0xfff) | (Math.floor(rdev / 0x100000000) & ~0xfff);
  const minor = (rdev & 0xff) | (Math.floor(rdev / 0x1000) & ~0xff);
  return `${major}:${minor}`;
}

/** Why mapping `state` is not the LUKS2 mapping of the image at `path` (LUKS UUID `luksUuid`), or undefined when it is. */
export async function mappingMismatch(state: MappingState, path: string, luksUuid: string | undefined, name: string): Promise<string | undefined> {
  if (!state.uuid.startsWith(LUKS2_UUID_PREFIX)) return `${name} is not a LUKS2 mapping`;
  if (!luksUuid) return 'the image has no LUKS UUID';
  // CRYPT-LUKS2-<uuid without dashes>-<name>, cut at dm's 128 characters for long names.
  const prefix = `${LUKS2_UUID_PREFIX}${luksUuid.replace(/-/g, '').toLowerCase()}-`;
  const rest = state.uuid.startsWith(prefix) ? state.uuid.slice(prefix.length) : undefined;
  if (rest === undefined || rest.length === 0 || !name.startsWith(rest)) return `${name} belongs to another LUKS2 volume`;
  const target = await realpath(path);
  if (state.backingFiles.includes(target)) return undefined;
  const st = await stat(target);
  if (st.isBlockDevice() && state.devices.includes(majorMinor(st.rdev))) return undefined;
  return `${name} is not backed by the image file`;
}

/** Creates the online LUKS2 re-encryption mechanism (guest running, mapping open). */
export function createLuks2OnlineReencrypt(options: Luks2OnlineOptions): RotationMechanism {
  const resilience = options.resilience ?? 'checksum';
  if (resilience !== 'checksum' && resilience !== 'journal') throw errors.invalid('resilience is checksum or journal');
  const hotzone = options.hotzoneSizeBytes;
  if (hotzone !== undefined && (hotzone < 1n << 20n || hotzone > 1n << 30n || hotzone % 4096n !== 0n)) throw errors.invalid('hotzoneSizeBytes must be a multiple of 4096 from 1 MiB to 1 GiB');
  const run = options.run ?? runTool;
  const cryptsetup = options.cryptsetup ?? 'cryptsetup';
  const images = options.images ?? createHostImageStore({ run });
  const mapper = options.mapper ?? createDmCryptMapper({ run, images });
  const sysBlock = options.sysBlockDir ?? '/sys/block';
  const timeoutMs = options.toolTimeoutMs ?? 120_000;
  const longTimeoutMs = options.reencryptTimeoutMs ?? 24 * 60 * 60 * 1000;
  const logger = options.logger ?? silentLogger;

  async function longRun(args: string[], passphrase: Uint8Array, hooks: RotationHooks, onStdout: (c: Buffer) => void): Promise<void> {
    const opts: RunToolOptions = { stdin: passphrase, timeoutMs: longTimeoutMs, onStdout };
    if (hooks.signal) opts.signal = hooks.signal;
    const r = await run(cryptsetup, args, opts);
    if (r.code === 2) throw errors.precondition('the new key does not open the image');
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function readHeader(cli: Luks2Cli, path: string): Promise<{ header: Luks2Header; uuid: string | undefined }> {
    const info = await images.inspect(path);
    if (!info.exists) throw errors.notFound('image');
    if (info.kind !== 'luks2') throw errors.precondition(`the image is ${info.kind}, not luks2`);
    const header = info.damaged ? undefined : await cli.dump(path);
    if (!header) throw errors.precondition('the image header is damaged', { hint: 'cryptsetup cannot read its LUKS2 metadata' });
    return { header, uuid: info.uuid };
  }

  async function payloadBytes(path: string): Promise<bigint> {
    const size = BigInt((await stat(path)).size);
    return size > LUKS2_DATA_OFFSET_BYTES ? size - LUKS2_DATA_OFFSET_BYTES : 0n;
  }

  /** The whole JSON metadata as cryptsetup reads it (for finishedDataPhase). */
  async function metadataJson(path: string): Promise<Parameters<typeof finishedDataPhase>[0]> {
    const r = await run(cryptsetup, ['luksDump', '--dump-json-metadata', path], { timeoutMs });
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
    try {
      return JSON.parse(r.stdout) as Parameters<typeof finishedDataPhase>[0];
    } catch (cause) {
      throw errors.internal(new Error('cryptsetup luksDump: output is not JSON', { cause }));
    }
  }

  /** The mapping, checked to be the image's; throws when it is not there or not the image's. */
  async function checkedMapping(name: string, path: string, uuid: string | undefined): Promise<MappingState> {
    const state = await mappingState(sysBlock, name);
    if (!state) throw errors.precondition(`the volume's dm-crypt mapping ${name} is not open`, { hint: 'the guest does not run here; the offline re-encryption applies' });
    const why = await mappingMismatch(state, path, uuid, name);
    if (why) throw errors.precondition(`refusing the online re-encryption: ${why}`);
    return state;
  }

  const stopTheGuest = (what: string): DomainError =>
    errors.precondition(`${what}: stop the guest, the offline re-encryption then recovers and finishes it`, { hint: 'cryptsetup left its device stack under the running guest; taking it over online is not safe' });

  async function runJob(job: RotationJob, target: ImageSpec, hooks: RotationHooks, oldPass: Buffer, newPass: Buffer): Promise<RotationResult> {
    const path = target.path;
    const mapping = checkMappingName(options.mappingName(job));
    const reason = await mapper.unavailableReason();
    if (reason) throw new DomainError('unavailable', 'online LUKS2 re-encryption needs device-mapper', { hint: reason });
    const cli = luks2Cli({ run, cryptsetup, timeoutMs, signal: hooks.signal });
    const progress = reporter(hooks.onProgress);
    const step = (s: string, done = 0n, total = 0n): void => progress({ step: s, bytesDone: done, bytesTotal: total, bytesPerSecond: 0 });

    step('inspecting');
    const first = await readHeader(cli, path);
    const uuid = first.uuid;
    let header = first.header;
    let state = await checkedMapping(mapping, path, uuid);
    const total = await payloadBytes(path);

    if (reencryptionInProgress(header)) {
      logger.info('resuming an interrupted online LUKS2 re-encryption', { rotation_id: job.rotationId, mapping });
      if (finishedDataPhase(await metadataJson(path))) throw stopTheGuest('an online LUKS2 re-encryption finished its data but not its metadata');
      if (state.helpers.length > 0 || state.suspended.length > 0) {
        logger.warn('interrupted online LUKS2 re-encryption left helper devices', { rotation_id: job.rotationId, helpers: state.helpers.join(','), suspended: state.suspended.join(',') });
        throw stopTheGuest('an online LUKS2 re-encryption was interrupted in its data phase');
      }
      if (!(await cli.opens(path, newPass))) {
        throw errors.precondition('a LUKS2 re-encryption of the image is in progress and the new key does not open it', { hint: 'it was not started by this rotation' });
      }
      step('reencrypting', 0n, total);
      await longRun(onlineResumeArgs(mapping, hotzone), newPass, hooks, progressJsonParser('reencrypting', progress));
    } else {
      header = await dropUnboundKeyslots(cli, path, header, oldPass);
      const oldOpens = await cli.opens(path, oldPass);
      const newOpens = await cli.opens(path, newPass);
      if (!oldOpens && !newOpens) throw errors.precondition('neither the old nor the new key opens the image');
      if (oldOpens) {
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
        const [slot] = added !== undefined ? [added] : await cli.slotsOpenedBy(path, header, newPass);
        if (slot === undefined) throw errors.internal(new Error('no keyslot opens with the new key'));
        // The mapping again, right before: the guest may have stopped meanwhile.
        state = await checkedMapping(mapping, path, uuid);
        step('reencrypting', 0n, total);
        try {
          await longRun(onlineReencryptArgs({ mapping, slot, resilience, target, hotzoneSizeBytes: hotzone }), newPass, hooks, progressJsonParser('reencrypting', progress));
        } catch (err) {
          await undoAddedKey(path, added, oldPass, job.rotationId);
          throw err;
        }
      }
      // newOpens && !oldOpens: finished by an earlier run.
    }

    step('verifying');
    const after = await cli.dump(path);
    if (!after || reencryptionInProgress(after) || after.segments !== 1) throw errors.internal(new Error('the re-encryption did not finish'));
    if (await cli.opens(path, oldPass)) throw errors.internal(new Error('the old key still opens the image after the re-encryption'));
    if (!(await cli.opens(path, newPass))) throw errors.internal(new Error('the new key does not open the image after the re-encryption'));
    // cryptsetup puts the mapping back on one dm-crypt table: no helper device may be left.
    state = (await mappingState(sysBlock, mapping)) ?? state;
    if (state.helpers.length > 0) logger.warn('helper devices left under the mapping after an online re-encryption', { rotation_id: job.rotationId, helpers: state.helpers.join(',') });
    return { opensWith: 'new', verified: false, bytesRewritten: total };
  }

  /** After a failed run: the keyslot it added goes again unless a re-encryption began (undoAddedKeyslot). */
  async function undoAddedKey(path: string, added: number | undefined, oldPass: Uint8Array, rotationId: string): Promise<void> {
    try {
      await undoAddedKeyslot(luks2Cli({ run, cryptsetup, timeoutMs }), path, added, oldPass);
    } catch (e) {
      logger.error('cannot remove the keyslot added for a failed online re-encryption', { rotation_id: rotationId, ...describeError(e) });
    }
  }

  async function runOnline(job: RotationJob, hooks: RotationHooks = {}): Promise<RotationResult> {
    const target = checkLuks2Job(job, 'reencrypt', NAME);
    return withPassphrases(job, (oldPass, newPass) => runJob(job, target, hooks, oldPass, newPass));
  }

  return { name: NAME, run: runOnline };
}
