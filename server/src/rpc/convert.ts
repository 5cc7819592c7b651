/**
 * Records to API messages and API enums to domain names. No I/O.
 */
import { HostState, KeyState, Role, VolumeFormat, type Guest, type Host, type Volume } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import type { HostConnection } from '../agent/agent-hub.js';
import type { GuestRecord, GuestStatusRecord, HostRecord, VolumeStatusRecord, KeyStateName, KeyVersionRecord, RoleName, VolumeFormatName, VolumeRecord } from '../domain/model.js';
import { FORMAT_TO_API } from '../../../shared/src/formats.js';
import { createHash } from 'node:crypto';

const KEY_STATE_TO_API: Readonly<Record<KeyStateName, KeyState>> = {
  pending: KeyState.KEY_STATE_PENDING,
  active: KeyState.KEY_STATE_ACTIVE,
  retired: KeyState.KEY_STATE_RETIRED,
  destroyed: KeyState.KEY_STATE_DESTROYED,
};

/** API VolumeFormat to the domain name; unspecified or unknown values are invalid. */
export function formatFromApi(f: VolumeFormat): VolumeFormatName {
  switch (f) {
    case VolumeFormat.VOLUME_FORMAT_LUKS:
      return 'luks';
    case VolumeFormat.VOLUME_FORMAT_QCOW2_LUKS:
      return 'qcow2-luks';
    case VolumeFormat.VOLUME_FORMAT_LUKS2:
      return 'luks2';
    case VolumeFormat.VOLUME_FORMAT_PLAIN:
      return 'plain';
    case VolumeFormat.VOLUME_FORMAT_RAW:
      return 'raw';
    case VolumeFormat.VOLUME_FORMAT_QCOW2:
      return 'qcow2';
    default:
      throw errors.invalid('unknown or unspecified volume format', { hint: 'formats: luks, qcow2-luks, luks2, plain, raw, qcow2 (unencrypted)' });
  }
}

/** API Role to the domain name for issuing credentials (admin or frontend only). */
export function credentialRoleFromApi(r: Role): RoleName {
  if (r === Role.ROLE_ADMIN) return 'admin';
  if (r === Role.ROLE_FRONTEND) return 'frontend';
  if (r === Role.ROLE_HOST) throw errors.invalid('host credentials are issued by enrollment', { hint: 'use `virtkm host token create`' });
  throw errors.invalid('unknown or unspecified role');
}

/** A volume as the API shows it. */
export function volumeToApi(v: VolumeRecord, keys: KeyVersionRecord[], guestNames: string[]): Volume {
  return {
    id: v.id,
    name: v.name,
    sizeBytes: v.sizeBytes,
    format: FORMAT_TO_API[v.format],
    cipher: { cipher: v.cipher, keySizeBits: v.keySizeBits, sectorSize: v.sectorSize },
    activeKeyVersion: v.activeVersion,
    keyVersions: keys.map((k) => ({ version: k.version, state: KEY_STATE_TO_API[k.state], createdAt: k.createdAt, retiredAt: k.retiredAt ?? '', destroyAfter: k.destroyAfter ?? '' })),
    createdAt: v.createdAt,
    guestNames,
  };
}

/** What guestToApi reads besides the guest. */
export interface GuestViewSource {
  getHost(id: string): HostRecord | undefined;
  guestStatuses(guestId: string): GuestStatusRecord[];
  volumeStatuses(volumeId: string): VolumeStatusRecord[];
}

/** A guest as the API shows it, with what its host last reported. */
export function guestToApi(g: GuestRecord, src: GuestViewSource): Guest {
  const hostName = (id: string | null) => (id === null ? '' : (src.getHost(id)?.name ?? ''));
  const status = g.hostId === null ? undefined : src.guestStatuses(g.id).find((s) => s.hostId === g.hostId);
  return {
    id: g.id,
    name: g.name,
    domainXml: g.domainXml,
    volumeIds: g.volumeIds,
    host: hostName(g.hostId),
    autostart: g.autostart,
    createdAt: g.createdAt,
    updatedAt: g.updatedAt,
    generation: BigInt(g.generation),
    phase: status?.phase ?? '',
    phaseReason: status?.reason ?? '',
    reportedAt: status?.reportedAt ?? '',
    volumeReports: g.volumeIds.flatMap((id) =>
      src.volumeStatuses(id).map((v) => ({ volumeId: id, host: hostName(v.hostId), phase: v.phase, keyVersion: v.keyVersion, reason: v.reason, reportedAt: v.reportedAt })),
    ),
    handoffFrom: hostName(g.handoffFromHostId),
  };
}

/** A host as the API shows it. */
export function hostToApi(h: HostRecord, guestCount: number, conn: HostConnection): Host {
  return {
    id: h.id,
    name: h.name,
    state: h.state === 'enrolled' ? HostState.HOST_STATE_ENROLLED : HostState.HOST_STATE_REVOKED,
    enrolledAt: h.enrolledAt,
    revokedAt: h.revokedAt ?? '',
    boxKeyFingerprint: createHash('sha256').update(h.boxPublicKey).digest('hex'),
    lastSeenAt: h.lastSeenAt ?? '',
    guestCount,
    connected: conn.connected,
    agentVersion: conn.agentVersion,
    desiredRevision: BigInt(h.desiredRevision),
    appliedRevision: BigInt(conn.appliedRevision),
  };
}
