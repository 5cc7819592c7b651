/**
 * Live re-encryption of a running guest's disk (luks, qcow2-luks): libvirt blockcopy into
 * a new image under the new key, pivot, and the new image takes the canonical name. The
 * same scheme encrypts a running guest's unencrypted disk (raw -> luks, qcow2 -> qcow2-luks:
 * there is no old key, and no secret before) and decrypts one (the reverse: the destination
 * has no <encryption> and no new key; the old secret goes once the copy took P's name).
 *
 * The scheme, with P the canonical image path, T = `.<P's name>.virtkm-rot-<rotationId>.live-new`
 * (the destination, next to P) and J = `.<P's name>.virtkm-rot-<rotationId>.live-journal` (a
 * small journal without secrets), named like every rotation file (common.ts):
 *   1. J := copying; T := a new image under the new key (same format, size and cipher).
 *   2. The libvirt secret of the new key version (same UUID scheme as the reconciler)
 *      replaces the old one just for the blockcopy call: libvirt reads it when it sets up
 *      the destination, and allows only one secret per usage (`virtkm:<volume>`), so both
 *      versions cannot be defined at once. Right after the call the old version's secret
 *      is back, matching the image at P (which the persistent definition still names).
 *   3. blockcopy P -> T with reuse-external, a transient job and synchronous writes: once
 *      ready, every guest write completes only after it reached T too, so T never lags
 *      behind P. Progress comes from the block job (cur/end).
 *   4. Ready: J := pivoting, then pivot. From here on T holds the newest data.
 *   5. rename(T, P) and fsync the directory. QEMU keeps its open file; the old image's
 *      last name is gone. The new version's secret replaces the old one.
 *   6. libvirt 9 rewrites the persistent definition at the pivot (even for a transient
 *      job) to name T and the new secret: the disk's <source file> is set back to P (and
 *      its secret to the new version, in case the pivot never happened but the roll
 *      forward below did), so the next start opens P with the new key.
 *   7. The new key opens P and the old one does not; J is removed.
 *
 * What stays: libvirt's *live* XML of the running guest names T (a file that no longer
 * exists) until the guest next stops; QEMU has the file open and the next start uses the
 * persistent definition. But QEMU reopens a node by that name when its permissions change:
 * the pivot of a later live rotation does so for its source and failed here ("Could not
 * open T: No such file or directory", job failed while pivoting). So a later live rotation
 * of the same running guest gives the stale name back to P (a hard link) just before its
 * copy, and removes it after its own rename. Other operations that reopen the disk by
 * name (an external snapshot, for example) fail until the guest restarts.
 *
 * Resume after kill -9 at any point (run again with the same job): libvirt says where the
 * guest is. Live source T: the pivot happened, go on with step 5. Live source P and a copy
 * job into T: wait for ready and pivot. Live source P and no job: start over (T is
 * dropped). The guest not running: J decides. At `pivoting` T is complete whether or not
 * the pivot finished (synchronous writes), so T becomes P offline; before that P is the
 * authoritative image and T is dropped, and the run refuses with failed_precondition (the
 * offline mechanism is another one). At every moment P or T holds the guest's newest data
 * under the old or the new key, and the defined libvirt secret is the one of the key that
 * opens P (except for the instant of the blockcopy call, restored on resume).
 *
 * Names of earlier versions: T and J were `.<P's name>.rot-<rotationId>.new` and `.json`. A
 * run finds them when an earlier version was killed during that rotation (J or T there, or
 * the guest's disk or mirror naming that T) and then finishes that rotation under those
 * names; the stale live names of earlier rotations are recognized in both forms.
 *
 * Things that must not happen meanwhile, and that this module cannot prevent: redefining
 * or restarting the guest from a definition that still names P with the old secret after
 * the pivot (the reconciler should resume an unfinished rotation first), and another
 * writer of the volume's libvirt secret.
 */
