/**
 * Converges the host to a desired state and says what is actually there. Idempotent: the
 * same desired state applied twice changes nothing the second time. Fails closed: an image
 * that does not open with its key, or is not of the expected kind, is reported and never
 * attached, reformatted or treated as raw. Removes only what virtkm created (domains with
 * its metadata marker, secrets whose usage is `virtkm:<volume>`).
 *
 * Unencrypted volumes (raw, qcow2) have no key: no packet, nothing cached, no libvirt
 * secret; their image is checked for its kind only. An encrypt or decrypt order changes a
 * volume's format: until the host reports it done the desired volume keeps the old format
 * and key version; once the job is done the pass uses the order's target format and
 * version (0 after a decryption), and the cache keeps both sides' keys until the server
 * confirms.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import {
  GuestPhase,
  KeyPacket,
  RotationKind,
  RotationPhase,
  type RotationStatus,
  type SealedKeyPacket,
  VolumeFormat,
  VolumePhase,
  DesiredState,
  type DesiredGuest,
  type DesiredVolume,
  type GuestStatus,
  type HostReport,
  type VolumeStatus,
} from '../../../shared/src/api.js';
import { openSealed, type BoxKeyPair } from '../../../shared/src/box.js';
import { formatFromApiValue } from '../../../shared/src/formats.js';
import { errors, isDomainError } from '../../../shared/src/errors.js';
import { describeError, type Logger } from '../../../shared/src/log.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import type { CachedKey, KeyCache } from '../cache/key-cache.js';
import { luksPassphrase } from '../images/passphrase.js';
import { isUnencryptedImageFormat } from '../images/types.js';
import type { DomainInfo, Libvirt } from '../libvirt/ports.js';
import { expectedKind, imageMatchesFormat, type AgentVolumeFormat, type DmCryptPort, type ImagePort, type ImageSpec, type KeyringPort } from './ports.js';
import { diskTargetOf, renderDomainXml, secretUuidFor, type HostVolume } from './render-domain.js';
import type { JobStatus, OrderContext, RotationDriver } from '../rotate/driver.js';

/** What the reconciler works with. */
export interface ReconcilerDeps {
  hostId: string;
  box: BoxKeyPair;
  libvirt: Libvirt;
  images: ImagePort;
  dmcrypt: DmCryptPort;
  /** Kernel keyring for dm-crypt keys; without it keys reach cryptsetup on stdin only. */
  keyring?: KeyringPort;
  cache: KeyCache;
  /** Directory of the image files (shared storage for moves). */
  imageDir: string;
  logger: Logger;
  /** Runs rotation orders; without it orders wait (unit tests of other logic). */
  rotations?: RotationDriver;
}

/**
 * What one pass does with a volume that has a rotation order. busy: a job runs and owns
 * the image and the volume's libvirt secret (nothing is checked, defined or started);
 * done: the image opens with the target version, which the pass uses; idle: the active
 * version is used (the job waits, failed, or cannot run offline).
 */
interface RotationPlan {
  order: NonNullable<DesiredVolume['rotation']>;
  status: JobStatus;
  mode: 'busy' | 'done' | 'idle';
}

/** The image spec of a desired volume on this host. */
function specOf(dv: DesiredVolume, format: AgentVolumeFormat, imageDir: string): ImageSpec {
  return {
    path: imagePath(imageDir, dv.volumeId, format),
    format,
    sizeBytes: dv.sizeBytes,
    cipher: dv.cipher?.cipher ?? 'aes-xts-plain64',
    // Unexpected values are refused by the image layer's own spec check.
    keySizeBits: (dv.cipher?.keySizeBits ?? 512) as ImageSpec['keySizeBits'],
    sectorSize: (dv.cipher?.sectorSize ?? 512) as ImageSpec['sectorSize'],
  };
}

/** The agent's name of an order's kind. */
function orderKind(k: RotationKind): OrderContext['kind'] {
  switch (k) {
    case RotationKind.ROTATION_KIND_REKEY:
      return 'rekey';
    case RotationKind.ROTATION_KIND_ENCRYPT:
      return 'encrypt';
    case RotationKind.ROTATION_KIND_DECRYPT:
      return 'decrypt';
    default:
      return 'reencrypt';
  }
}

