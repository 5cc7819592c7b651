/**
 * Rekey of QEMU's LUKS formats (luks = raw LUKS1 image, qcow2-luks = qcow2 with an embedded
 * LUKS1 header) with `qemu-img amend`: a keyslot for the new passphrase is added, the new
 * key is checked, then every keyslot of the old passphrase is removed. Metadata only: the
 * data key (and so every data block) stays as it is.
 *
 * Crash safety. QEMU orders its writes so that each amend step keeps one key working: an
 * added keyslot's key material is written before the header marks the slot active, and an
 * erase marks the slot inactive before it overwrites the material. So a kill -9 of the
 * agent or of qemu-img leaves the image opening with the old key, or with both, or (after
 * the erase) with the new one. The run after a crash asks the image which keys open it and
 * goes on from there:
 *   old only -> take a header backup, add the new keyslot;
 *   both     -> remove the old keyslot (the backup is kept until the end);
 *   new only -> done: remove the backup;
 *   neither  -> only possible after damage (a torn header write on power loss, a bug):
 *               restore the header backup, then go on as above; without a backup refuse.
 *
 * The header backup: the bytes `qemu-img amend` may change, saved to a hidden file next to
 * the image named after the rotation id (common.ts rotationFilePath, purpose "hdr"),
 * written durably (temporary name, fsync, rename, directory fsync) and checksummed.
 * - luks: bytes 0 .. payload offset (the LUKS1 header and the eight keyslot areas; the
 *   payload offset is in the header, about 2 MiB with QEMU's defaults).
 * - qcow2-luks: the first cluster (the qcow2 header with its extensions, among them the
 *   "full disk encryption header pointer" 0x0537be77) and the LUKS header clusters it
 *   points to (offset and length from that extension). amend changes only the latter
 *   (checked with cmp on qemu-img 7.2: cluster 0 stays the same); the LUKS header clusters
 *   are allocated once when the image is created and never move, and a rekey allocates no
 *   other clusters, so writing these ranges back is a faithful restore as long as nothing
 *   wrote to the image in between, which holds: a restore happens only when no key opens
 *   the image, so nothing could have used it.
 * The backup holds the old keyslot; it is overwritten with zeros before it is deleted.
 *
 * Guest running: amend needs the image for writing and a running guest holds it, so a
 * rekey of a running guest's image is refused (failed_precondition) before anything changes.
 *
 * The PBKDF2 calibration failure of QEMU ("Unable to get accurate CPU usage", see
 * images/image-store.ts) hits adding a keyslot as it hits create: a failed add is retried
 * with the next iter-time of the list (the image still opens with the old key only).
 */
import { open } from 'node:fs/promises';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger, type Logger } from '../../../shared/src/log.js';
import { QEMU_EXIT_KINDS, runTool, toolError, type RunTool, type ToolResult } from '../../../shared/src/run-tool.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { fsError } from '../images/files.js';
import { QCOW2_CRYPT_LUKS, parseLuksUuid } from '../images/header.js';
import { createHostImageStore, DEFAULT_ITER_TIMES_MS } from '../images/image-store.js';
import { luksPassphrase } from '../images/passphrase.js';
import { checkImageSpec } from '../images/spec.js';
import { KIND_OF_FORMAT, type ImageSpec, type ImageStore } from '../images/types.js';
import {
  checkJobBasics,
  progressReporter,
  readHeaderBackup,
  removeFiles,
  restoreHeaderBackup,
  rotationFilePath,
  rotationLeftovers,
  sameSecret,
  saveHeaderBackup,
  throwIfAborted,
  type ByteRange,
  type HeaderBackupInfo,
} from './common.js';
import { assertNotInUse, createKeyProbe, keyState, NEW_SECRET_ID, OLD_SECRET_ID, qemuNode, secretObject, type KeyState } from './qemu-tools.js';
import type { RotationHooks, RotationJob, RotationMechanism, RotationResult } from './types.js';

/** Options of createQemuRekey, with their defaults. */
export interface QemuRekeyOptions {
  /** Runs the tools (default runTool). */
  run?: RunTool;
  qemuImg?: string;
  qemuIo?: string;
  /** iter-time of the new keyslot per attempt, in ms (default the image store's list). */
  iterTimesMs?: readonly number[];
  /** Time limit of each tool run (default 120 s). */
  toolTimeoutMs?: number;
  /** The image store used to inspect the image (default one built from the options above). */
  store?: ImageStore;
  logger?: Logger;
}

