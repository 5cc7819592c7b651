/**
 * The storage port of the server. The real adapter is SQLite (sqlite-store.ts); the
 * store sees only sealed secrets, never plaintext. Reads are synchronous; every write
 * goes through `write()`, which runs the unit inside a transaction shared with other
 * units queued at the same time (group commit) and resolves only once that transaction
 * is durable (synchronous=FULL). A unit that throws is rolled back alone (savepoint).
 */
import type {
  AuditEntryInput,
  AuditRecord,
  CertificateRecord,
  EnrollmentTokenRecord,
  GuestRecord,
  GuestStatusRecord,
  HostRecord,
  KeyVersionRecord,
  Page,
  PolicyScope,
  RotationPolicyRecord,
  RotationRecord,
  RotationStateName,
  VolumeFormatName,
  VolumeRecord,
  VolumeStatusRecord,
} from '../domain/model.js';

/** Filters and paging for listVolumes. */
export interface VolumeQuery {
  pageSize: number;
  /** Opaque token from a previous page, "" for the first. */
  pageToken: string;
  namePrefix?: string;
  format?: VolumeFormatName;
}

/** Filters and paging for listGuests. */
export interface GuestQuery {
  pageSize: number;
  pageToken: string;
  namePrefix?: string;
  hostId?: string;
}

/** Filters and paging for listAuditEvents. */
export interface AuditQuery {
  pageSize: number;
  pageToken: string;
  action?: string;
  target?: string;
  afterSeq?: number;
}

/** Filters and paging for listRotations (newest first). */
export interface RotationQuery {
  pageSize: number;
  pageToken: string;
  states?: RotationStateName[];
  volumeId?: string;
}

/** Result of verifying the audit hash chain. */
export interface AuditVerification {
  ok: boolean;
  eventsChecked: number;
  /** First event that does not verify (0 when ok). */
  firstBadSeq: number;
  /** What is wrong, e.g. "hash mismatch", "sequence gap", "prev_hash mismatch". */
  problem: string;
  headHash: string;
}

/** Read operations. Unknown ids return undefined, never throw. */
export interface StoreReader {
  getVolume(id: string): VolumeRecord | undefined;
  getVolumeByName(name: string): VolumeRecord | undefined;
  listVolumes(q: VolumeQuery): Page<VolumeRecord>;
  countVolumes(): number;
  getKeyVersions(volumeId: string): KeyVersionRecord[];
  /** The sealed secret of the volume's active version, or undefined. */
  getActiveKey(volumeId: string): KeyVersionRecord | undefined;
  /** Names of guests using the volume. */
  guestNamesOfVolume(volumeId: string): string[];

  getGuest(id: string): GuestRecord | undefined;
  getGuestByName(name: string): GuestRecord | undefined;
  listGuests(q: GuestQuery): Page<GuestRecord>;
  /**
   * True when a guest that uses the volume is placed on the host. This is the key-release
   * authorisation check: it must be one indexed query.
   */
  isVolumePlacedOnHost(volumeId: string, hostId: string): boolean;
  /**
   * The key-release hot path in one query: the volume and its active key version, only if
   * a guest using the volume is placed on the host (else undefined).
   */
  getReleasable(volumeId: string, hostId: string): { volume: VolumeRecord; key: KeyVersionRecord } | undefined;

  /** Guests placed on the host or being handed over from it, by name. */
  guestsForHost(hostId: string): GuestRecord[];
  /** What hosts reported about a guest (one row per host). */
  guestStatuses(guestId: string): GuestStatusRecord[];
  /** Image files the host must delete: volume id and format. */
  imageDeletionsForHost(hostId: string): { volumeId: string; format: VolumeFormatName }[];
  /** Whether some host has reported the volume's image ready. */
  isMaterialized(volumeId: string): boolean;
  /** What hosts reported about a volume (one row per host). */
  volumeStatuses(volumeId: string): VolumeStatusRecord[];

  getHost(id: string): HostRecord | undefined;
  getHostByName(name: string): HostRecord | undefined;
  listHosts(pageSize: number, pageToken: string): Page<HostRecord>;
  countGuestsOnHost(hostId: string): number;

  getEnrollmentToken(id: string): EnrollmentTokenRecord | undefined;
  getCertificate(serial: string): CertificateRecord | undefined;
  /**
   * A number that changes whenever a certificate or a host's identity, state or keys
   * change through this store (not for last_seen or the desired revision). Authentication
   * keeps a connection's checked principal until it changes (server/src/rpc/auth.ts). A
   * store shared by several servers must change it on every server (see docs/architecture.md).
   */
  credentialsGeneration(): number;
  /** Certificates of a role that are not revoked (expired ones included). */
  countActiveCertificates(role: string): number;

  listAuditEvents(q: AuditQuery): Page<AuditRecord>;
  verifyAuditLog(): AuditVerification;