import { createHash } from 'node:crypto';
import { link, open, readdir, readFile, rename, stat, statfs } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize } from 'node:path';
import { DomainError, errors, isDomainError } from '../../../shared/src/errors.js';
import type { Logger } from '../../../shared/src/log.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { fsError, fsyncDir, pathExists, unlinkQuietly } from '../images/files.js';
import { luksPassphrase } from '../images/passphrase.js';
import type { ImageSpec } from '../images/types.js';
import type { DomainDisk, Libvirt } from '../libvirt/ports.js';
import { escapeXml } from '../libvirt/xml.js';
import type { ImagePort } from '../reconcile/ports.js';
import { secretOwnerTag } from '../reconcile/reconciler.js';
import { secretUuidFor } from '../reconcile/render-domain.js';
import { LIVE_COPY_PURPOSE_PREFIX, checkRotationId, rotationFilePath } from './common.js';
import type { RotationHooks, RotationJob, RotationMechanism, RotationProgress, RotationResult } from './types.js';

/** Where a job's volume is attached and between which key versions it rotates. */
export interface LiveCopyPlacement {
  /** libvirt domain name of the guest (a virtkm domain). */
  domain: string;
  /** Disk target of the volume in that domain, e.g. vda. */
  disk: string;
  /** Key version of `job.oldKey` (its libvirt secret UUID is derived from it). */
  oldKeyVersion: number;
  /** Key version of `job.newKey`. */
  newKeyVersion: number;
  /** The volume's name, for the secret's description only. */
  volumeName?: string;
}

/** What the mechanism works with. */
export interface LiveCopyDeps {
  libvirt: Libvirt;
  /** Creates the destination image and checks keys. */
  images: ImagePort;
  /** This host's id (the owner tag of the secrets it defines, as the reconciler writes it). */
  hostId: string;
  /** Finds the guest, disk and key versions of a job (the driver knows them). */
  locate(job: RotationJob): LiveCopyPlacement | Promise<LiveCopyPlacement>;
  logger?: Logger;
  /** Interval of block job polls; default 200 ms. */
  pollIntervalMs?: number;
  /** A copy whose cursor does not move for this long is abandoned; default 10 minutes. */
  stallTimeoutMs?: number;
  /** Extra free space required beyond the image's size for the copy; default 16 MiB. */
  spaceMarginBytes?: bigint;
}

/** Phases recorded in the journal (no secrets in it). */
type JournalPhase = 'copying' | 'pivoting';
interface Journal {
  v: 1;
  rotationId: string;
  phase: JournalPhase;
}

/** Rotation ids earlier versions accepted (their file names hold them). */
const LEGACY_ROTATION_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** Purposes of this mechanism's files (common.ts' rotationFilePath). */
const TEMP_PURPOSE = `${LIVE_COPY_PURPOSE_PREFIX}new`;
const JOURNAL_PURPOSE = `${LIVE_COPY_PURPOSE_PREFIX}journal`;
const sha256 = (s: string): Buffer => createHash('sha256').update(s).digest();
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The hidden destination of a rotation, next to the canonical path. */
export function liveCopyTempPath(canonical: string, rotationId: string): string {
  return rotationFilePath(canonical, rotationId, TEMP_PURPOSE);
}

/** The journal of a rotation, next to the canonical path. */
export function liveCopyJournalPath(canonical: string, rotationId: string): string {
  return rotationFilePath(canonical, rotationId, JOURNAL_PURPOSE);
}

/** The destination and journal names of earlier versions (see the module comment). */
export function legacyLiveCopyPaths(canonical: string, rotationId: string): { temp: string; journal: string } {
  const base = join(dirname(canonical), `.${basename(canonical)}.rot-${rotationId}`);
  return { temp: `${base}.new`, journal: `${base}.json` };
}

/** Whether `path` is the destination name of some live rotation of `canonical`, in today's form or an earlier version's. */
function isRotationTempOf(canonical: string, path: string): boolean {
  if (dirname(path) !== dirname(canonical)) return false;
  const name = basename(path);
  const forms = [
    { prefix: `.${basename(canonical)}.virtkm-rot-`, suffix: `.${TEMP_PURPOSE}` },
    { prefix: `.${basename(canonical)}.rot-`, suffix: '.new' },
  ];
  return forms.some(({ prefix, suffix }) => name.startsWith(prefix) && name.endsWith(suffix) && name.length > prefix.length + suffix.length && LEGACY_ROTATION_ID_RE.test(name.slice(prefix.length, -suffix.length)));
}

