/**
 * SQLite adapter of the Store port (better-sqlite3, synchronous API).
 *
 * Durability and confidentiality settings: WAL journal, a write resolves only once it is
 * durable (see "durability" below), foreign keys on, secure_delete on (deleted sealed
 * secrets are overwritten with zeros in the file: crypto-shredding), temporary data kept
 * in memory, the database file created with mode 0600.
 *
 * Writes use group commit: units queued during one event-loop turn run on the next turn
 * inside ONE `BEGIN IMMEDIATE ... COMMIT`, each in its own SAVEPOINT so that a failing
 * unit is rolled back alone. One fsync is shared by the whole batch, which is what makes
 * thousands of audited key releases per second possible.
 *
 * Durability, two modes with the same guarantee (docs/architecture.md):
 * - 'full-sync': synchronous=FULL, SQLite fsyncs the WAL inside every COMMIT, on the event
 *   loop (it blocks the whole server for the length of one disk flush per batch).
 * - 'async-wal-sync' (default): synchronous=NORMAL, which in WAL mode is FULL minus the
 *   per-commit sync of the WAL file (NORMAL still syncs the WAL before and the database
 *   after every checkpoint), plus that missing sync done by the store itself: an
 *   fdatasync of the -wal file on libuv's thread pool after the COMMIT, and the batch's
 *   promises resolve only once an fdatasync that STARTED after their COMMIT has
 *   completed. Batches pipeline: the next batch may commit while the previous one's sync
 *   is in flight; one sync at a time, each covering everything committed before it
 *   started (the WAL is appended in commit order, and fdatasync covers the whole file).
 *   A failed sync leaves the file in an unknown state (a later fsync may "succeed"
 *   without the lost pages ever reaching the disk), so the store then rejects the
 *   waiting units and refuses every further write until the server is restarted.
 *   Batches are small in this mode (8 units by default): the units that arrived in one
 *   turn commit as several batches in a row, so the first ones are acknowledged (their
 *   replies go out) while the later ones still commit. The callers, often one client with
 *   many calls in flight, then work in parallel with the server instead of in turns; the
 *   syncs still coalesce. In full-sync mode, where every COMMIT blocks the loop for one
 *   disk flush, batches are large (256): measured in docs/benchmarks.md (issue 2).
 *
 * The store owns its database file: one process, one connection. Reads are served from
 * the same connection; they never observe a half-run batch because batches run
 * synchronously within one turn of the event loop. In the async mode a read may observe a
 * batch that is committed but not yet durable (its writers are still waiting); anything
 * that acts on such a read through a write of its own (a key release and its audit entry)
 * is acknowledged only once that later write is durable, which implies the earlier one is.
 */
import fs from 'node:fs';
import { basename, dirname, join as pathJoin } from 'node:path';

import Database from 'better-sqlite3';

import { fdatasyncFd } from '../../../shared/src/durable-fs.js';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { describeError, silentLogger } from '../../../shared/src/log.js';
import type { Logger } from '../../../shared/src/log.js';
import { GENESIS_HASH, auditHash, canonicalJson, verifyChain } from '../audit/chain.js';
import type {
  AuditEntryInput,
  AuditRecord,
  CertificateRecord,
  EnrollmentTokenRecord,
  GuestRecord,
  GuestStatusRecord,
  VolumeStatusRecord,
  HostRecord,
  KeyVersionRecord,
  Page,
  PolicyScope,
  RotationPolicyRecord,
  RotationRecord,
  VolumeFormatName,
  VolumeRecord,
} from '../domain/model.js';
import { clampPageSize, sqliteCode, decodeNameToken, decodeSeqToken, encodePageToken, nameRange, run, toPage, type NameUpperBound } from './sqlite-util.js';
import { LATEST_SCHEMA_VERSION, MIGRATIONS, SCHEMA_MIGRATIONS_DDL, assertMigrationsWellFormed } from './migrations.js';
import type { AuditQuery, AuditVerification, GuestQuery, RotationQuery, Store, StoreWriter, VolumeQuery } from './ports.js';
import { SqliteRotationTables, retirementOf } from './sqlite-rotations.js';

/** Test seams. Never set in production code. */
export interface SqliteStoreTestHooks {
  /** Called inside the batch transaction just before COMMIT; throwing simulates a failed COMMIT. */
  beforeCommit?: () => void;
}

/** Options of openSqliteStore. */
export interface SqliteStoreOptions {
  /** Database file (created 0600 if missing), or ":memory:" for a throw-away store in tests. */
  path: string;
  /** Default: a silent logger. */
  logger?: Logger;
  /** Most units per transaction (default 8 with async-wal-sync, 256 with full-sync). */
  maxBatch?: number;
  /** Clock for audit timestamps (default: system clock). */
  now?: () => Date;
  /**
   * Hold an exclusive lock on the database for as long as the store is open, so a second
   * server on the same data directory refuses to start (the kernel drops the lock if the
   * process dies). The server sets this; tools that read the file alongside must not.
   */
  exclusive?: boolean;
  /**
   * How a COMMIT is made durable before its units resolve (module comment): 'full-sync' =
   * synchronous=FULL, the fsync inside COMMIT on the event loop; 'async-wal-sync'
   * (default) = synchronous=NORMAL plus an fdatasync of the -wal file on the thread pool.
   * Same guarantee; the first is the fallback if the second is ever in doubt.
   */
  durability?: SqliteDurability;
  /**
   * The fdatasync of the async mode, given the -wal file's descriptor (default: node:fs
   * fdatasync on libuv's thread pool). Tests inject a controllable or failing one.
   */
  syncWal?: (fd: number) => Promise<void>;
  /** Testing only. */
  hooks?: SqliteStoreTestHooks;
}

/** See SqliteStoreOptions.durability. */
export type SqliteDurability = 'full-sync' | 'async-wal-sync';
/** Every durability mode, the default first. */
export const SQLITE_DURABILITIES: readonly SqliteDurability[] = ['async-wal-sync', 'full-sync'];

/** Counters of the write path, for tests and metrics. */
export interface SqliteStoreStats {
  /** Transactions committed. */
  commits: number;
  /** Units that ran (committed or rolled back). */
  units: number;
  /** Units rolled back alone because they threw. */
  failedUnits: number;
  /** Batches whose transaction failed as a whole (all their units rejected). */
  failedBatches: number;
  /** WAL fdatasyncs completed by the store (async-wal-sync mode; 0 in full-sync mode). */
  walSyncs: number;
  /** Of those, the ones that took SLOW_SYNC_MS or longer (each delayed every reply waiting on it). */
  slowWalSyncs: number;
  /** The longest WAL fdatasync so far, ms. */
  maxWalSyncMs: number;
}

/** A WAL fdatasync this long or longer is logged (rate-limited) and counted as slow. */
const SLOW_SYNC_MS = 50;
/** At most one "slow WAL fdatasync" log line per this many ms. */
const SLOW_SYNC_LOG_INTERVAL_MS = 10_000;

/**
 * The SQLite store. Units given to `write` MUST be synchronous functions: the transaction
 * is open only while the unit runs, so a unit that returns a Promise is rolled back and
 * rejected with a TypeError, and the writer refuses use after the unit returned.
 */
export interface SqliteStore extends Store {
  /** Snapshot of the write counters. */
  stats(): SqliteStoreStats;
  /** Schema version of the open database. */
  readonly schemaVersion: number;
  /** The durability mode and the connection's settings behind it (diagnostics, tests). */
  durabilitySettings(): { durability: SqliteDurability; journalMode: string; synchronous: 'off' | 'normal' | 'full' | 'extra' };
}

/** Most units per batch by durability mode (see the file comment and docs/benchmarks.md). */
const DEFAULT_MAX_BATCH: Readonly<Record<SqliteDurability, number>> = { 'async-wal-sync': 8, 'full-sync': 256 };
const BUSY_TIMEOUT_MS = 5000;
const MAX_INT64 = 2n ** 63n - 1n;

// ---------------------------------------------------------------------------------------
// Row shapes (snake_case as in the schema)

interface VolumeRow {
  id: string;
  name: string;
  size_bytes: bigint;
  format: string;
  cipher: string;
  key_size_bits: bigint;
  sector_size: bigint;
  active_version: bigint;
  created_at: string;
}

interface KeyVersionRow {
  volume_id: string;
  version: number;
  state: string;
  sealed: Buffer | null;
  created_at: string;
  retired_at?: string | null;
  destroy_after?: string | null;
}

interface GuestRow {
  id: string;
  name: string;
  domain_xml: string;
  host_id: string | null;
  autostart: number;
  created_at: string;
  updated_at: string;
  generation: number;
  handoff_from_host_id: string | null;
}

interface HostRow {
  id: string;
  name: string;
  state: string;
  box_public_key: Buffer;
  cert_serial: string;
  enrolled_at: string;
  revoked_at: string | null;
  last_seen_at: string | null;
  desired_revision: number;
}

interface GuestStatusRow {
  guest_id: string;
  host_id: string;
  generation: number;
  phase: string;
  reason: string;
  reported_at: string;
}

interface VolumeStatusRow {
  volume_id: string;
  host_id: string;
  key_version: number;
  phase: string;
  reason: string;
  reported_at: string;
}

interface TokenRow {
  id: string;
  host_name: string;
  secret_hash: Buffer;
  created_at: string;
  expires_at: string;
  used_at: string | null;
  created_by: string;
}

interface CertificateRow {
  serial: string;
  role: string;
  name: string;
  issued_at: string;
  expires_at: string;
  revoked_at: string | null;
}

interface AuditRow {
  seq: number;
  time: string;
  actor: string;
  action: string;
  target: string;
  outcome: string;
  detail_json: string;
  prev_hash: string;
  hash: string;
}


const VOLUME_COLS = 'id, name, size_bytes, format, cipher, key_size_bits, sector_size, active_version, created_at';
const KEY_COLS = 'volume_id, version, state, sealed, created_at';
const GUEST_COLS = 'id, name, domain_xml, host_id, autostart, created_at, updated_at, generation, handoff_from_host_id';
const HOST_COLS = 'id, name, state, box_public_key, cert_serial, enrolled_at, revoked_at, last_seen_at, desired_revision';
const TOKEN_COLS = 'id, host_name, secret_hash, created_at, expires_at, used_at, created_by';
const CERT_COLS = 'serial, role, name, issued_at, expires_at, revoked_at';
const AUDIT_COLS = 'seq, time, actor, action, target, outcome, detail_json, prev_hash, hash';
const AUDIT_COLS_OF = (alias: string) => AUDIT_COLS.split(', ').map((c) => `${alias}.${c}`).join(', ');

