/**
 * The real ImageStore: qemu-img and qemu-io for QEMU's formats (luks = raw LUKS1 image,
 * qcow2-luks = qcow2 with an embedded LUKS header), cryptsetup for luks2, plain files for
 * plain dm-crypt, and qemu-img for the unencrypted raw and qcow2 volumes (no key: they
 * are created and checked without one). Secrets reach the tools only on stdin or fd 3 (see passphrase.ts for the
 * bytes they get); every tool runs through runTool.
 *
 * Key stretching is light on purpose: a volume secret is 256 random bits, not a password,
 * so PBKDF2 iterations add no protection against guessing (2^256 candidates either way) and
 * only cost time at every unlock; with hundreds of volumes per host that adds up. LUKS2
 * keyslots use PBKDF2 with 1000 iterations (cryptsetup's minimum). QEMU only takes a time
 * budget (iter-time, 100 ms here, so an unlock costs about 0.1 s of CPU).
 *
 * qemu-img create of a LUKS header sometimes fails with "Unable to get accurate CPU usage":
 * QEMU calibrates PBKDF2 (qcrypto_pbkdf2_count_iters) by timing a first round of 2^15
 * iterations with the thread's CPU clock, and on a kernel with tick-based CPU accounting
 * that round can measure 0 ms. The calibration does not depend on iter-time, and on this
 * kind of machine 10-50% of creates failed at any iter-time (1, 10, 100, 1000 ms), so the
 * cure is another attempt: up to 10 (all failing: about 1e-5 at 30%), with a mildly growing
 * iter-time (harmless, as the notes suggested).
 * The same calibration makes every create cost about 2 s of CPU (two rounds of >= 0.5 s
 * each for the keyslot and the master-key digest), whatever iter-time says.
 */