/** The format a volume's image has once its order is carried out (unspecified: unchanged). */
function targetFormatOf(dv: DesiredVolume): AgentVolumeFormat | undefined {
  const order = dv.rotation;
  if (order && order.targetFormat !== VolumeFormat.VOLUME_FORMAT_UNSPECIFIED) return formatFromApiValue(order.targetFormat);
  return formatFromApiValue(dv.format);
}

/** Starts (or looks up) the jobs of the rotation orders in `desired`. */
async function planRotations(desired: DesiredState, packets: Map<string, Uint8Array>, deps: ReconcilerDeps, domains: DomainInfo[], offline: boolean, mapped: ReadonlySet<string>): Promise<Map<string, RotationPlan>> {
  const plans = new Map<string, RotationPlan>();
  const driver = deps.rotations;
  for (const g of desired.guests) {
    for (const dv of g.volumes) {
      const order = dv.rotation;
      if (!order || plans.has(dv.volumeId)) continue;
      const waiting = (reason: string): JobStatus => ({ rotationId: order.rotationId, volumeId: dv.volumeId, targetVersion: order.targetVersion, phase: 'waiting', mechanism: '', step: 'waiting', bytesDone: 0n, bytesTotal: 0n, bytesPerSecond: 0, reason, offline: true });
      let status = driver?.status(order.rotationId);
      if (offline || !driver) {
        // While the server is unreachable nothing new starts, and a guest whose rotation
        // is unfinished stays stopped: a live copy interrupted after its pivot must be
        // finished before the image is used again.
        status ??= waiting(offline ? 'the server is unreachable' : 'this agent cannot rotate keys');
        plans.set(dv.volumeId, { order, status, mode: status.phase === 'done' ? 'done' : 'busy' });
        continue;
      }
      if (!status || status.phase === 'waiting') {
        const format = formatFromApiValue(dv.format);
        const targetFormat = targetFormatOf(dv);
        // An unencrypted side (encrypting from, decrypting to) has no key.
        const oldNeeded = format !== undefined && !isUnencryptedImageFormat(format);
        const newNeeded = targetFormat !== undefined && !isUnencryptedImageFormat(targetFormat);
        const oldKey = oldNeeded ? (packets.get(`${dv.volumeId}:${dv.keyVersion}`) ?? deps.cache.get(dv.volumeId, dv.keyVersion)) : undefined;
        const newKey = newNeeded ? (packets.get(`${dv.volumeId}:${order.targetVersion}`) ?? deps.cache.get(dv.volumeId, order.targetVersion)) : undefined;
        if (!format || !targetFormat) status = driver.wait(order.rotationId, dv.volumeId, order.targetVersion, 'unknown volume format');
        else if ((oldNeeded && !oldKey) || (newNeeded && !newKey)) status = driver.wait(order.rotationId, dv.volumeId, order.targetVersion, `no key for version ${oldNeeded && !oldKey ? dv.keyVersion : order.targetVersion} yet`);
        else {
          const dom = domains.find((d) => d.marker?.guestId === g.guestId);
          const running = dom?.state === 'running' || dom?.state === 'paused';
          if (!running && mapped.has(mappingName(dv.volumeId))) {
            // A stopped guest whose mapping is still open (it shut down by itself, or
            // closing the mapping failed): an offline job would rewrite the image under a live
            // dm-crypt mapping. This pass keeps the guest stopped and closes the mapping at
            // its end (mode busy, offline); the job starts on a later pass.
            plans.set(dv.volumeId, { order, status: waiting("the volume's dm-crypt mapping is still open: closing it first"), mode: 'busy' });
            continue;
          }
          const diskTarget = running ? await diskTargetOf(g.domainXml, dv.volumeId, dv.name) : undefined;
          status = driver.ensure({
            rotationId: order.rotationId,
            volumeId: dv.volumeId,
            kind: orderKind(order.kind),
            fromVersion: dv.keyVersion,
            targetVersion: order.targetVersion,
            // Same path before and after: the formats of a conversion share a file name.
            spec: specOf(dv, targetFormat, deps.imageDir),
            fromFormat: format,
            oldKey,
            newKey,
            guestRunning: running,
            ...(dom && diskTarget ? { domain: { name: dom.name, diskTarget, volumeName: dv.name } } : {}),
          });
        }
      }
      plans.set(dv.volumeId, { order, status, mode: status.phase === 'running' ? 'busy' : status.phase === 'done' ? 'done' : 'idle' });
    }
  }
  driver?.retain(new Set([...plans.values()].map((p) => p.order.rotationId)));
  return plans;
}