/** Purpose name of the header backup file (common.ts rotationFilePath). */
export const REKEY_BACKUP_PURPOSE = 'hdr';

/** qcow2 header extension "full disk encryption header pointer". */
const QCOW2_EXT_CRYPTO = 0x0537be77;
/** Bounds used to reject nonsense in a header before it becomes a backup range. */
const MAX_LUKS_HEADER_BYTES = 16 << 20;
/** A rekey goes through old -> both -> new; restores and retries add a few more rounds. */
const MAX_ROUNDS = 24;

type QemuLuksFormat = 'luks' | 'qcow2-luks';

/** The ranges a header backup of `path` covers, and the LUKS UUID (see the module comment). */
async function headerLayout(path: string, format: QemuLuksFormat): Promise<HeaderBackupInfo> {
  const fh = await open(path, 'r').catch((err: unknown) => {
    throw fsError(err, 'image');
  });
  try {
    const size = (await fh.stat()).size;
    const read = async (offset: number, length: number): Promise<Buffer> => {
      const b = Buffer.alloc(length);
      const { bytesRead } = await fh.read(b, 0, length, offset);
      return b.subarray(0, bytesRead);
    };
    const damaged = (): DomainError => errors.precondition('the image header is damaged; no header backup can be taken');
    if (format === 'luks') {
      const head = await read(0, 4096);
      if (head.length < 592 || head.readUInt16BE(6) !== 1) throw damaged();
      const payload = head.readUInt32BE(104) * 512;
      if (payload < 4096 || payload > MAX_LUKS_HEADER_BYTES || payload > size) throw damaged();
      const info: HeaderBackupInfo = { layout: 'luks1', ranges: [{ offset: 0, length: payload }], imageSize: size };
      const uuid = parseLuksUuid(head);
      if (uuid) info.identity = uuid;
      return info;
    }
    const head = await read(0, 4096);
    if (head.length < 104 || head.readUInt32BE(0) !== 0x514649fb) throw damaged();
    const version = head.readUInt32BE(4);
    const clusterBits = head.readUInt32BE(20);
    if (clusterBits < 9 || clusterBits > 21 || head.readUInt32BE(32) !== QCOW2_CRYPT_LUKS) throw damaged();
    const clusterSize = 2 ** clusterBits;
    const cluster0 = await read(0, clusterSize);
    let at = version >= 3 ? cluster0.readUInt32BE(100) : 72;
    let crypto: ByteRange | undefined;
    // Header extensions: u32 type, u32 length, data padded to 8 bytes; type 0 ends them.
    while (at + 8 <= cluster0.length) {
      const type = cluster0.readUInt32BE(at);
      const len = cluster0.readUInt32BE(at + 4);
      if (type === 0) break;
      if (type === QCOW2_EXT_CRYPTO && len >= 16 && at + 24 <= cluster0.length) {
        const offset = Number(cluster0.readBigUInt64BE(at + 8));
        const length = Number(cluster0.readBigUInt64BE(at + 16));
        crypto = { offset, length };
      }
      at += 8 + Math.ceil(len / 8) * 8;
    }
    if (!crypto || crypto.offset < clusterSize || crypto.length <= 0 || crypto.length > MAX_LUKS_HEADER_BYTES || crypto.offset + crypto.length > size) throw damaged();
    const info: HeaderBackupInfo = { layout: 'qcow2-luks', ranges: [{ offset: 0, length: clusterSize }, crypto], imageSize: size };
    const uuid = parseLuksUuid(await read(crypto.offset, 512));
    if (uuid) info.identity = uuid;
    return info;
  } finally {
    await fh.close();
  }
}

/** What the header says about identity now, if it can still be read (for the restore check). */
async function currentIdentity(path: string, format: QemuLuksFormat): Promise<string | undefined> {
  try {
    return (await headerLayout(path, format)).identity;
  } catch {
    return undefined;
  }
}

