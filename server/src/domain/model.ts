/**
 * Plain records of the server's domain. Storage adapters read and write these; services
 * translate them to and from API messages. No I/O here.
 */

import type { VolumeFormatName } from '../../../shared/src/formats.js';

/** How a volume is encrypted on the host (API enum VolumeFormat); raw and qcow2: not at all. */
export type { VolumeFormatName };
/** Life-cycle state of one version of a volume's secret. */
export type KeyStateName = 'pending' | 'active' | 'retired' | 'destroyed';
/** The role a client certificate names. */
export type RoleName = 'admin' | 'frontend' | 'host';
/** Enrollment state of a host. */
export type HostStateName = 'enrolled' | 'revoked';

/** A managed volume. Holds no secret. */
export interface VolumeRecord {
  id: string;
  name: string;
  sizeBytes: bigint;
  format: VolumeFormatName;
  cipher: string;
  keySizeBits: number;
  sectorSize: number;
  /** The version hosts use now; 0 for an unencrypted volume (raw, qcow2), which has no key. */
  activeVersion: number;
  createdAt: string;
}

/** One version of a volume's secret; `sealed` is the envelope, null once destroyed. */
export interface KeyVersionRecord {
  volumeId: string;
  version: number;
  state: KeyStateName;
  sealed: Uint8Array | null;
  createdAt: string;
  /** When it stopped being active; null while pending or active. */
  retiredAt?: string | null;
  /** When a retired version is (or was) destroyed; null when not scheduled. */
  destroyAfter?: string | null;
}

/**
 * What a rotation does: a new keyslot passphrase, a new data key (all blocks rewritten),
 * encrypting an unencrypted volume (raw -> luks, qcow2 -> qcow2-luks) or decrypting one
 * (the reverse).
 */
export type RotationKindName = 'rekey' | 'reencrypt' | 'encrypt' | 'decrypt';
/** Life-cycle state of a rotation. */
export type RotationStateName = 'queued' | 'running' | 'done' | 'failed';

/** One replacement of a volume's key. */
export interface RotationRecord {
  id: string;
  volumeId: string;
  kind: RotationKindName;
  state: RotationStateName;
  /** "manual", "scheduled", "move", "compromise" or an admin's text. */
  reason: string;
  /** Higher goes first (compromise 100, manual 50, move 20, scheduled 10). */
  priority: number;
  /** Deadline (after-move window), or null. */
  dueAt: string | null;
  /** 0 when encrypting (no key before). */
  fromVersion: number;
  /** 0 while queued, and for a decryption (no key after). */
  toVersion: number;
  /** The host doing it, or null while queued. */
  hostId: string | null;
  step: string;
  bytesDone: number;
  bytesTotal: number;
  bytesPerSecond: number;
  error: string;
  mechanism: string;
  requestedBy: string;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
}

/** Scope of a rotation policy. */
export type PolicyScope = 'global' | 'guest' | 'volume';

/** When the keys of a scope must be replaced. */
export interface RotationPolicyRecord {
  scope: PolicyScope;
  /** Guest or volume id; "" for global. */
  targetId: string;
  /** 0: no age limit. */
  maxKeyAgeSeconds: number;
  kind: RotationKindName;
  /** 0: no re-encryption after a move. */
  reencryptAfterMoveSeconds: number;
  updatedAt: string;
}

/** A guest (libvirt domain) and its placement. */
export interface GuestRecord {
  id: string;
  name: string;
  domainXml: string;
  /** Host id, or null when not placed. */
  hostId: string | null;
  autostart: boolean;
  createdAt: string;
  updatedAt: string;
  /** Increases with every change of desired state. */
  generation: number;
  /** Volume ids in the order given at definition. */
  volumeIds: string[];
  /** While a move hands the guest over: the host it leaves, wiped once the new host confirms. */
  handoffFromHostId: string | null;
}

/** An enrolled (or revoked) libvirt host. */
export interface HostRecord {
  id: string;
  name: string;
  state: HostStateName;
  /** Raw X25519 public key that key packets are sealed to. */
  boxPublicKey: Uint8Array;
  /** Serial (hex) of the host's current certificate. */
  certSerial: string;
  enrolledAt: string;
  revokedAt: string | null;
  lastSeenAt: string | null;
  /** Increases whenever the host's desired state changes (guests placed on it, keys). */
  desiredRevision: number;
}

/** What a host last reported about a guest. */
export interface GuestStatusRecord {
  guestId: string;
  hostId: string;
  generation: number;
  /** pending, defined, running, stopped, failed, wiped. */
  phase: string;
  reason: string;
  reportedAt: string;
}

/** What a host last reported about a volume. */
export interface VolumeStatusRecord {
  volumeId: string;
  hostId: string;
  keyVersion: number;
  /** pending, ready, missing, wrong_key, failed, wiped. */
  phase: string;
  reason: string;
  reportedAt: string;
}

/** A one-time enrollment token. Only a hash of its secret part is stored. */
export interface EnrollmentTokenRecord {
  id: string;
  hostName: string;
  /** SHA-256 of the token's secret part. */
  secretHash: Uint8Array;
  createdAt: string;
  expiresAt: string;
  usedAt: string | null;
  createdBy: string;
}

/** A certificate issued by the internal CA. */
export interface CertificateRecord {
  /** Lower-case hex serial. */
  serial: string;
  role: RoleName;
  /** Principal name (the certificate's CN). */
  name: string;
  issuedAt: string;
  expiresAt: string;
  revokedAt: string | null;
}

/** What a caller appends to the audit log. */
export interface AuditEntryInput {
  /** "<role>:<name>" or "server". */
  actor: string;
  /** Dotted action name, e.g. "volume.create", "key.release", "key.refuse". */
  action: string;
  target: string;
  outcome: 'ok' | 'denied' | 'failed';
  /** Non-secret details; serialised as canonical JSON. */
  detail?: Record<string, string | number | boolean | null>;
}

/** A stored audit event with its place in the hash chain. */
export interface AuditRecord {
  seq: number;
  time: string;
  actor: string;
  action: string;
  target: string;
  outcome: string;
  /** Canonical JSON of the detail object ("{}" when none). */
  detailJson: string;
  /** Hex SHA-256 of the previous event (64 zeros for the first). */
  prevHash: string;
  /** Hex SHA-256 over prevHash and this event's fields; see audit/chain.ts. */
  hash: string;
}

/** A page of results and the token for the next one ("" at the end). */
export interface Page<T> {
  items: T[];
  nextPageToken: string;
}
