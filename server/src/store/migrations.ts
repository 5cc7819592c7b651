/**
 * Versioned schema of the SQLite store. Migrations are append-only: never edit or reorder
 * one that has shipped, add a new entry with the next version instead. The store applies
 * every pending migration inside one transaction when it opens the database and records
 * each in `schema_migrations`; it refuses a database whose version is newer than the
 * newest entry here (an older server must not write a schema it does not understand).
 */

/** One schema migration. */
export interface Migration {
  /** Strictly increasing, starting at 1, without gaps. */
  version: number;
  /** Short identifier, stored with the version to detect a mismatched history. */
  name: string;
  /** DDL run with `exec` (may hold several statements). */
  sql: string;
}

/**
 * Table of applied migrations. Created outside the numbered list because the list's
 * bookkeeping lives in it.
 */
export const SCHEMA_MIGRATIONS_DDL = `
CREATE TABLE IF NOT EXISTS schema_migrations (
  version    INTEGER PRIMARY KEY,
  name       TEXT NOT NULL,
  applied_at TEXT NOT NULL
) STRICT;
`;

/**
 * All migrations, oldest first.
 *
 * Notes on the initial schema:
 * - STRICT tables, so a wrongly typed bind fails loudly instead of being coerced.
 * - volumes.size_bytes is a 64-bit INTEGER read with safeIntegers (bigint), so values up
 *   to 2^63-1 round-trip exactly.
 * - guest_volumes(volume_id, guest_id) plus the guests primary key make the key-release
 *   check `isVolumePlacedOnHost` one index search followed by primary-key lookups.
 * - key_versions.sealed holds the sealed envelope only; deleting a row relies on
 *   `PRAGMA secure_delete` to overwrite the bytes (crypto-shredding).
 */
