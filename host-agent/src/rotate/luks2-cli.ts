/**
 * The cryptsetup steps the LUKS2 rotation mechanisms share (luks2-rekey.ts,
 * luks2-reencrypt.ts): reading the header's JSON metadata, asking which key opens which
 * keyslot, adding and removing keyslots, header backups, and checking the job and the room
 * left in the keyslot area. Passphrases go to cryptsetup on stdin (`--key-file -`) and, for
 * a second one, on fd 3 (`--new-keyfile /dev/fd/3`), never in argv.
 *
 * Every question about keys uses `open --test-passphrase`, which unlocks a keyslot without
 * device-mapper (it works on plain files here): exit 0 is "opens", exit 2 "does not open",
 * anything else an error. It answers for a header in the middle of a re-encryption too:
 * then only a passphrase that unlocks every segment's volume key opens (checked with
 * cryptsetup 2.6.1: the new passphrase, which has keyslots for both keys, opens; the old
 * one, which only has the old volume key, does not).
 *
 * Rotation ids, names of files next to the image and their removal come from common.ts,
 * shared with the QEMU mechanisms; what is here is LUKS2-specific.
 */
import { errors } from '../../../shared/src/errors.js';
import { CRYPTSETUP_EXIT_KINDS, toolError, type RunTool } from '../../../shared/src/run-tool.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { LUKS2_PBKDF2_ITERATIONS } from '../images/image-store.js';
import { luksPassphrase } from '../images/passphrase.js';
import { checkImageSpec } from '../images/spec.js';
import type { ImageSpec } from '../images/types.js';
import { checkJobBasics, sameSecret } from './common.js';
import type { RotationJob, RotationProgress } from './types.js';

/** LUKS2 allows keyslots 0..31. */
export const LUKS2_MAX_KEYSLOTS = 32;
/** Anti-forensic stripes of a LUKS2 keyslot (cryptsetup's fixed value). */
const AF_STRIPES = 4000;
/** Keyslot areas are 4 KiB aligned. */
const AREA_ALIGN = 4096n;

/** One keyslot of the JSON metadata. */
export interface Luks2Keyslot {
  id: number;
  /** 'luks2' for a passphrase keyslot, 'reencrypt' for the re-encryption's own area. */
  type: string;
  areaOffset: bigint;
  areaSize: bigint;
}

/** What the rotation mechanisms use of `luksDump --dump-json-metadata`. */
export interface Luks2Header {
  keyslots: Luks2Keyslot[];
  /** Number of data segments (1 when no re-encryption is going on). */
  segments: number;
  /**
   * Passphrase keyslots bound to no segment (their digest has none): what a `cryptsetup
   * reencrypt` killed during its initialisation leaves (the new volume key's keyslot,
   * created before the re-encryption is recorded). `open --test-passphrase` fails with
   * exit 1 for a passphrase that matches one.
   */
  unboundKeyslots: number[];
  /**
   * The stored digest (salt and value) of the volume key of data segment 0: it changes
   * with the volume key only, so two headers with the same one describe the same data.
   */
  segmentKeyDigest: string | undefined;
  /** config.requirements.mandatory, e.g. ["online-reencrypt-v2"] during a re-encryption. */
  requirements: string[];
  /** config.json_size and config.keyslots_size, in bytes. */
  jsonSize: bigint;
  keyslotsSize: bigint;
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

function isObject(v: Json | undefined): v is { [key: string]: Json } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function bad(what: string): never {
  throw errors.internal(new Error(`cryptsetup luksDump: unexpected JSON (${what})`));
}

function count(v: Json | undefined, what: string): bigint {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === 'string' && /^\d{1,19}$/.test(v)) return BigInt(v);
  return bad(what);
}