/** Every statement, prepared once at open (preparing costs more than running a hot query). */
function prepareStatements(db: Database.Database) {
  return {
    // Transaction control.
    begin: db.prepare('BEGIN IMMEDIATE'),
    commit: db.prepare('COMMIT'),
    rollback: db.prepare('ROLLBACK'),
    savepoint: db.prepare('SAVEPOINT unit'),
    rollbackToSavepoint: db.prepare('ROLLBACK TO unit'),
    releaseSavepoint: db.prepare('RELEASE unit'),

    // Volumes. safeIntegers: size_bytes may exceed 2^53.
    getVolume: db.prepare<[string], VolumeRow>(`SELECT ${VOLUME_COLS} FROM volumes WHERE id = ?`).safeIntegers(true),
    getVolumeByName: db.prepare<[string], VolumeRow>(`SELECT ${VOLUME_COLS} FROM volumes WHERE name = ?`).safeIntegers(true),
    listVolumes: db
      .prepare<[string, NameUpperBound, number], VolumeRow>(
        `SELECT ${VOLUME_COLS} FROM volumes WHERE name >= ? AND name < ? ORDER BY name LIMIT ?`,
      )
      .safeIntegers(true),
    listVolumesByFormat: db
      .prepare<[string, NameUpperBound, string, number], VolumeRow>(
        `SELECT ${VOLUME_COLS} FROM volumes WHERE name >= ? AND name < ? AND format = ? ORDER BY name LIMIT ?`,
      )
      .safeIntegers(true),
    countVolumes: db.prepare<[], number>('SELECT count(*) FROM volumes').pluck(),
    volumeExists: db.prepare<[string], number>('SELECT 1 FROM volumes WHERE id = ?').pluck(),
    insertVolume: db.prepare<[string, string, bigint, string, string, number, number, number, string]>(
      `INSERT INTO volumes (${VOLUME_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    ),
    deleteVolume: db.prepare<[string]>('DELETE FROM volumes WHERE id = ?'),
    deleteVolumeLinks: db.prepare<[string]>('DELETE FROM guest_volumes WHERE volume_id = ?'),
    deleteVolumeKeys: db.prepare<[string]>('DELETE FROM key_versions WHERE volume_id = ?'),
    setVolumeActiveVersion: db.prepare<[number, string]>('UPDATE volumes SET active_version = ? WHERE id = ?'),
    setVolumeFormat: db.prepare<[string, number, string]>('UPDATE volumes SET format = ?, active_version = ? WHERE id = ?'),
    guestNamesOfVolume: db
      .prepare<[string], string>(
        'SELECT g.name FROM guest_volumes gv JOIN guests g ON g.id = gv.guest_id WHERE gv.volume_id = ? ORDER BY g.name',
      )
      .pluck(),

    // Key versions.
    getKeyVersions: db.prepare<[string], KeyVersionRow>(`SELECT ${KEY_COLS}, retired_at, destroy_after FROM key_versions WHERE volume_id = ? ORDER BY version`),
    // Hot path of key release: one primary-key lookup on each table.
    getActiveKey: db.prepare<[string], KeyVersionRow>(
      `SELECT k.volume_id, k.version, k.state, k.sealed, k.created_at
         FROM volumes v JOIN key_versions k ON k.volume_id = v.id AND k.version = v.active_version
        WHERE v.id = ? AND k.sealed IS NOT NULL AND k.state <> 'destroyed'`,
    ),
    getKeyVersion: db.prepare<[string, number], KeyVersionRow>(`SELECT ${KEY_COLS} FROM key_versions WHERE volume_id = ? AND version = ?`),
    insertKeyVersion: db.prepare<[string, number, string, Buffer | null, string]>(
      `INSERT INTO key_versions (${KEY_COLS}) VALUES (?, ?, ?, ?, ?)`,
    ),
    retireOtherActive: db.prepare<[string, number]>(
      "UPDATE key_versions SET state = 'retired' WHERE volume_id = ? AND state = 'active' AND version <> ?",
    ),
    activateKeyVersion: db.prepare<[string, number]>("UPDATE key_versions SET state = 'active' WHERE volume_id = ? AND version = ?"),

    // Guests.
    getGuest: db.prepare<[string], GuestRow>(`SELECT ${GUEST_COLS} FROM guests WHERE id = ?`),
    getGuestByName: db.prepare<[string], GuestRow>(`SELECT ${GUEST_COLS} FROM guests WHERE name = ?`),
    guestVolumeIds: db.prepare<[string], string>('SELECT volume_id FROM guest_volumes WHERE guest_id = ? ORDER BY position').pluck(),
    listGuests: db.prepare<[string, NameUpperBound, number], GuestRow>(
      `SELECT ${GUEST_COLS} FROM guests WHERE name >= ? AND name < ? ORDER BY name LIMIT ?`,
    ),
    listGuestsOnHost: db.prepare<[string, string, NameUpperBound, number], GuestRow>(
      `SELECT ${GUEST_COLS} FROM guests WHERE host_id = ? AND name >= ? AND name < ? ORDER BY name LIMIT ?`,
    ),
    // The key-release authorisation check: an index search on guest_volumes(volume_id),
    // then a primary-key lookup per linked guest (a volume has very few guests).
    isVolumePlacedOnHost: db
      .prepare<[string, string], number>(
        `SELECT EXISTS (SELECT 1 FROM guest_volumes gv JOIN guests g ON g.id = gv.guest_id
                         WHERE gv.volume_id = ? AND g.host_id = ?)`,
      )
      .pluck(),
    getReleasable: db
      .prepare<[string, string], VolumeRow & { k_version: number; k_state: string; k_sealed: Buffer | null; k_created_at: string }>(
        `SELECT v.id, v.name, v.size_bytes, v.format, v.cipher, v.key_size_bits, v.sector_size, v.active_version, v.created_at,
                k.version AS k_version, k.state AS k_state, k.sealed AS k_sealed, k.created_at AS k_created_at
           FROM volumes v JOIN key_versions k ON k.volume_id = v.id AND k.version = v.active_version
          WHERE v.id = ? AND k.sealed IS NOT NULL AND k.state <> 'destroyed'
            AND EXISTS (SELECT 1 FROM guest_volumes gv JOIN guests g ON g.id = gv.guest_id WHERE gv.volume_id = v.id AND g.host_id = ?)`,
      )
      .safeIntegers(true),
    countGuestsOnHost: db.prepare<[string], number>('SELECT count(*) FROM guests WHERE host_id = ?').pluck(),
    upsertGuest: db.prepare<[string, string, string, string | null, number, string, string, number, string | null]>(
      `INSERT INTO guests (${GUEST_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET
         name = excluded.name, domain_xml = excluded.domain_xml, host_id = excluded.host_id,
         autostart = excluded.autostart, created_at = excluded.created_at,
         updated_at = excluded.updated_at, generation = excluded.generation,
         handoff_from_host_id = excluded.handoff_from_host_id`,
    ),
    guestsForHost: db.prepare<[string, string], GuestRow>(
      `SELECT ${GUEST_COLS} FROM guests WHERE host_id = ? OR handoff_from_host_id = ? ORDER BY name`,
    ),
    guestStatuses: db.prepare<[string], GuestStatusRow>('SELECT guest_id, host_id, generation, phase, reason, reported_at FROM guest_status WHERE guest_id = ? ORDER BY host_id'),
    volumeStatuses: db.prepare<[string], VolumeStatusRow>('SELECT volume_id, host_id, key_version, phase, reason, reported_at FROM volume_status WHERE volume_id = ? ORDER BY host_id'),
    deleteGuestStatusOfHost: db.prepare<[string]>('DELETE FROM guest_status WHERE host_id = ?'),
    deleteVolumeStatusOfHost: db.prepare<[string]>('DELETE FROM volume_status WHERE host_id = ?'),
    insertGuestStatus: db.prepare<[string, string, number, string, string, string]>(
      'INSERT OR REPLACE INTO guest_status (guest_id, host_id, generation, phase, reason, reported_at) VALUES (?, ?, ?, ?, ?, ?)',
    ),
    insertVolumeStatus: db.prepare<[string, string, number, string, string, string]>(
      'INSERT OR REPLACE INTO volume_status (volume_id, host_id, key_version, phase, reason, reported_at) VALUES (?, ?, ?, ?, ?, ?)',
    ),
    imageDeletionsForHost: db.prepare<[string], { volume_id: string; format: string }>('SELECT volume_id, format FROM image_deletions WHERE host_id = ? ORDER BY volume_id'),
    requestImageDeletion: db.prepare<[string, string, string, string]>('INSERT OR IGNORE INTO image_deletions (volume_id, host_id, format, requested_at) VALUES (?, ?, ?, ?)'),
    completeImageDeletion: db.prepare<[string, string]>('DELETE FROM image_deletions WHERE host_id = ? AND volume_id = ?'),
    markMaterialized: db.prepare<[string, string]>('UPDATE volumes SET materialized_at = ? WHERE id = ? AND materialized_at IS NULL'),
    isMaterialized: db.prepare<[string], number>('SELECT 1 FROM volumes WHERE id = ? AND materialized_at IS NOT NULL').pluck(),
    bumpHostRevision: db.prepare<[string], number>('UPDATE hosts SET desired_revision = desired_revision + 1 WHERE id = ? RETURNING desired_revision').pluck(),
    deleteGuestLinks: db.prepare<[string]>('DELETE FROM guest_volumes WHERE guest_id = ?'),
    insertGuestLink: db.prepare<[string, string, number]>('INSERT INTO guest_volumes (guest_id, volume_id, position) VALUES (?, ?, ?)'),
    deleteGuest: db.prepare<[string]>('DELETE FROM guests WHERE id = ?'),

    // Hosts.
    getHost: db.prepare<[string], HostRow>(`SELECT ${HOST_COLS} FROM hosts WHERE id = ?`),
    getHostByName: db.prepare<[string], HostRow>(`SELECT ${HOST_COLS} FROM hosts WHERE name = ?`),
    listHosts: db.prepare<[string, NameUpperBound, number], HostRow>(
      `SELECT ${HOST_COLS} FROM hosts WHERE name >= ? AND name < ? ORDER BY name LIMIT ?`,
    ),
    insertHost: db.prepare<[string, string, string, Buffer, string, string, string | null, string | null, number]>(
      `INSERT INTO hosts (${HOST_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    ),
    // desired_revision only grows: an update never lowers it.
    updateHost: db.prepare<[string, string, Buffer, string, string, string | null, string | null, number, string]>(
      `UPDATE hosts SET name = ?, state = ?, box_public_key = ?, cert_serial = ?, enrolled_at = ?,
                        revoked_at = ?, last_seen_at = ?, desired_revision = max(desired_revision, ?)
        WHERE id = ?`,
    ),
    touchHost: db.prepare<[string, string]>('UPDATE hosts SET last_seen_at = ? WHERE id = ?'),

    // Enrollment tokens.
    getToken: db.prepare<[string], TokenRow>(`SELECT ${TOKEN_COLS} FROM enrollment_tokens WHERE id = ?`),
    insertToken: db.prepare<[string, string, Buffer, string, string, string | null, string]>(
      `INSERT INTO enrollment_tokens (${TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)`,
    ),
    // Single use: only the first UPDATE finds used_at NULL.
    consumeToken: db.prepare<[string, string]>('UPDATE enrollment_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL'),
    tokenExists: db.prepare<[string], number>('SELECT 1 FROM enrollment_tokens WHERE id = ?').pluck(),

    // Certificates.
    countActiveCertificates: db.prepare<[string], number>('SELECT count(*) FROM certificates WHERE role = ? AND revoked_at IS NULL').pluck(),
    getCertificate: db.prepare<[string], CertificateRow>(`SELECT ${CERT_COLS} FROM certificates WHERE serial = ?`),
    insertCertificate: db.prepare<[string, string, string, string, string, string | null]>(
      `INSERT INTO certificates (${CERT_COLS}) VALUES (?, ?, ?, ?, ?, ?)`,
    ),
    // The first revocation time wins; revoking again is a no-op.
    revokeCertificate: db.prepare<[string, string]>('UPDATE certificates SET revoked_at = COALESCE(revoked_at, ?) WHERE serial = ?'),

    // Audit log.
    auditHead: db.prepare<[], { seq: number; hash: string }>('SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1'),
    auditAll: db.prepare<[], AuditRow>(`SELECT ${AUDIT_COLS} FROM audit_log ORDER BY seq`),
    listAudit: db.prepare<[number, number], AuditRow>(`SELECT ${AUDIT_COLS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?`),
    listAuditByAction: db.prepare<[number, string, number], AuditRow>(
      `SELECT ${AUDIT_COLS} FROM audit_log WHERE seq > ? AND action = ? ORDER BY seq LIMIT ?`,
    ),
    // By target through the audit index (attachAuditIndex), then the entries by seq.
    // `a.target = t.target`: an index entry never shows another target's entry.
    listAuditByTarget: db.prepare<[string, number, number], AuditRow>(
      `SELECT ${AUDIT_COLS_OF('a')} FROM ${AUDIT_INDEX}.by_target t JOIN audit_log a ON a.seq = t.seq AND a.target = t.target
        WHERE t.target = ? AND t.seq > ? ORDER BY t.seq LIMIT ?`,
    ),
    listAuditByActionTarget: db.prepare<[string, number, string, number], AuditRow>(
      `SELECT ${AUDIT_COLS_OF('a')} FROM ${AUDIT_INDEX}.by_target t JOIN audit_log a ON a.seq = t.seq AND a.target = t.target
        WHERE t.target = ? AND t.seq > ? AND a.action = ? ORDER BY t.seq LIMIT ?`,
    ),
    insertAudit: db.prepare<[number, string, string, string, string, string, string, string, string]>(
      `INSERT INTO audit_log (${AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    ),
    insertAuditTarget: db.prepare<[string, number]>(`INSERT INTO ${AUDIT_INDEX}.by_target (target, seq) VALUES (?, ?)`),
    setAuditIndexUpto: db.prepare<[number, string]>(`UPDATE ${AUDIT_INDEX}.state SET upto = ?, upto_hash = ? WHERE id = 1`),

    // Settings.
    getSetting: db.prepare<[string], string>('SELECT value FROM settings WHERE key = ?').pluck(),
    setSetting: db.prepare<[string, string]>(
      'INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value',
    ),
  };
}

type Statements = ReturnType<typeof prepareStatements>;

// ---------------------------------------------------------------------------------------
// Row mapping

/** A no-copy Uint8Array view of a Buffer (records expose plain Uint8Array). */
function bytes(b: Buffer): Uint8Array {
  return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

/** A no-copy Buffer view of a Uint8Array, for binding as BLOB. */
function blob(u: Uint8Array): Buffer {
  return Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

function toVolume(r: VolumeRow): VolumeRecord {
  // The statement runs with safeIntegers, so every INTEGER column arrives as bigint; only
  // size_bytes may exceed 2^53, the others are small and become numbers.
  return {
    id: r.id,
    name: r.name,
    sizeBytes: r.size_bytes,
    format: r.format as VolumeRecord['format'],
    cipher: r.cipher,
    keySizeBits: Number(r.key_size_bits),
    sectorSize: Number(r.sector_size),
    activeVersion: Number(r.active_version),
    createdAt: r.created_at,
  };
}

function toKeyVersion(r: KeyVersionRow): KeyVersionRecord {
  return {
    volumeId: r.volume_id,
    version: r.version,
    state: r.state as KeyVersionRecord['state'],
    sealed: r.sealed === null ? null : bytes(r.sealed),
    createdAt: r.created_at,
    ...retirementOf(r),
  };
}

function toHost(r: HostRow): HostRecord {
  return {
    id: r.id,
    name: r.name,
    state: r.state as HostRecord['state'],
    boxPublicKey: bytes(r.box_public_key),
    certSerial: r.cert_serial,
    enrolledAt: r.enrolled_at,
    revokedAt: r.revoked_at,
    lastSeenAt: r.last_seen_at,
    desiredRevision: r.desired_revision,
  };
}

function toGuestStatus(r: GuestStatusRow): GuestStatusRecord {
  return { guestId: r.guest_id, hostId: r.host_id, generation: r.generation, phase: r.phase, reason: r.reason, reportedAt: r.reported_at };
}

function toVolumeStatus(r: VolumeStatusRow): VolumeStatusRecord {
  return { volumeId: r.volume_id, hostId: r.host_id, keyVersion: r.key_version, phase: r.phase, reason: r.reason, reportedAt: r.reported_at };
}

function toToken(r: TokenRow): EnrollmentTokenRecord {
  return {
    id: r.id,
    hostName: r.host_name,
    secretHash: bytes(r.secret_hash),
    createdAt: r.created_at,
    expiresAt: r.expires_at,
    usedAt: r.used_at,
    createdBy: r.created_by,
  };
}

function toCertificate(r: CertificateRow): CertificateRecord {
  return {
    serial: r.serial,
    role: r.role as CertificateRecord['role'],
    name: r.name,
    issuedAt: r.issued_at,
    expiresAt: r.expires_at,
    revokedAt: r.revoked_at,
  };
}

function toAudit(r: AuditRow): AuditRecord {
  return {
    seq: r.seq,
    time: r.time,
    actor: r.actor,
    action: r.action,
    target: r.target,
    outcome: r.outcome,
    detailJson: r.detail_json,
    prevHash: r.prev_hash,
    hash: r.hash,
  };
}

function* auditRecords(rows: Iterable<AuditRow>): Generator<AuditRecord> {
  // Leaving this generator early (verifyChain returns at the first bad event) closes the
  // underlying statement iterator, which frees the connection for further queries.
  for (const r of rows) yield toAudit(r);
}


// ---------------------------------------------------------------------------------------
// File handling and schema

/** Creates the database file with mode 0600 before SQLite does (SQLite would use 0644). */
function prepareDatabaseFile(path: string, logger: Logger): void {
  try {
    fs.closeSync(fs.openSync(path, 'wx', 0o600));
    return;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  tightenMode(path, logger);
}

/** Removes group/other permissions from an existing file (db, -wal, -shm). */
function tightenMode(path: string, logger: Logger): void {
  let mode: number;
  try {
    mode = fs.statSync(path).mode;
  } catch {
    return; // does not exist (yet)
  }
  if ((mode & 0o077) !== 0) {
    fs.chmodSync(path, mode & 0o700);
    logger.warn('tightened permissions of a database file', { path, mode: (mode & 0o777).toString(8) });
  }
}

/** Takes and keeps the exclusive lock (see SqliteStoreOptions.exclusive). */
function lockExclusive(db: Database.Database): void {
  db.pragma('locking_mode = EXCLUSIVE');
  db.pragma('busy_timeout = 0');
  try {
    db.exec('BEGIN EXCLUSIVE; COMMIT');
  } catch (err) {
    if ((err as { code?: string }).code === 'SQLITE_BUSY') {
      throw errors.precondition('the database is in use by another process', { hint: 'is another virtkm-server running on this data directory?', cause: err });
    }
    throw err;
  } finally {
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  }
}

/** SQLite page cache of the store's connection, KiB. */
const PAGE_CACHE_KIB = 64 * 1024;
/**
 * WAL pages after which a COMMIT checkpoints (SQLite's default: 1,000). A checkpoint runs
 * inside the COMMIT that crosses the mark, on the event loop, and syncs the WAL and the
 * database file; each key release adds an audit row at a random place of the by-target
 * index, so a batch writes ~50 pages and with the default every ~20th batch checkpointed:
 * in run D2/E profiles most of the remaining COMMIT time. 10,000 pages (40 MiB of WAL at
 * most) checkpoints ten times less often and rewrites the hot pages (audit tail, index
 * inner pages) once per checkpoint instead of ten times; measured alone, 32-row audit
 * batches spent 2.6x less time in COMMIT (docs/benchmarks.md, run E). Durability is not
 * affected: only when committed pages are copied into the main file.
 */
const WAL_AUTOCHECKPOINT_PAGES = 10_000;

/** Schema name of the attached audit index (attachAuditIndex). */
const AUDIT_INDEX = 'audit_index';
/** Page cache of the audit index, KiB: small on purpose (see attachAuditIndex). */
const AUDIT_INDEX_CACHE_KIB = 4 * 1024;

/** The audit index's file next to the database (`virtkm.db-audit-index`). */
export function auditIndexPath(dbPath: string): string {
  return `${dbPath}-audit-index`;
}

/**
 * The audit log's index by target, in a database file of its own, attached to the store's
 * connection as `audit_index`: `by_target(target, seq)` and `state(upto, upto_hash)`, the
 * highest seq it covers and that entry's chain hash. appendAudit adds the entry's row to
 * by_target, and the batch sets the state once before its COMMIT: all in the transaction
 * that writes the entries.
 *
 * Why apart: key releases add audit entries for random volumes, so each one inserts at a
 * random place of this index, and its page splits renumber pages through a scratch page
 * number far beyond the end of the file; SQLite's page cache then scans every slot of its
 * hash table at the next COMMIT (pcache1TruncateUnsafe). In the main file that is the
 * whole 64 MiB cache (~16,000 pages), about 200 µs per such COMMIT; in a file of its own,
 * with a 4 MiB cache, a sixteenth of it (docs/benchmarks.md, run G).
 *
 * It is derived data: SQLite commits each attached WAL database on its own, so a crash
 * between the two may leave the index one transaction behind or ahead of audit_log, and
 * the index is synced only at its checkpoints (synchronous=NORMAL, consistent but perhaps
 * not durable). So at every open it is brought back to exactly audit_log: when the log
 * holds the entry the index ends at, with the same chain hash (which commits to the whole
 * history before it), only the missing entries are added; in any other case (index ahead
 * of the log, another history, a new or lost file) it is rebuilt from the whole log. A file
 * that SQLite calls corrupt or not a database is deleted and rebuilt. The audit chain
 * itself never depends on it, and a query joins each index entry to the log by seq AND
 * target, so a stale entry can hide nothing and show nothing false.
 */
function attachAuditIndex(db: Database.Database, dbPath: string, memory: boolean, exclusive: boolean, logger: Logger): void {
  const path = memory ? ':memory:' : auditIndexPath(dbPath);
  const attach = () => {
    if (!memory) prepareDatabaseFile(path, logger);
    db.prepare(`ATTACH DATABASE ? AS ${AUDIT_INDEX}`).run(path);
    if (exclusive && !memory) db.pragma(`${AUDIT_INDEX}.locking_mode = EXCLUSIVE`);
    const mode = db.pragma(`${AUDIT_INDEX}.journal_mode = WAL`, { simple: true });
    if (!memory && mode !== 'wal') throw new Error(`could not enable WAL journal for the audit index (got ${String(mode)})`);
    db.pragma(`${AUDIT_INDEX}.synchronous = NORMAL`);
    db.pragma(`${AUDIT_INDEX}.cache_size = -${AUDIT_INDEX_CACHE_KIB}`);
    db.exec(`
      CREATE TABLE IF NOT EXISTS ${AUDIT_INDEX}.by_target (target TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (target, seq)) WITHOUT ROWID, STRICT;
      CREATE TABLE IF NOT EXISTS ${AUDIT_INDEX}.state (id INTEGER PRIMARY KEY CHECK (id = 1), upto INTEGER NOT NULL, upto_hash TEXT NOT NULL) STRICT;
      INSERT OR IGNORE INTO ${AUDIT_INDEX}.state (id, upto, upto_hash) VALUES (1, 0, '');`);
    repairAuditIndex(db, logger);
  };
  try {
    attach();
  } catch (err) {
    const code = sqliteCode(err);
    if (memory || (code !== 'SQLITE_CORRUPT' && code !== 'SQLITE_NOTADB')) throw err;
    logger.warn('audit index unreadable; rebuilding it from the audit log', { path, code });
    try {
      db.exec(`DETACH DATABASE ${AUDIT_INDEX}`);
    } catch {
      // not attached
    }
    for (const f of [path, `${path}-wal`, `${path}-shm`]) fs.rmSync(f, { force: true });
    attach();
  }
}

/** Makes the audit index cover exactly audit_log (see attachAuditIndex). */
function repairAuditIndex(db: Database.Database, logger: Logger): void {
  db.transaction(() => {
    const head = db.prepare<[], { seq: number; hash: string }>('SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1').get();
    const last = head ? Number(head.seq) : 0;
    const state = db.prepare<[], { upto: number; upto_hash: string }>(`SELECT upto, upto_hash FROM ${AUDIT_INDEX}.state WHERE id = 1`).get();
    const upto = state ? Number(state.upto) : 0;
    const hashAt = (seq: number) => (seq === 0 ? '' : db.prepare<[number], string>('SELECT hash FROM audit_log WHERE seq = ?').pluck().get(seq));
    // The index is a prefix of this log when the log has its last entry, same hash.
    const prefix = upto <= last && hashAt(upto) === (state?.upto_hash ?? '');
    if (prefix && upto === last) return;
    const from = prefix ? upto : 0;
    const removed = prefix ? 0 : db.prepare(`DELETE FROM ${AUDIT_INDEX}.by_target`).run().changes;
    const added = db
      .prepare<[number]>(`INSERT INTO ${AUDIT_INDEX}.by_target (target, seq) SELECT target, seq FROM audit_log WHERE seq > ? ORDER BY target, seq`)
      .run(from).changes;
    db.prepare<[number, string]>(`UPDATE ${AUDIT_INDEX}.state SET upto = ?, upto_hash = ? WHERE id = 1`).run(last, head?.hash ?? '');
    logger.info('audit index brought up to date', { covered_before: upto, audit_entries: last, rebuilt: !prefix, added, removed });
  })();
}

function configure(db: Database.Database, memory: boolean, durability: SqliteDurability): void {
  const mode = db.pragma('journal_mode = WAL', { simple: true });
  if (!memory && mode !== 'wal') throw new Error(`could not enable WAL journal (got ${String(mode)})`);
  // NORMAL only together with the store's own sync of the WAL after each COMMIT (#runBatch).
  db.pragma(durability === 'full-sync' ? 'synchronous = FULL' : 'synchronous = NORMAL');
  db.pragma('foreign_keys = ON');
  // Crypto-shredding: overwrite deleted content (sealed secrets) with zeros.
  db.pragma('secure_delete = ON');
  // Statement journals and sorts would otherwise go to temporary files on disk.
  db.pragma('temp_store = MEMORY');
  // Key release reads four B-tree paths per volume at random over the whole database; with
  // SQLite's default 2 MiB page cache most of those pages came from the OS through a read()
  // each. 64 MiB (an upper bound, allocated as pages are used) holds the hot indexes.
  db.pragma(`cache_size = -${PAGE_CACHE_KIB}`);
  db.pragma(`wal_autocheckpoint = ${WAL_AUTOCHECKPOINT_PAGES}`);
  db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  db.pragma('trusted_schema = OFF');
  if (db.pragma('secure_delete', { simple: true }) !== 1 || db.pragma('foreign_keys', { simple: true }) !== 1) {
    throw new Error('could not enable secure_delete and foreign_keys');
  }
}

/** Applies pending migrations in one transaction; returns the resulting schema version. */
function migrate(db: Database.Database, logger: Logger): number {
  const apply = db.transaction(() => {
    db.exec(SCHEMA_MIGRATIONS_DDL);
    const applied = db
      .prepare<[], { version: number; name: string }>('SELECT version, name FROM schema_migrations ORDER BY version')
      .all();
    const current = applied.reduce((max, m) => Math.max(max, m.version), 0);
    if (current > LATEST_SCHEMA_VERSION) {
      throw errors.precondition(`database schema version ${current} is newer than this server supports (${LATEST_SCHEMA_VERSION})`, {
        hint: 'run a newer virtkm-server, or restore a backup made by this version',
      });
    }
    for (const row of applied) {
      if (MIGRATIONS[row.version - 1]?.name !== row.name) {
        throw errors.precondition('database schema history does not match this server', {
          hint: 'the database was created by an incompatible build of virtkm-server',
        });
      }
    }
    const insert = db.prepare<[number, string, string]>('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)');
    for (const m of MIGRATIONS) {
      if (m.version <= current) continue;
      db.exec(m.sql);
      insert.run(m.version, m.name, new Date().toISOString());
      logger.info('applied schema migration', { version: m.version, name: m.name });
    }
    return LATEST_SCHEMA_VERSION;
  });
  // IMMEDIATE: two processes opening a fresh file must not both try to migrate it.
  return apply.immediate();
}

// ---------------------------------------------------------------------------------------
// The store

interface QueuedUnit {
  fn: (tx: StoreWriter) => unknown;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

type UnitOutcome = { ok: true; value: unknown } | { ok: false; error: unknown };

/** A committed batch waiting for the WAL sync that makes it durable. */
interface UndurableBatch {
  /** #commitSeq right after its COMMIT (and checkpoint, if any). */
  seq: number;
  units: QueuedUnit[];
  outcomes: UnitOutcome[];
}

/** The -wal file as the store holds it open for fdatasync. */
interface WalHandle {
  fd: number;
  dev: number;
  ino: number;
}

interface ChainHead {
  seq: number;
  hash: string;
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === 'object' || typeof v === 'function') && v !== null && typeof (v as { then?: unknown }).then === 'function';
}

/**
 * Implements both the Store and, for the duration of one unit, the StoreWriter given to it
 * (the same object: the write methods check that a unit is running).
 */
class SqliteStoreImpl implements SqliteStore, StoreWriter {
  readonly schemaVersion: number;
  readonly #db: Database.Database;
  readonly #s: Statements;
  readonly #rot: SqliteRotationTables;
  readonly #memory: boolean;
  readonly #path: string;
  readonly #logger: Logger;
  readonly #maxBatch: number;
  readonly #now: () => Date;
  readonly #hooks: SqliteStoreTestHooks;
  readonly #durability: SqliteDurability;
  /** True in 'async-wal-sync' mode on a file database: COMMIT alone is not durable. */
  readonly #asyncSync: boolean;
  readonly #syncWal: (fd: number) => Promise<void>;
  /**
   * See StoreReader.credentialsGeneration: bumped by every write of a certificate or host
   * record (except touchHost and bumpHostRevision), when the unit runs. Batches run within
   * one turn, so a call authenticated after that turn sees the new number and checks the
   * database again; a unit rolled back only costs one extra check per connection.
   */
  #credentialsGeneration = 0;
  /** Our own descriptor of the -wal file (opened at the first sync). */
  #wal: WalHandle | undefined;
  /** The -wal file could not be found: batches are made durable by checkpoints instead. */
  #walGone = false;
  /** dev:ino the -wal path named when its file was last looked up ('none': missing). */
  #walPathSeen: string | undefined;
  /** Batches committed so far; a sync started at #commitSeq = n makes batches <= n durable. */
  #commitSeq = 0;
  #durableSeq = 0;
  #syncInFlight = false;
  /** Committed batches in commit order whose sync has not completed yet. */
  #undurable: UndurableBatch[] = [];
  /** Set for good by a failed WAL sync: every later write is refused with it. */
  #syncFailed: DomainError | undefined;
  /** Resolved whenever #undurable becomes empty (close waits for it). */
  #durableWaiters: (() => void)[] = [];
  /** Last event of the audit chain as of the current (possibly uncommitted) state. */
  #head: ChainHead;
  #inUnit = false;
  /** A unit of the running batch deleted sealed secrets: checkpoint the WAL after COMMIT. */
  #shredPending = false;
  #queue: QueuedUnit[] = [];
  #scheduled = false;
  #idleWaiters: (() => void)[] = [];
  #closing: Promise<void> | undefined;
  readonly #stats: SqliteStoreStats = { commits: 0, units: 0, failedUnits: 0, failedBatches: 0, walSyncs: 0, slowWalSyncs: 0, maxWalSyncMs: 0 };
  /** Slow syncs not yet logged, and when the last log line was written. */
  #slowSyncLog = { unlogged: 0, maxMs: 0, at: Number.NEGATIVE_INFINITY };

  constructor(
    db: Database.Database,
    init: {
      schemaVersion: number;
      memory: boolean;
      path: string;
      logger: Logger;
      maxBatch: number;
      now: () => Date;
      hooks: SqliteStoreTestHooks;
      durability: SqliteDurability;
      syncWal: (fd: number) => Promise<void>;
    },
  ) {
    this.#db = db;
    this.schemaVersion = init.schemaVersion;
    this.#memory = init.memory;
    this.#path = init.path;
    this.#logger = init.logger;
    this.#maxBatch = init.maxBatch;
    this.#now = init.now;
    this.#hooks = init.hooks;
    this.#durability = init.durability;
    this.#asyncSync = init.durability === 'async-wal-sync' && !init.memory;
    this.#syncWal = init.syncWal;
    this.#s = prepareStatements(db);
    this.#rot = new SqliteRotationTables(db);
    const head = this.#s.auditHead.get();
    this.#head = head ? { seq: head.seq, hash: head.hash } : { seq: 0, hash: GENESIS_HASH };
  }

  stats(): SqliteStoreStats {
    return { ...this.#stats };
  }

  durabilitySettings(): { durability: SqliteDurability; journalMode: string; synchronous: 'off' | 'normal' | 'full' | 'extra' } {
    const level = Number(this.#db.pragma('synchronous', { simple: true }));
    const names = ['off', 'normal', 'full', 'extra'] as const;
    return {
      durability: this.#durability,
      journalMode: String(this.#db.pragma('journal_mode', { simple: true })),
      synchronous: names[level] ?? 'extra',
    };
  }

  // ----- reads -------------------------------------------------------------------------

  getRotation(id: string): RotationRecord | undefined {
    return this.#rot.getRotation(id);
  }

  openRotationOfVolume(volumeId: string): RotationRecord | undefined {
    return this.#rot.openRotationOfVolume(volumeId);
  }

  latestRotationOfVolume(volumeId: string): RotationRecord | undefined {
    return this.#rot.latestRotationOfVolume(volumeId);
  }

  listRotations(q: RotationQuery): Page<RotationRecord> {
    return this.#rot.listRotations(q);
  }

  runningRotationsOnHost(hostId: string): RotationRecord[] {
    return this.#rot.runningRotationsOnHost(hostId);
  }

  queuedRotations(limit: number): RotationRecord[] {
    return this.#rot.queuedRotations(limit);
  }

  agedVolumes(cutoff: string, limit: number, after?: { keyCreatedAt: string; volumeId: string }): { volumeId: string; keyCreatedAt: string }[] {
    return this.#rot.agedVolumes(cutoff, limit, after);
  }

  retiredKeysDue(now: string, limit: number): { volumeId: string; version: number }[] {
    return this.#rot.retiredKeysDue(now, limit);
  }

  getPolicy(scope: PolicyScope, targetId: string): RotationPolicyRecord | undefined {
    return this.#rot.getPolicy(scope, targetId);
  }

  listPolicies(): RotationPolicyRecord[] {
    return this.#rot.listPolicies();
  }

  getVolume(id: string): VolumeRecord | undefined {
    const r = this.#s.getVolume.get(id);
    return r && toVolume(r);
  }

  getVolumeByName(name: string): VolumeRecord | undefined {
    const r = this.#s.getVolumeByName.get(name);
    return r && toVolume(r);
  }

  listVolumes(q: VolumeQuery): Page<VolumeRecord> {
    // Keyset pagination on the unique name: O(page) however deep the page, and stable
    // when rows are inserted or deleted between calls (unlike OFFSET).
    const limit = clampPageSize(q.pageSize);
    const { start, end } = nameRange(q.namePrefix ?? '', decodeNameToken(q.pageToken, 'volume'));
    const rows =
      q.format === undefined
        ? this.#s.listVolumes.all(start, end, limit + 1)
        : this.#s.listVolumesByFormat.all(start, end, q.format, limit + 1);
    return toPage(rows.map(toVolume), limit, (v) => encodePageToken('volume', v.name));
  }

  countVolumes(): number {
    return this.#s.countVolumes.get() ?? 0;
  }

  getKeyVersions(volumeId: string): KeyVersionRecord[] {
    return this.#s.getKeyVersions.all(volumeId).map(toKeyVersion);
  }

  getActiveKey(volumeId: string): KeyVersionRecord | undefined {
    const r = this.#s.getActiveKey.get(volumeId);
    return r && toKeyVersion(r);
  }

  guestNamesOfVolume(volumeId: string): string[] {
    return this.#s.guestNamesOfVolume.all(volumeId);
  }

  getGuest(id: string): GuestRecord | undefined {
    const r = this.#s.getGuest.get(id);
    return r && this.#toGuest(r);
  }

  getGuestByName(name: string): GuestRecord | undefined {
    const r = this.#s.getGuestByName.get(name);
    return r && this.#toGuest(r);
  }

  listGuests(q: GuestQuery): Page<GuestRecord> {
    const limit = clampPageSize(q.pageSize);
    const { start, end } = nameRange(q.namePrefix ?? '', decodeNameToken(q.pageToken, 'guest'));
    const rows =
      q.hostId === undefined
        ? this.#s.listGuests.all(start, end, limit + 1)
        : this.#s.listGuestsOnHost.all(q.hostId, start, end, limit + 1);
    return toPage(
      rows.map((r) => this.#toGuest(r)),
      limit,
      (g) => encodePageToken('guest', g.name),
    );
  }

  isVolumePlacedOnHost(volumeId: string, hostId: string): boolean {
    return this.#s.isVolumePlacedOnHost.get(volumeId, hostId) === 1;
  }

  credentialsGeneration(): number {
    return this.#credentialsGeneration;
  }

  getHost(id: string): HostRecord | undefined {
    const r = this.#s.getHost.get(id);
    return r && toHost(r);
  }

  getHostByName(name: string): HostRecord | undefined {
    const r = this.#s.getHostByName.get(name);
    return r && toHost(r);
  }

  listHosts(pageSize: number, pageToken: string): Page<HostRecord> {
    const limit = clampPageSize(pageSize);
    const { start, end } = nameRange('', decodeNameToken(pageToken, 'host'));
    const rows = this.#s.listHosts.all(start, end, limit + 1);
    return toPage(rows.map(toHost), limit, (h) => encodePageToken('host', h.name));
  }

  getReleasable(volumeId: string, hostId: string): { volume: VolumeRecord; key: KeyVersionRecord } | undefined {
    const r = this.#s.getReleasable.get(volumeId, hostId);
    if (!r) return undefined;
    return {
      volume: toVolume(r),
      key: toKeyVersion({ volume_id: r.id, version: Number(r.k_version), state: r.k_state, sealed: r.k_sealed, created_at: r.k_created_at }),
    };
  }

  guestsForHost(hostId: string): GuestRecord[] {
    return this.#s.guestsForHost.all(hostId, hostId).map((r) => this.#toGuest(r));
  }

  guestStatuses(guestId: string): GuestStatusRecord[] {
    return this.#s.guestStatuses.all(guestId).map(toGuestStatus);
  }

  imageDeletionsForHost(hostId: string): { volumeId: string; format: VolumeFormatName }[] {
    return this.#s.imageDeletionsForHost.all(hostId).map((r) => ({ volumeId: r.volume_id, format: r.format as VolumeFormatName }));
  }

  isMaterialized(volumeId: string): boolean {
    return this.#s.isMaterialized.get(volumeId) === 1;
  }

  volumeStatuses(volumeId: string): VolumeStatusRecord[] {
    return this.#s.volumeStatuses.all(volumeId).map(toVolumeStatus);
  }

  countGuestsOnHost(hostId: string): number {
    return this.#s.countGuestsOnHost.get(hostId) ?? 0;
  }

  getEnrollmentToken(id: string): EnrollmentTokenRecord | undefined {
    const r = this.#s.getToken.get(id);
    return r && toToken(r);
  }

  countActiveCertificates(role: string): number {
    return this.#s.countActiveCertificates.get(role) ?? 0;
  }

  getCertificate(serial: string): CertificateRecord | undefined {
    const r = this.#s.getCertificate.get(serial);
    return r && toCertificate(r);
  }

  listAuditEvents(q: AuditQuery): Page<AuditRecord> {
    // Ascending seq; the page token and afterSeq are both exclusive lower bounds.
    const limit = clampPageSize(q.pageSize);
    const fromToken = decodeSeqToken(q.pageToken) ?? 0;
    const fromQuery = q.afterSeq !== undefined && Number.isSafeInteger(q.afterSeq) && q.afterSeq > 0 ? q.afterSeq : 0;
    const after = Math.max(fromToken, fromQuery);
    const action = q.action === undefined || q.action === '' ? undefined : q.action;
    const target = q.target === undefined || q.target === '' ? undefined : q.target;
    let rows: AuditRow[];
    if (action !== undefined && target !== undefined) rows = this.#s.listAuditByActionTarget.all(target, after, action, limit + 1);
    else if (action !== undefined) rows = this.#s.listAuditByAction.all(after, action, limit + 1);
    else if (target !== undefined) rows = this.#s.listAuditByTarget.all(target, after, limit + 1);
    else rows = this.#s.listAudit.all(after, limit + 1);
    return toPage(rows.map(toAudit), limit, (e) => encodePageToken('audit', e.seq));
  }

  verifyAuditLog(): AuditVerification {
    // iterate() streams rows: memory stays flat however long the log is.
    return verifyChain(auditRecords(this.#s.auditAll.iterate()));
  }

  getSetting(key: string): string | undefined {
    return this.#s.getSetting.get(key);
  }

  #toGuest(r: GuestRow): GuestRecord {
    return {
      id: r.id,
      name: r.name,
      domainXml: r.domain_xml,
      hostId: r.host_id,
      autostart: r.autostart === 1,
      createdAt: r.created_at,
      updatedAt: r.updated_at,
      generation: r.generation,
      volumeIds: this.#s.guestVolumeIds.all(r.id),
      handoffFromHostId: r.handoff_from_host_id,
    };
  }

  // ----- writes (only while a unit runs) -----------------------------------------------

  #assertInUnit(): void {
    // A unit that kept its writer past its return (e.g. across an await) would otherwise
    // write outside any transaction, or into a later batch it does not belong to.
    if (!this.#inUnit) throw new Error('StoreWriter used outside its write unit (units must be synchronous)');
  }

  insertRotation(r: RotationRecord): void {
    this.#assertInUnit();
    this.#rot.insertRotation(r);
  }

  updateRotation(r: RotationRecord): void {
    this.#assertInUnit();
    this.#rot.updateRotation(r);
  }

  retireKeyVersion(volumeId: string, version: number, retiredAt: string, destroyAfter: string | null): void {
    this.#assertInUnit();
    this.#rot.retireKeyVersion(volumeId, version, retiredAt, destroyAfter);
  }

  destroyKeyVersion(volumeId: string, version: number): boolean {
    this.#assertInUnit();
    const erased = this.#rot.destroyKeyVersion(volumeId, version);
    if (erased) this.#shredPending = true;
    return erased;
  }

  upsertPolicy(p: RotationPolicyRecord): void {
    this.#assertInUnit();
    this.#rot.upsertPolicy(p);
  }

  deletePolicy(scope: PolicyScope, targetId: string): boolean {
    this.#assertInUnit();
    return this.#rot.deletePolicy(scope, targetId);
  }

  insertVolume(v: VolumeRecord): void {
    this.#assertInUnit();
    if (typeof v.sizeBytes !== 'bigint' || v.sizeBytes < 0n || v.sizeBytes > MAX_INT64) {
      throw errors.invalid('volume size out of range');
    }
    run(
      () =>
        this.#s.insertVolume.run(v.id, v.name, v.sizeBytes, v.format, v.cipher, v.keySizeBits, v.sectorSize, v.activeVersion, v.createdAt),
      { unique: 'volume name', primary: 'volume' },
    );
  }

  deleteVolume(id: string): void {
    this.#assertInUnit();
    // Explicit deletes (the foreign keys cascade too): links, then the sealed secrets,
    // which secure_delete overwrites in the file, then the volume.
    this.#s.deleteVolumeLinks.run(id);
    this.#rot.deletePolicy('volume', id);
    if (this.#s.deleteVolumeKeys.run(id).changes > 0) this.#shredPending = true;
    if (this.#s.deleteVolume.run(id).changes === 0) throw errors.notFound('volume');
  }

  insertKeyVersion(k: KeyVersionRecord): void {
    this.#assertInUnit();
    run(() => this.#s.insertKeyVersion.run(k.volumeId, k.version, k.state, k.sealed === null ? null : blob(k.sealed), k.createdAt), {
      primary: 'key version',
      foreign: 'volume',
    });
  }

  /**
   * Makes `version` the active one: the volume points at it, its state becomes "active",
   * and any other "active" version of the volume becomes "retired".
   */
  setActiveVersion(volumeId: string, version: number): void {
    this.#assertInUnit();
    if (this.#s.volumeExists.get(volumeId) === undefined) throw errors.notFound('volume');
    const k = this.#s.getKeyVersion.get(volumeId, version);
    if (k === undefined) throw errors.notFound('key version');
    if (k.state === 'destroyed' || k.sealed === null) throw errors.precondition('key version is destroyed');
    this.#s.retireOtherActive.run(volumeId, version);
    this.#s.activateKeyVersion.run(volumeId, version);
    this.#s.setVolumeActiveVersion.run(version, volumeId);
  }

  /**
   * Encrypting or decrypting a volume: its format and active version change together (one
   * statement: the schema ties unencrypted formats to version 0). A version > 0 becomes
   * the active one as in setActiveVersion; 0 leaves the volume without an active version
   * (the caller retires the old one).
   */
  setVolumeFormat(volumeId: string, format: VolumeFormatName, activeVersion: number): void {
    this.#assertInUnit();
    if (this.#s.volumeExists.get(volumeId) === undefined) throw errors.notFound('volume');
    if (activeVersion > 0) {
      const k = this.#s.getKeyVersion.get(volumeId, activeVersion);
      if (k === undefined) throw errors.notFound('key version');
      if (k.state === 'destroyed' || k.sealed === null) throw errors.precondition('key version is destroyed');
      this.#s.retireOtherActive.run(volumeId, activeVersion);
      this.#s.activateKeyVersion.run(volumeId, activeVersion);
    }
    run(() => this.#s.setVolumeFormat.run(format, activeVersion, volumeId), {});
  }

  upsertGuest(g: GuestRecord): void {
    this.#assertInUnit();
    if (new Set(g.volumeIds).size !== g.volumeIds.length) throw errors.invalid('a volume is listed twice for the guest');
    run(
      () =>
        this.#s.upsertGuest.run(g.id, g.name, g.domainXml, g.hostId, g.autostart ? 1 : 0, g.createdAt, g.updatedAt, g.generation, g.handoffFromHostId),
      { unique: 'guest name', foreign: 'host' },
    );
    // Links are replaced as a whole; position keeps the order given at definition.
    this.#s.deleteGuestLinks.run(g.id);
    g.volumeIds.forEach((volumeId, position) => {
      run(() => this.#s.insertGuestLink.run(g.id, volumeId, position), { foreign: 'volume' });
    });
  }

  deleteGuest(id: string): void {
    this.#assertInUnit();
    this.#s.deleteGuestLinks.run(id);
    this.#rot.deletePolicy('guest', id);
    if (this.#s.deleteGuest.run(id).changes === 0) throw errors.notFound('guest');
  }

  insertHost(h: HostRecord): void {
    this.#assertInUnit();
    this.#credentialsGeneration++;
    run(
      () =>
        this.#s.insertHost.run(h.id, h.name, h.state, blob(h.boxPublicKey), h.certSerial, h.enrolledAt, h.revokedAt, h.lastSeenAt, h.desiredRevision),
      { unique: 'host name', primary: 'host' },
    );
  }

  updateHost(h: HostRecord): void {
    this.#assertInUnit();
    this.#credentialsGeneration++;
    let changes = 0;
    run(
      () => {
        changes = this.#s.updateHost.run(h.name, h.state, blob(h.boxPublicKey), h.certSerial, h.enrolledAt, h.revokedAt, h.lastSeenAt, h.desiredRevision, h.id)
          .changes;
      },
      { unique: 'host name' },
    );
    if (changes === 0) throw errors.notFound('host');
  }

  bumpHostRevision(id: string): number {
    this.#assertInUnit();
    const revision = this.#s.bumpHostRevision.get(id);
    if (revision === undefined) throw errors.notFound('host');
    return revision;
  }

  requestImageDeletion(volumeId: string, hostId: string, format: VolumeFormatName, at: string): void {
    this.#assertInUnit();
    this.#s.requestImageDeletion.run(volumeId, hostId, format, at);
  }

  completeImageDeletions(hostId: string, volumeIds: string[]): void {
    this.#assertInUnit();
    for (const id of volumeIds) this.#s.completeImageDeletion.run(hostId, id);
  }

  markMaterialized(volumeIds: string[], at: string): void {
    this.#assertInUnit();
    for (const id of volumeIds) this.#s.markMaterialized.run(at, id);
  }

  replaceHostReport(hostId: string, guests: GuestStatusRecord[], volumes: VolumeStatusRecord[]): void {
    this.#assertInUnit();
    this.#s.deleteGuestStatusOfHost.run(hostId);
    this.#s.deleteVolumeStatusOfHost.run(hostId);
    // Rows about guests or volumes unknown here (deleted meanwhile, or made up) are dropped.
    for (const g of guests) {
      if (this.#s.getGuest.get(g.guestId)) this.#s.insertGuestStatus.run(g.guestId, hostId, g.generation, g.phase, g.reason, g.reportedAt);
    }
    for (const v of volumes) {
      if (this.#s.volumeExists.get(v.volumeId)) this.#s.insertVolumeStatus.run(v.volumeId, hostId, v.keyVersion, v.phase, v.reason, v.reportedAt);
    }
  }

  touchHost(id: string, lastSeenAt: string): void {
    this.#assertInUnit();
    if (this.#s.touchHost.run(lastSeenAt, id).changes === 0) throw errors.notFound('host');
  }

  insertEnrollmentToken(t: EnrollmentTokenRecord): void {
    this.#assertInUnit();
    run(() => this.#s.insertToken.run(t.id, t.hostName, blob(t.secretHash), t.createdAt, t.expiresAt, t.usedAt, t.createdBy), {
      primary: 'enrollment token',
    });
  }

  /** True for the first use; false when already used; not_found for an unknown token. */
  consumeEnrollmentToken(id: string, usedAt: string): boolean {
    this.#assertInUnit();
    if (this.#s.consumeToken.run(usedAt, id).changes === 1) return true;
    if (this.#s.tokenExists.get(id) === undefined) throw errors.notFound('enrollment token');
    return false;
  }

  insertCertificate(c: CertificateRecord): void {
    this.#assertInUnit();
    this.#credentialsGeneration++;
    run(() => this.#s.insertCertificate.run(c.serial, c.role, c.name, c.issuedAt, c.expiresAt, c.revokedAt), {
      primary: 'certificate',
    });
  }

  revokeCertificate(serial: string, revokedAt: string): void {
    this.#assertInUnit();
    this.#credentialsGeneration++;
    if (this.#s.revokeCertificate.run(revokedAt, serial).changes === 0) throw errors.notFound('certificate');
  }

  appendAudit(e: AuditEntryInput): AuditRecord {
    this.#assertInUnit();
    const fields = {
      seq: this.#head.seq + 1,
      time: this.#now().toISOString(),
      actor: e.actor,
      action: e.action,
      target: e.target,
      outcome: e.outcome,
      detailJson: canonicalJson(e.detail ?? {}),
    };
    const prevHash = this.#head.hash;
    const record: AuditRecord = { ...fields, prevHash, hash: auditHash(prevHash, fields) };
    this.#s.insertAudit.run(
      record.seq,
      record.time,
      record.actor,
      record.action,
      record.target,
      record.outcome,
      record.detailJson,
      record.prevHash,
      record.hash,
    );
    this.#s.insertAuditTarget.run(record.target, record.seq);
    // Advance the in-memory head only once the row is in; #runBatch rewinds it if the
    // unit's savepoint or the batch's COMMIT is rolled back.
    this.#head = { seq: record.seq, hash: record.hash };
    return record;
  }

  setSetting(key: string, value: string): void {
    this.#assertInUnit();
    this.#s.setSetting.run(key, value);
  }

  rewrapSealedSecrets(rewrap: (volumeId: string, version: number, sealed: Uint8Array) => Uint8Array | undefined): number {
    this.#assertInUnit();
    // Pages by primary key: better-sqlite3 cannot update while a SELECT iterates.
    const page = this.#db.prepare<[string, number], { volume_id: string; version: number; sealed: Buffer }>(
      `SELECT volume_id, version, sealed FROM key_versions
        WHERE sealed IS NOT NULL AND (volume_id, version) > (?, ?) ORDER BY volume_id, version LIMIT 1000`,
    );
    const update = this.#db.prepare<[Buffer, string, number]>('UPDATE key_versions SET sealed = ? WHERE volume_id = ? AND version = ?');
    let after: [string, number] = ['', 0];
    let count = 0;
    for (;;) {
      const rows = page.all(...after);
      if (rows.length === 0) break;
      for (const r of rows) {
        const next = rewrap(r.volume_id, Number(r.version), bytes(r.sealed));
        if (next !== undefined) {
          update.run(blob(next), r.volume_id, r.version);
          count++;
        }
      }
      const last = rows[rows.length - 1]!;
      after = [last.volume_id, Number(last.version)];
    }
    // The old envelopes were overwritten in place (secure_delete); fold the WAL after COMMIT.
    if (count > 0) this.#shredPending = true;
    return count;
  }

  // ----- group commit ------------------------------------------------------------------

  /**
   * Queues a synchronous unit for the next batch; resolves with its return value once the
   * batch's COMMIT is durable, or rejects with what the unit threw (the unit alone is
   * rolled back) or with the batch's error (every unit of the batch rolled back).
   */
  write<T>(fn: (tx: StoreWriter) => T): Promise<T> {
    if (this.#closing) return Promise.reject(new DomainError('unavailable', 'store is closed'));
    if (this.#syncFailed) return Promise.reject(this.#syncFailed);
    return new Promise<T>((resolve, reject) => {
      this.#queue.push({ fn, resolve: resolve as (value: unknown) => void, reject });
      this.#schedule();
    });
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = true;
    // setImmediate, not a microtask: lets every request handler of this turn enqueue first.
    setImmediate(() => this.#flush());
  }

  #flush(): void {
    this.#scheduled = false;
    const batch = this.#queue.splice(0, this.#maxBatch);
    if (batch.length > 0 && this.#syncFailed) {
      // Queued before the sync failed: never run on a file in an unknown state.
      for (const u of batch) u.reject(this.#syncFailed);
    } else if (batch.length > 0) {
      this.#runBatch(batch);
    }
    if (this.#queue.length > 0) {
      this.#schedule();
    } else {
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  /** Runs one batch; never throws (every failure settles the units' promises). */
  #runBatch(batch: QueuedUnit[]): void {
    const headAtStart = this.#head;
    this.#shredPending = false;
    try {
      this.#s.begin.run();
    } catch (err) {
      this.#failBatch(batch, sqliteCode(err) === 'SQLITE_BUSY' ? new DomainError('unavailable', 'database is busy', { cause: err }) : err);
      return;
    }

    const outcomes: UnitOutcome[] = [];
    try {
      for (const [i, unit] of batch.entries()) {
        const headAtUnit = this.#head;
        this.#s.savepoint.run();
        this.#inUnit = true;
        try {
          const value = unit.fn(this);
          if (isThenable(value)) {
            // Its rejection (if any) is the caller's bug, reported through the TypeError below.
            Promise.resolve(value).catch(() => undefined);
            throw new TypeError('store write unit returned a promise; units must be synchronous');
          }
          this.#inUnit = false;
          this.#s.releaseSavepoint.run();
          outcomes.push({ ok: true, value });
        } catch (err) {
          this.#inUnit = false;
          this.#head = headAtUnit;
          if (!this.#db.inTransaction) {
            // SQLite rolled back the whole transaction itself (I/O error, disk full...):
            // the units before this one lost their writes as well. Reject them and this
            // one; requeue the rest, which never ran, at the front of the queue.
            this.#head = headAtStart;
            this.#queue.unshift(...batch.slice(i + 1));
            if (this.#queue.length > 0) this.#schedule();
            this.#failBatch(batch.slice(0, i + 1), err);
            return;
          }
          this.#s.rollbackToSavepoint.run();
          this.#s.releaseSavepoint.run();
          this.#stats.failedUnits++;
          outcomes.push({ ok: false, error: err });
        }
      }
      // The audit index's state, once per batch: where the chain's head is now.
      if (this.#head.seq !== headAtStart.seq) this.#s.setAuditIndexUpto.run(this.#head.seq, this.#head.hash);
      this.#hooks.beforeCommit?.();
      this.#s.commit.run();
    } catch (err) {
      this.#inUnit = false;
      if (this.#db.inTransaction) {
        try {
          this.#s.rollback.run();
        } catch (rollbackErr) {
          this.#logger.error('rollback after failed batch failed', describeError(rollbackErr));
        }
      }
      this.#head = headAtStart;
      this.#failBatch(batch, err);
      return;
    }

    this.#stats.commits++;
    this.#stats.units += batch.length;
    if (this.#shredPending) {
      this.#shredPending = false;
      // secure_delete zeroes the pages, but the WAL still holds older images of them
      // (with the secret) until a checkpoint; fold and truncate it now, before the
      // deleting unit learns that its volume is gone.
      this.#checkpoint('crypto-shred');
    }
    if (!this.#asyncSync) {
      settleUnits(batch, outcomes);
      return;
    }
    // Numbered after the checkpoint: the sync that covers this batch also makes a shred
    // checkpoint's truncation of the WAL durable before the deleting unit resolves.
    this.#commitSeq++;
    this.#undurable.push({ seq: this.#commitSeq, units: batch, outcomes });
    this.#startSync();
  }

  /**
   * Starts one WAL fdatasync covering every batch committed so far, unless one is in
   * flight (its completion starts the next) or the store has failed. Never throws.
   */
  #startSync(): void {
    if (this.#syncInFlight || this.#syncFailed || this.#durableSeq >= this.#commitSeq) return;
    const target = this.#commitSeq;
    let fd: number | undefined;
    try {
      fd = this.#currentWalFd();
    } catch (err) {
      this.#onSyncFailed(err);
      return;
    }
    if (fd === undefined) {
      // No -wal file to sync: the checkpoint in #currentWalFd made everything durable.
      this.#durableSeq = target;
      this.#settleDurable();
      return;
    }
    this.#syncInFlight = true;
    const t0 = performance.now();
    let started: Promise<void>;
    try {
      started = this.#syncWal(fd);
    } catch (err) {
      started = Promise.reject(err);
    }
    started.then(
      () => {
        this.#syncInFlight = false;
        this.#stats.walSyncs++;
        this.#noteSyncTime(performance.now() - t0);
        this.#durableSeq = target;
        this.#settleDurable();
        this.#startSync();
      },
      (err: unknown) => {
        this.#syncInFlight = false;
        this.#onSyncFailed(err);
      },
    );
  }

  /**
   * Counts a slow sync and logs slow ones, at most once per SLOW_SYNC_LOG_INTERVAL_MS: the
   * storage's tail latency is the floor of every durable write's latency (key releases
   * included), so an operator chasing slow releases should see it in the log.
   */
  #noteSyncTime(ms: number): void {
    if (ms > this.#stats.maxWalSyncMs) this.#stats.maxWalSyncMs = ms;
    if (ms < SLOW_SYNC_MS) return;
    this.#stats.slowWalSyncs++;
    const log = this.#slowSyncLog;
    log.unlogged++;
    log.maxMs = Math.max(log.maxMs, ms);
    const now = performance.now();
    if (now - log.at < SLOW_SYNC_LOG_INTERVAL_MS) return;
    this.#logger.warn('slow WAL fdatasync', { slow_syncs: log.unlogged, max_ms: Math.round(log.maxMs), threshold_ms: SLOW_SYNC_MS, path: `${this.#path}-wal` });
    log.unlogged = 0;
    log.maxMs = 0;
    log.at = now;
  }

  /**
   * The descriptor to fdatasync: our own one of the -wal file SQLite writes. Every batch
   * checks that the path still names the file we hold (same device and inode; a TRUNCATE
   * checkpoint shortens the file in place and keeps it). When it does not (first call, or
   * the file replaced, removed or recreated), the file is looked up among this process's
   * open descriptors (/proc/self/fd: the one SQLite's connection holds, deleted or not) and
   * reopened through it, so the sync always reaches the file SQLite appends to. If that
   * cannot be told, a synchronous checkpoint (NORMAL syncs the WAL before it and the
   * database after it) makes the batch durable whichever file it is, and so on for every
   * batch until the file can be found again (logged once). Returns undefined in that case.
   */
  #currentWalFd(): number | undefined {
    const walPath = `${this.#path}-wal`;
    const st = statIfExists(walPath);
    const held = this.#wal;
    if (held && st && st.ino === held.ino && st.dev === held.dev) return held.fd;
    // The path changed, but not since we last looked into it and kept `held`.
    const seen = st ? `${st.dev}:${st.ino}` : 'none';
    if (held && seen === this.#walPathSeen) return held.fd;
    this.#walPathSeen = seen;

    const used = walFilesOfProcess(walPath, held?.fd);
    if (used === undefined) {
      // No /proc (not Linux): trust the path, as SQLite itself opened it by name.
      if (!st) return this.#walByCheckpoint(walPath, 'the -wal file is missing');
      if (held) this.#dropWal(true);
      return this.#openWal(walPath);
    }
    if (used.length !== 1) {
      return this.#walByCheckpoint(walPath, used.length === 0 ? 'no open -wal file found' : 'several -wal files open');
    }
    const file = used[0]!;
    if (held && file.dev === held.dev && file.ino === held.ino) {
      // SQLite still appends to the file we hold; the path was replaced or removed by
      // someone else. Keep syncing the right file, and say so once.
      this.#logger.warn('SQLite WAL path no longer names the file SQLite writes; syncing the open file', { path: walPath });
      return held.fd;
    }
    // SQLite writes to another file than the one we held: batches committed since the last
    // sync may be in either, so checkpoint before switching.
    if (held) this.#dropWal(true);
    const fd = this.#openWal(file.link);
    if (this.#walGone || !st || st.ino !== file.ino || st.dev !== file.dev) {
      this.#logger.warn('syncing the SQLite WAL through its open descriptor (the path does not name it)', { path: walPath });
    }
    this.#walGone = false;
    return fd;
  }

  #openWal(file: string): number {
    // Read-only is enough for fdatasync on Linux (libuv adds O_CLOEXEC); never O_CREAT:
    // only SQLite creates the file.
    const fd = fs.openSync(file, fs.constants.O_RDONLY);
    const own = fs.fstatSync(fd);
    this.#wal = { fd, dev: own.dev, ino: own.ino };
    return fd;
  }

  /** Closes our descriptor of the -wal file, checkpointing first when asked (see above). */
  #dropWal(checkpoint: boolean): void {
    if (checkpoint) this.#checkpointOrThrow();
    if (this.#wal) fs.closeSync(this.#wal.fd);
    this.#wal = undefined;
  }

  #walByCheckpoint(walPath: string, why: string): undefined {
    this.#dropWal(false);
    if (!this.#walGone) this.#logger.warn('cannot sync the SQLite WAL file; checkpointing every batch instead', { path: walPath, why });
    this.#walGone = true;
    this.#checkpointOrThrow();
    return undefined;
  }

  #checkpointOrThrow(): void {
    const r = this.#db.pragma('wal_checkpoint(TRUNCATE)') as { busy: number }[];
    if (r[0]?.busy) throw new Error('WAL checkpoint incomplete');
  }

  /** Resolves the batches the last completed sync made durable (all of them up to #durableSeq). */
  #settleDurable(): void {
    let n = 0;
    while (n < this.#undurable.length && this.#undurable[n]!.seq <= this.#durableSeq) n++;
    const done = this.#undurable.splice(0, n);
    for (const b of done) settleUnits(b.units, b.outcomes);
    if (this.#undurable.length === 0) this.#wakeDurableWaiters();
  }

  /**
   * A WAL sync failed: the committed-but-unsynced batches may or may not be on disk, and
   * retrying fsync proves nothing (the kernel may have dropped the dirty pages and cleared
   * the error). Reject their units, refuse every later write, and say so loudly.
   */
  #onSyncFailed(err: unknown): void {
    if (!this.#syncFailed) {
      this.#syncFailed = new DomainError('unavailable', 'store refuses writes after a failed sync of its write-ahead log', {
        hint: 'check the disk and the server log, then restart the server',
        cause: err,
      });
      this.#logger.error('fdatasync of the SQLite WAL failed: store refuses all further writes until restarted', {
        path: `${this.#path}-wal`,
        ...describeError(err),
      });
    }
    const failed = this.#undurable;
    this.#undurable = [];
    for (const b of failed) {
      this.#stats.failedBatches++;
      // A unit that threw keeps its own error: nothing of it was committed.
      b.units.forEach((u, i) => {
        const o = b.outcomes[i];
        u.reject(o && !o.ok ? o.error : this.#syncFailed);
      });
    }
    this.#wakeDurableWaiters();
  }

  #wakeDurableWaiters(): void {
    const waiters = this.#durableWaiters;
    this.#durableWaiters = [];
    for (const w of waiters) w();
  }

  /** Resolves once every committed batch is durable or failed. */
  #allDurable(): Promise<void> {
    if (this.#undurable.length === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.#durableWaiters.push(resolve));
  }

  #failBatch(units: QueuedUnit[], err: unknown): void {
    this.#stats.failedBatches++;
    this.#stats.units += units.length;
    this.#logger.error('write batch failed', { units: units.length, ...describeError(err) });
    for (const u of units) u.reject(err);
  }

  // ----- close -------------------------------------------------------------------------

  /** Refuses new writes, waits for queued ones, checkpoints the WAL and closes. Idempotent. */
  close(): Promise<void> {
    if (!this.#closing) {
      const drained =
        this.#queue.length === 0 && !this.#scheduled ? Promise.resolve() : new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
      this.#closing = drained.then(() => this.#allDurable()).then(() => this.#closeNow());
    }
    return this.#closing;
  }

  /**
   * Folds the WAL into the main file and truncates it, so old page images (which may hold
   * since-deleted sealed secrets) do not linger in the -wal file. Failure is logged only:
   * the data is committed either way.
   */
  #checkpoint(reason: string): void {
    if (this.#memory) return;
    try {
      this.#checkpointOrThrow();
    } catch (err) {
      this.#logger.warn('WAL checkpoint failed or incomplete', { reason, path: this.#path, ...describeError(err) });
    }
  }

  #closeNow(): void {
    this.#checkpoint('close');
    if (!this.#memory) {
      try {
        // The audit index's WAL folded too; it is rebuilt at open if this does not happen.
        this.#db.pragma(`${AUDIT_INDEX}.wal_checkpoint(TRUNCATE)`);
      } catch (err) {
        this.#logger.warn('audit index checkpoint failed', describeError(err));
      }
    }
    this.#dropWal(false);
    this.#db.close();
    this.#logger.info('store closed');
  }
}

