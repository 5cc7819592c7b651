/**
 * Output of the CLI: human tables and JSON (bigints as strings), sizes.
 */
import { HostState, KeyState, VolumeFormat, type Guest, type Host, type Volume } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';

/** Names of VolumeFormat values on the command line. */
export const FORMAT_NAMES: Readonly<Record<string, VolumeFormat>> = {
  luks: VolumeFormat.VOLUME_FORMAT_LUKS,
  'qcow2-luks': VolumeFormat.VOLUME_FORMAT_QCOW2_LUKS,
  luks2: VolumeFormat.VOLUME_FORMAT_LUKS2,
  plain: VolumeFormat.VOLUME_FORMAT_PLAIN,
  // Unencrypted (no key); `volume encrypt` turns them into luks and qcow2-luks.
  raw: VolumeFormat.VOLUME_FORMAT_RAW,
  qcow2: VolumeFormat.VOLUME_FORMAT_QCOW2,
};

/** The command-line name of a format. */
export function formatName(f: VolumeFormat): string {
  return Object.entries(FORMAT_NAMES).find(([, v]) => v === f)?.[0] ?? 'unknown';
}

/** The lower-case name of a key state. */
export function keyStateName(s: KeyState): string {
  return KeyState[s]?.replace('KEY_STATE_', '').toLowerCase() ?? 'unknown';
}

/** The lower-case name of a host state. */
export function hostStateName(s: HostState): string {
  return HostState[s]?.replace('HOST_STATE_', '').toLowerCase() ?? 'unknown';
}

const UNITS: Record<string, bigint> = { '': 1n, b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n };

/** Parses "10G", "512MiB", "1048576" (binary units). */
export function parseSize(text: string): bigint {
  const m = /^(\d{1,20})\s*([kmgtb]?)(i?b)?$/i.exec(text.trim());
  const unit = m ? UNITS[(m[2] ?? '').toLowerCase()] : undefined;
  if (!m || unit === undefined) throw errors.invalid(`invalid size "${text.slice(0, 40)}"`, { hint: 'use bytes or a binary unit: 512M, 10G, 1T' });
  return BigInt(m[1] as string) * unit;
}

/** Formats bytes with a binary unit. */
export function formatSize(bytes: bigint): string {
  for (const [u, v] of [['T', 1n << 40n], ['G', 1n << 30n], ['M', 1n << 20n], ['K', 1n << 10n]] as const) {
    if (bytes >= v && bytes % v === 0n) return `${bytes / v}${u}iB`;
  }
  return `${bytes}B`;
}

/** JSON with bigints as decimal strings and enums by name. */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), 2);
}

/** A left-aligned text table. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n') + '\n';
}

/** A volume as plain JSON-friendly data. */
export function volumeView(v: Volume) {
  return {
    id: v.id,
    name: v.name,
    size_bytes: v.sizeBytes.toString(),
    format: formatName(v.format),
    cipher: v.cipher?.cipher ?? '',
    key_size_bits: v.cipher?.keySizeBits ?? 0,
    sector_size: v.cipher?.sectorSize ?? 0,
    active_key_version: v.activeKeyVersion,
    key_versions: v.keyVersions.map((k) => ({ version: k.version, state: keyStateName(k.state), created_at: k.createdAt, retired_at: k.retiredAt, destroy_after: k.destroyAfter })),
    guests: v.guestNames,
    created_at: v.createdAt,
  };
}

/** A guest as plain data; the XML only when asked. */
export function guestView(g: Guest, withXml: boolean) {
  return {
    id: g.id,
    name: g.name,
    host: g.host,
    autostart: g.autostart,
    volume_ids: g.volumeIds,
    generation: g.generation.toString(),
    phase: g.phase,
    phase_reason: g.phaseReason,
    reported_at: g.reportedAt,
    handoff_from: g.handoffFrom,
    volume_reports: g.volumeReports.map((r) => ({ volume_id: r.volumeId, host: r.host, phase: r.phase, key_version: r.keyVersion, reason: r.reason, reported_at: r.reportedAt })),
    created_at: g.createdAt,
    updated_at: g.updatedAt,
    ...(withXml ? { domain_xml: g.domainXml } : {}),
  };
}

/** A host as plain data. */
export function hostView(h: Host) {
  return {
    id: h.id,
    name: h.name,
    state: hostStateName(h.state),
    enrolled_at: h.enrolledAt,
    revoked_at: h.revokedAt,
    last_seen_at: h.lastSeenAt,
    guests: h.guestCount,
    connected: h.connected,
    agent_version: h.agentVersion,
    desired_revision: h.desiredRevision.toString(),
    applied_revision: h.appliedRevision.toString(),
    box_key_sha256: h.boxKeyFingerprint,
  };
}