/**
 * The <disk> element of a block copy destination: a QEMU LUKS image opened with
 * `secretUuid`, or an unencrypted raw or qcow2 image (a decryption: no <encryption>).
 */
export function destinationDiskXml(path: string, format: 'luks' | 'qcow2-luks' | 'raw' | 'qcow2', secretUuid: string): string {
  const encrypted = format === 'luks' || format === 'qcow2-luks';
  const encryption = encrypted ? `<encryption format='luks'><secret type='passphrase' uuid='${secretUuid}'/></encryption>` : '';
  return (
    `<disk type='file' device='disk'>` +
    `<driver name='qemu' type='${format === 'luks' || format === 'raw' ? 'raw' : 'qcow2'}'/>` +
    `<source file='${escapeXml(path)}'>${encryption}</source>` +
    `</disk>`
  );
}

/** Whether `plain` -> `encrypted` is a conversion the copy does (raw <-> luks, qcow2 <-> qcow2-luks). */
function isConversionPair(plain: string, encrypted: string): boolean {
  return (plain === 'raw' && encrypted === 'luks') || (plain === 'qcow2' && encrypted === 'qcow2-luks');
}

/**
 * Points the disk `target` of a persistent domain XML (as libvirt formats it) at `path`
 * with the encryption secret `secretUuid`; returns undefined when it already does. Only
 * that <disk> element changes (its source file attributes and secret uuid attributes), the
 * rest of the text stays byte for byte. Throws failed_precondition when the disk is not
 * found or has no file source.
 */