/** Parses the LUKS2 JSON metadata (the parts the rotation needs). */
export function parseLuks2Header(text: string): Luks2Header {
  let root: Json;
  try {
    root = JSON.parse(text) as Json;
  } catch (cause) {
    throw errors.internal(new Error('cryptsetup luksDump: output is not JSON', { cause }));
  }
  if (!isObject(root) || !isObject(root['keyslots']) || !isObject(root['segments']) || !isObject(root['config'])) return bad('keyslots/segments/config');
  const keyslots: Luks2Keyslot[] = [];
  for (const [key, slot] of Object.entries(root['keyslots'])) {
    if (!/^\d{1,2}$/.test(key) || !isObject(slot) || !isObject(slot['area']) || typeof slot['type'] !== 'string') return bad('keyslot');
    keyslots.push({ id: Number(key), type: slot['type'], areaOffset: count(slot['area']['offset'], 'area offset'), areaSize: count(slot['area']['size'], 'area size') });
  }
  keyslots.sort((a, b) => a.id - b.id);
  const config = root['config'];
  const requirements: string[] = [];
  const req = config['requirements'];
  if (isObject(req) && Array.isArray(req['mandatory'])) {
    for (const r of req['mandatory']) if (typeof r === 'string') requirements.push(r);
  }
  const bound = new Set<number>();
  let segmentKeyDigest: string | undefined;
  if (isObject(root['digests'])) {
    for (const d of Object.values(root['digests'])) {
      if (isObject(d) && Array.isArray(d['segments']) && d['segments'].includes('0') && typeof d['salt'] === 'string' && typeof d['digest'] === 'string') {
        segmentKeyDigest = `${d['salt']}:${d['digest']}`;
      }
      if (!isObject(d) || !Array.isArray(d['segments']) || d['segments'].length === 0 || !Array.isArray(d['keyslots'])) continue;
      for (const k of d['keyslots']) if (typeof k === 'string') bound.add(Number(k));
    }
  }
  return {
    keyslots,
    segments: Object.keys(root['segments']).length,
    unboundKeyslots: keyslots.filter((k) => k.type === 'luks2' && !bound.has(k.id)).map((k) => k.id),
    segmentKeyDigest,
    requirements,
    jsonSize: count(config['json_size'], 'json_size'),
    keyslotsSize: count(config['keyslots_size'], 'keyslots_size'),
  };
}

/** True when the header is in the middle of a LUKS2 re-encryption (online or offline, any version). */
export function reencryptionInProgress(h: Luks2Header): boolean {
  return h.requirements.some((r) => r.startsWith('online-reencrypt')) || h.keyslots.some((k) => k.type === 'reencrypt');
}

/** Bytes of the keyslot area a passphrase keyslot for a key of keyBytes takes. */
export function keyslotAreaBytes(keyBytes: number): bigint {
  const raw = BigInt(keyBytes * AF_STRIPES);
  return ((raw + AREA_ALIGN - 1n) / AREA_ALIGN) * AREA_ALIGN;
}

/**
 * The largest free stretch of the keyslot area. Keyslot areas start right after the two
 * copies of the binary header and JSON area (2 x (4 KiB + json_size)) and take
 * keyslots_size bytes from there.
 */
export function largestFreeKeyslotArea(h: Luks2Header): bigint {
  const start = 2n * (4096n + h.jsonSize);
  const end = start + h.keyslotsSize;
  const used = [...h.keyslots].sort((a, b) => (a.areaOffset < b.areaOffset ? -1 : a.areaOffset > b.areaOffset ? 1 : 0));
  let best = 0n;
  let at = start;
  for (const k of used) {
    if (k.areaOffset > at && k.areaOffset - at > best) best = k.areaOffset - at;
    const kEnd = k.areaOffset + k.areaSize;
    if (kEnd > at) at = kEnd;
  }
  if (end > at && end - at > best) best = end - at;
  return best;
}

/** The lowest keyslot number not in use, or undefined when all 32 are taken. */
export function freeKeyslot(h: Luks2Header): number | undefined {
  const used = new Set(h.keyslots.map((k) => k.id));
  for (let i = 0; i < LUKS2_MAX_KEYSLOTS; i++) if (!used.has(i)) return i;
  return undefined;
}