const ROTATION_PHASES: Readonly<Record<JobStatus['phase'], RotationPhase>> = {
  waiting: RotationPhase.ROTATION_PHASE_WAITING,
  running: RotationPhase.ROTATION_PHASE_RUNNING,
  done: RotationPhase.ROTATION_PHASE_DONE,
  failed: RotationPhase.ROTATION_PHASE_FAILED,
};

/** A job's status as the agent reports it. */
export function rotationStatusOf(s: JobStatus): RotationStatus {
  return {
    rotationId: s.rotationId,
    volumeId: s.volumeId,
    phase: ROTATION_PHASES[s.phase],
    step: s.step,
    bytesDone: s.bytesDone,
    bytesTotal: s.bytesTotal,
    bytesPerSecond: BigInt(Math.max(0, Math.round(s.bytesPerSecond))),
    reason: s.reason,
    mechanism: s.mechanism,
    targetVersion: s.targetVersion,
  };
}


const sha256 = (s: string) => createHash('sha256').update(s).digest();

/** The image path of a volume on this host. */
export function imagePath(imageDir: string, volumeId: string, format: AgentVolumeFormat): string {
  // qcow2 and qcow2-luks share a name, and so do raw and luks: encrypting or decrypting
  // converts an image in place.
  return join(imageDir, `${volumeId}.${format === 'qcow2-luks' || format === 'qcow2' ? 'qcow2' : 'img'}`);
}

/** Name of a volume's dm-crypt mapping. */
export function mappingName(volumeId: string): string {
  return `virtkm-${volumeId}`;
}

function reasonOf(err: unknown): string {
  return isDomainError(err) ? err.message : 'internal error (see the agent log)';
}

/** A copy of a desired state without key packets (what the cache keeps of it). */
export function withoutPackets(d: DesiredState): DesiredState {
  return {
    ...d,
    guests: d.guests.map((g) => ({ ...g, volumes: g.volumes.map((v) => ({ ...v, packet: undefined, rotation: v.rotation ? { ...v.rotation, targetPacket: undefined } : undefined })) })),
  };
}

/** Opens the key packets of a desired state; packets for another host or volume are refused. */
export function openPackets(desired: DesiredState, deps: Pick<ReconcilerDeps, 'box' | 'hostId' | 'logger'>): Map<string, Uint8Array> {
  const keys = new Map<string, Uint8Array>();
  for (const g of desired.guests) {
    for (const v of g.volumes) {
      // The active version's packet, and the new version's of a rotation order.
      const wanted: [SealedKeyPacket | undefined, number][] = [[v.packet, v.keyVersion], [v.rotation?.targetPacket, v.rotation?.targetVersion ?? 0]];
      for (const [packet, version] of wanted) {
        if (!packet) continue;
        let plain: Uint8Array | undefined;
        try {
          plain = openSealed(packet.sealed, deps.box);
          const p = KeyPacket.decode(plain);
          if (p.type !== 'virtkm.keypacket.v1' || p.hostId !== deps.hostId || p.volumeId !== v.volumeId || p.keyVersion !== version) {
            wipe(p.secret);
            deps.logger.warn('key packet refused: it names another host, volume or version', { volume_id: v.volumeId });
            continue;
          }
          keys.set(`${v.volumeId}:${version}`, ownedCopy(p.secret));
          wipe(p.secret);
        } catch (err) {
          deps.logger.warn('key packet does not open', { volume_id: v.volumeId, ...describeError(err) });
        } finally {
          wipe(plain);
        }
      }
    }
  }
  return keys;
}

/**
 * Applies `desired`. `offline` is set when the state comes from the local cache because
 * the server is unreachable: then nothing is created and only autostart guests start.
 */