/**
 * The distinct files (device, inode, a /proc path that reopens them) that this process
 * holds open under the name of the -wal file, deleted or not, other than `exceptFd`:
 * SQLite's connection(s). Undefined when /proc/self/fd cannot be read.
 */
function walFilesOfProcess(walPath: string, exceptFd?: number): { dev: number; ino: number; link: string }[] | undefined {
  let names: string[];
  let real: string;
  try {
    names = fs.readdirSync('/proc/self/fd');
    real = pathJoin(fs.realpathSync(dirname(walPath)), basename(walPath));
  } catch {
    return undefined;
  }
  const found = new Map<string, { dev: number; ino: number; link: string }>();
  for (const n of names) {
    if (Number(n) === exceptFd) continue;
    const link = `/proc/self/fd/${n}`;
    try {
      const target = fs.readlinkSync(link);
      if (target !== real && target !== `${real} (deleted)`) continue;
      const st = fs.statSync(link);
      found.set(`${st.dev}:${st.ino}`, { dev: st.dev, ino: st.ino, link });
    } catch {
      // closed meanwhile (readdir's own descriptor, another thread's file)
    }
  }
  return [...found.values()];
}

/** fdatasync of a file by name, blocking; a missing file has nothing to sync. */
function syncFileSync(file: string): void {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function statIfExists(file: string): fs.Stats | undefined {
  try {
    return fs.statSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

function settleUnits(units: QueuedUnit[], outcomes: UnitOutcome[]): void {
  units.forEach((unit, i) => {
    const o = outcomes[i];
    if (o === undefined) unit.reject(new Error('store write unit has no outcome'));
    else if (o.ok) unit.resolve(o.value);
    else unit.reject(o.error);
  });
}

/**
 * Opens (creating and migrating if needed) the SQLite store at options.path. Throws
 * DomainError failed_precondition when the database's schema is newer than this code.
 */
export function openSqliteStore(options: SqliteStoreOptions): SqliteStore {
  const logger = options.logger ?? silentLogger;
  if (options.path === '') throw errors.invalid('store path is empty');
  const durability = options.durability ?? 'async-wal-sync';
  if (!SQLITE_DURABILITIES.includes(durability)) throw errors.invalid(`durability must be one of ${SQLITE_DURABILITIES.join(', ')}`);
  const maxBatch = options.maxBatch ?? DEFAULT_MAX_BATCH[durability];
  if (!Number.isSafeInteger(maxBatch) || maxBatch < 1) throw errors.invalid('maxBatch must be a positive integer');
  assertMigrationsWellFormed(MIGRATIONS);

  const memory = options.path === ':memory:';
  if (!memory) prepareDatabaseFile(options.path, logger);
  const db = new Database(options.path, { timeout: BUSY_TIMEOUT_MS });
  try {
    configure(db, memory, durability);
    if (options.exclusive && !memory) lockExclusive(db);
    if (!memory) {
      // SQLite gives -wal/-shm the main file's mode; tighten leftovers of a looser past.
      tightenMode(`${options.path}-wal`, logger);
      tightenMode(`${options.path}-shm`, logger);
    }
    const schemaVersion = migrate(db, logger);
    attachAuditIndex(db, options.path, memory, options.exclusive === true, logger);
    // Migrations (and the exclusive lock's empty transaction) committed outside the group
    // commit, so with synchronous=NORMAL nothing synced them yet: once, blocking, at open.
    if (!memory && durability === 'async-wal-sync') syncFileSync(`${options.path}-wal`);
    const store = new SqliteStoreImpl(db, {
      schemaVersion,
      memory,
      path: options.path,
      logger,
      maxBatch,
      now: options.now ?? (() => new Date()),
      hooks: options.hooks ?? {},
      durability,
      syncWal: options.syncWal ?? fdatasyncFd,
    });
    logger.info('store opened', { path: options.path, schemaVersion, durability });
    return store;
  } catch (err) {
    db.close();
    if ((err as { code?: string }).code === 'SQLITE_BUSY') {
      throw errors.precondition('the database is in use by another process', { hint: 'is another virtkm-server running on this data directory?', cause: err });
    }
    throw err;
  }
}