/**
 * Checks what every LUKS2 mechanism needs of a job: the kind, luks2 before and after, a
 * valid target spec (canonical path, cipher, sizes), two distinct secrets of a valid length, and a rotation id that can be
 * part of a file name. Returns the target spec.
 */
export function checkLuks2Job(job: RotationJob, kind: RotationJob['kind'], mechanism: string): ImageSpec {
  if (job.kind !== kind) throw errors.invalid(`${mechanism} performs ${kind} rotations, not ${job.kind}`);
  const target = job.target;
  if (job.fromFormat !== 'luks2' || target.format !== 'luks2') throw errors.invalid(`${mechanism} handles luks2 images only`);
  checkImageSpec(target);
  checkJobBasics(job);
  if (!job.oldKey || !job.newKey) throw errors.invalid(`${mechanism} needs the old and the new key`);
  // luksPassphrase checks the lengths; the copies are wiped at once.
  wipe(luksPassphrase(job.oldKey), luksPassphrase(job.newKey));
  if (sameSecret(job.oldKey, job.newKey)) throw errors.invalid('the new key is the same as the old key');
  return target;
}

/** Options shared by the LUKS2 cryptsetup helpers. */
export interface Luks2CliOptions {
  run: RunTool;
  cryptsetup: string;
  /** Time limit of each metadata command. */
  timeoutMs: number;
  signal?: AbortSignal | undefined;
}

/** The cryptsetup commands the LUKS2 mechanisms run. */
export interface Luks2Cli {
  /** The header's metadata, or undefined when cryptsetup cannot read it (damaged, not LUKS2). */
  dump(path: string): Promise<Luks2Header | undefined>;
  /** True when the passphrase opens the image (in that keyslot only, when given). */
  opens(path: string, passphrase: Uint8Array, slot?: number): Promise<boolean>;
  /** The passphrase keyslots the passphrase opens. */
  slotsOpenedBy(path: string, header: Luks2Header, passphrase: Uint8Array): Promise<number[]>;
  /** Adds `added` in keyslot `slot`, unlocking with `existing`; same PBKDF2 settings as create. */
  addKey(path: string, existing: Uint8Array, added: Uint8Array, slot: number): Promise<void>;
  /** Removes keyslot `slot`; `remaining` must open another keyslot. */
  killSlot(path: string, slot: number, remaining: Uint8Array): Promise<void>;
  /** Writes a header backup to `backupPath` (which must not exist). */
  headerBackup(path: string, backupPath: string): Promise<void>;
  /** Writes the header from `backupPath` back onto the image. */
  headerRestore(path: string, backupPath: string): Promise<void>;
}

/** The PBKDF settings of every keyslot virtkm writes (the same as image-store's create). */
export const PBKDF_ARGS: readonly string[] = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', String(LUKS2_PBKDF2_ITERATIONS), '--hash', 'sha256'];

