/**
 * Converges the host to a desired state and says what is actually there. Idempotent: the
 * same desired state applied twice changes nothing the second time. Fails closed: an image
 * that does not open with its key, or is not of the expected kind, is reported and never
 * attached, reformatted or treated as raw. Removes only what virtkm created (domains with
 * its metadata marker, secrets whose usage is `virtkm:<volume>`).
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import {
  GuestPhase,
  KeyPacket,
  VolumePhase,
  DesiredState,
  type DesiredGuest,
  type GuestStatus,
  type HostReport,
  type VolumeStatus,
} from '../../../shared/src/api.js';
import { openSealed, type BoxKeyPair } from '../../../shared/src/box.js';
import { formatFromApiValue } from '../../../shared/src/formats.js';
import { isDomainError } from '../../../shared/src/errors.js';
import { describeError, type Logger } from '../../../shared/src/log.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import type { CachedKey, KeyCache } from '../cache/key-cache.js';
import { luksPassphrase } from '../images/passphrase.js';
import type { Libvirt } from '../libvirt/ports.js';
import { expectedKind, type AgentVolumeFormat, type DmCryptPort, type ImagePort, type ImageSpec } from './ports.js';
import { renderDomainXml, secretUuidFor, type HostVolume } from './render-domain.js';

/** What the reconciler works with. */
export interface ReconcilerDeps {
  hostId: string;
  box: BoxKeyPair;
  libvirt: Libvirt;
  images: ImagePort;
  dmcrypt: DmCryptPort;
  cache: KeyCache;
  /** Directory of the image files (shared storage for moves). */
  imageDir: string;
  logger: Logger;
}


const sha256 = (s: string) => createHash('sha256').update(s).digest();

/** The image path of a volume on this host. */
export function imagePath(imageDir: string, volumeId: string, format: AgentVolumeFormat): string {
  return join(imageDir, `${volumeId}.${format === 'qcow2-luks' ? 'qcow2' : 'img'}`);
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
  return { ...d, guests: d.guests.map((g) => ({ ...g, volumes: g.volumes.map((v) => ({ ...v, packet: undefined })) })) };
}