export function pointDiskAt(domainXml: string, target: string, path: string, secretUuid: string): string | undefined {
  const disks = [...domainXml.matchAll(/<disk\b[\s\S]*?<\/disk>/g)];
  const targetRe = new RegExp(`<target\\s[^>]*dev=(['"])${target.replace(/[.]/g, '\\.')}\\1`);
  const found = disks.find((m) => targetRe.test(m[0]));
  if (!found || found.index === undefined) throw errors.precondition(`the domain has no disk ${target}`);
  const block = found[0];
  if (!/<source\s[^>]*\bfile=/.test(block)) throw errors.precondition(`disk ${target} is not a file-backed disk`);
  const updated = block
    .replace(/(<source\s[^>]*\bfile=)(['"])[^'"]*\2/g, (_m, head: string, q: string) => `${head}${q}${escapeXml(path)}${q}`)
    .replace(/(<secret\s[^>]*\buuid=)(['"])[^'"]*\2/g, (_m, head: string, q: string) => `${head}${q}${secretUuid}${q}`);
  if (updated === block) return undefined;
  return domainXml.slice(0, found.index) + updated + domainXml.slice(found.index + block.length);
}

/** Creates the live blockcopy mechanism. */
export function createLiveCopy(deps: LiveCopyDeps): RotationMechanism {
  const { libvirt, images } = deps;
  const pollMs = deps.pollIntervalMs ?? 200;
  const stallMs = deps.stallTimeoutMs ?? 10 * 60_000;
  const margin = deps.spaceMarginBytes ?? 16n * 1024n * 1024n;

  async function readJournal(path: string, rotationId: string): Promise<Journal | undefined> {
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') return undefined;
      throw fsError(err, 'rotation journal');
    }
    try {
      const j = JSON.parse(text) as Partial<Journal>;
      if (j.v === 1 && j.rotationId === rotationId && (j.phase === 'copying' || j.phase === 'pivoting')) return j as Journal;
    } catch {
      // fall through: an unreadable journal is treated as none (written atomically, so this
      // means someone else's file): P stays authoritative
    }
    deps.logger?.warn('ignoring an unreadable live rotation journal', { rotation_id: rotationId });
    return undefined;
  }

  /** Writes the journal atomically and durably (temporary file, fsync, rename, fsync dir). */
  async function writeJournal(path: string, journal: Journal): Promise<void> {
    const tmp = `${path}.tmp`;
    try {
      const fh = await open(tmp, 'w', 0o600);
      try {
        await fh.writeFile(JSON.stringify(journal));
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, path);
      await fsyncDir(dirname(path));
    } catch (err) {
      throw fsError(err, 'rotation journal');
    }
  }

  async function dropJournal(path: string): Promise<void> {
    await unlinkQuietly(`${path}.tmp`);
    await unlinkQuietly(path);
  }

  return {
    name: 'live-blockcopy',

    async run(job: RotationJob, hooks: RotationHooks = {}): Promise<RotationResult> {
      // ----- input -----------------------------------------------------------------------
      if (job.kind !== 'reencrypt') throw errors.invalid('live blockcopy only re-encrypts (kind reencrypt)');
      const format = job.target.format;
      const from = job.fromFormat;
      // Re-encrypting keeps the format and needs both keys; encrypting has no old key,
      // decrypting no new one.
      const encrypting = isConversionPair(from, format);
      const decrypting = isConversionPair(format, from);
      if (!encrypting && !decrypting) {
        if (format !== 'luks' && format !== 'qcow2-luks') throw errors.invalid('live blockcopy handles luks and qcow2-luks images (and raw, qcow2 ones to encrypt or decrypt)');
        if (from !== format) throw errors.invalid('live blockcopy keeps the image format, or converts raw <-> luks, qcow2 <-> qcow2-luks');
        if (!job.oldKey || !job.newKey) throw errors.invalid('live re-encryption needs the old and the new key');
      }
      if (encrypting && (job.oldKey || !job.newKey)) throw errors.invalid('encrypting needs the new key and no old one');
      if (decrypting && (!job.oldKey || job.newKey)) throw errors.invalid('decrypting needs the old key and no new one');
      checkRotationId(job.rotationId);
      const canonical = job.target.path;
      if (!isAbsolute(canonical) || normalize(canonical) !== canonical || canonical.endsWith('/')) throw errors.invalid('the image path must be absolute and normalized');
      const spec = job.target as ImageSpec;
      const place = await deps.locate(job);
      if (!Number.isSafeInteger(place.oldKeyVersion) || !Number.isSafeInteger(place.newKeyVersion) || place.oldKeyVersion === place.newKeyVersion) {
        throw errors.invalid('old and new key versions must be two different integers');
      }
      const { domain, disk: target } = place;
      const dir = dirname(canonical);
      // A rotation an earlier version was killed in keeps its names to the end (renaming T
      // would take the name libvirt and QEMU know it by): its J or T is there, or the guest
      // runs on, or mirrors into, its T.
      const legacy = legacyLiveCopyPaths(canonical, job.rotationId);
      const legacyDisk = await libvirt.domains.disk(domain, target).catch(() => undefined);
      const useLegacy =
        (await pathExists(legacy.journal)) || (await pathExists(`${legacy.journal}.tmp`)) || (await pathExists(legacy.temp)) || legacyDisk?.sourcePath === legacy.temp || legacyDisk?.mirror?.path === legacy.temp;
      if (useLegacy) deps.logger?.info('resuming a live re-encryption under the file names of an earlier version', { rotation_id: job.rotationId });
      const temp = useLegacy ? legacy.temp : liveCopyTempPath(canonical, job.rotationId);
      const journalPath = useLegacy ? legacy.journal : liveCopyJournalPath(canonical, job.rotationId);
      const oldUuid = secretUuidFor(job.volumeId, place.oldKeyVersion, sha256);
      const newUuid = secretUuidFor(job.volumeId, place.newKeyVersion, sha256);
      // An unencrypted side has no key (undefined), and no libvirt secret.
      const oldKey = job.oldKey;
      const newKey = job.newKey;
      const { signal } = hooks;
      /** The key of a side for testKey: the image store ignores it for an unencrypted spec. */
      const keyOf = (k: Uint8Array | undefined): Uint8Array => k ?? new Uint8Array(0);

      // ----- progress --------------------------------------------------------------------
      let lastReport = 0;
      let rateSample: { at: number; cur: bigint } | undefined;
      let rate = 0;
      const progress = (step: string, done: bigint, total: bigint, force = false): void => {
        const now = Date.now();
        if (!force && now - lastReport < 250) return;
        lastReport = now;
        const p: RotationProgress = { step, bytesDone: done, bytesTotal: total, bytesPerSecond: rate };
        try {
          hooks.onProgress?.(p);
        } catch {
          // a failing listener must not break the rotation
        }
      };

      // ----- libvirt secrets -------------------------------------------------------------
      /**
       * Makes the secret of `which` key version the volume's only one, with its value; for
       * an unencrypted side (no key), the volume is left without a secret.
       */
      async function ensureSecret(which: 'old' | 'new'): Promise<void> {
        const key = which === 'new' ? newKey : oldKey;
        const want = which === 'new' ? newUuid : oldUuid;
        const other = which === 'new' ? oldUuid : newUuid;
        for (const s of await libvirt.secrets.list()) {
          if (s.volumeId !== job.volumeId || (s.uuid === want && key)) continue;
          if (s.uuid !== other && s.uuid !== want) throw errors.precondition(`volume ${job.volumeId} has a libvirt secret of another key version`);
          await libvirt.secrets.undefine(s.uuid);
        }
        if (!key) return;
        const version = which === 'new' ? place.newKeyVersion : place.oldKeyVersion;
        await libvirt.secrets.define({ uuid: want, volumeId: job.volumeId, description: `virtkm volume ${place.volumeName ?? job.volumeId} key v${version}${secretOwnerTag(deps.hostId)}` });
        const passphrase = luksPassphrase(key);
        try {
          await libvirt.secrets.setValue(want, passphrase);
        } finally {
          wipe(passphrase);
        }
      }

      // ----- steps -----------------------------------------------------------------------
      const sameFile = async (a: string, b: string): Promise<boolean> => {
        const [x, y] = await Promise.all([stat(a), stat(b)]);
        return x.dev === y.dev && x.ino === y.ino;
      };
      const isCanonicalSource = async (disk: DomainDisk): Promise<boolean> => {
        const src = disk.sourcePath;
        if (src === canonical) return true;
        // The stale live name of an earlier live rotation (its file was renamed to P), or
        // that name given back to P by restoreSourceName.
        if (src === undefined || src === temp || !isRotationTempOf(canonical, src)) return false;
        return !(await pathExists(src)) || (await sameFile(src, canonical));
      };

      /**
       * QEMU reopens the source of a copy by its file name when the pivot drops it (to take
       * a read-only descriptor), so a source known under the stale name of an earlier live
       * rotation makes the pivot fail ("Could not open ...: No such file"). That name is
       * given back to P as a second link for the time of the copy; finish removes it.
       */
      async function restoreSourceName(disk: DomainDisk): Promise<void> {
        const src = disk.sourcePath;
        if (src === undefined || src === canonical || (await pathExists(src))) return;
        try {
          await link(canonical, src);
        } catch (err) {
          throw fsError(err, 'image');
        }
        await fsyncDir(dir);
      }

      /** Removes the names of earlier rotations' destinations (links made by restoreSourceName). */
      async function removeStaleNames(): Promise<void> {
        try {
          for (const name of await readdir(dir)) {
            const path = join(dir, name);
            if (path !== temp && isRotationTempOf(canonical, path)) await unlinkQuietly(path);
          }
        } catch (err) {
          throw fsError(err, 'image');
        }
      }

      /** Removes T and what an interrupted create of T left (the image store's own temporaries of it). */
      async function removeTemp(): Promise<void> {
        try {
          const prefix = `.${basename(temp)}.virtkm-tmp-`;
          for (const name of await readdir(dir)) if (name.startsWith(prefix)) await unlinkQuietly(join(dir, name));
          await unlinkQuietly(temp);
        } catch (err) {
          throw fsError(err, 'temporary image');
        }
      }

      /** Drops T and J: P is the authoritative image. */
      async function rollBackFiles(): Promise<void> {
        await removeTemp();
        await dropJournal(journalPath);
        await fsyncDir(dir);
      }

      /** Steps 5-7: T becomes P, the definition and the secret follow, both keys checked. */
      async function finish(): Promise<RotationResult> {
        progress('finishing', spec.sizeBytes, spec.sizeBytes, true);
        if (!(await pathExists(temp)) && !(await images.testKey(canonical, spec, keyOf(newKey)))) {
          // T was renamed already, so P must be the new image; anything else means the
          // image QEMU writes to lost its name (never done by this module).
          throw errors.internal(new Error('neither the destination nor a re-encrypted canonical image exists'));
        }
        if (await pathExists(temp)) {
          try {
            await rename(temp, canonical);
          } catch (err) {
            throw fsError(err, 'image');
          }
        }
        // The old image's last names go: nothing under the old key stays behind.
        await removeStaleNames();
        await fsyncDir(dir);
        const info = (await libvirt.domains.list()).find((d) => d.name === domain);
        if (info?.persistent) {
          const xml = pointDiskAt(await libvirt.domains.xml(domain, { inactive: true }), target, canonical, newUuid);
          if (xml !== undefined) await libvirt.domains.define(xml);
        }
        await ensureSecret('new');
        progress('verifying', spec.sizeBytes, spec.sizeBytes, true);
        // For a conversion the kind check of testKey is the proof (an encrypted image is no
        // longer raw or qcow2, a decrypted one no longer LUKS); keys exist on both sides only
        // for a re-encryption.
        if (!(await images.testKey(canonical, spec, keyOf(newKey)))) throw errors.internal(new Error('the new key does not open the re-encrypted image'));
        if (oldKey && newKey && (await images.testKey(canonical, spec, oldKey))) throw errors.internal(new Error('the old key still opens the re-encrypted image'));
        await removeTemp(); // an interrupted create's leftovers, if any
        await dropJournal(journalPath);
        await fsyncDir(dir);
        progress('done', spec.sizeBytes, spec.sizeBytes, true);
        // The copy cannot be compared with its source while the guest writes: QEMU's mirror
        // is what guarantees the data; the keys were checked.
        return { opensWith: 'new', verified: false, bytesRewritten: spec.sizeBytes };
      }

      /** Steps 1-3: a fresh destination and a new copy job. */
      async function startCopy(disk: DomainDisk): Promise<void> {
        progress('preparing', 0n, spec.sizeBytes, true);
        await removeTemp();
        let size: bigint;
        try {
          size = BigInt((await stat(canonical)).size);
          const fs = await statfs(dir, { bigint: true });
          if (fs.bavail * fs.bsize < size + margin) throw new DomainError('resource_exhausted', 'not enough free space for the re-encrypted copy of the image');
        } catch (err) {
          if (isDomainError(err)) throw err;
          throw fsError(err, 'image');
        }
        await writeJournal(journalPath, { v: 1, rotationId: job.rotationId, phase: 'copying' });
        signal?.throwIfAborted();
        progress('creating', 0n, spec.sizeBytes, true);
        await images.create({ ...spec, path: temp }, keyOf(newKey));
        await restoreSourceName(disk);
        let started = false;
        try {
          // A decryption's destination needs no secret (and the source keeps its own).
          if (newKey) await ensureSecret('new');
          progress('copying', 0n, spec.sizeBytes, true);
          await libvirt.domains.blockCopy(domain, target, destinationDiskXml(temp, format as 'luks' | 'qcow2-luks' | 'raw' | 'qcow2', newUuid), { reuseExternal: true, transientJob: true, synchronousWrites: true });
          started = true;
        } finally {
          // Back to the secret of the key that opens P, whatever happened.
          await ensureSecret('old');
          // A failed call may still have started the job (a lost connection): T is dropped
          // only when libvirt shows no job, so a mirror never loses its name.
          if (!started && (await libvirt.domains.blockJob(domain, target).catch(() => ({}))) === undefined) await rollBackFiles();
        }
      }

      /** Abandons a running copy: the guest stays on P. */
      async function abandonCopy(): Promise<void> {
        await libvirt.domains.blockJobAbort(domain, target, { pivot: false }).catch((err: unknown) => {
          if (!isDomainError(err) || err.kind !== 'failed_precondition') throw err;
        });
        await rollBackFiles();
      }

      /** Step 4: waits for the copy to be ready, then pivots. */
      async function waitAndPivot(): Promise<void> {
        let stalledSince = Date.now();
        let lastCur = -1n;
        for (;;) {
          if (signal?.aborted) {
            await abandonCopy();
            throw new DomainError('unavailable', 'live re-encryption aborted; the guest stays on its old image');
          }
          const info = await libvirt.domains.blockJob(domain, target);
          if (!info) return; // ended: the caller looks at where the guest is now
          const now = Date.now();
          if (rateSample && now > rateSample.at && info.cur >= rateSample.cur) rate = Number(info.cur - rateSample.cur) / ((now - rateSample.at) / 1000);
          rateSample = { at: now, cur: info.cur };
          progress('copying', info.cur, info.end);
          if (info.ready) break;
          if (info.cur !== lastCur) {
            lastCur = info.cur;
            stalledSince = now;
          } else if (now - stalledSince > stallMs) {
            await abandonCopy();
            throw new DomainError('unavailable', 'the live copy made no progress; the guest stays on its old image');
          }
          await sleep(pollMs);
        }
        await writeJournal(journalPath, { v: 1, rotationId: job.rotationId, phase: 'pivoting' });
        progress('pivot', spec.sizeBytes, spec.sizeBytes, true);
        await libvirt.domains.blockJobAbort(domain, target, { pivot: true });
      }

      // ----- the state machine -----------------------------------------------------------
      // Each pass reads where things are and takes one step; a few passes finish a run.
      let starts = 0;
      for (let pass = 0; pass < 8; pass++) {
        const state = await libvirt.domains.state(domain);
        if (state === undefined) throw errors.precondition(`the guest's domain "${domain}" is not defined on this host`);
        const journal = await readJournal(journalPath, job.rotationId);
        if (state !== 'running' && state !== 'paused') {
          if (journal?.phase === 'pivoting') {
            deps.logger?.info('finishing a pivoted live re-encryption with the guest stopped', { rotation_id: job.rotationId });
            return finish();
          }
          if (journal || (await pathExists(temp))) {
            // The copy died with the guest: P holds the data under the old key.
            await rollBackFiles();
            await ensureSecret('old');
          }
          throw errors.precondition('the guest is not running: live re-encryption needs a running guest (the offline mechanism handles stopped ones)');
        }
        const disk = await libvirt.domains.disk(domain, target);
        if (!disk) throw errors.precondition(`the guest has no disk ${target}`);
        if (disk.sourcePath === temp) return finish();
        if (!(await isCanonicalSource(disk))) throw errors.precondition(`disk ${target} of the guest is not this volume's image`);
        const blockJob = await libvirt.domains.blockJob(domain, target);
        if (blockJob) {
          if (blockJob.type !== 'copy' || disk.mirror?.path !== temp) throw errors.precondition(`disk ${target} has another block job`);
          if (!journal) await writeJournal(journalPath, { v: 1, rotationId: job.rotationId, phase: 'copying' });
          await ensureSecret('old');
          await waitAndPivot();
          continue;
        }
        if (journal || starts > 0) deps.logger?.warn('no live copy is running; starting it (again)', { rotation_id: job.rotationId });
        if (++starts > 3) {
          await rollBackFiles();
          throw new DomainError('unavailable', 'the live copy keeps ending before the pivot; the guest stays on its old image (details in the agent log)');
        }
        await startCopy(disk);
      }
      throw new DomainError('unavailable', 'the live copy did not finish (details in the agent log)');
    },
  };
}