/** Creates the qemu-img amend rekey mechanism. */
export function createQemuRekey(options: QemuRekeyOptions = {}): RotationMechanism {
  const run = options.run ?? runTool;
  const qemuImg = options.qemuImg ?? 'qemu-img';
  const qemuIo = options.qemuIo ?? 'qemu-io';
  const iterTimes = options.iterTimesMs ?? DEFAULT_ITER_TIMES_MS;
  const timeoutMs = options.toolTimeoutMs ?? 120_000;
  const logger = options.logger ?? silentLogger;
  const store = options.store ?? createHostImageStore({ run, qemuImg, qemuIo, toolTimeoutMs: timeoutMs, logger });
  const probe = createKeyProbe(run, qemuIo, qemuImg, timeoutMs);
  if (iterTimes.length === 0 || iterTimes.some((t) => !Number.isInteger(t) || t <= 0)) throw errors.invalid('iter-time values must be positive integers');

  function checkJob(job: RotationJob): { spec: ImageSpec; format: QemuLuksFormat; oldKey: Uint8Array; newKey: Uint8Array } {
    checkJobBasics(job);
    if (job.kind !== 'rekey') throw errors.invalid('this mechanism only rekeys');
    const format = job.target.format;
    if (format !== 'luks' && format !== 'qcow2-luks') throw errors.invalid(`qemu-img amend rekeys luks and qcow2-luks images, not ${format}`);
    if (job.fromFormat !== format) throw errors.invalid('a rekey does not change the image format');
    const spec = checkImageSpec(job.target as ImageSpec);
    if (!job.oldKey || !job.newKey) throw errors.invalid('a rekey needs the old and the new key');
    if (sameSecret(job.oldKey, job.newKey)) throw errors.invalid('the new key is the old key');
    return { spec, format, oldKey: job.oldKey, newKey: job.newKey };
  }

  /** One qemu-img amend with the old passphrase on fd 3 and the new one on fd 4. */
  async function amend(format: QemuLuksFormat, path: string, openWith: string, amendOptions: string[], oldPass: Buffer, newPass: Buffer, signal?: AbortSignal): Promise<ToolResult> {
    const prefix = format === 'qcow2-luks' ? 'encrypt.' : '';
    const args = [
      'amend',
      '--object', secretObject(OLD_SECRET_ID, 3),
      '--object', secretObject(NEW_SECRET_ID, 4),
      '-o', amendOptions.map((o) => prefix + o).join(','),
      qemuNode(format, path, openWith),
    ];
    return run(qemuImg, args, { fds: [oldPass, newPass], timeoutMs, ...(signal ? { signal } : {}) });
  }

  async function runJob(job: RotationJob, hooks?: RotationHooks): Promise<RotationResult> {
    const { spec, format, oldKey, newKey } = checkJob(job);
    const path = spec.path;
    const backupPath = rotationFilePath(path, job.rotationId, REKEY_BACKUP_PURPOSE);
    const progress = progressReporter(hooks);
    const signal = hooks?.signal;

    progress.report('checking image', 0n, 0n);
    const info = await store.inspect(path);
    if (!info.exists) throw errors.notFound('image');
    if (info.kind !== KIND_OF_FORMAT[format]) {
      // Another kind is bad input, unless this rotation's own backup exists: then it is
      // our image with a header destroyed half-way (a torn write), which the loop restores.
      const backup = await readHeaderBackup(backupPath);
      backup?.data.fill(0);
      if (!backup) throw errors.precondition(`the image is ${info.kind}, not ${KIND_OF_FORMAT[format]}`);
    }

    const oldPass = luksPassphrase(oldKey);
    const newPass = luksPassphrase(newKey);
    try {
      let addAttempts = 0;
      let restores = 0;
      let checkedInUse = false;
      for (let round = 0; round < MAX_ROUNDS; round++) {
        throwIfAborted(hooks);
        progress.report('checking keys', 0n, 0n);
        // A damaged header (a torn write) is a state in which neither key opens.
        let state: KeyState;
        try {
          const now = await store.inspect(path);
          const readable = now.exists && now.kind === KIND_OF_FORMAT[format] && !now.damaged;
          state = readable ? await keyState(probe, format, path, oldKey, newKey, signal) : 'neither';
        } catch (err) {
          if (!(err instanceof DomainError) || err.kind !== 'failed_precondition') throw err;
          state = 'neither';
        }

        if (state === 'new') {
          // Done (in this run or an earlier one): nothing but our backup to clean up.
          await removeFiles(await rotationLeftovers(path, job.rotationId), true);
          progress.report('done', 0n, 0n, true);
          return { opensWith: 'new', verified: true, bytesRewritten: 0n };
        }

        if (state === 'neither') {
          const backup = await readHeaderBackup(backupPath);
          if (!backup) {
            throw errors.precondition('neither the old nor the new key opens the image', {
              hint: round === 0 ? 'check that the old key is the one the image was created or last rekeyed with' : 'no header backup of this rotation was found',
            });
          }
          if (++restores > 2) throw errors.internal(new Error('rekey: the image opens with no key even after restoring the header backup'));
          try {
            progress.report('restoring header backup', 0n, 0n, true);
            logger.warn('no key opens the image; restoring the header backup taken before the rekey', { rotation_id: job.rotationId });
            await restoreHeaderBackup(path, backup, format === 'luks' ? 'luks1' : 'qcow2-luks', await currentIdentity(path, format));
          } finally {
            backup.data.fill(0);
          }
          continue;
        }

        // Every other state changes the image: not while a guest holds it.
        if (!checkedInUse) {
          await assertNotInUse(run, qemuIo, path, timeoutMs, signal);
          checkedInUse = true;
        }

        if (state === 'old') {
          // Before any change: a backup of the header as it is now. Taken again on every
          // round in this state (a backup left by an earlier run shows the same state).
          progress.report('header backup', 0n, 0n, true);
          await saveHeaderBackup(path, backupPath, await headerLayout(path, format));
          const iterTime = iterTimes[Math.min(addAttempts, iterTimes.length - 1)] ?? 100;
          if (addAttempts++ >= iterTimes.length) throw errors.internal(new Error('rekey: adding the new keyslot keeps failing'));
          progress.report('adding keyslot', 0n, 0n, true);
          const r = await amend(format, path, OLD_SECRET_ID, ['state=active', `new-secret=${NEW_SECRET_ID}`, `iter-time=${iterTime}`], oldPass, newPass, signal);
          if (r.code !== 0) {
            // Another holder (a guest started meanwhile, a qemu-img left by a killed agent)
            // is not worth retrying against.
            await assertNotInUse(run, qemuIo, path, timeoutMs, signal);
            // Most likely QEMU's PBKDF2 calibration (module comment); the next round asks
            // the image again and retries while it still opens with the old key only.
            logger.warn('qemu-img amend (add keyslot) failed; retrying', { iter_time_ms: iterTime, stderr: r.stderr.trim().slice(-300) });
            if (addAttempts >= iterTimes.length) throw toolError('qemu-img', r, QEMU_EXIT_KINDS);
          }
          continue;
        }

        // state === 'both': the new key is proven to open the image; the old keyslot goes.
        if (!(await readHeaderBackup(backupPath).then((b) => (b ? (b.data.fill(0), true) : false)))) {
          // Only when the backup was lost (removed by hand): one of this state is as good.
          progress.report('header backup', 0n, 0n, true);
          await saveHeaderBackup(path, backupPath, await headerLayout(path, format));
        }
        progress.report('removing old keyslot', 0n, 0n, true);
        const r = await amend(format, path, NEW_SECRET_ID, ['state=inactive', `old-secret=${OLD_SECRET_ID}`], oldPass, newPass, signal);
        if (r.code !== 0) {
          await assertNotInUse(run, qemuIo, path, timeoutMs, signal);
          throw toolError('qemu-img', r, QEMU_EXIT_KINDS);
        }
      }
      throw errors.internal(new Error('rekey: no progress after many rounds'));
    } finally {
      wipe(oldPass);
      wipe(newPass);
    }
  }

  return {
    name: 'qemu-rekey',
    async run(job, hooks) {
      try {
        return await runJob(job, hooks);
      } catch (err) {
        if (!(err instanceof DomainError)) logger.error('qemu rekey failed', describeError(err));
        throw err instanceof DomainError ? err : errors.internal(err);
      }
    },
  };
}

/** For tests and the driver: where the rekey keeps its header backup for a job. */
export function rekeyBackupPath(job: Pick<RotationJob, 'rotationId' | 'target'>): string {
  return rotationFilePath(job.target.path, job.rotationId, REKEY_BACKUP_PURPOSE);
}