import { chmod, lstat, open, stat, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { CRYPTSETUP_EXIT_KINDS, QEMU_EXIT_KINDS, runTool, toolError, type RunTool, type ToolResult } from '../../../shared/src/run-tool.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { fsCode, fsError, fsyncDir, fsyncFile, pathExists, publishNoReplace, readAt, temporaryPathFor, unlinkQuietly } from './files.js';
import {
  HEADER_PROBE_BYTES,
  LUKS2_SECONDARY_OFFSETS,
  QCOW2_CRYPT_AES,
  QCOW2_CRYPT_LUKS,
  QCOW2_CRYPT_NONE,
  isLuks2SecondaryHeader,
  parseImageHeader,
  parseLuksUuid,
  type HeaderFacts,
} from './header.js';
import { checkPlainKey, luksPassphrase } from './passphrase.js';
import { checkImagePath, checkImageSpec, qemuCipherOptions } from './spec.js';
import { parseLuks2Metadata, parseQemuImgInfo } from './tool-json.js';
import { isUnencryptedImageFormat, KIND_OF_FORMAT, type ImageInfo, type ImageSpec, type ImageStore } from './types.js';

/** Options of createHostImageStore, with their defaults. */
export interface HostImageStoreOptions {
  /** Runs the tools (default runTool); tests inject fakes. */
  run?: RunTool;
  /** Tool paths (default: looked up in runTool's fixed PATH). */
  qemuImg?: string;
  qemuIo?: string;
  cryptsetup?: string;
  /** QEMU iter-time values, one per attempt, tried in order while qemu-img create fails (default DEFAULT_ITER_TIMES_MS). */
  iterTimesMs?: readonly number[];
  /** Time limit of each tool run (default 120 s). */
  toolTimeoutMs?: number;
  logger?: Logger;
}

/** LUKS2 data offset used by create: 16 MiB (cryptsetup's default), in 512-byte sectors. */
export const LUKS2_DATA_OFFSET_SECTORS = 32768;
/** The same in bytes: a luks2 image file is this much larger than the volume. */
export const LUKS2_DATA_OFFSET_BYTES = BigInt(LUKS2_DATA_OFFSET_SECTORS) * 512n;
/** PBKDF2 iterations of LUKS2 keyslots (the minimum cryptsetup accepts; see module comment). */
export const LUKS2_PBKDF2_ITERATIONS = 1000;
/** iter-time of QEMU keyslots per attempt of qemu-img create, in ms (see module comment). */
export const DEFAULT_ITER_TIMES_MS: readonly number[] = [100, 100, 150, 150, 200, 200, 300, 300, 300, 300];

/** LUKS1's binary header (phdr) is 592 bytes; less of it is a damaged image. */
const LUKS1_PHDR_BYTES = 592;
/** QEMU secret object id used on every command line; its data comes from fd 3. */
const SECRET_ID = 'sec0';
const SECRET_OBJECT = `secret,id=${SECRET_ID},format=raw,file=/dev/fd/3`;

type QemuFormat = 'luks' | 'qcow2-luks';

/**
 * A QEMU block node description for `json:` filenames. JSON escaping handles any path
 * (commas, colons, quotes) without QEMU's option-string quoting rules. backing is null so
 * that inspecting a qcow2 never opens the backing file its header names.
 */
function qemuNode(format: QemuFormat, path: string, withKey: boolean): string {
  const file = { driver: 'file', filename: path };
  const node =
    format === 'luks'
      ? { driver: 'luks', ...(withKey ? { 'key-secret': SECRET_ID } : {}), file }
      : { driver: 'qcow2', ...(withKey ? { encrypt: { format: 'luks', 'key-secret': SECRET_ID } } : {}), file, backing: null };
  return `json:${JSON.stringify(node)}`;
}

/** Creates the real image store. */
export function createHostImageStore(options: HostImageStoreOptions = {}): ImageStore {
  const run = options.run ?? runTool;
  const qemuImg = options.qemuImg ?? 'qemu-img';
  const qemuIo = options.qemuIo ?? 'qemu-io';
  const cryptsetup = options.cryptsetup ?? 'cryptsetup';
  const iterTimes = options.iterTimesMs ?? DEFAULT_ITER_TIMES_MS;
  const timeoutMs = options.toolTimeoutMs ?? 120_000;
  const logger = options.logger ?? silentLogger;
  if (iterTimes.length === 0 || iterTimes.some((t) => !Number.isInteger(t) || t <= 0)) throw errors.invalid('iter-time values must be positive integers');

  /** qemu-img create of a luks or qcow2-luks image at `target` (an existing empty temporary file). */
  async function qemuCreate(spec: ImageSpec, target: string, passphrase: Uint8Array): Promise<void> {
    const c = qemuCipherOptions(spec.cipher, spec.keySizeBits);
    const prefix = spec.format === 'qcow2-luks' ? 'encrypt.' : '';
    const optionsFor = (iterTime: number): string => {
      const o = [`${prefix}key-secret=${SECRET_ID}`, `${prefix}cipher-alg=${c.cipherAlg}`, `${prefix}cipher-mode=${c.cipherMode}`, `${prefix}ivgen-alg=${c.ivgenAlg}`, `${prefix}hash-alg=sha256`, `${prefix}iter-time=${iterTime}`];
      return (spec.format === 'qcow2-luks' ? ['encrypt.format=luks', ...o] : o).join(',');
    };
    const format = spec.format === 'qcow2-luks' ? 'qcow2' : 'luks';
    let last: ToolResult | undefined;
    for (const iterTime of iterTimes) {
      // A failed LUKS create deletes its file (QEMU cleans up after itself): bring the
      // owner-only temporary file back before the next attempt, so qemu-img never creates it
      // with the default mode.
      await (await open(target, 'a', 0o600)).close();
      const args = ['create', '-q', '-f', format, '--object', SECRET_OBJECT, '-o', optionsFor(iterTime), target, spec.sizeBytes.toString()];
      const r = await run(qemuImg, args, { fds: [passphrase], timeoutMs });
      if (r.code === 0) return;
      last = r;
      // Exit 1 is all qemu-img says; with the spec validated, its most likely cause is the
      // PBKDF2 calibration (module comment). Another attempt is cheap; the text is logged
      // for people, never used to decide.
      logger.warn('qemu-img create failed; retrying with a longer iter-time', { iter_time_ms: iterTime, stderr: r.stderr.trim().slice(0, 300) });
    }
    // Every attempt failed in QEMU's PBKDF2 calibration (its thread CPU clock showed no
    // progress, seen on a loaded VM): a passing condition, so callers retry later instead
    // of treating it as a broken image or spec.
    if (last?.stderr.includes('Unable to get accurate CPU usage')) {
      throw new DomainError('unavailable', 'qemu-img could not calibrate the LUKS key derivation (no CPU time measured); try again', { hint: 'a passing condition of a loaded machine' });
    }
    throw toolError('qemu-img', last ?? { code: -1, stdout: '', stderr: '', truncated: false }, QEMU_EXIT_KINDS);
  }

  /** cryptsetup luksFormat of a LUKS2 header into `target` (already the right size). */
  async function luks2Format(spec: ImageSpec, target: string, passphrase: Uint8Array): Promise<void> {
    const args = [
      'luksFormat',
      '--type', 'luks2',
      '--batch-mode',
      '--key-file', '-',
      '--cipher', spec.cipher,
      '--key-size', String(spec.keySizeBits),
      '--sector-size', String(spec.sectorSize),
      '--hash', 'sha256',
      '--pbkdf', 'pbkdf2',
      '--pbkdf-force-iterations', String(LUKS2_PBKDF2_ITERATIONS),
      '--offset', String(LUKS2_DATA_OFFSET_SECTORS),
      target,
    ];
    const r = await run(cryptsetup, args, { stdin: passphrase, timeoutMs });
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function create(spec: ImageSpec, secret: Uint8Array): Promise<void> {
    checkImageSpec(spec);
    if (spec.format === 'plain') checkPlainKey(secret, spec.keySizeBits);
    const unencrypted = isUnencryptedImageFormat(spec.format);
    const passphrase = spec.format === 'plain' || unencrypted ? undefined : luksPassphrase(secret);
    try {
      if (await pathExists(spec.path)) throw errors.alreadyExists('image', { hint: 'virtkm never overwrites an image; delete it first if it is not needed' });
      const temporary = temporaryPathFor(spec.path);
      // Exclusive create, owner-only: the temporary name is ours alone.
      let fh;
      try {
        fh = await open(temporary, 'wx', 0o600);
      } catch (err) {
        throw fsError(err, fsCode(err) === 'ENOENT' ? 'image directory' : 'image');
      }
      try {
        try {
          if (spec.format === 'luks2') await fh.truncate(Number(spec.sizeBytes + LUKS2_DATA_OFFSET_BYTES));
          // plain dm-crypt has no header: the volume is the whole file, left sparse.
          if (spec.format === 'plain') await fh.truncate(Number(spec.sizeBytes));
        } finally {
          await fh.close();
        }
        if (spec.format === 'luks' || spec.format === 'qcow2-luks') await qemuCreate(spec, temporary, passphrase ?? new Uint8Array(0));
        if (spec.format === 'luks2') await luks2Format(spec, temporary, passphrase ?? new Uint8Array(0));
        if (unencrypted) {
          // Into the owner-only temporary file; qemu-img keeps an existing file's mode.
          const r = await run(qemuImg, ['create', '-q', '-f', spec.format, temporary, spec.sizeBytes.toString()], { timeoutMs });
          if (r.code !== 0) throw toolError('qemu-img', r, QEMU_EXIT_KINDS);
        }
        // Whatever the tools did to the file: owner-only (libvirt gives QEMU access itself).
        await chmod(temporary, 0o600);
        await fsyncFile(temporary);
        await publishNoReplace(temporary, spec.path);
      } catch (err) {
        await unlinkQuietly(temporary).catch((e: unknown) => logger.error('cannot remove a temporary image', describeError(e)));
        throw err;
      }
    } finally {
      wipe(passphrase);
    }
  }

  /** Reports a qcow2 image: kind from the header's crypt_method and from qemu-img's JSON. */
  async function inspectQcow2(path: string, facts: Extract<HeaderFacts, { type: 'qcow2' }>): Promise<ImageInfo> {
    if (facts.cryptMethod === QCOW2_CRYPT_AES) {
      throw errors.precondition('the image uses legacy qcow2 AES encryption, which virtkm does not support');
    }
    if (facts.cryptMethod !== undefined && facts.cryptMethod !== QCOW2_CRYPT_NONE && facts.cryptMethod !== QCOW2_CRYPT_LUKS) {
      throw errors.precondition('the image uses an unknown qcow2 encryption method');
    }
    const headerEncrypted = facts.cryptMethod === QCOW2_CRYPT_LUKS;
    const r = await run(qemuImg, ['info', '-U', '--output=json', qemuNode('qcow2-luks', path, false)], { timeoutMs });
    if (r.code !== 0) {
      // Unreadable for QEMU (truncated, corrupt): the header alone decides the kind.
      const info: ImageInfo = { exists: true, kind: headerEncrypted ? 'qcow2-luks' : 'qcow2', damaged: true };
      if (facts.virtualSizeBytes !== undefined) info.virtualSizeBytes = facts.virtualSizeBytes;
      return info;
    }
    const q = parseQemuImgInfo(r.stdout);
    if (q.encryptFormat !== undefined && q.encryptFormat !== 'luks') {
      throw errors.precondition('the image uses a qcow2 encryption format virtkm does not support');
    }
    const jsonEncrypted = q.encryptFormat === 'luks';
    // Either source saying "encrypted" wins (fail closed); disagreement means damage.
    const info: ImageInfo = { exists: true, kind: headerEncrypted || jsonEncrypted ? 'qcow2-luks' : 'qcow2', virtualSizeBytes: q.virtualSizeBytes };
    if (q.uuid) info.uuid = q.uuid;
    if (headerEncrypted !== jsonEncrypted) info.damaged = true;
    return info;
  }

  /** Reports a LUKS2 image: sizes from the JSON metadata, UUID from the binary header. */
  async function inspectLuks2(path: string, uuid: string | undefined, fileSize: bigint | undefined): Promise<ImageInfo> {
    const info: ImageInfo = { exists: true, kind: 'luks2' };
    if (uuid) info.uuid = uuid;
    const r = await run(cryptsetup, ['luksDump', '--dump-json-metadata', path], { timeoutMs });
    if (r.code !== 0) {
      // cryptsetup cannot read the metadata (truncated or corrupt header): still LUKS2.
      info.damaged = true;
      return info;
    }
    const meta = parseLuks2Metadata(r.stdout);
    const segment = meta.segments[0];
    if (!uuid || !segment) info.damaged = true;
    if (segment) {
      if (segment.sizeBytes !== 'dynamic') info.virtualSizeBytes = segment.sizeBytes;
      else if (fileSize !== undefined && fileSize >= segment.offsetBytes) info.virtualSizeBytes = fileSize - segment.offsetBytes;
      else if (fileSize !== undefined) info.damaged = true;
    }
    return info;
  }

  /** Looks for a LUKS2 secondary header (a wiped primary header leaves it in place). */
  async function findLuks2Secondary(path: string, fileSize: bigint | undefined): Promise<ImageInfo | undefined> {
    for (const offset of LUKS2_SECONDARY_OFFSETS) {
      if (fileSize !== undefined && BigInt(offset) + 512n > fileSize) break;
      const bytes = await readAt(path, offset, 512);
      if (isLuks2SecondaryHeader(bytes)) {
        const info: ImageInfo = { exists: true, kind: 'luks2', damaged: true };
        const uuid = parseLuksUuid(bytes);
        if (uuid) info.uuid = uuid;
        return info;
      }
    }
    return undefined;
  }

  async function inspect(path: string): Promise<ImageInfo> {
    checkImagePath(path);
    let st;
    try {
      st = await stat(path);
    } catch (err) {
      if (fsCode(err) !== 'ENOENT') throw fsError(err, 'image');
      // ENOENT from stat but something at the path: a symbolic link to nowhere.
      if (await pathExists(path)) throw errors.precondition('the image path is a symbolic link to nothing');
      return { exists: false, kind: 'missing' };
    }
    if (!st.isFile() && !st.isBlockDevice()) throw errors.precondition('the image path is neither a file nor a block device');
    // Block devices report size 0 here: sizes that depend on the file size are left out.
    const fileSize = st.isFile() ? BigInt(st.size) : undefined;
    let head;
    try {
      head = await readAt(path, 0, HEADER_PROBE_BYTES);
    } catch (err) {
      throw fsError(err, 'image');
    }
    const facts = parseImageHeader(head);

    if (facts.type === 'luks' && facts.version === 2) return inspectLuks2(path, facts.uuid, fileSize);
    if (facts.type === 'luks') {
      const info: ImageInfo = { exists: true, kind: 'luks1' };
      if (facts.uuid) info.uuid = facts.uuid;
      const offset = facts.payloadOffsetBytes;
      if (offset !== undefined && fileSize !== undefined && offset > 0n && offset <= fileSize) info.virtualSizeBytes = fileSize - offset;
      const truncated = fileSize !== undefined && (offset === undefined || offset === 0n || offset > fileSize);
      if (head.length < LUKS1_PHDR_BYTES || !facts.uuid || truncated) info.damaged = true;
      return info;
    }
    if (facts.type === 'qcow2') return inspectQcow2(path, facts);

    const secondary = await findLuks2Secondary(path, fileSize);
    if (secondary) return secondary;
    const info: ImageInfo = { exists: true, kind: 'raw' };
    if (fileSize !== undefined) info.virtualSizeBytes = fileSize;
    return info;
  }

  /** A tool killed by a signal (OOM killer, an operator) gave no answer: unavailable, worth asking again. */
  function noAnswer(tool: string, r: ToolResult): DomainError | undefined {
    return r.code > 128 ? new DomainError('unavailable', `${tool} was killed by a signal`, { hint: 'try again', cause: toolError(tool, r) }) : undefined;
  }

  async function testKey(path: string, spec: ImageSpec, secret: Uint8Array): Promise<boolean> {
    checkImagePath(path);
    checkImageSpec({ ...spec, path });
    if (spec.format === 'plain') {
      throw errors.precondition('a plain dm-crypt volume has no header to check a key against', { hint: 'a wrong key only shows as unreadable data once opened' });
    }
    const expected = KIND_OF_FORMAT[spec.format];
    const info = await inspect(path);
    if (!info.exists) throw errors.notFound('image');
    if (info.kind !== expected) throw errors.precondition(`the image is ${info.kind}, not ${expected}`);
    if (info.damaged) throw errors.precondition('the image header is damaged');
    // No key to check: an unencrypted image of the right kind that QEMU reads is "open".
    if (isUnencryptedImageFormat(spec.format)) return true;
    const passphrase = luksPassphrase(secret);
    try {
      if (spec.format === 'luks2') {
        const r = await run(cryptsetup, ['open', '--test-passphrase', '--type', 'luks2', '--key-file', '-', path], { stdin: passphrase, timeoutMs });
        if (r.code === 0) return true;
        // Exit 2 is documented as "no permission (bad passphrase)".
        if (r.code === 2) return false;
        throw noAnswer('cryptsetup', r) ?? toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
      }
      // Opening (read-only, sharing any lock a running guest holds) unlocks a keyslot;
      // qemu-img info would not: it opens without I/O and never checks the key.
      const r = await run(qemuIo, ['-r', '-U', '--object', SECRET_OBJECT, qemuNode(spec.format, path, true), '-c', 'quit'], { fds: [passphrase], timeoutMs });
      if (r.code === 0) return true;
      // Only qemu-io's error exit can mean "wrong key": killed by a signal is no answer.
      if (r.code !== 1) throw noAnswer('qemu-io', r) ?? toolError('qemu-io', r, QEMU_EXIT_KINDS);
      // -U shares only what we share: a process that does not share consistent reads (a
      // qemu-img amend changing keyslots, a convert target) also makes the open fail. A
      // keyless read-only open of the plain file without -U fails exactly then (a running
      // guest shares reads): the image is busy, which is not "wrong key".
      const reader = await run(qemuIo, ['-r', '-c', 'quit', `json:${JSON.stringify({ driver: 'raw', file: { driver: 'file', filename: path } })}`], { timeoutMs });
      if (reader.code === 1) throw new DomainError('unavailable', 'another process is changing the image', { hint: 'a key change or copy may still be running; try again' });
      if (reader.code !== 0) throw noAnswer('qemu-io', reader) ?? toolError('qemu-io', reader, QEMU_EXIT_KINDS);
      // qemu-io says only "exit 1". Tell a wrong key from other failures without reading
      // its message: the same image without a key (header and keyslot table only) must
      // open. If it does, the one difference, the key, is what failed.
      const probe = await run(qemuImg, ['info', '-U', '--output=json', qemuNode(spec.format, path, false)], { timeoutMs });
      if (probe.code === 0) return false;
      throw toolError('qemu-io', r, QEMU_EXIT_KINDS);
    } finally {
      wipe(passphrase);
    }
  }

  async function remove(path: string): Promise<void> {
    checkImagePath(path);
    let st;
    try {
      st = await lstat(path);
    } catch (err) {
      if (fsCode(err) === 'ENOENT') return;
      throw fsError(err, 'image');
    }
    if (!st.isFile() && !st.isSymbolicLink()) throw errors.precondition('only image files are removed, not devices or directories');
    try {
      await unlink(path);
      await fsyncDir(dirname(path));
    } catch (err) {
      if (fsCode(err) === 'ENOENT') return;
      throw fsError(err, 'image');
    }
  }

  return { create, inspect, testKey, remove };
}