export async function reconcile(desired: DesiredState, deps: ReconcilerDeps, offline = false): Promise<HostReport> {
  const { libvirt, images, dmcrypt, cache, logger } = deps;
  const packets = offline ? new Map<string, Uint8Array>() : openPackets(desired, deps);
  const guests: GuestStatus[] = [];
  const volumes: VolumeStatus[] = [];
  const deletedImages: string[] = [];
  const keep: CachedKey[] = [];
  const neededSecrets = new Set<string>();
  const neededMappings = new Set<string>();
  const neededKeys = new Set<string>();
  const dmReason = await dmcrypt.unavailableReason();
  // Only what this host's agent made: another agent may share the libvirtd (tests, or a
  // host enrolled twice) and its domains and secrets are not ours to touch.
  const domainList = (await libvirt.domains.list()).filter((d) => d.marker === undefined || d.marker.hostId === deps.hostId);

  // Open mappings before any job starts: none may start over a stopped guest's open mapping.
  const mapped = new Set(dmReason ? [] : await dmcrypt.list());
  const plans = await planRotations(desired, packets, deps, domainList, offline, mapped);

  try {
    // Secrets first, for every volume whose key is here: libvirt holds what guests need
    // moments after a (re)start; the slower image checks below then decide whether a guest
    // is defined and started, and secrets of volumes that fail them are removed at the end.
    const secretsSet = new Set<string>();
    for (const g of desired.guests) {
      for (const dv of g.volumes) {
        const plan = plans.get(dv.volumeId);
        const format = plan?.mode === 'done' ? targetFormatOf(dv) : formatFromApiValue(dv.format);
        // A running rotation owns the volume's secret.
        if (plan?.mode === 'busy') continue;
        const version = plan?.mode === 'done' ? plan.order.targetVersion : dv.keyVersion;
        const secret = packets.get(`${dv.volumeId}:${version}`) ?? cache.get(dv.volumeId, version);
        const uuid = secretUuidFor(dv.volumeId, version, sha256);
        if ((format !== 'luks' && format !== 'qcow2-luks') || !secret || secretsSet.has(uuid)) continue;
        try {
          await defineSecret(libvirt, deps.hostId, uuid, dv.volumeId, dv.name, version, secret);
          secretsSet.add(uuid);
        } catch (err) {
          logger.warn('defining a secret failed', { volume_id: dv.volumeId, ...describeError(err) });
        }
      }
    }
    for (const g of desired.guests) {
      const hostVolumes: HostVolume[] = [];
      // A live rotation runs on one of its disks: leave the domain as it is.
      let hold = false;
      // A finished rotation changed a disk's key: the definition must name the new secret.
      let redefine = false;
      let blocked = '';
      // Whether what blocks the guest is a failure (fail closed) or only a missing key.
      let fatal = false;
      for (const dv of g.volumes) {
        const plan = plans.get(dv.volumeId);
        // A finished encrypt/decrypt job: the image has the order's format now.
        const format = plan?.mode === 'done' ? targetFormatOf(dv) : formatFromApiValue(dv.format);
        const version = plan?.mode === 'done' ? plan.order.targetVersion : dv.keyVersion;
        if (plan?.mode === 'done') redefine = true;
        const status: VolumeStatus = { volumeId: dv.volumeId, keyVersion: version, phase: VolumePhase.VOLUME_PHASE_PENDING, reason: '', created: false };
        volumes.push(status);
        const tag = `${dv.volumeId}:${version}`;
        const secret = packets.get(tag) ?? cache.get(dv.volumeId, version);
        if (!format) {
          status.phase = VolumePhase.VOLUME_PHASE_FAILED;
          status.reason = 'unknown volume format';
          blocked ||= status.reason;
          fatal = true;
          continue;
        }
        const unencrypted = isUnencryptedImageFormat(format);
        if (!secret && !unencrypted) {
          status.reason = 'no key yet';
          blocked ||= `volume ${dv.name}: no key yet`;
          continue;
        }
        const keepKey = (v: number, key: Uint8Array): CachedKey => {
          let k = keep.find((x) => x.volumeId === dv.volumeId && x.keyVersion === v);
          if (k) k.guestIds.push(g.guestId);
          else keep.push((k = { volumeId: dv.volumeId, keyVersion: v, guestIds: [g.guestId], secret: ownedCopy(key) }));
          return k;
        };
        // An unencrypted image has no key to keep (nothing cached, so nothing to wipe).
        const kept: Pick<CachedKey, 'verifiedHeader'> = secret && !unencrypted ? keepKey(version, secret) : {};
        if (plan) {
          // Both versions stay in the cache until the server confirms the rotation (an
          // encryption's or decryption's keyless side is version 0: nothing to keep).
          const other = version === dv.keyVersion ? plan.order.targetVersion : dv.keyVersion;
          const otherKey = other > 0 ? (packets.get(`${dv.volumeId}:${other}`) ?? cache.get(dv.volumeId, other)) : undefined;
          if (otherKey) keepKey(other, otherKey);
        }
        if (plan?.mode === 'busy') {
          status.phase = VolumePhase.VOLUME_PHASE_READY;
          status.reason = `key rotation: ${plan.status.step || 'starting'}`;
          if (plan.status.offline || offline) blocked ||= `volume ${dv.name}: key rotation in progress (${plan.status.reason || plan.status.step || 'starting'})`;
          // A job that runs with the guest (live copy, online LUKS2 re-encryption) keeps
          // the volume's mapping open: cryptsetup re-encrypts through it.
          else {
            hold = true;
            neededMappings.add(mappingName(dv.volumeId));
          }
          continue;
        }
        const spec = specOf(dv, format, deps.imageDir);
        try {
          const info = await images.inspect(spec.path);
          if (info.kind === 'missing') {
            if (!dv.mayCreate || offline) {
              status.phase = VolumePhase.VOLUME_PHASE_MISSING;
              status.reason = 'image not found';
              blocked ||= `volume ${dv.name}: image not found`;
              fatal = true;
              continue;
            }
            await images.create(spec, unencrypted ? new Uint8Array(0) : (secret as Uint8Array));
            status.created = true;
            const made = (await images.inspect(spec.path)).uuid;
            if (made) kept.verifiedHeader = made;
            logger.info('image created', { volume_id: dv.volumeId, format });
          } else if (!imageMatchesFormat(format, info.kind)) {
            // Never overwrite, never treat an encrypted image as raw (a raw volume's content
            // is the guest's: see imageMatchesFormat).
            status.phase = VolumePhase.VOLUME_PHASE_FAILED;
            status.reason = `image is ${info.kind}, expected ${expectedKind(format)}`;
            blocked ||= `volume ${dv.name}: ${status.reason}`;
            fatal = true;
            continue;
          } else if (unencrypted) {
            // No key to check: the kind matched; the image store refuses a damaged qcow2
            // (a raw file has no header of ours: what looks damaged is the guest's data).
            if (info.damaged && format !== 'raw') throw errors.precondition('the image header is damaged');
          } else if (format !== 'plain') {
            const known = info.uuid !== undefined && cache.verifiedHeader(dv.volumeId, version) === info.uuid;
            if (!known && !(await images.testKey(spec.path, spec, secret as Uint8Array))) {
              status.phase = VolumePhase.VOLUME_PHASE_WRONG_KEY;
              status.reason = 'the key does not open the image';
              blocked ||= `volume ${dv.name}: wrong key`;
              fatal = true;
              continue;
            }
            if (info.uuid) kept.verifiedHeader = info.uuid;
          }
          let path = spec.path;
          const secretUuid = secretUuidFor(dv.volumeId, version, sha256);
          if (format === 'luks' || format === 'qcow2-luks') {
            if (!secretsSet.has(secretUuid)) await defineSecret(libvirt, deps.hostId, secretUuid, dv.volumeId, dv.name, version, secret as Uint8Array);
            neededSecrets.add(secretUuid);
          } else if (unencrypted) {
            // QEMU opens the file itself; no secret, no mapping.
          } else if (dmReason) {
            status.phase = VolumePhase.VOLUME_PHASE_FAILED;
            status.reason = `dm-crypt unavailable: ${dmReason}`;
            blocked ||= `volume ${dv.name}: ${status.reason}`;
            fatal = true;
            continue;
          } else if (offline ? g.autostart && g.run : g.run) {
            const keyRef = deps.keyring?.load(dv.volumeId, version, secret as Uint8Array);
            path = await dmcrypt.open(spec, mappingName(dv.volumeId), secret as Uint8Array, keyRef);
            neededMappings.add(mappingName(dv.volumeId));
            if (keyRef) neededKeys.add(keyRef);
          } else {
            // A guest that should not run here keeps no mapping open: it is closed at the
            // end of this pass, once the domain has been stopped.
            path = `/dev/mapper/${mappingName(dv.volumeId)}`;
          }
          status.phase = VolumePhase.VOLUME_PHASE_READY;
          hostVolumes.push({ volumeId: dv.volumeId, name: dv.name, format, path, secretUuid });
        } catch (err) {
          logger.warn('volume failed', { volume_id: dv.volumeId, ...describeError(err) });
          status.phase = VolumePhase.VOLUME_PHASE_FAILED;
          status.reason = reasonOf(err);
          blocked ||= `volume ${dv.name}: ${status.reason}`;
          fatal = true;
        }
      }
      guests.push(await reconcileGuest(g, hostVolumes, blocked, fatal, domainList, deps, offline, { hold, redefine }));
    }

    // Remove what virtkm created and is no longer desired: domains, then secrets, mappings.
    const desiredIds = new Set(desired.guests.map((g) => g.guestId));
    for (const d of domainList) {
      if (!d.marker || desiredIds.has(d.marker.guestId)) continue;
      try {
        if (d.state === 'running' || d.state === 'paused') await libvirt.domains.destroy(d.name);
        await libvirt.domains.undefine(d.name);
        guests.push({ guestId: d.marker.guestId, generation: BigInt(d.marker.generation), phase: GuestPhase.GUEST_PHASE_WIPED, reason: '' });
        logger.info('guest wiped', { guest_id: d.marker.guestId, domain: d.name });
      } catch (err) {
        logger.warn('wiping a guest failed', { domain: d.name, ...describeError(err) });
      }
    }
    for (const s of await libvirt.secrets.list()) {
      // The secret of a volume under a running rotation belongs to the rotation job.
      if (s.volumeId !== undefined && plans.get(s.volumeId)?.mode === 'busy') continue;
      if (s.volumeId !== undefined && s.description.endsWith(secretOwnerTag(deps.hostId)) && !neededSecrets.has(s.uuid)) {
        await libvirt.secrets.undefine(s.uuid).catch((err: unknown) => logger.warn('undefining a secret failed', { uuid: s.uuid, ...describeError(err) }));
      }
    }
    // Images the admin asked to delete with their (already destroyed) volume; never one a
    // desired guest still uses.
    const inUse = new Set(desired.guests.flatMap((g) => g.volumes.map((v) => v.volumeId)));
    for (const d of offline ? [] : desired.deleteImages) {
      const format = formatFromApiValue(d.format);
      if (!format || inUse.has(d.volumeId)) continue;
      try {
        const path = imagePath(deps.imageDir, d.volumeId, format);
        const info = await images.inspect(path);
        // Only what virtkm would have made there: a file of another kind is left alone.
        if (info.kind !== 'missing' && !imageMatchesFormat(format, info.kind)) {
          logger.warn('not deleting an image of an unexpected kind', { volume_id: d.volumeId, kind: info.kind });
          continue;
        }
        await images.remove(path);
        deletedImages.push(d.volumeId);
        logger.info('image deleted', { volume_id: d.volumeId });
      } catch (err) {
        logger.warn('deleting an image failed', { volume_id: d.volumeId, ...describeError(err) });
      }
    }
    if (!dmReason) {
      for (const m of await dmcrypt.list()) if (!neededMappings.has(m)) await dmcrypt.close(m).catch((err: unknown) => logger.warn('closing a mapping failed', { name: m, ...describeError(err) }));
    }
    // Keys of mappings no longer open (guest stopped, moved or wiped) leave the kernel keyring.
    try {
      for (const k of deps.keyring?.retain(neededKeys) ?? []) logger.info('key unlinked from the kernel keyring', { key: k });
    } catch (err) {
      logger.warn('unlinking keys from the kernel keyring failed', describeError(err));
    }
    // The cache keeps exactly the keys of desired volumes (dropped ones are wiped) and the
    // desired state itself without key packets, for starting guests while offline.
    if (!offline) cache.replace(keep, DesiredState.encode(withoutPackets(desired)).finish());
  } finally {
    for (const k of packets.values()) wipe(k);
    if (offline) for (const k of keep) wipe(k.secret);
  }
  return { revision: desired.revision, guests, volumes, deletedImages, rotations: [...plans.values()].map((p) => rotationStatusOf(p.status)) };
}