/** Opens the key packets of a desired state; packets for another host or volume are refused. */
export function openPackets(desired: DesiredState, deps: Pick<ReconcilerDeps, 'box' | 'hostId' | 'logger'>): Map<string, Uint8Array> {
  const keys = new Map<string, Uint8Array>();
  for (const g of desired.guests) {
    for (const v of g.volumes) {
      if (!v.packet) continue;
      let plain: Uint8Array | undefined;
      try {
        plain = openSealed(v.packet.sealed, deps.box);
        const p = KeyPacket.decode(plain);
        if (p.type !== 'virtkm.keypacket.v1' || p.hostId !== deps.hostId || p.volumeId !== v.volumeId || p.keyVersion !== v.keyVersion) {
          wipe(p.secret);
          deps.logger.warn('key packet refused: it names another host, volume or version', { volume_id: v.volumeId });
          continue;
        }
        keys.set(`${v.volumeId}:${v.keyVersion}`, ownedCopy(p.secret));
        wipe(p.secret);
      } catch (err) {
        deps.logger.warn('key packet does not open', { volume_id: v.volumeId, ...describeError(err) });
      } finally {
        wipe(plain);
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
  const dmReason = await dmcrypt.unavailableReason();
  // Only what this host's agent made: another agent may share the libvirtd (tests, or a
  // host enrolled twice) and its domains and secrets are not ours to touch.
  const domainList = (await libvirt.domains.list()).filter((d) => d.marker === undefined || d.marker.hostId === deps.hostId);

  try {
    // Secrets first, for every volume whose key is here: libvirt holds what guests need
    // moments after a (re)start; the slower image checks below then decide whether a guest
    // is defined and started, and secrets of volumes that fail them are removed at the end.
    const secretsSet = new Set<string>();
    for (const g of desired.guests) {
      for (const dv of g.volumes) {
        const format = formatFromApiValue(dv.format);
        const secret = packets.get(`${dv.volumeId}:${dv.keyVersion}`) ?? cache.get(dv.volumeId, dv.keyVersion);
        const uuid = secretUuidFor(dv.volumeId, dv.keyVersion, sha256);
        if ((format !== 'luks' && format !== 'qcow2-luks') || !secret || secretsSet.has(uuid)) continue;
        try {
          await defineSecret(libvirt, deps.hostId, uuid, dv.volumeId, dv.name, dv.keyVersion, secret);
          secretsSet.add(uuid);
        } catch (err) {
          logger.warn('defining a secret failed', { volume_id: dv.volumeId, ...describeError(err) });
        }
      }
    }
    for (const g of desired.guests) {
      const hostVolumes: HostVolume[] = [];
      let blocked = '';
      // Whether what blocks the guest is a failure (fail closed) or only a missing key.
      let fatal = false;
      for (const dv of g.volumes) {
        const format = formatFromApiValue(dv.format);
        const status: VolumeStatus = { volumeId: dv.volumeId, keyVersion: dv.keyVersion, phase: VolumePhase.VOLUME_PHASE_PENDING, reason: '', created: false };
        volumes.push(status);
        const tag = `${dv.volumeId}:${dv.keyVersion}`;
        const secret = packets.get(tag) ?? cache.get(dv.volumeId, dv.keyVersion);
        if (!format) {
          status.phase = VolumePhase.VOLUME_PHASE_FAILED;
          status.reason = 'unknown volume format';
          blocked ||= status.reason;
          fatal = true;
          continue;
        }
        if (!secret) {
          status.reason = 'no key yet';
          blocked ||= `volume ${dv.name}: no key yet`;
          continue;
        }
        let kept = keep.find((k) => k.volumeId === dv.volumeId && k.keyVersion === dv.keyVersion);
        if (kept) kept.guestIds.push(g.guestId);
        else keep.push((kept = { volumeId: dv.volumeId, keyVersion: dv.keyVersion, guestIds: [g.guestId], secret: ownedCopy(secret) }));
        const spec: ImageSpec = {
          path: imagePath(deps.imageDir, dv.volumeId, format),
          format,
          sizeBytes: dv.sizeBytes,
          cipher: dv.cipher?.cipher ?? 'aes-xts-plain64',
          // Unexpected values are refused by the image layer's own spec check.
          keySizeBits: (dv.cipher?.keySizeBits ?? 512) as ImageSpec['keySizeBits'],
          sectorSize: (dv.cipher?.sectorSize ?? 512) as ImageSpec['sectorSize'],
        };
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
            await images.create(spec, secret);
            status.created = true;
            const made = (await images.inspect(spec.path)).uuid;
            if (made) kept.verifiedHeader = made;
            logger.info('image created', { volume_id: dv.volumeId, format });
          } else if (info.kind !== expectedKind(format)) {
            // Never overwrite, never treat an encrypted image as raw.
            status.phase = VolumePhase.VOLUME_PHASE_FAILED;
            status.reason = `image is ${info.kind}, expected ${expectedKind(format)}`;
            blocked ||= `volume ${dv.name}: ${status.reason}`;
            fatal = true;
            continue;
          } else if (format !== 'plain') {
            const known = info.uuid !== undefined && cache.verifiedHeader(dv.volumeId, dv.keyVersion) === info.uuid;
            if (!known && !(await images.testKey(spec.path, spec, secret))) {
              status.phase = VolumePhase.VOLUME_PHASE_WRONG_KEY;
              status.reason = 'the key does not open the image';
              blocked ||= `volume ${dv.name}: wrong key`;
              fatal = true;
              continue;
            }
            if (info.uuid) kept.verifiedHeader = info.uuid;
          }
          let path = spec.path;
          const secretUuid = secretUuidFor(dv.volumeId, dv.keyVersion, sha256);
          if (format === 'luks' || format === 'qcow2-luks') {
            if (!secretsSet.has(secretUuid)) await defineSecret(libvirt, deps.hostId, secretUuid, dv.volumeId, dv.name, dv.keyVersion, secret);
            neededSecrets.add(secretUuid);
          } else if (dmReason) {
            status.phase = VolumePhase.VOLUME_PHASE_FAILED;
            status.reason = `dm-crypt unavailable: ${dmReason}`;
            blocked ||= `volume ${dv.name}: ${status.reason}`;
            fatal = true;
            continue;
          } else if (offline ? g.autostart && g.run : g.run) {
            path = await dmcrypt.open(spec, mappingName(dv.volumeId), secret);
            neededMappings.add(mappingName(dv.volumeId));
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
      guests.push(await reconcileGuest(g, hostVolumes, blocked, fatal, domainList, deps, offline));
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
        if (info.kind !== 'missing' && info.kind !== expectedKind(format)) {
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
    // The cache keeps exactly the keys of desired volumes (dropped ones are wiped) and the
    // desired state itself without key packets, for starting guests while offline.
    if (!offline) cache.replace(keep, DesiredState.encode(withoutPackets(desired)).finish());
  } finally {
    for (const k of packets.values()) wipe(k);
    if (offline) for (const k of keep) wipe(k.secret);
  }
  return { revision: desired.revision, guests, volumes, deletedImages, rotations: [] };
}

/** The end of the description of every secret this host's agent defines. */
export function secretOwnerTag(hostId: string): string {
  return ` host ${hostId}`;
}

/** Defines a volume's private, ephemeral libvirt secret and sets its value. */
async function defineSecret(libvirt: Libvirt, hostId: string, uuid: string, volumeId: string, name: string, keyVersion: number, secret: Uint8Array): Promise<void> {
  await libvirt.secrets.define({ uuid, volumeId, description: `virtkm volume ${name} key v${keyVersion}${secretOwnerTag(hostId)}` });
  // libvirt hands the value to QEMU, which wants the same hex passphrase the image was made
  // with (see images/passphrase.ts).
  const passphrase = luksPassphrase(secret);
  try {
    await libvirt.secrets.setValue(uuid, passphrase);
  } finally {
    wipe(passphrase);
  }
}

async function reconcileGuest(g: DesiredGuest, vols: HostVolume[], blocked: string, fatal: boolean, domains: Awaited<ReturnType<Libvirt['domains']['list']>>, deps: ReconcilerDeps, offline: boolean): Promise<GuestStatus> {
  const { libvirt, logger } = deps;
  const status: GuestStatus = { guestId: g.guestId, generation: g.generation, phase: GuestPhase.GUEST_PHASE_PENDING, reason: '' };
  const existing = domains.find((d) => d.marker?.guestId === g.guestId);
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
    if (!existing || BigInt(existing.marker?.generation ?? -1) !== g.generation || existing.name !== g.name) {
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
