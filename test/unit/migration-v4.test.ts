/**
 * Schema migration v4 (unencrypted volumes, encrypt/decrypt rotations) on a v3 database
 * that holds data: the store opens it, rebuilds volumes and every table referencing them,
 * and afterwards every row is still there, the foreign keys and their cascades still hold,
 * the indexes are back, the new formats and kinds are accepted and the schema ties
 * unencrypted formats to active version 0.
 */
import test from 'ava';
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DomainError } from '../../shared/src/errors.js';
import { LATEST_SCHEMA_VERSION, MIGRATIONS } from '../../server/src/store/migrations.js';
import { openSqliteStore } from '../../server/src/store/sqlite-store.js';

const T = '2026-01-01T00:00:00.000Z';

/** A database file at schema v3 with a host, guests, volumes, keys, statuses and rotations. */
function v3Database(path: string): void {
  const db = new Database(path);
  try {
    db.pragma('foreign_keys = ON');
    db.exec('CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL) STRICT;');
    for (const m of MIGRATIONS.filter((x) => x.version <= 3)) {
      db.exec(m.sql);
      db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)').run(m.version, m.name, T);
    }
    db.exec(`
INSERT INTO hosts (id, name, state, box_public_key, cert_serial, enrolled_at, desired_revision) VALUES ('h1', 'host1', 'enrolled', x'00', 's1', '${T}', 7);
INSERT INTO volumes (id, name, size_bytes, format, cipher, key_size_bits, sector_size, active_version, created_at, materialized_at)
  VALUES ('v1', 'vol1', 9007199254740993, 'qcow2-luks', 'aes-xts-plain64', 512, 512, 2, '${T}', '${T}'),
         ('v2', 'vol2', 1048576, 'luks2', 'aes-xts-plain64', 512, 4096, 1, '${T}', NULL);
INSERT INTO key_versions (volume_id, version, state, sealed, created_at, retired_at, destroy_after)
  VALUES ('v1', 1, 'retired', x'0102', '${T}', '${T}', '2026-02-01T00:00:00.000Z'),
         ('v1', 2, 'active', x'0304', '${T}', NULL, NULL),
         ('v2', 1, 'active', x'0506', '${T}', NULL, NULL);
INSERT INTO guests (id, name, domain_xml, host_id, autostart, created_at, updated_at, generation) VALUES ('g1', 'guest1', '<domain/>', 'h1', 1, '${T}', '${T}', 3);
INSERT INTO guest_volumes (guest_id, volume_id, position) VALUES ('g1', 'v1', 0), ('g1', 'v2', 1);
INSERT INTO volume_status (volume_id, host_id, key_version, phase, reason, reported_at) VALUES ('v1', 'h1', 2, 'ready', '', '${T}');
INSERT INTO rotations (id, volume_id, kind, state, reason, priority, due_at, from_version, to_version, host_id, step, bytes_done, bytes_total, bytes_per_second, error, mechanism, requested_by, created_at, started_at, finished_at)
  VALUES ('r1', 'v1', 'reencrypt', 'done', 'manual', 50, NULL, 1, 2, 'h1', 'done', 10, 10, 0, '', 'qemu-convert', 'admin:a', '${T}', '${T}', '${T}'),
         ('r2', 'v2', 'rekey', 'queued', 'manual', 50, NULL, 1, 0, NULL, 'queued', 0, 0, 0, '', '', 'admin:a', '${T}', NULL, NULL);
INSERT INTO rotation_policies (scope, target_id, max_key_age_seconds, kind, reencrypt_after_move_seconds, updated_at) VALUES ('global', '', 86400, 'rekey', 0, '${T}');
`);
  } finally {
    db.close();
  }
}