  /** Small key/value settings (schema-independent metadata), e.g. "server.id". */
  getSetting(key: string): string | undefined;

  getRotation(id: string): RotationRecord | undefined;
  /** The volume's queued or running rotation (at most one). */
  openRotationOfVolume(volumeId: string): RotationRecord | undefined;
  /** The volume's newest rotation in any state. */
  latestRotationOfVolume(volumeId: string): RotationRecord | undefined;
  listRotations(q: RotationQuery): Page<RotationRecord>;
  runningRotationsOnHost(hostId: string): RotationRecord[];
  /** Queued rotations in dispatch order: priority, then deadline, then age. */
  queuedRotations(limit: number): RotationRecord[];
  /**
   * Volumes whose active key was created before `cutoff` and that have no open rotation,
   * oldest first; `after` continues from the last row of a previous page.
   */
  agedVolumes(cutoff: string, limit: number, after?: { keyCreatedAt: string; volumeId: string }): { volumeId: string; keyCreatedAt: string }[];
  /** Retired key versions whose destruction time has come. */
  retiredKeysDue(now: string, limit: number): { volumeId: string; version: number }[];
  getPolicy(scope: PolicyScope, targetId: string): RotationPolicyRecord | undefined;
  listPolicies(): RotationPolicyRecord[];
}

/** Write operations; only valid inside `Store.write`. Constraint violations throw DomainError. */
export interface StoreWriter extends StoreReader {
  insertVolume(v: VolumeRecord): void;
  /** Crypto-shred: deletes the volume, all its key versions and guest links. */
  deleteVolume(id: string): void;
  insertKeyVersion(k: KeyVersionRecord): void;
  setActiveVersion(volumeId: string, version: number): void;
  /** Encrypt/decrypt: the volume's format and active version (0: none) change together. */
  setVolumeFormat(volumeId: string, format: VolumeFormatName, activeVersion: number): void;

  /** Inserts or replaces a guest and its volume links. */
  upsertGuest(g: GuestRecord): void;
  deleteGuest(id: string): void;

  insertHost(h: HostRecord): void;
  updateHost(h: HostRecord): void;
  touchHost(id: string, lastSeenAt: string): void;
  /** Increments and returns the host's desired-state revision. */
  bumpHostRevision(id: string): number;
  /** Asks a host to delete a (crypto-shredded) volume's image file. */
  requestImageDeletion(volumeId: string, hostId: string, format: VolumeFormatName, at: string): void;
  /** Forgets deletion requests the host reported done. */
  completeImageDeletions(hostId: string, volumeIds: string[]): void;
  /** Records that volumes' images exist (first time only): agents may no longer create them. */
  markMaterialized(volumeIds: string[], at: string): void;
  /** Replaces everything the host reported with this report. */
  replaceHostReport(hostId: string, guests: GuestStatusRecord[], volumes: VolumeStatusRecord[]): void;

  insertEnrollmentToken(t: EnrollmentTokenRecord): void;
  /** Marks a token used; returns false when it was used already (single use). */
  consumeEnrollmentToken(id: string, usedAt: string): boolean;

  insertCertificate(c: CertificateRecord): void;
  revokeCertificate(serial: string, revokedAt: string): void;

  /** Appends to the hash-chained audit log in this same transaction. */
  appendAudit(e: AuditEntryInput): AuditRecord;

  setSetting(key: string, value: string): void;

  /**
   * Master key rotation (app/master-key-rotation.ts): passes every stored sealed secret
   * (each key version that still has one) to `rewrap` and stores what it returns
   * (undefined: unchanged), all inside this unit's transaction. Returns the number
   * rewritten. A throwing `rewrap` rolls the whole unit back.
   */
  rewrapSealedSecrets(rewrap: (volumeId: string, version: number, sealed: Uint8Array) => Uint8Array | undefined): number;

  /** already_exists when the volume has an open rotation. */
  insertRotation(r: RotationRecord): void;
  updateRotation(r: RotationRecord): void;
  /** Marks a key version retired, to be destroyed at destroyAfter (null: not scheduled). */
  retireKeyVersion(volumeId: string, version: number, retiredAt: string, destroyAfter: string | null): void;
  /** Erases a non-active version's sealed secret (crypto-shredding); false when there was none. */
  destroyKeyVersion(volumeId: string, version: number): boolean;
  upsertPolicy(p: RotationPolicyRecord): void;
  deletePolicy(scope: PolicyScope, targetId: string): boolean;
}

/** The storage port. */
export interface Store extends StoreReader {
  /** Runs fn in a (group-committed) transaction; resolves after it is durable. */
  write<T>(fn: (tx: StoreWriter) => T): Promise<T>;
  /** Flushes pending writes and closes the database. */
  close(): Promise<void>;
}
