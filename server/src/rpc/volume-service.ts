/**
 * VolumeService: create, show, list and crypto-shred volumes. Thin: validation lives in
 * domain/, secrets in the key vault, persistence in the store.
 */
import { randomUUID } from 'node:crypto';
import type { VolumeServiceServer } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import type { VolumeRecord } from '../domain/model.js';
import { checkName, checkSize, compileCipherSpec, isUnencryptedFormat, pageSize, secretLength } from '../domain/volume-spec.js';
import type { KeyVault } from '../vault/key-vault.js';
import { actorOf } from './auth.js';
import { formatFromApi, volumeToApi } from './convert.js';
import { unary, type RpcContext } from './handler.js';
import { resolveVolume } from './resolve.js';
import { rotationToApi } from './rotation-service.js';

/** Dependencies of the volume service. */
export interface VolumeServiceDeps extends RpcContext {
  vault: KeyVault;
  clock: Clock;
}

const ROLES = ['admin', 'frontend'] as const;

/** Creates the grpc-js implementation of VolumeService. */
export function createVolumeService(deps: VolumeServiceDeps): VolumeServiceServer {
  const { store, vault, clock } = deps;
  const show = (v: VolumeRecord) => volumeToApi(v, store.getKeyVersions(v.id), store.guestNamesOfVolume(v.id));
  return {
    createVolume: unary(deps, 'CreateVolume', ROLES, async (req, p) => {
      const name = checkName('volume', req.name);
      const format = formatFromApi(req.format);
      const spec = compileCipherSpec(format, req.cipher ?? {});
      const sizeBytes = checkSize(req.sizeBytes, spec.sectorSize);
      const id = randomUUID();
      const now = clock.now().toISOString();
      // An unencrypted volume (raw, qcow2) has no secret and no key version at all; its
      // cipher is kept for the day it is encrypted.
      const encrypted = !isUnencryptedFormat(format);
      const sealed = encrypted ? vault.newSealedSecret(id, 1, secretLength(format, spec)) : undefined;
      const volume: VolumeRecord = { id, name, sizeBytes, format, cipher: spec.cipher, keySizeBits: spec.keySizeBits, sectorSize: spec.sectorSize, activeVersion: encrypted ? 1 : 0, createdAt: now };
      await store.write((tx) => {
        tx.insertVolume(volume);
        if (sealed) tx.insertKeyVersion({ volumeId: id, version: 1, state: 'active', sealed, createdAt: now });
        tx.appendAudit({ actor: actorOf(p), action: 'volume.create', target: id, outcome: 'ok', detail: { name, format, size: sizeBytes.toString(), cipher: spec.cipher, key_size_bits: spec.keySizeBits, encrypted } });
      });
      return { volume: show(volume) };
    }),
    getVolume: unary(deps, 'GetVolume', ROLES, (req) => {
      const v = resolveVolume(store, req.volume);
      const latest = store.latestRotationOfVolume(v.id);
      return { volume: show(v), rotation: latest ? rotationToApi(latest, store) : undefined };
    }),
    listVolumes: unary(deps, 'ListVolumes', ROLES, (req) => {
      const page = store.listVolumes({
        pageSize: pageSize(req.page?.pageSize ?? 0),
        pageToken: req.page?.pageToken ?? '',
        ...(req.namePrefix ? { namePrefix: req.namePrefix } : {}),
        ...(req.format ? { format: formatFromApi(req.format) } : {}),
      });
      return { volumes: page.items.map(show), nextPageToken: page.nextPageToken };
    }),
    deleteVolume: unary(deps, 'DeleteVolume', ROLES, async (req, p) => {
      const v = resolveVolume(store, req.volume);
      await store.write((tx) => {
        // Checked inside the transaction so a concurrent DefineGuest cannot slip in between.
        const users = tx.guestNamesOfVolume(v.id);
        if (users.length > 0) {
          throw errors.precondition(`volume "${v.name}" is used by guest(s) ${users.slice(0, 5).join(', ')}`, { hint: 'delete or redefine those guests first' });
        }
        tx.deleteVolume(v.id);
        tx.appendAudit({ actor: actorOf(p), action: 'volume.delete', target: v.id, outcome: 'ok', detail: { name: v.name, crypto_shredded: true } });
      });
      return {};
    }),
  };
}