/** The end of the description of every secret this host's agent defines. */
export function secretOwnerTag(hostId: string): string {
  return ` host ${hostId}`;
}

/** Defines a volume's private, ephemeral libvirt secret and sets its value. */
async function defineSecret(libvirt: Libvirt, hostId: string, uuid: string, volumeId: string, name: string, keyVersion: number, secret: Uint8Array): Promise<void> {
  const def = { uuid, volumeId, description: `virtkm volume ${name} key v${keyVersion}${secretOwnerTag(hostId)}` };
  try {
    await libvirt.secrets.define(def);
  } catch (err) {
    // libvirt allows one secret per usage (`virtkm:<volume>`): after a rotation the
    // previous version's secret of this host gives way to the new one.
    if (!isDomainError(err) || err.kind !== 'already_exists') throw err;
    const previous = (await libvirt.secrets.list()).find((s) => s.volumeId === volumeId && s.uuid !== uuid && s.description.endsWith(secretOwnerTag(hostId)));
    if (!previous) throw err;
    await libvirt.secrets.undefine(previous.uuid);
    await libvirt.secrets.define(def);
  }
  // libvirt hands the value to QEMU, which wants the same hex passphrase the image was made
  // with (see images/passphrase.ts).
  const passphrase = luksPassphrase(secret);
  try {
    await libvirt.secrets.setValue(uuid, passphrase);
  } finally {
    wipe(passphrase);
  }
}

