/**
 * Offline re-encryption of QEMU images (guest stopped) with `qemu-img convert`: the image is
 * copied, read with the old key, into a new image next to it that is encrypted with the new
 * key (a new LUKS header with a new data key, same format and cipher), the copy is flushed
 * and compared with the original (`qemu-img compare` reads all data of both), and then
 * renamed over the canonical path (atomic: same directory) and the directory flushed. The
 * same path encrypts an unencrypted image (raw or qcow2 -> luks or qcow2-luks, no old key)
 * and decrypts one (luks or qcow2-luks -> raw or qcow2, no new key).
 *
 * Crash safety: until the rename the canonical image is the untouched original; after it,
 * it is the verified copy. The copy lives under a hidden name derived from the rotation id
 * (common.ts rotationFilePath, purpose "copy"), so a later run finds it. A run asks the
 * canonical image what it is:
 *   opens with the new key (or is already of the unencrypted target kind) -> done: flush
 *     file and directory again (the kill may have come between rename and fsync), remove
 *     leftovers;
 *   opens with the old key (or is still of the unencrypted source kind) -> remove any
 *     leftover copy and start over (a copy of unknown completeness is never trusted);
 *   neither -> failed_precondition, nothing touched.
 *
 * Space: the copy needs about the image's allocated size plus a header (luks targets are
 * written in full: unwritten areas of a raw LUKS image do not read as zeros, so QEMU writes
 * encrypted zeros). That is checked with statfs before anything is written; too little is
 * resource_exhausted with nothing changed.
 *
 * Progress: qemu-img's `-p` output ("(12.50/100%)" lines ended by CR), read as it arrives
 * (runTool's onStdout), as bytes of the virtual size; copying and verifying are separate
 * steps.
 *
 * Not handled: images with a backing file (refused: a copy would flatten the chain) and
 * qcow2 internal snapshots (convert does not copy them; an image with snapshots is refused).
 */