test('migration v4 keeps every row of a v3 database, its foreign keys, cascades and indexes, and accepts the new formats and kinds', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-mig4-'));
  try {
    const path = join(dir, 'virtkm.db');
    v3Database(path);
    const store = openSqliteStore({ path });
    try {
      // The data, through the store's own reads.
      const v1 = store.getVolume('v1')!;
      t.deepEqual([v1.name, v1.sizeBytes, v1.format, v1.activeVersion, v1.sectorSize], ['vol1', 9007199254740993n, 'qcow2-luks', 2, 512]);
      t.is(store.getVolume('v2')!.format, 'luks2');
      t.true(store.isMaterialized('v1'));
      t.false(store.isMaterialized('v2'));
      t.deepEqual(store.getKeyVersions('v1').map((k) => [k.version, k.state, Buffer.from(k.sealed!).toString('hex'), k.destroyAfter ?? null]), [
        [1, 'retired', '0102', '2026-02-01T00:00:00.000Z'],
        [2, 'active', '0304', null],
      ]);
      t.deepEqual(store.getGuest('g1')!.volumeIds, ['v1', 'v2']);
      t.true(store.isVolumePlacedOnHost('v1', 'h1'));
      t.is(store.getReleasable('v1', 'h1')?.key.version, 2);
      t.deepEqual(store.volumeStatuses('v1').map((s) => [s.hostId, s.keyVersion, s.phase]), [['h1', 2, 'ready']]);
      t.deepEqual([store.getRotation('r1')!.mechanism, store.getRotation('r2')!.state], ['qemu-convert', 'queued']);
      t.is(store.openRotationOfVolume('v2')!.id, 'r2');
      t.is(store.getHost('h1')!.desiredRevision, 7);
      t.is(store.listPolicies().length, 1);

      // The new formats and kinds.
      await store.write((tx) => {
        tx.insertVolume({ id: 'v3', name: 'vol3', sizeBytes: 1n << 20n, format: 'raw', cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512, activeVersion: 0, createdAt: T });
        tx.upsertGuest({ ...store.getGuest('g1')!, volumeIds: ['v1', 'v2', 'v3'] });
        tx.insertRotation({ ...store.getRotation('r1')!, id: 'r3', volumeId: 'v3', kind: 'encrypt', state: 'running', fromVersion: 0, toVersion: 1 });
      });
      t.is(store.getVolume('v3')!.format, 'raw');
      t.is(store.getRotation('r3')!.kind, 'encrypt');
      // The partial unique index is back: a second open rotation of v3 is refused.
      const dup = await t.throwsAsync(store.write((tx) => tx.insertRotation({ ...store.getRotation('r3')!, id: 'r4' })), { instanceOf: DomainError });
      t.is(dup?.kind, 'already_exists');
      // An unencrypted format with a key version, or an encrypted one without: refused.
      const checkFails = async (fn: () => Promise<unknown>) => {
        const code = await fn().then(
          () => 'ok',
          (err: unknown) => (err as { code?: string }).code ?? 'other',
        );
        t.is(code, 'SQLITE_CONSTRAINT_CHECK');
      };
      await checkFails(() => store.write((tx) => tx.insertVolume({ ...store.getVolume('v3')!, id: 'v4', name: 'vol4', activeVersion: 1 })));
      await checkFails(() => store.write((tx) => tx.insertVolume({ ...store.getVolume('v1')!, id: 'v5', name: 'vol5', activeVersion: 0 })));
      // Encrypting v3: key and format change together.
      await store.write((tx) => {
        tx.insertKeyVersion({ volumeId: 'v3', version: 1, state: 'pending', sealed: new Uint8Array([7]), createdAt: T });
        tx.setVolumeFormat('v3', 'luks', 1);
      });
      t.deepEqual([store.getVolume('v3')!.format, store.getVolume('v3')!.activeVersion, store.getActiveKey('v3')?.state], ['luks', 1, 'active']);

      // Foreign keys point at the new volumes table: deleting a volume cascades.
      await store.write((tx) => {
        tx.upsertGuest({ ...store.getGuest('g1')!, volumeIds: ['v2', 'v3'] });
        tx.deleteVolume('v1');
      });
      t.deepEqual(store.getKeyVersions('v1'), []);
      t.deepEqual(store.volumeStatuses('v1'), []);
      t.is(store.getRotation('r1'), undefined, 'rotations cascade with their volume');
      const raw = new Database(path, { readonly: true, fileMustExist: true });
      try {
        const refs = raw.prepare<[], { sql: string }>("SELECT sql FROM sqlite_schema WHERE type = 'table' AND sql LIKE '%REFERENCES%'").all().map((r) => r.sql);
        t.false(refs.some((s) => /_v4/.test(s)), 'no reference names a temporary table');
        const idx = raw.prepare<[], { name: string }>("SELECT name FROM sqlite_schema WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name").all().map((r) => r.name);
        for (const name of ['key_versions_retired', 'guest_volumes_by_volume', 'volume_status_by_host', 'rotations_one_open_per_volume', 'rotations_by_state', 'rotations_by_host', 'rotations_by_volume', 'guests_by_host']) {
          t.true(idx.includes(name), `index ${name}`);
        }
        t.deepEqual(raw.prepare('PRAGMA foreign_key_check').all(), []);
        t.is(raw.prepare<[], { v: number }>('SELECT max(version) AS v FROM schema_migrations').get()?.v, LATEST_SCHEMA_VERSION);
      } finally {
        raw.close();
      }
    } finally {
      await store.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