async function reconcileGuest(
  g: DesiredGuest,
  vols: HostVolume[],
  blocked: string,
  fatal: boolean,
  domains: DomainInfo[],
  deps: ReconcilerDeps,
  offline: boolean,
  rotation: { hold: boolean; redefine: boolean } = { hold: false, redefine: false },
): Promise<GuestStatus> {
  const { libvirt, logger } = deps;
  const status: GuestStatus = { guestId: g.guestId, generation: g.generation, phase: GuestPhase.GUEST_PHASE_PENDING, reason: '' };
  const existing = domains.find((d) => d.marker?.guestId === g.guestId);
  if (rotation.hold && !blocked) {
    // A live rotation owns the running domain's disk and definition until it ends.
    status.phase = existing?.state === 'running' ? GuestPhase.GUEST_PHASE_RUNNING : GuestPhase.GUEST_PHASE_PENDING;
    status.reason = 'live key rotation in progress';
    return status;
  }
  if (blocked) {
    status.reason = blocked;
    // Waiting for a key is pending: a running guest keeps running (QEMU holds its key). A
    // disk that fails (wrong key, wrong kind, missing) fails closed: the guest is stopped.
    status.phase = fatal ? GuestPhase.GUEST_PHASE_FAILED : GuestPhase.GUEST_PHASE_PENDING;
    if (fatal && existing && existing.state === 'running') await libvirt.domains.destroy(existing.name).catch(() => undefined);
    return status;
  }
  try {
    let state = existing?.state;
    if (!existing || rotation.redefine || BigInt(existing.marker?.generation ?? -1) !== g.generation || existing.name !== g.name) {
      if (existing && existing.name !== g.name) {
        if (existing.state === 'running') await libvirt.domains.destroy(existing.name);
        await libvirt.domains.undefine(existing.name);
        state = undefined;
      }
      const keepUuid = existing && existing.name === g.name ? { uuid: existing.uuid } : {};
      const xml = await renderDomainXml({ xml: g.domainXml, guestId: g.guestId, hostId: deps.hostId, name: g.name, generation: g.generation, volumes: vols, ...keepUuid });
      await libvirt.domains.define(xml);
      state ??= 'shutoff';
      logger.info('domain defined', { guest_id: g.guestId, name: g.name, generation: g.generation });
    }
    const shouldRun = offline ? g.autostart && g.run : g.run;
    if (shouldRun && state !== 'running') {
      await libvirt.domains.start(g.name);
      state = 'running';
    } else if (!g.run && state === 'running') {
      await libvirt.domains.destroy(g.name);
      state = 'shutoff';
    }
    status.phase = state === 'running' ? GuestPhase.GUEST_PHASE_RUNNING : g.run ? GuestPhase.GUEST_PHASE_DEFINED : GuestPhase.GUEST_PHASE_STOPPED;
    if (!g.run && status.phase === GuestPhase.GUEST_PHASE_STOPPED && !existing) status.phase = GuestPhase.GUEST_PHASE_DEFINED;
  } catch (err) {
    logger.warn('guest failed', { guest_id: g.guestId, ...describeError(err) });
    status.phase = GuestPhase.GUEST_PHASE_FAILED;
    status.reason = reasonOf(err);
  }
  return status;
}