export const MIGRATIONS: readonly Migration[] = Object.freeze([
  {
    version: 1,
    name: 'initial',
    sql: `
CREATE TABLE volumes (
  id             TEXT PRIMARY KEY,
  name           TEXT NOT NULL UNIQUE,
  size_bytes     INTEGER NOT NULL CHECK (size_bytes >= 0),
  format         TEXT NOT NULL CHECK (format IN ('luks', 'qcow2-luks', 'luks2', 'plain')),
  cipher         TEXT NOT NULL,
  key_size_bits  INTEGER NOT NULL,
  sector_size    INTEGER NOT NULL,
  active_version INTEGER NOT NULL CHECK (active_version >= 0),
  created_at     TEXT NOT NULL
) STRICT;

CREATE TABLE key_versions (
  volume_id  TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
  version    INTEGER NOT NULL CHECK (version >= 1),
  state      TEXT NOT NULL CHECK (state IN ('pending', 'active', 'retired', 'destroyed')),
  sealed     BLOB,
  created_at TEXT NOT NULL,
  PRIMARY KEY (volume_id, version)
) STRICT;

CREATE TABLE hosts (
  id             TEXT PRIMARY KEY,
  name           TEXT NOT NULL UNIQUE,
  state          TEXT NOT NULL CHECK (state IN ('enrolled', 'revoked')),
  box_public_key BLOB NOT NULL,
  cert_serial    TEXT NOT NULL,
  enrolled_at    TEXT NOT NULL,
  revoked_at     TEXT,
  last_seen_at   TEXT
) STRICT;

CREATE TABLE guests (
  id         TEXT PRIMARY KEY,
  name       TEXT NOT NULL UNIQUE,
  domain_xml TEXT NOT NULL,
  host_id    TEXT REFERENCES hosts(id),
  autostart  INTEGER NOT NULL CHECK (autostart IN (0, 1)),
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  generation INTEGER NOT NULL
) STRICT;
CREATE INDEX guests_by_host ON guests(host_id, name);

CREATE TABLE guest_volumes (
  guest_id  TEXT NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
  volume_id TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
  position  INTEGER NOT NULL,
  PRIMARY KEY (guest_id, position),
  UNIQUE (guest_id, volume_id)
) STRICT;
CREATE INDEX guest_volumes_by_volume ON guest_volumes(volume_id, guest_id);

CREATE TABLE enrollment_tokens (
  id          TEXT PRIMARY KEY,
  host_name   TEXT NOT NULL,
  secret_hash BLOB NOT NULL,
  created_at  TEXT NOT NULL,
  expires_at  TEXT NOT NULL,
  used_at     TEXT,
  created_by  TEXT NOT NULL
) STRICT;

CREATE TABLE certificates (
  serial     TEXT PRIMARY KEY,
  role       TEXT NOT NULL CHECK (role IN ('admin', 'frontend', 'host')),
  name       TEXT NOT NULL,
  issued_at  TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  revoked_at TEXT
) STRICT;

CREATE TABLE audit_log (
  seq         INTEGER PRIMARY KEY,
  time        TEXT NOT NULL,
  actor       TEXT NOT NULL,
  action      TEXT NOT NULL,
  target      TEXT NOT NULL,
  outcome     TEXT NOT NULL,
  detail_json TEXT NOT NULL,
  prev_hash   TEXT NOT NULL,
  hash        TEXT NOT NULL
) STRICT;
CREATE INDEX audit_by_action ON audit_log(action, seq);
CREATE INDEX audit_by_target ON audit_log(target, seq);

CREATE TABLE settings (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;
`,
  },
  {
    version: 2,
    name: 'agent-stream',
    // What hosts report, the per-host desired-state revision, and the source host of a
    // guest being handed over by a move.
    sql: `
ALTER TABLE guests ADD COLUMN handoff_from_host_id TEXT REFERENCES hosts(id);
ALTER TABLE hosts ADD COLUMN desired_revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE volumes ADD COLUMN materialized_at TEXT;
CREATE INDEX guests_by_handoff ON guests(handoff_from_host_id);

CREATE TABLE guest_status (
  guest_id    TEXT NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
  host_id     TEXT NOT NULL REFERENCES hosts(id),
  generation  INTEGER NOT NULL,
  phase       TEXT NOT NULL,
  reason      TEXT NOT NULL,
  reported_at TEXT NOT NULL,
  PRIMARY KEY (guest_id, host_id)
) STRICT;
CREATE INDEX guest_status_by_host ON guest_status(host_id);

CREATE TABLE volume_status (
  volume_id   TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
  host_id     TEXT NOT NULL REFERENCES hosts(id),
  key_version INTEGER NOT NULL,
  phase       TEXT NOT NULL,
  reason      TEXT NOT NULL,
  reported_at TEXT NOT NULL,
  PRIMARY KEY (volume_id, host_id)
) STRICT;
CREATE INDEX volume_status_by_host ON volume_status(host_id);

-- Image files a host must delete: volumes crypto-shredded with --delete-volumes.
CREATE TABLE image_deletions (
  volume_id    TEXT NOT NULL,
  host_id      TEXT NOT NULL REFERENCES hosts(id),
  format       TEXT NOT NULL,
  requested_at TEXT NOT NULL,
  PRIMARY KEY (volume_id, host_id)
) STRICT;
`,
  },
  {
    version: 3,
    name: 'key-rotation',
    // Rotations (one open per volume: the partial unique index), rotation policies, and
    // when a retired key version is destroyed.
    sql: `
ALTER TABLE key_versions ADD COLUMN retired_at TEXT;
ALTER TABLE key_versions ADD COLUMN destroy_after TEXT;
CREATE INDEX key_versions_retired ON key_versions(destroy_after) WHERE state = 'retired';

CREATE TABLE rotations (
  id               TEXT PRIMARY KEY,
  volume_id        TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
  kind             TEXT NOT NULL CHECK (kind IN ('rekey', 'reencrypt')),
  state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
  reason           TEXT NOT NULL,
  priority         INTEGER NOT NULL,
  due_at           TEXT,
  from_version     INTEGER NOT NULL,
  to_version       INTEGER NOT NULL,
  host_id          TEXT REFERENCES hosts(id),
  step             TEXT NOT NULL,
  bytes_done       INTEGER NOT NULL,
  bytes_total      INTEGER NOT NULL,
  bytes_per_second INTEGER NOT NULL,
  error            TEXT NOT NULL,
  mechanism        TEXT NOT NULL,
  requested_by     TEXT NOT NULL,
  created_at       TEXT NOT NULL,
  started_at       TEXT,
  finished_at      TEXT
) STRICT;
CREATE UNIQUE INDEX rotations_one_open_per_volume ON rotations(volume_id) WHERE state IN ('queued', 'running');
CREATE INDEX rotations_by_state ON rotations(state, priority DESC, due_at, created_at);
CREATE INDEX rotations_by_host ON rotations(host_id, state);
CREATE INDEX rotations_by_volume ON rotations(volume_id, created_at);

CREATE TABLE rotation_policies (
  scope                        TEXT NOT NULL CHECK (scope IN ('global', 'guest', 'volume')),
  target_id                    TEXT NOT NULL,
  max_key_age_seconds          INTEGER NOT NULL CHECK (max_key_age_seconds >= 0),
  kind                         TEXT NOT NULL CHECK (kind IN ('rekey', 'reencrypt')),
  reencrypt_after_move_seconds INTEGER NOT NULL CHECK (reencrypt_after_move_seconds >= 0),
  updated_at                   TEXT NOT NULL,
  PRIMARY KEY (scope, target_id)
) STRICT;
`,
  },
  {
    version: 4,
    name: 'unencrypted-volumes',
    // Unencrypted volumes (formats raw and qcow2: active_version 0, no key row) and the
    // rotation kinds that convert them (encrypt, decrypt). SQLite cannot change a CHECK
    // constraint in place, so volumes and rotations are rebuilt. The store migrates with
    // foreign keys on and inside one transaction (where PRAGMA foreign_keys cannot be
    // switched off), so dropping the old volumes table while key_versions, guest_volumes,
    // volume_status and rotations still referenced it would cascade-delete their rows:
    // every table that references volumes is rebuilt too, as a copy that references the
    // new table, and the old ones are dropped children first. Renaming volumes_v4 to
    // volumes then rewrites the copies' REFERENCES clauses (SQLite >= 3.26 without
    // legacy_alter_table). Indexes go with their tables and are created again.
    sql: `
CREATE TABLE volumes_v4 (
  id              TEXT PRIMARY KEY,
  name            TEXT NOT NULL UNIQUE,
  size_bytes      INTEGER NOT NULL CHECK (size_bytes >= 0),
  format          TEXT NOT NULL CHECK (format IN ('luks', 'qcow2-luks', 'luks2', 'plain', 'raw', 'qcow2')),
  cipher          TEXT NOT NULL,
  key_size_bits   INTEGER NOT NULL,
  sector_size     INTEGER NOT NULL,
  active_version  INTEGER NOT NULL CHECK (active_version >= 0),
  created_at      TEXT NOT NULL,
  materialized_at TEXT,
  -- An unencrypted volume has no key version; an encrypted one always has an active one.
  CHECK ((format IN ('raw', 'qcow2')) = (active_version = 0))
) STRICT;
INSERT INTO volumes_v4 (id, name, size_bytes, format, cipher, key_size_bits, sector_size, active_version, created_at, materialized_at)
  SELECT id, name, size_bytes, format, cipher, key_size_bits, sector_size, active_version, created_at, materialized_at FROM volumes;

CREATE TABLE key_versions_v4 (
  volume_id     TEXT NOT NULL REFERENCES volumes_v4(id) ON DELETE CASCADE,
  version       INTEGER NOT NULL CHECK (version >= 1),
  state         TEXT NOT NULL CHECK (state IN ('pending', 'active', 'retired', 'destroyed')),
  sealed        BLOB,
  created_at    TEXT NOT NULL,
  retired_at    TEXT,
  destroy_after TEXT,
  PRIMARY KEY (volume_id, version)
) STRICT;
INSERT INTO key_versions_v4 (volume_id, version, state, sealed, created_at, retired_at, destroy_after)
  SELECT volume_id, version, state, sealed, created_at, retired_at, destroy_after FROM key_versions;

CREATE TABLE guest_volumes_v4 (
  guest_id  TEXT NOT NULL REFERENCES guests(id) ON DELETE CASCADE,
  volume_id TEXT NOT NULL REFERENCES volumes_v4(id) ON DELETE CASCADE,
  position  INTEGER NOT NULL,
  PRIMARY KEY (guest_id, position),
  UNIQUE (guest_id, volume_id)
) STRICT;
INSERT INTO guest_volumes_v4 (guest_id, volume_id, position) SELECT guest_id, volume_id, position FROM guest_volumes;

CREATE TABLE volume_status_v4 (
  volume_id   TEXT NOT NULL REFERENCES volumes_v4(id) ON DELETE CASCADE,
  host_id     TEXT NOT NULL REFERENCES hosts(id),
  key_version INTEGER NOT NULL,
  phase       TEXT NOT NULL,
  reason      TEXT NOT NULL,
  reported_at TEXT NOT NULL,
  PRIMARY KEY (volume_id, host_id)
) STRICT;
INSERT INTO volume_status_v4 (volume_id, host_id, key_version, phase, reason, reported_at)
  SELECT volume_id, host_id, key_version, phase, reason, reported_at FROM volume_status;

CREATE TABLE rotations_v4 (
  id               TEXT PRIMARY KEY,
  volume_id        TEXT NOT NULL REFERENCES volumes_v4(id) ON DELETE CASCADE,
  kind             TEXT NOT NULL CHECK (kind IN ('rekey', 'reencrypt', 'encrypt', 'decrypt')),
  state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
  reason           TEXT NOT NULL,
  priority         INTEGER NOT NULL,
  due_at           TEXT,
  from_version     INTEGER NOT NULL,
  to_version       INTEGER NOT NULL,
  host_id          TEXT REFERENCES hosts(id),
  step             TEXT NOT NULL,
  bytes_done       INTEGER NOT NULL,
  bytes_total      INTEGER NOT NULL,
  bytes_per_second INTEGER NOT NULL,
  error            TEXT NOT NULL,
  mechanism        TEXT NOT NULL,
  requested_by     TEXT NOT NULL,
  created_at       TEXT NOT NULL,
  started_at       TEXT,
  finished_at      TEXT
) STRICT;
INSERT INTO rotations_v4 (id, volume_id, kind, state, reason, priority, due_at, from_version, to_version, host_id, step, bytes_done, bytes_total,
                          bytes_per_second, error, mechanism, requested_by, created_at, started_at, finished_at)
  SELECT id, volume_id, kind, state, reason, priority, due_at, from_version, to_version, host_id, step, bytes_done, bytes_total,
         bytes_per_second, error, mechanism, requested_by, created_at, started_at, finished_at FROM rotations;

DROP TABLE rotations;
DROP TABLE volume_status;
DROP TABLE guest_volumes;
DROP TABLE key_versions;
DROP TABLE volumes;
ALTER TABLE volumes_v4 RENAME TO volumes;
ALTER TABLE key_versions_v4 RENAME TO key_versions;
ALTER TABLE guest_volumes_v4 RENAME TO guest_volumes;
ALTER TABLE volume_status_v4 RENAME TO volume_status;
ALTER TABLE rotations_v4 RENAME TO rotations;

CREATE INDEX key_versions_retired ON key_versions(destroy_after) WHERE state = 'retired';
CREATE INDEX guest_volumes_by_volume ON guest_volumes(volume_id, guest_id);
CREATE INDEX volume_status_by_host ON volume_status(host_id);
CREATE UNIQUE INDEX rotations_one_open_per_volume ON rotations(volume_id) WHERE state IN ('queued', 'running');
CREATE INDEX rotations_by_state ON rotations(state, priority DESC, due_at, created_at);
CREATE INDEX rotations_by_host ON rotations(host_id, state);
CREATE INDEX rotations_by_volume ON rotations(volume_id, created_at);
`,
  },
  {
    version: 5,
    name: 'audit-index-apart',
    // The audit log's index by target moves to its own database file (the audit index,
    // sqlite-store.ts attachAuditIndex), rebuilt there from audit_log at the next open.
    // Each key release inserts at a random place of that index; in the main file its page
    // splits made SQLite scan the whole 64 MiB page cache at the next COMMIT
    // (docs/benchmarks.md, run G).
    sql: `
DROP INDEX IF EXISTS audit_by_target;
`,
  },
]);

/** The schema version this code writes: the newest migration's version. */
export const LATEST_SCHEMA_VERSION: number = MIGRATIONS.reduce((max, m) => Math.max(max, m.version), 0);

/**
 * Checks that a migration list is ordered 1, 2, 3, ... with unique names. Called by the
 * store at open so a badly edited list fails before it touches a database.
 */
export function assertMigrationsWellFormed(list: readonly Migration[]): void {
  const names = new Set<string>();
  list.forEach((m, i) => {
    if (m.version !== i + 1) throw new Error(`migration list out of order at index ${i}`);
    if (names.has(m.name)) throw new Error(`duplicate migration name ${m.name}`);
    names.add(m.name);
  });
}