import { chmod, chown, open, rename, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { QEMU_EXIT_KINDS, runTool, toolError, type RunTool } from '../../../shared/src/run-tool.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { fsCode, fsError, fsyncDir, fsyncFile } from '../images/files.js';
import { createHostImageStore, DEFAULT_ITER_TIMES_MS } from '../images/image-store.js';
import { luksPassphrase } from '../images/passphrase.js';
import { checkImagePath, checkImageSpec } from '../images/spec.js';
import { parseQemuImgInfo } from '../images/tool-json.js';
import type { ImageKind, ImageSpec, ImageStore } from '../images/types.js';
import { checkFreeSpace, checkJobBasics, freeBytes, progressReporter, removeFiles, rotationFilePath, rotationLeftovers, sameSecret, throwIfAborted, type ProgressReporter } from './common.js';
import { assertNotInUse, createKeyProbe, NEW_SECRET_ID, OLD_SECRET_ID, qemuFormatName, qemuNode, secretObject } from './qemu-tools.js';
import type { AnyImageFormat, RotationHooks, RotationJob, RotationMechanism, RotationResult } from './types.js';

/** Options of createQemuConvert, with their defaults. */
export interface QemuConvertOptions {
  /** Runs the tools (default runTool). */
  run?: RunTool;
  qemuImg?: string;
  qemuIo?: string;
  /** iter-time per attempt of creating the new LUKS header (default the image store's list). */
  iterTimesMs?: readonly number[];
  /** Time limit of the short tool runs (create, info, key checks; default 120 s). */
  toolTimeoutMs?: number;
  /** Time limit of the copy and of the comparison, each (default none: abort through the signal). */
  copyTimeoutMs?: number;
  /** The image store (inspect, create of the encrypted copy; default one built from the options above). */
  store?: ImageStore;
  logger?: Logger;
}

/** Purpose name of the copy's file (common.ts rotationFilePath). */
export const CONVERT_COPY_PURPOSE = 'copy';

/** Room for a LUKS header (QEMU's is about 2 MiB) and qcow2's first metadata clusters. */
const HEADER_ALLOWANCE = 4n << 20n;

type Encrypted = 'luks' | 'qcow2-luks';
type Plain = 'raw' | 'qcow2';
const ENCRYPTED: readonly AnyImageFormat[] = ['luks', 'qcow2-luks'];
const PLAIN: readonly AnyImageFormat[] = ['raw', 'qcow2'];
const KIND: Readonly<Record<Encrypted | Plain, ImageKind>> = { luks: 'luks1', 'qcow2-luks': 'qcow2-luks', raw: 'raw', qcow2: 'qcow2' };

/** A checked job. */
interface ConvertPlan {
  path: string;
  from: Encrypted | Plain;
  to: Encrypted | Plain;
  sizeBytes: bigint;
  /** Spec of the target when it is encrypted. */
  targetSpec?: ImageSpec;
  /** Spec for key checks of the source when it is encrypted. */
  sourceSpec?: ImageSpec;
  oldKey?: Uint8Array;
  newKey?: Uint8Array;
}

function isQemuFormat(f: AnyImageFormat): f is Encrypted | Plain {
  return ENCRYPTED.includes(f) || PLAIN.includes(f);
}

function isEncrypted(f: AnyImageFormat): f is Encrypted {
  return ENCRYPTED.includes(f);
}

function checkJob(job: RotationJob): ConvertPlan {
  checkJobBasics(job);
  if (job.kind !== 'reencrypt') throw errors.invalid('this mechanism only re-encrypts');
  const from = job.fromFormat;
  const to = job.target.format;
  if (!isQemuFormat(from) || !isQemuFormat(to)) throw errors.invalid('qemu-img convert handles luks, qcow2-luks, raw and qcow2 images');
  const fromEnc = isEncrypted(from);
  const toEnc = isEncrypted(to);
  if (!fromEnc && !toEnc) throw errors.invalid('neither the image nor the target is encrypted: nothing to rotate');
  if (fromEnc && toEnc && from !== to) throw errors.invalid('a re-encryption keeps the image format');
  if (fromEnc !== (job.oldKey !== undefined)) throw errors.invalid(fromEnc ? 'an encrypted image needs its old key' : 'an unencrypted image has no old key');
  if (toEnc !== (job.newKey !== undefined)) throw errors.invalid(toEnc ? 'an encrypted target needs the new key' : 'a decrypted target has no new key');
  if (job.oldKey && job.newKey && sameSecret(job.oldKey, job.newKey)) throw errors.invalid('the new key is the old key');
  const path = checkImagePath(job.target.path);
  const sizeBytes = job.target.sizeBytes;
  if (typeof sizeBytes !== 'bigint' || sizeBytes <= 0n || sizeBytes % 512n !== 0n || sizeBytes > 1n << 53n) {
    throw errors.invalid('image size must be a positive multiple of 512');
  }
  const plan: ConvertPlan = { path, from, to, sizeBytes };
  if (toEnc) plan.targetSpec = checkImageSpec(job.target as ImageSpec);
  if (fromEnc) {
    // Only path and format matter to a key check; the cipher is the server's default.
    plan.sourceSpec = plan.targetSpec ? { ...plan.targetSpec, format: from } : { path, format: from, sizeBytes, cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 };
  }
  if (job.oldKey) plan.oldKey = job.oldKey;
  if (job.newKey) plan.newKey = job.newKey;
  return plan;
}

/** Reads qemu-img's "-p" output: the last percentage in the stream, across chunk borders. */
function percentReader(onPercent: (pct: number) => void): (chunk: Buffer) => void {
  let tail = '';
  return (chunk) => {
    const text = tail + chunk.toString('latin1');
    let last: number | undefined;
    for (const m of text.matchAll(/\((\d{1,3}(?:\.\d+)?)\/100%\)/g)) last = Number(m[1]);
    tail = text.slice(-32);
    if (last !== undefined && Number.isFinite(last)) onPercent(Math.min(100, Math.max(0, last)));
  };
}

/** Creates the offline qemu-img convert re-encryption mechanism. */
export function createQemuConvert(options: QemuConvertOptions = {}): RotationMechanism {
  const run = options.run ?? runTool;
  const qemuImg = options.qemuImg ?? 'qemu-img';
  const qemuIo = options.qemuIo ?? 'qemu-io';
  const timeoutMs = options.toolTimeoutMs ?? 120_000;
  const copyTimeoutMs = options.copyTimeoutMs;
  const logger = options.logger ?? silentLogger;
  const store =
    options.store ?? createHostImageStore({ run, qemuImg, qemuIo, toolTimeoutMs: timeoutMs, logger, iterTimesMs: options.iterTimesMs ?? DEFAULT_ITER_TIMES_MS });
  const probe = createKeyProbe(run, qemuIo, qemuImg, timeoutMs);

  /** What the canonical image is now: the rotation's end state, its start state, or neither. */
  async function canonicalState(plan: ConvertPlan): Promise<'new' | 'old' | 'neither'> {
    const info = await store.inspect(plan.path);
    if (!info.exists) throw errors.notFound('image');
    if (info.kind === KIND[plan.to]) {
      if (!plan.targetSpec) return 'new';
      if (plan.newKey && (await probe(plan.targetSpec.format as Encrypted, plan.path, plan.newKey))) return 'new';
    }
    if (info.kind === KIND[plan.from]) {
      if (!plan.sourceSpec) return 'old';
      if (plan.oldKey && (await probe(plan.sourceSpec.format as Encrypted, plan.path, plan.oldKey))) return 'old';
    }
    if (info.kind !== KIND[plan.from] && info.kind !== KIND[plan.to]) {
      throw errors.precondition(`the image is ${info.kind}, not ${KIND[plan.from]}`);
    }
    return 'neither';
  }

  /** Secret objects and fds for a tool that opens the source (old key) and the copy (new key). */
  function secrets(oldPass: Buffer | undefined, newPass: Buffer | undefined): { args: string[]; fds: Buffer[] } {
    const args: string[] = [];
    const fds: Buffer[] = [];
    if (oldPass) {
      fds.push(oldPass);
      args.push('--object', secretObject(OLD_SECRET_ID, 2 + fds.length));
    }
    if (newPass) {
      fds.push(newPass);
      args.push('--object', secretObject(NEW_SECRET_ID, 2 + fds.length));
    }
    return { args, fds };
  }

  /** Facts about the source needed before copying: virtual size, allocated bytes, qcow2 cluster size. */
  async function sourceFacts(plan: ConvertPlan): Promise<{ allocated: bigint }> {
    const r = await run(qemuImg, ['info', '--output=json', qemuNode(plan.from, plan.path)], { timeoutMs });
    if (r.code !== 0) throw toolError('qemu-img', r, QEMU_EXIT_KINDS);
    const info = parseQemuImgInfo(r.stdout);
    if (info.backingFilename !== undefined) throw errors.precondition('the image has a backing file; a copy would flatten the chain', { hint: 'commit or rebase the image first' });
    const raw = JSON.parse(r.stdout) as { snapshots?: unknown[] };
    if (Array.isArray(raw.snapshots) && raw.snapshots.length > 0) throw errors.precondition('the image has internal snapshots, which a copy does not keep', { hint: 'delete them first' });
    if (info.virtualSizeBytes !== plan.sizeBytes) throw errors.invalid('the target size differs from the image size', { hint: 'a rotation does not resize' });
    const st = await stat(plan.path);
    return { allocated: BigInt(st.blocks) * 512n };
  }

  /** Bytes the copy will take (module comment). */
  function neededBytes(plan: ConvertPlan, allocated: bigint): bigint {
    const data = allocated < plan.sizeBytes ? allocated : plan.sizeBytes;
    switch (plan.to) {
      case 'luks':
        return plan.sizeBytes + HEADER_ALLOWANCE;
      case 'raw':
        return data;
      default:
        // qcow2: data clusters, plus L2 tables (8 bytes per 64 KiB cluster) and the header.
        return data + plan.sizeBytes / 8192n + HEADER_ALLOWANCE;
    }
  }

  /** Creates the empty copy at `copy` (owner-only), in the target format, with the new key. */
  async function createCopy(plan: ConvertPlan, copy: string): Promise<void> {
    if (plan.targetSpec && plan.newKey) {
      await store.create({ ...plan.targetSpec, path: copy }, plan.newKey);
      return;
    }
    const fh = await open(copy, 'wx', 0o600).catch((err: unknown) => {
      throw fsError(err, 'image copy');
    });
    try {
      if (plan.to === 'raw') await fh.truncate(Number(plan.sizeBytes));
    } finally {
      await fh.close();
    }
    if (plan.to === 'qcow2') {
      const r = await run(qemuImg, ['create', '-q', '-f', 'qcow2', copy, plan.sizeBytes.toString()], { timeoutMs });
      if (r.code !== 0) throw toolError('qemu-img', r, QEMU_EXIT_KINDS);
    }
  }

  /** Runs convert or compare with -p, reporting progress as bytes of the virtual size. */
  async function longRun(args: string[], fds: Buffer[], step: string, plan: ConvertPlan, progress: ProgressReporter, signal?: AbortSignal) {
    progress.report(step, 0n, plan.sizeBytes, true);
    const onStdout = percentReader((pct) => progress.report(step, (plan.sizeBytes * BigInt(Math.round(pct * 100))) / 10000n, plan.sizeBytes));
    const r = await run(qemuImg, args, {
      fds,
      onStdout,
      ...(copyTimeoutMs !== undefined ? { timeoutMs: copyTimeoutMs } : {}),
      ...(signal ? { signal } : {}),
    });
    if (r.code === 0) progress.report(step, plan.sizeBytes, plan.sizeBytes, true);
    return r;
  }

  /** The copy, from creating it to the rename over the canonical path. */
  async function copyAndSwap(job: RotationJob, plan: ConvertPlan, progress: ProgressReporter, hooks: RotationHooks | undefined): Promise<void> {
    const signal = hooks?.signal;
    const dir = dirname(plan.path);
    const copy = rotationFilePath(plan.path, job.rotationId, CONVERT_COPY_PURPOSE);
    progress.report('checking image', 0n, plan.sizeBytes, true);
    await assertNotInUse(run, qemuIo, plan.path, timeoutMs, signal);
    const { allocated } = await sourceFacts(plan);
    // A copy left by an earlier run is of unknown completeness: start over.
    await removeFiles(await rotationLeftovers(plan.path, job.rotationId));
    await checkFreeSpace(dir, neededBytes(plan, allocated));
    throwIfAborted(hooks);

    const oldPass = plan.oldKey ? luksPassphrase(plan.oldKey) : undefined;
    const newPass = plan.newKey ? luksPassphrase(plan.newKey) : undefined;
    let renamed = false;
    try {
      progress.report('creating copy', 0n, plan.sizeBytes, true);
      await createCopy(plan, copy);
      throwIfAborted(hooks);

      const src = qemuNode(plan.from, plan.path, oldPass ? OLD_SECRET_ID : undefined);
      const dst = qemuNode(plan.to, copy, newPass ? NEW_SECRET_ID : undefined);
      const s = secrets(oldPass, newPass);
      // -n: the copy exists (created above with the new key and owner-only mode).
      const c = await longRun(['convert', '-p', '-n', '-O', qemuFormatName(plan.to), ...s.args, src, dst], s.fds, 'copying', plan, progress, signal);
      if (c.code !== 0) {
        // ENOSPC despite the check (something else filled the disk) reads as exit 1 too.
        if ((await freeBytes(dir)) < 1n << 20n) throw new DomainError('resource_exhausted', 'the file system filled up during the copy', { cause: new Error(c.stderr.trim().slice(-500)) });
        throw toolError('qemu-img', c, QEMU_EXIT_KINDS);
      }
      progress.report('flushing', plan.sizeBytes, plan.sizeBytes, true);
      await fsyncFile(copy);

      // compare: 0 identical, 1 different, 2 error (qemu-img(1)).
      const v = await longRun(['compare', '-p', ...s.args, src, dst], s.fds, 'verifying', plan, progress, signal);
      if (v.code === 1) throw errors.internal(new Error('the copy differs from the image'));
      if (v.code !== 0) throw toolError('qemu-img', v, { 1: 'internal', 2: 'internal' });
      if (plan.oldKey && plan.targetSpec && (await probe(plan.targetSpec.format as Encrypted, copy, plan.oldKey, signal))) {
        throw errors.internal(new Error('the old key opens the copy'));
      }
      throwIfAborted(hooks);

      // The copy takes the original's place: same mode and owner (libvirt may have given
      // the file to its QEMU user), then an atomic rename and a flushed directory.
      progress.report('renaming', plan.sizeBytes, plan.sizeBytes, true);
      const st = await stat(plan.path);
      await chmod(copy, st.mode & 0o7777);
      const mine = await stat(copy);
      if (mine.uid !== st.uid || mine.gid !== st.gid) await chown(copy, st.uid, st.gid);
      await rename(copy, plan.path);
      renamed = true;
      await fsyncDir(dir);
    } catch (err) {
      if (!renamed) await removeFiles([copy]).catch((e: unknown) => logger.error('cannot remove the image copy', describeError(e)));
      if (err instanceof DomainError) throw err;
      throw fsCode(err) ? fsError(err, 'image copy') : errors.internal(err);
    } finally {
      wipe(oldPass, newPass);
    }
  }

  async function runJob(job: RotationJob, hooks?: RotationHooks): Promise<RotationResult> {
    const plan = checkJob(job);
    const progress = progressReporter(hooks);
    progress.report('checking keys', 0n, plan.sizeBytes, true);
    let state = await canonicalState(plan);
    if (state === 'neither') {
      throw errors.precondition('neither the old nor the new key opens the image', { hint: 'check that the old key is the one the image was last encrypted with' });
    }
    if (state === 'old') {
      await copyAndSwap(job, plan, progress, hooks);
      state = await canonicalState(plan);
      if (state !== 'new') throw errors.internal(new Error('the image does not open with the new key after the rename'));
    } else {
      // Done by an earlier run, which may have been killed between the rename and the
      // directory flush: flush again.
      await fsyncFile(plan.path);
      await fsyncDir(dirname(plan.path));
    }
    await removeFiles(await rotationLeftovers(plan.path, job.rotationId));
    progress.report('done', plan.sizeBytes, plan.sizeBytes, true);
    return { opensWith: 'new', verified: true, bytesRewritten: plan.sizeBytes };
  }

  return {
    name: 'qemu-convert',
    async run(job, hooks) {
      try {
        return await runJob(job, hooks);
      } catch (err) {
        if (!(err instanceof DomainError)) logger.error('qemu convert failed', describeError(err));
        throw err instanceof DomainError ? err : errors.internal(err);
      }
    },
  };
}

/** For tests and the driver: where the convert writes its copy for a job. */
export function convertCopyPath(job: Pick<RotationJob, 'rotationId' | 'target'>): string {
  return rotationFilePath(job.target.path, job.rotationId, CONVERT_COPY_PURPOSE);
}