/** Creates the helpers over a tool runner. */
export function luks2Cli(o: Luks2CliOptions): Luks2Cli {
  const { run, cryptsetup, timeoutMs, signal } = o;
  const exec = (args: string[], stdin?: Uint8Array, fds?: Uint8Array[]) => {
    const opts: Parameters<RunTool>[2] = { timeoutMs };
    if (signal) opts.signal = signal;
    if (stdin) opts.stdin = stdin;
    if (fds) opts.fds = fds;
    return run(cryptsetup, args, opts);
  };

  async function dump(path: string): Promise<Luks2Header | undefined> {
    const r = await exec(['luksDump', '--dump-json-metadata', path]);
    if (r.code !== 0) return undefined;
    return parseLuks2Header(r.stdout);
  }

  async function opens(path: string, passphrase: Uint8Array, slot?: number): Promise<boolean> {
    const args = ['open', '--test-passphrase', '--type', 'luks2', '--key-file', '-'];
    if (slot !== undefined) args.push('--key-slot', String(slot));
    args.push(path);
    const r = await exec(args, passphrase);
    if (r.code === 0) return true;
    // Exit 2 is "no permission (bad passphrase)" (cryptsetup(8), RETURN CODES).
    if (r.code === 2) return false;
    throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function slotsOpenedBy(path: string, header: Luks2Header, passphrase: Uint8Array): Promise<number[]> {
    const out: number[] = [];
    for (const k of header.keyslots) {
      if (k.type !== 'luks2') continue;
      if (await opens(path, passphrase, k.id)) out.push(k.id);
    }
    return out;
  }

  async function addKey(path: string, existing: Uint8Array, added: Uint8Array, slot: number): Promise<void> {
    const args = ['luksAddKey', '--batch-mode', '--type', 'luks2', '--key-file', '-', '--new-keyfile', '/dev/fd/3', '--new-key-slot', String(slot), ...PBKDF_ARGS, path];
    const r = await exec(args, existing, [added]);
    if (r.code === 2) throw errors.precondition('the old key does not open the image');
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function killSlot(path: string, slot: number, remaining: Uint8Array): Promise<void> {
    const r = await exec(['luksKillSlot', '--batch-mode', '--type', 'luks2', '--key-file', '-', path, String(slot)], remaining);
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function headerBackup(path: string, backupPath: string): Promise<void> {
    const r = await exec(['luksHeaderBackup', '--batch-mode', '--header-backup-file', backupPath, path]);
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function headerRestore(path: string, backupPath: string): Promise<void> {
    const r = await exec(['luksHeaderRestore', '--batch-mode', '--header-backup-file', backupPath, path]);
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  return { dump, opens, slotsOpenedBy, addKey, killSlot, headerBackup, headerRestore };
}

/**
 * Removes unbound passphrase keyslots (see Luks2Header.unboundKeyslots) when no
 * re-encryption is in progress: they hold a volume key that no data uses, left by an
 * interrupted initialisation, and they make `--test-passphrase` fail. Returns the header
 * as it is afterwards.
 */
export async function dropUnboundKeyslots(cli: Luks2Cli, path: string, header: Luks2Header, anyPassphrase: Uint8Array): Promise<Luks2Header> {
  if (header.unboundKeyslots.length === 0 || reencryptionInProgress(header)) return header;
  // --batch-mode: luksKillSlot asks for no remaining passphrase (cryptsetup(8)).
  for (const id of header.unboundKeyslots) await cli.killSlot(path, id, anyPassphrase);
  const after = await cli.dump(path);
  if (!after) throw errors.internal(new Error('the header became unreadable'));
  return after;
}

/**
 * After a failed `cryptsetup reencrypt` (offline or online): when it never initialised the
 * re-encryption, removes the keyslot the run added (`added`, undefined when none) so that
 * nothing is changed. Leaves the header alone when a re-encryption is recorded in it or the
 * old passphrase no longer opens it. Throws what the tools throw: callers log it (best
 * effort, it runs after an abort too).
 */
export async function undoAddedKeyslot(cli: Luks2Cli, path: string, added: number | undefined, oldPass: Uint8Array): Promise<void> {
  if (added === undefined) return;
  const h = await cli.dump(path);
  if (!h || reencryptionInProgress(h)) return;
  if (!(await cli.opens(path, oldPass))) return;
  await cli.killSlot(path, added, oldPass);
}

/** Calls onProgress without letting a failing consumer stop the rotation. */
export function reporter(onProgress: ((p: RotationProgress) => void) | undefined): (p: RotationProgress) => void {
  return (p) => {
    try {
      onProgress?.(p);
    } catch {
      // progress is advisory
    }
  };
}

/**
 * Runs `fn` with the keyslot passphrases of a job's two keys (images/passphrase.ts), wiped
 * when it settles.
 */
export async function withPassphrases<T>(job: RotationJob, fn: (oldPass: Buffer, newPass: Buffer) => Promise<T>): Promise<T> {
  const oldPass = luksPassphrase(job.oldKey ?? new Uint8Array(0));
  const newPass = luksPassphrase(job.newKey ?? new Uint8Array(0));
  try {
    return await fn(oldPass, newPass);
  } finally {
    wipe(oldPass, newPass);
  }
}
