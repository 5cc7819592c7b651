// Unit tests of the SQLite store: schema, CRUD, group commit, pagination, audit chain on
// disk (tampering through a raw connection), crypto-shredding with secure_delete, and the
// durability modes (the WAL fdatasync off the event loop).
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import anyTest from 'ava';
import type { ExecutionContext, TestFn } from 'ava';
import Database from 'better-sqlite3';

import { fdatasyncFd } from '../../shared/src/durable-fs.js';
import { DomainError } from '../../shared/src/errors.js';
import type { ErrorKind } from '../../shared/src/errors.js';
import { createLogger } from '../../shared/src/log.js';
import type { Logger } from '../../shared/src/log.js';
import type { CertificateRecord, EnrollmentTokenRecord, GuestRecord, HostRecord, VolumeRecord } from '../../server/src/domain/model.js';
import { LATEST_SCHEMA_VERSION } from '../../server/src/store/migrations.js';
import { openSqliteStore } from '../../server/src/store/sqlite-store.js';
import type { SqliteStore, SqliteStoreOptions } from '../../server/src/store/sqlite-store.js';
import type { StoreWriter } from '../../server/src/store/ports.js';

interface Ctx {
  dir: string;
  dbPath: string;
  /** Stores opened by the test; closed (if still open) after it. */
  opened: SqliteStore[];
  open: (extra?: Partial<SqliteStoreOptions>) => SqliteStore;
}

const test = anyTest as TestFn<Ctx>;

test.beforeEach((t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'virtkm-store-'));
  const dbPath = path.join(dir, 'virtkm.db');
  const opened: SqliteStore[] = [];
  t.context = {
    dir,
    dbPath,
    opened,
    open: (extra = {}) => {
      const s = openSqliteStore({ path: dbPath, ...extra });
      opened.push(s);
      return s;
    },
  };
});

test.afterEach.always(async (t) => {
  for (const s of t.context.opened) {
    try {
      await s.close();
    } catch {
      // already closed
    }
  }
  fs.rmSync(t.context.dir, { recursive: true, force: true });
});

// ----- fixtures ------------------------------------------------------------------------

const NOW = '2024-06-01T10:00:00.000Z';

function volume(name: string, over: Partial<VolumeRecord> = {}): VolumeRecord {
  return {
    id: `vol-${name}`,
    name,
    sizeBytes: 10n * 1024n ** 3n,
    format: 'luks2',
    cipher: 'aes-xts-plain64',
    keySizeBits: 512,
    sectorSize: 4096,
    activeVersion: 1,
    createdAt: NOW,
    ...over,
  };
}

function host(name: string, over: Partial<HostRecord> = {}): HostRecord {
  return {
    id: `host-${name}`,
    name,
    state: 'enrolled',
    boxPublicKey: new Uint8Array(32).fill(7),
    certSerial: 'ab01',
    enrolledAt: NOW,
    revokedAt: null,
    lastSeenAt: null,
    desiredRevision: 0,
    ...over,
  };
}

function guest(name: string, over: Partial<GuestRecord> = {}): GuestRecord {
  return {
    id: `guest-${name}`,
    name,
    domainXml: `<domain><name>${name}</name></domain>`,
    hostId: null,
    autostart: false,
    createdAt: NOW,
    updatedAt: NOW,
    generation: 1,
    volumeIds: [],
    handoffFromHostId: null,
    ...over,
  };
}

function token(id: string): EnrollmentTokenRecord {
  return {
    id,
    hostName: 'h1',
    secretHash: new Uint8Array(32).fill(9),
    createdAt: NOW,
    expiresAt: '2024-06-02T10:00:00.000Z',
    usedAt: null,
    createdBy: 'admin:alice',
  };
}

function cert(serial: string): CertificateRecord {
  return { serial, role: 'host', name: 'h1', issuedAt: NOW, expiresAt: '2025-06-01T10:00:00.000Z', revokedAt: null };
}

/** Asserts that a promise rejects with a DomainError of the kind (and message). */
async function rejectsKind(t: ExecutionContext<Ctx>, p: Promise<unknown>, kind: ErrorKind, message?: string): Promise<DomainError> {
  const err = await t.throwsAsync(p, { instanceOf: DomainError });
  t.is(err?.kind, kind);
  if (message !== undefined) t.is(err?.message, message);
  return err as DomainError;
}

/** Opens the file with a raw connection (for inspection and tampering), runs fn, closes. */
function withRaw<T>(dbPath: string, fn: (db: Database.Database) => T): T {
  const db = new Database(dbPath);
  try {
    return fn(db);
  } finally {
    db.close();
  }
}

async function seedAudit(store: SqliteStore, n: number): Promise<void> {
  await store.write((tx) => {
    for (let i = 1; i <= n; i++) {
      tx.appendAudit({ actor: 'admin:alice', action: i % 2 ? 'volume.create' : 'key.release', target: `vol-${i}`, outcome: 'ok', detail: { i } });
    }
  });
}

// ----- schema and file -----------------------------------------------------------------

test('creates the database file with mode 0600 and WAL journal', async (t) => {
  const store = t.context.open();
  await store.write((tx) => tx.setSetting('server.id', 'abc'));
  t.is(fs.statSync(t.context.dbPath).mode & 0o777, 0o600);
  for (const suffix of ['-wal', '-shm']) {
    const f = t.context.dbPath + suffix;
    if (fs.existsSync(f)) t.is(fs.statSync(f).mode & 0o777, 0o600, suffix);
  }
  t.is(store.schemaVersion, LATEST_SCHEMA_VERSION);
  withRaw(t.context.dbPath, (db) => t.is(db.pragma('journal_mode', { simple: true }), 'wal'));
});

test('migrations are idempotent across reopen and data survives', async (t) => {
  const first = t.context.open();
  await first.write((tx) => tx.insertVolume(volume('a')));
  await first.close();
  const second = t.context.open();
  t.is(second.schemaVersion, LATEST_SCHEMA_VERSION);
  t.is(second.getVolumeByName('a')?.id, 'vol-a');
  await second.close();
  withRaw(t.context.dbPath, (db) => {
    const rows = db.prepare('SELECT version FROM schema_migrations ORDER BY version').pluck().all();
    t.deepEqual(
      rows,
      Array.from({ length: LATEST_SCHEMA_VERSION }, (_, i) => i + 1),
    );
  });
});

test('refuses a database whose schema is newer than the code', async (t) => {
  await t.context.open().close();
  withRaw(t.context.dbPath, (db) => {
    db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)').run(LATEST_SCHEMA_VERSION + 1, 'future', NOW);
  });
  const err = t.throws(() => openSqliteStore({ path: t.context.dbPath }), { instanceOf: DomainError });
  t.is(err?.kind, 'failed_precondition');
  t.false(err?.message.includes(t.context.dbPath));
});

test('in-memory store works for tests of other modules', async (t) => {
  const store = openSqliteStore({ path: ':memory:' });
  await store.write((tx) => tx.insertVolume(volume('m')));
  t.is(store.countVolumes(), 1);
  await store.close();
});

// ----- volumes and keys ----------------------------------------------------------------

test('volume round-trip keeps large bigint sizes exactly', async (t) => {
  const store = t.context.open();
  const sizes = [2n ** 53n + 1n, 2n ** 63n - 1n, 0n];
  await store.write((tx) => sizes.forEach((s, i) => tx.insertVolume(volume(`v${i}`, { sizeBytes: s }))));
  for (const [i, s] of sizes.entries()) {
    const v = store.getVolume(`vol-v${i}`);
    t.deepEqual(v, volume(`v${i}`, { sizeBytes: s }));
    t.is(typeof v?.keySizeBits, 'number');
  }
  await store.close();
  const again = t.context.open();
  t.is(again.getVolumeByName('v1')?.sizeBytes, 2n ** 63n - 1n);
  t.is(again.countVolumes(), 3);
  t.is(again.getVolume('missing'), undefined);
  t.is(again.getVolumeByName('missing'), undefined);
});

test('volume size beyond int64 is invalid_argument', async (t) => {
  const store = t.context.open();
  await rejectsKind(t, store.write((tx) => tx.insertVolume(volume('big', { sizeBytes: 2n ** 63n }))), 'invalid_argument');
  await rejectsKind(t, store.write((tx) => tx.insertVolume(volume('neg', { sizeBytes: -1n }))), 'invalid_argument');
});

test('duplicate volume name or id is already_exists with a safe message', async (t) => {
  const store = t.context.open();
  await store.write((tx) => tx.insertVolume(volume('a')));
  const e1 = await rejectsKind(t, store.write((tx) => tx.insertVolume(volume('a', { id: 'other' }))), 'already_exists', 'volume name already exists');
  t.false(/UNIQUE|volumes\.|INSERT/i.test(e1.message));
  await rejectsKind(t, store.write((tx) => tx.insertVolume(volume('b', { id: 'vol-a' }))), 'already_exists', 'volume already exists');
});

test('key versions: active key, rotation, unknown volume', async (t) => {
  const store = t.context.open();
  const s1 = crypto.randomBytes(48);
  const s2 = crypto.randomBytes(48);
  await store.write((tx) => {
    tx.insertVolume(volume('a'));
    tx.insertKeyVersion({ volumeId: 'vol-a', version: 1, state: 'active', sealed: s1, createdAt: NOW });
  });
  t.deepEqual(Buffer.from(store.getActiveKey('vol-a')?.sealed ?? []), s1);
  await store.write((tx) => tx.insertKeyVersion({ volumeId: 'vol-a', version: 2, state: 'pending', sealed: s2, createdAt: NOW }));
  t.is(store.getActiveKey('vol-a')?.version, 1);
  await store.write((tx) => tx.setActiveVersion('vol-a', 2));
  const active = store.getActiveKey('vol-a');
  t.is(active?.version, 2);
  t.is(active?.state, 'active');
  t.deepEqual(Buffer.from(active?.sealed ?? []), s2);
  t.deepEqual(
    store.getKeyVersions('vol-a').map((k) => [k.version, k.state]),
    [
      [1, 'retired'],
      [2, 'active'],
    ],
  );
  t.is(store.getVolume('vol-a')?.activeVersion, 2);
  t.is(store.getActiveKey('missing'), undefined);
  await rejectsKind(
    t,
    store.write((tx) => tx.insertKeyVersion({ volumeId: 'missing', version: 1, state: 'active', sealed: s1, createdAt: NOW })),
    'not_found',
    'volume not found',
  );
  await rejectsKind(
    t,
    store.write((tx) => tx.insertKeyVersion({ volumeId: 'vol-a', version: 2, state: 'active', sealed: s1, createdAt: NOW })),
    'already_exists',
  );
  await rejectsKind(t, store.write((tx) => tx.setActiveVersion('vol-a', 9)), 'not_found', 'key version not found');
  await rejectsKind(t, store.write((tx) => tx.setActiveVersion('missing', 1)), 'not_found', 'volume not found');
});

// ----- guests, hosts, placement --------------------------------------------------------

test('guest upsert, links in order, names of volume, delete', async (t) => {
  const store = t.context.open();
  await store.write((tx) => {
    tx.insertHost(host('h1'));
    for (const n of ['a', 'b', 'c']) tx.insertVolume(volume(n));
    tx.upsertGuest(guest('g1', { hostId: 'host-h1', volumeIds: ['vol-c', 'vol-a'], autostart: true }));
    tx.upsertGuest(guest('g2', { volumeIds: ['vol-a'] }));
  });
  t.deepEqual(store.getGuest('guest-g1'), guest('g1', { hostId: 'host-h1', volumeIds: ['vol-c', 'vol-a'], autostart: true }));
  t.deepEqual(store.getGuestByName('g2')?.volumeIds, ['vol-a']);
  t.deepEqual(store.guestNamesOfVolume('vol-a'), ['g1', 'g2']);
  t.is(store.countGuestsOnHost('host-h1'), 1);

  await store.write((tx) => tx.upsertGuest(guest('g1', { hostId: null, volumeIds: ['vol-b'], generation: 2 })));
  const g1 = store.getGuest('guest-g1');
  t.deepEqual(g1?.volumeIds, ['vol-b']);
  t.is(g1?.generation, 2);
  t.deepEqual(store.guestNamesOfVolume('vol-a'), ['g2']);
  t.is(store.countGuestsOnHost('host-h1'), 0);

  await rejectsKind(t, store.write((tx) => tx.upsertGuest(guest('g2', { id: 'guest-x' }))), 'already_exists', 'guest name already exists');
  await rejectsKind(t, store.write((tx) => tx.upsertGuest(guest('g3', { hostId: 'nope' }))), 'not_found', 'host not found');
  await rejectsKind(t, store.write((tx) => tx.upsertGuest(guest('g3', { volumeIds: ['vol-a', 'nope'] }))), 'not_found', 'volume not found');
  t.is(store.getGuestByName('g3'), undefined, 'failed unit left nothing behind');
  await rejectsKind(t, store.write((tx) => tx.upsertGuest(guest('g3', { volumeIds: ['vol-a', 'vol-a'] }))), 'invalid_argument');

  await store.write((tx) => tx.deleteGuest('guest-g2'));
  t.is(store.getGuest('guest-g2'), undefined);
  t.deepEqual(store.guestNamesOfVolume('vol-a'), []);
  await rejectsKind(t, store.write((tx) => tx.deleteGuest('guest-g2')), 'not_found');
});

test('isVolumePlacedOnHost follows placement, moves and deletes', async (t) => {
  const store = t.context.open();
  await store.write((tx) => {
    tx.insertHost(host('h1'));
    tx.insertHost(host('h2'));
    tx.insertVolume(volume('a'));
    tx.insertVolume(volume('b'));
    tx.upsertGuest(guest('g1', { hostId: 'host-h1', volumeIds: ['vol-a'] }));
  });
  t.true(store.isVolumePlacedOnHost('vol-a', 'host-h1'));
  t.false(store.isVolumePlacedOnHost('vol-a', 'host-h2'));
  t.false(store.isVolumePlacedOnHost('vol-b', 'host-h1'));
  t.false(store.isVolumePlacedOnHost('missing', 'host-h1'));

  await store.write((tx) => tx.upsertGuest(guest('g1', { hostId: 'host-h2', volumeIds: ['vol-a'], generation: 2 })));
  t.false(store.isVolumePlacedOnHost('vol-a', 'host-h1'));
  t.true(store.isVolumePlacedOnHost('vol-a', 'host-h2'));

  await store.write((tx) => tx.upsertGuest(guest('g2', { hostId: 'host-h1', volumeIds: ['vol-b'] })));
  await store.write((tx) => tx.deleteGuest('guest-g1'));
  t.false(store.isVolumePlacedOnHost('vol-a', 'host-h2'));
  t.true(store.isVolumePlacedOnHost('vol-b', 'host-h1'));

  await store.write((tx) => tx.deleteVolume('vol-b'));
  t.false(store.isVolumePlacedOnHost('vol-b', 'host-h1'));
  t.deepEqual(store.getGuest('guest-g2')?.volumeIds, []);
});

test('isVolumePlacedOnHost is an indexed query (no table scan)', async (t) => {
  const store = t.context.open();
  await store.write((tx) => tx.insertVolume(volume('a')));
  await store.close();
  withRaw(t.context.dbPath, (db) => {
    const plan = db
      .prepare(
        `EXPLAIN QUERY PLAN SELECT EXISTS (SELECT 1 FROM guest_volumes gv JOIN guests g ON g.id = gv.guest_id
                         WHERE gv.volume_id = ? AND g.host_id = ?)`,
      )
      .all('vol-a', 'host-h1') as { detail: string }[];
    const details = plan.map((p) => p.detail);
    t.true(details.some((d) => /SEARCH/.test(d)));
    t.false(
      details.some((d) => /^SCAN (gv|g)\b/.test(d)),
      details.join(' | '),
    );
  });
});

test('hosts: insert, update, touch, lookups', async (t) => {
  const store = t.context.open();
  await store.write((tx) => tx.insertHost(host('h1')));
  t.deepEqual(store.getHost('host-h1'), host('h1'));
  await store.write((tx) => tx.updateHost(host('h1', { state: 'revoked', revokedAt: NOW, certSerial: 'cd02' })));
  t.is(store.getHostByName('h1')?.state, 'revoked');
  await store.write((tx) => tx.touchHost('host-h1', '2024-06-01T11:00:00.000Z'));
  t.is(store.getHost('host-h1')?.lastSeenAt, '2024-06-01T11:00:00.000Z');
  await rejectsKind(t, store.write((tx) => tx.insertHost(host('h1', { id: 'x' }))), 'already_exists', 'host name already exists');
  await rejectsKind(t, store.write((tx) => tx.updateHost(host('zz'))), 'not_found', 'host not found');
  await rejectsKind(t, store.write((tx) => tx.touchHost('zz', NOW)), 'not_found');
  t.is(store.getHost('zz'), undefined);
});

test('enrollment token is single use, also within one batch', async (t) => {
  const store = t.context.open();
  await store.write((tx) => {
    tx.insertEnrollmentToken(token('t1'));
    tx.insertEnrollmentToken(token('t2'));
  });
  t.deepEqual(store.getEnrollmentToken('t1'), token('t1'));
  t.true(await store.write((tx) => tx.consumeEnrollmentToken('t1', NOW)));
  t.false(await store.write((tx) => tx.consumeEnrollmentToken('t1', NOW)));
  t.is(store.getEnrollmentToken('t1')?.usedAt, NOW);
  const racing = await Promise.all([1, 2, 3].map(() => store.write((tx) => tx.consumeEnrollmentToken('t2', NOW))));
  t.deepEqual(racing, [true, false, false]);
  await rejectsKind(t, store.write((tx) => tx.consumeEnrollmentToken('nope', NOW)), 'not_found');
  await rejectsKind(t, store.write((tx) => tx.insertEnrollmentToken(token('t1'))), 'already_exists', 'enrollment token already exists');
});

test('certificates: insert, revoke keeps the first revocation time', async (t) => {
  const store = t.context.open();
  await store.write((tx) => tx.insertCertificate(cert('0a')));
  t.deepEqual(store.getCertificate('0a'), cert('0a'));
  await store.write((tx) => tx.revokeCertificate('0a', NOW));
  await store.write((tx) => tx.revokeCertificate('0a', '2030-01-01T00:00:00.000Z'));
  t.is(store.getCertificate('0a')?.revokedAt, NOW);
  await rejectsKind(t, store.write((tx) => tx.revokeCertificate('ff', NOW)), 'not_found');
  await rejectsKind(t, store.write((tx) => tx.insertCertificate(cert('0a'))), 'already_exists', 'certificate already exists');
});

test('credentialsGeneration changes with every certificate or host identity write, not with last_seen or the desired revision', async (t) => {
  const store = t.context.open();
  const gens: number[] = [store.credentialsGeneration()];
  const step = async (fn: (tx: StoreWriter) => unknown) => {
    await store.write((tx) => void fn(tx));
    gens.push(store.credentialsGeneration());
  };
  await step((tx) => tx.insertCertificate(cert('0b')));
  await step((tx) => tx.insertHost(host('hg')));
  const h = store.getHostByName('hg')!;
  await step((tx) => tx.updateHost({ ...h, state: 'revoked', revokedAt: NOW }));
  await step((tx) => tx.revokeCertificate('0b', NOW));
  for (let i = 1; i < gens.length; i++) t.not(gens[i], gens[i - 1], `write ${i} changed the generation`);
  const before = store.credentialsGeneration();
  await store.write((tx) => {
    tx.touchHost(h.id, NOW);
    tx.bumpHostRevision(h.id);
  });
  t.is(store.credentialsGeneration(), before, 'last_seen and the desired revision do not count');
});

test('settings round-trip and overwrite', async (t) => {
  const store = t.context.open();
  t.is(store.getSetting('server.id'), undefined);
  await store.write((tx) => tx.setSetting('server.id', 'one'));
  await store.write((tx) => tx.setSetting('server.id', 'two'));
  t.is(store.getSetting('server.id'), 'two');
});

// ----- pagination ----------------------------------------------------------------------

test('volume pagination across pages, with prefix and format filters', async (t) => {
  const store = t.context.open();
  const names = Array.from({ length: 25 }, (_, i) => `vol${String(i).padStart(2, '0')}`);
  await store.write((tx) => {
    for (const [i, n] of names.entries()) tx.insertVolume(volume(n, { format: i % 5 === 0 ? 'plain' : 'luks2' }));
    tx.insertVolume(volume('other'));
  });
  const seen: string[] = [];
  let pageToken = '';
  let pages = 0;
  do {
    const page = store.listVolumes({ pageSize: 10, pageToken, namePrefix: 'vol' });
    seen.push(...page.items.map((v) => v.name));
    pageToken = page.nextPageToken;
    pages++;
  } while (pageToken !== '');
  t.deepEqual(seen, names);
  t.is(pages, 3);

  const exact = store.listVolumes({ pageSize: 26, pageToken: '' });
  t.is(exact.items.length, 26);
  t.is(exact.nextPageToken, '');

  const plain = store.listVolumes({ pageSize: 3, pageToken: '', format: 'plain' });
  t.deepEqual(
    plain.items.map((v) => v.name),
    ['vol00', 'vol05', 'vol10'],
  );
  const plain2 = store.listVolumes({ pageSize: 3, pageToken: plain.nextPageToken, format: 'plain' });
  t.deepEqual(
    plain2.items.map((v) => v.name),
    ['vol15', 'vol20'],
  );
  t.is(plain2.nextPageToken, '');

  t.deepEqual(
    store.listVolumes({ pageSize: 100, pageToken: '', namePrefix: 'vol1' }).items.map((v) => v.name),
    names.filter((n) => n.startsWith('vol1')),
  );
  t.is(store.listVolumes({ pageSize: 100, pageToken: '', namePrefix: 'zzz' }).items.length, 0);
  // Defensive clamp: 0 behaves as 1, huge as 1000.
  t.is(store.listVolumes({ pageSize: 0, pageToken: '' }).items.length, 1);
  t.is(store.listVolumes({ pageSize: 1e9, pageToken: '' }).items.length, 26);
});

test('name prefixes with unusual characters select exactly the matching names', async (t) => {
  const store = t.context.open();
  const names = ['a', 'a\u{10FFFF}', 'a\u{10FFFF}b', 'ab', 'a\uD7FF', 'a\uE000', 'b', '\u{10FFFF}', '\u{10FFFF}z'];
  await store.write((tx) => names.forEach((n, i) => tx.insertVolume(volume(n, { id: `v${i}` }))));
  const list = (prefix: string) =>
    store
      .listVolumes({ pageSize: 100, pageToken: '', namePrefix: prefix })
      .items.map((v) => v.name)
      .sort();
  for (const prefix of ['a', 'a\u{10FFFF}', 'a\uD7FF', '\u{10FFFF}', 'b']) {
    t.deepEqual(list(prefix), names.filter((n) => n.startsWith(prefix)).sort(), JSON.stringify(prefix));
  }
});

test('guest and host pagination, host filter', async (t) => {
  const store = t.context.open();
  await store.write((tx) => {
    for (let i = 0; i < 7; i++) tx.insertHost(host(`h${i}`));
    for (let i = 0; i < 9; i++) tx.upsertGuest(guest(`g${i}`, { hostId: i % 3 === 0 ? 'host-h0' : null }));
  });
  const p1 = store.listHosts(4, '');
  const p2 = store.listHosts(4, p1.nextPageToken);
  t.deepEqual([...p1.items, ...p2.items].map((h) => h.name), ['h0', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6']);
  t.is(p2.nextPageToken, '');

  const g1 = store.listGuests({ pageSize: 2, pageToken: '', hostId: 'host-h0' });
  const g2 = store.listGuests({ pageSize: 2, pageToken: g1.nextPageToken, hostId: 'host-h0' });
  t.deepEqual([...g1.items, ...g2.items].map((g) => g.name), ['g0', 'g3', 'g6']);
  t.is(g2.nextPageToken, '');
  t.is(store.listGuests({ pageSize: 100, pageToken: '' }).items.length, 9);
});

test('malformed page tokens are invalid_argument', (t) => {
  const store = t.context.open();
  const good = Buffer.from(JSON.stringify(['host', 'x'])).toString('base64url');
  for (const bad of ['!!!', 'abc', 'e30', Buffer.from('not json').toString('base64url'), good + '=', good]) {
    const err = t.throws(() => store.listVolumes({ pageSize: 10, pageToken: bad }), { instanceOf: DomainError });
    t.is(err?.kind, 'invalid_argument');
    t.is(err?.message, 'invalid page token');
  }
  t.throws(() => store.listAuditEvents({ pageSize: 10, pageToken: Buffer.from('["audit","7"]').toString('base64url') }), {
    message: 'invalid page token',
  });
  t.throws(() => store.listHosts(10, 'zz'), { message: 'invalid page token' });
});

test('audit listing: pages, filters, afterSeq', async (t) => {
  const store = t.context.open();
  await seedAudit(store, 30);
  const all: number[] = [];
  let pageToken = '';
  do {
    const page = store.listAuditEvents({ pageSize: 7, pageToken });
    all.push(...page.items.map((e) => e.seq));
    pageToken = page.nextPageToken;
  } while (pageToken);
  t.deepEqual(
    all,
    Array.from({ length: 30 }, (_, i) => i + 1),
  );
  const releases = store.listAuditEvents({ pageSize: 100, pageToken: '', action: 'key.release' });
  t.is(releases.items.length, 15);
  t.true(releases.items.every((e) => e.action === 'key.release'));
  t.deepEqual(
    store.listAuditEvents({ pageSize: 100, pageToken: '', target: 'vol-4' }).items.map((e) => e.seq),
    [4],
  );
  t.deepEqual(
    store.listAuditEvents({ pageSize: 100, pageToken: '', action: 'key.release', target: 'vol-4' }).items.map((e) => e.seq),
    [4],
  );
  t.deepEqual(
    store.listAuditEvents({ pageSize: 3, pageToken: '', afterSeq: 27 }).items.map((e) => e.seq),
    [28, 29, 30],
  );
  const first = store.listAuditEvents({ pageSize: 1, pageToken: '' }).items[0];
  t.is(first?.detailJson, '{"i":1}');
  t.is(first?.actor, 'admin:alice');
});

// ----- group commit --------------------------------------------------------------------

test('group commit: 500 concurrent writes share few transactions (full-sync: batches of up to 256)', async (t) => {
  const store = t.context.open({ durability: 'full-sync' });
  const before = store.stats().commits;
  const results = await Promise.all(
    Array.from({ length: 500 }, (_, i) =>
      store.write((tx) => {
        tx.insertVolume(volume(`v${i}`));
        return i;
      }),
    ),
  );
  t.deepEqual(
    results,
    Array.from({ length: 500 }, (_, i) => i),
  );
  const commits = store.stats().commits - before;
  t.is(commits, 2, 'maxBatch 256: 256 + 244');
  t.is(store.countVolumes(), 500);
});

test('group commit: with async-wal-sync (the default) batches hold at most 8 units, with at most one sync per batch', async (t) => {
  const store = t.context.open();
  t.is(store.durabilitySettings().durability, 'async-wal-sync');
  const before = store.stats();
  await Promise.all(Array.from({ length: 100 }, (_, i) => store.write((tx) => tx.insertVolume(volume(`w${i}`)))));
  const after = store.stats();
  t.is(after.commits - before.commits, 13, '100 units = 12 batches of 8 + 1 of 4');
  // Fewer when a sync is still in flight as the next batch commits (timing-dependent).
  t.true(after.walSyncs - before.walSyncs <= 13, `at most one sync per commit (${after.walSyncs - before.walSyncs})`);
  t.true(after.walSyncs - before.walSyncs >= 1);
  t.is(store.countVolumes(), 100);
});

test('group commit respects maxBatch', async (t) => {
  const store = t.context.open({ maxBatch: 10 });
  await Promise.all(Array.from({ length: 50 }, (_, i) => store.write((tx) => tx.setSetting(`k${i}`, 'v'))));
  t.is(store.stats().commits, 5);
});

test('a failing unit is rolled back alone; the others of the batch commit', async (t) => {
  const store = t.context.open();
  const before = store.stats();
  const boom = new Error('boom');
  const [a, b, c] = await Promise.allSettled([
    store.write((tx) => tx.insertVolume(volume('a'))),
    store.write((tx) => {
      tx.insertVolume(volume('b'));
      throw boom;
    }),
    store.write((tx) => {
      tx.insertVolume(volume('c'));
      return 'c';
    }),
  ]);
  t.is(a?.status, 'fulfilled');
  t.deepEqual(b, { status: 'rejected', reason: boom });
  t.deepEqual(c, { status: 'fulfilled', value: 'c' });
  t.truthy(store.getVolume('vol-a'));
  t.is(store.getVolume('vol-b'), undefined);
  t.truthy(store.getVolume('vol-c'));
  const after = store.stats();
  t.is(after.commits - before.commits, 1);
  t.is(after.failedUnits - before.failedUnits, 1);
});

test('audit chain head is restored after a failed unit', async (t) => {
  const store = t.context.open();
  const entry = { actor: 'server', action: 'test.event', target: 'x', outcome: 'ok' as const };
  const results = await Promise.allSettled([
    store.write((tx) => tx.appendAudit(entry).seq),
    store.write((tx) => {
      tx.appendAudit(entry);
      tx.appendAudit(entry);
      throw new Error('fail after append');
    }),
    store.write((tx) => tx.appendAudit(entry).seq),
  ]);
  t.deepEqual(results[0], { status: 'fulfilled', value: 1 });
  t.is(results[1]?.status, 'rejected');
  t.deepEqual(results[2], { status: 'fulfilled', value: 2 });
  const v = store.verifyAuditLog();
  t.true(v.ok, v.problem);
  t.is(v.eventsChecked, 2);
});

test('a failed COMMIT rejects every unit and restores the chain head', async (t) => {
  let failNext = false;
  const store = t.context.open({
    hooks: {
      beforeCommit: () => {
        if (failNext) {
          failNext = false;
          throw new Error('simulated commit failure');
        }
      },
    },
  });
  const entry = { actor: 'server', action: 'test.event', target: 'x', outcome: 'ok' as const };
  await store.write((tx) => tx.appendAudit(entry));
  failNext = true;
  const results = await Promise.allSettled([
    store.write((tx) => tx.appendAudit(entry)),
    store.write((tx) => tx.insertVolume(volume('lost'))),
  ]);
  t.true(results.every((r) => r.status === 'rejected'));
  t.is(store.getVolume('vol-lost'), undefined);
  t.is(store.stats().failedBatches, 1);
  const rec = await store.write((tx) => tx.appendAudit(entry));
  t.is(rec.seq, 2);
  const v = store.verifyAuditLog();
  t.true(v.ok, v.problem);
  t.is(v.headHash, rec.hash);
});

test('a unit returning a promise is rejected and rolled back', async (t) => {
  const store = t.context.open();
  let leaked: { insertVolume(v: VolumeRecord): void } | undefined;
  const p = store.write(async (tx) => {
    tx.insertVolume(volume('async'));
    leaked = tx;
    await Promise.resolve();
  });
  await t.throwsAsync(p, { instanceOf: TypeError });
  t.is(store.getVolume('vol-async'), undefined);
  t.throws(() => leaked?.insertVolume(volume('late')), { message: /outside its write unit/ });
  t.is(store.getVolume('vol-late'), undefined);
});

test('close waits for queued writes; writes after close are refused', async (t) => {
  const store = t.context.open();
  const pending = store.write((tx) => tx.insertVolume(volume('queued')));
  await store.close();
  await pending;
  await rejectsKind(t, store.write((tx) => tx.insertVolume(volume('late'))), 'unavailable');
  const again = t.context.open();
  t.truthy(again.getVolumeByName('queued'));
});

// ----- audit chain on disk ---------------------------------------------------------------

test('audit log verifies, and survives reopen', async (t) => {
  const store = t.context.open();
  await seedAudit(store, 20);
  const v = store.verifyAuditLog();
  t.true(v.ok);
  t.is(v.eventsChecked, 20);
  await store.close();
  const again = t.context.open();
  const rec = await again.write((tx) => tx.appendAudit({ actor: 'server', action: 'x', target: 'y', outcome: 'failed' }));
  t.is(rec.seq, 21);
  t.is(rec.prevHash, v.headHash);
  t.true(again.verifyAuditLog().ok);
});

/** Seeds 10 events, closes, tampers through a raw connection, reopens and verifies. */
async function tamperAndVerify(t: ExecutionContext<Ctx>, tamper: (db: Database.Database) => void) {
  const store = t.context.open();
  await seedAudit(store, 10);
  t.true(store.verifyAuditLog().ok);
  await store.close();
  withRaw(t.context.dbPath, tamper);
  return t.context.open().verifyAuditLog();
}

test('tamper: edited field is a hash mismatch at that event', async (t) => {
  const v = await tamperAndVerify(t, (db) => db.prepare("UPDATE audit_log SET outcome = 'denied' WHERE seq = 4").run());
  t.false(v.ok);
  t.is(v.firstBadSeq, 4);
  t.is(v.problem, 'hash mismatch');
});

test('tamper: deleted row is a sequence gap after it', async (t) => {
  const v = await tamperAndVerify(t, (db) => db.prepare('DELETE FROM audit_log WHERE seq = 6').run());
  t.false(v.ok);
  t.is(v.firstBadSeq, 7);
  t.is(v.problem, 'sequence gap');
});

test('tamper: swapped row contents are a prev_hash mismatch', async (t) => {
  const v = await tamperAndVerify(t, (db) => {
    const cols = 'time, actor, action, target, outcome, detail_json, prev_hash, hash';
    const get = db.prepare(`SELECT ${cols} FROM audit_log WHERE seq = ?`);
    const a = get.get(3) as Record<string, string>;
    const b = get.get(4) as Record<string, string>;
    const set = db.prepare(
      'UPDATE audit_log SET time = @time, actor = @actor, action = @action, target = @target, outcome = @outcome, detail_json = @detail_json, prev_hash = @prev_hash, hash = @hash WHERE seq = @seq',
    );
    set.run({ ...b, seq: 3 });
    set.run({ ...a, seq: 4 });
  });
  t.false(v.ok);
  t.is(v.firstBadSeq, 3);
  t.is(v.problem, 'prev_hash mismatch');
});

test('tamper: edited hash is detected at that event', async (t) => {
  const v = await tamperAndVerify(t, (db) => db.prepare('UPDATE audit_log SET hash = ? WHERE seq = 8').run('e'.repeat(64)));
  t.false(v.ok);
  t.is(v.firstBadSeq, 8);
  t.is(v.problem, 'hash mismatch');
});

test('verifyAuditLog streams a long log', async (t) => {
  const store = t.context.open();
  await seedAudit(store, 20000);
  const v = store.verifyAuditLog();
  t.true(v.ok);
  t.is(v.eventsChecked, 20000);
  // The connection is usable afterwards (the iterator was closed).
  t.is(store.listAuditEvents({ pageSize: 1, pageToken: '' }).items[0]?.seq, 1);
});

// ----- crypto-shredding --------------------------------------------------------------------

function fileContains(file: string, pattern: Buffer): boolean {
  return fs.existsSync(file) && fs.readFileSync(file).includes(pattern);
}

test('secure_delete: a deleted sealed secret is gone from the db and WAL files', async (t) => {
  const pattern = crypto.randomBytes(64);
  const store = t.context.open();
  await store.write((tx) => {
    for (let i = 0; i < 20; i++) {
      tx.insertVolume(volume(`filler${i}`));
      tx.insertKeyVersion({ volumeId: `vol-filler${i}`, version: 1, state: 'active', sealed: crypto.randomBytes(64), createdAt: NOW });
    }
    tx.insertVolume(volume('secret'));
    tx.insertKeyVersion({ volumeId: 'vol-secret', version: 1, state: 'active', sealed: pattern, createdAt: NOW });
  });
  await store.close();
  const files = ['', '-wal', '-shm'].map((s) => t.context.dbPath + s);
  t.true(
    files.some((f) => fileContains(f, pattern)),
    'sanity: the secret is on disk before deletion',
  );

  const again = t.context.open();
  await again.write((tx) => tx.deleteVolume('vol-secret'));
  t.deepEqual(again.getKeyVersions('vol-secret'), []);
  // Already gone while the store is still open (WAL checkpointed after the delete)...
  for (const f of files) t.false(fileContains(f, pattern), `pattern found in ${path.basename(f)} before close`);
  await again.close();
  // ...and after close.
  for (const f of files) t.false(fileContains(f, pattern), `pattern found in ${path.basename(f)}`);
  // The other secrets are still there.
  const third = t.context.open();
  t.is(third.getKeyVersions('vol-filler3').length, 1);
});

test('getReleasable returns volume and active key only when placed on the host and the key is live', async (t) => {
  const store = t.context.open();
  const sealed = new Uint8Array(72).fill(5);
  await store.write((tx) => {
    tx.insertHost(host('h1'));
    tx.insertHost(host('h2'));
    tx.insertVolume(volume('a', { sizeBytes: (1n << 62n) + 3n }));
    tx.insertKeyVersion({ volumeId: 'vol-a', version: 1, state: 'active', sealed, createdAt: NOW });
    tx.upsertGuest(guest('g1', { hostId: 'host-h1', volumeIds: ['vol-a'] }));
  });
  const r = store.getReleasable('vol-a', 'host-h1');
  t.is(r?.volume.sizeBytes, (1n << 62n) + 3n);
  t.is(r?.key.version, 1);
  t.deepEqual(r?.key.sealed, sealed);
  t.is(store.getReleasable('vol-a', 'host-h2'), undefined, 'not placed there');
  t.is(store.getReleasable('missing', 'host-h1'), undefined);
  await store.write((tx) => {
    tx.insertKeyVersion({ volumeId: 'vol-a', version: 2, state: 'destroyed', sealed: null, createdAt: NOW });
  });
  await rejectsKind(t, store.write((tx) => tx.setActiveVersion('vol-a', 2)), 'failed_precondition');
  t.is(store.getReleasable('vol-a', 'host-h1')?.key.version, 1, 'a destroyed version never becomes the released one');
});

// ----- durability: the WAL sync off the event loop ---------------------------------------

/**
 * A syncWal fake whose calls complete only when the test says so (all of them at teardown,
 * so that closing the store after a failed assertion does not wait forever).
 */
function controlledSync(t: ExecutionContext<Ctx>): { syncWal: (fd: number) => Promise<void>; calls: { fd: number; done: () => void; fail: (e: Error) => void }[] } {
  const calls: { fd: number; done: () => void; fail: (e: Error) => void }[] = [];
  t.teardown(() => {
    for (const c of calls) c.done();
  });
  return {
    calls,
    syncWal: (fd) =>
      new Promise<void>((resolve, reject) => {
        calls.push({ fd, done: resolve, fail: reject });
      }),
  };
}

/** Lets queued batches run and settled promises propagate (several event-loop turns). */
async function turns(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

/** Tracks whether a promise has settled, without awaiting it. */
function track<T>(p: Promise<T>): { settled: () => boolean; p: Promise<T> } {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  return { settled: () => settled, p };
}

function captureLogger(): { logger: Logger; lines: () => Record<string, unknown>[] } {
  const out: string[] = [];
  return { logger: createLogger({ component: 'store', level: 'debug', write: (l) => out.push(l) }), lines: () => out.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('durability: the default is async-wal-sync with synchronous=NORMAL; full-sync keeps FULL', async (t) => {
  const store = t.context.open();
  t.deepEqual(store.durabilitySettings(), { durability: 'async-wal-sync', journalMode: 'wal', synchronous: 'normal' });
  await store.close();
  const full = t.context.open({ durability: 'full-sync' });
  t.deepEqual(full.durabilitySettings(), { durability: 'full-sync', journalMode: 'wal', synchronous: 'full' });
  await full.write((tx) => tx.setSetting('k', 'v'));
  t.is(full.stats().walSyncs, 0, 'full-sync: SQLite syncs inside COMMIT, the store does not');
  t.throws(() => openSqliteStore({ path: t.context.dbPath, durability: 'fast' as never }), { instanceOf: DomainError, message: /durability/ });
});

test('durability: a unit resolves only after the fdatasync started after its COMMIT completed', async (t) => {
  const sync = controlledSync(t);
  const store = t.context.open({ syncWal: sync.syncWal });
  const a = track(store.write((tx) => tx.insertVolume(volume('a'))));
  await turns();
  t.is(store.stats().commits, 1, 'batch 1 committed');
  t.is(sync.calls.length, 1, 'its sync started');
  t.false(a.settled(), 'not resolved while its sync is in flight');
  t.truthy(store.getVolume('vol-a'), 'committed: visible to reads');

  // Batch 2 commits while sync 1 is in flight (pipelining), but sync 1 does not cover it.
  const b = track(store.write((tx) => tx.insertVolume(volume('b'))));
  await turns();
  t.is(store.stats().commits, 2);
  t.is(sync.calls.length, 1, 'one sync in flight at a time');
  sync.calls[0]!.done();
  await a.p;
  await turns();
  t.false(b.settled(), 'b committed after sync 1 started: not durable yet');
  t.is(sync.calls.length, 2, 'the next sync starts once the first completes');
  sync.calls[1]!.done();
  await b.p;
  t.is(store.stats().walSyncs, 2);
});

test('durability: syncs coalesce; many concurrent units all resolve with fewer syncs than commits', async (t) => {
  const sync = controlledSync(t);
  const store = t.context.open({ syncWal: sync.syncWal, maxBatch: 8 });
  const first = store.write((tx) => tx.setSetting('first', '1'));
  await turns();
  t.is(sync.calls.length, 1);
  // 10 waves of 20 units commit (batches of at most 8) while sync 1 is held.
  const rest: Promise<unknown>[] = [];
  for (let w = 0; w < 10; w++) {
    for (let i = 0; i < 20; i++) rest.push(store.write((tx) => tx.insertVolume(volume(`w${w}-${i}`))));
    await turns(1);
  }
  await turns(40); // one batch per turn
  const commits = store.stats().commits;
  t.true(commits >= 1 + 200 / 8, `${commits} commits`);
  t.is(sync.calls.length, 1, 'still one sync in flight');
  sync.calls[0]!.done();
  await first;
  await turns();
  t.is(sync.calls.length, 2, 'one sync covers everything committed meanwhile');
  sync.calls[1]!.done();
  const results = await Promise.allSettled(rest);
  t.true(results.every((r) => r.status === 'fulfilled'));
  t.is(store.stats().walSyncs, 2);
  t.is(store.countVolumes(), 200);
});

test('durability: with the real fdatasync, 2,000 concurrent units all resolve, commits < units, syncs <= commits', async (t) => {
  const store = t.context.open();
  const all: Promise<number>[] = [];
  for (let w = 0; w < 20; w++) {
    for (let i = 0; i < 100; i++) {
      const n = w * 100 + i;
      all.push(
        store.write((tx) => {
          tx.appendAudit({ actor: 'host:h', action: 'key.release', target: `vol-${n}`, outcome: 'ok', detail: { n } });
          return n;
        }),
      );
    }
    await turns(1);
  }
  const values = await Promise.all(all);
  t.deepEqual(
    values,
    Array.from({ length: 2000 }, (_, i) => i),
  );
  const s = store.stats();
  t.is(s.units, 2000);
  t.true(s.commits < s.units, `${s.commits} commits`);
  t.true(s.walSyncs >= 1 && s.walSyncs <= s.commits, `${s.walSyncs} syncs, ${s.commits} commits`);
  t.true(store.verifyAuditLog().ok);
  await store.close();
  t.is(t.context.open().verifyAuditLog().eventsChecked, 2000, 'all there after reopen');
});

test('durability: the real sync gets a descriptor of the -wal file SQLite writes, also after a shred checkpoint', async (t) => {
  const seen: { ino: number; walIno: number; size: number }[] = [];
  const store = t.context.open({
    syncWal: async (fd) => {
      const own = fs.fstatSync(fd);
      seen.push({ ino: own.ino, walIno: fs.statSync(`${t.context.dbPath}-wal`).ino, size: own.size });
      await fdatasyncFd(fd);
    },
  });
  await store.write((tx) => {
    tx.insertVolume(volume('gone'));
    tx.insertKeyVersion({ volumeId: 'vol-gone', version: 1, state: 'active', sealed: crypto.randomBytes(64), createdAt: NOW });
  });
  t.is(seen.length, 1);
  t.is(seen[0]!.ino, seen[0]!.walIno, 'same inode as the -wal path');
  t.true(seen[0]!.size > 0, 'the file the COMMIT appended to');
  // A delete of sealed secrets checkpoints with TRUNCATE: same file, now empty, still synced.
  await store.write((tx) => tx.deleteVolume('vol-gone'));
  t.is(seen.length, 2);
  t.is(seen[1]!.ino, seen[0]!.ino, 'a truncate keeps the inode; same descriptor');
  t.is(seen[1]!.size, 0, 'the sync came after the truncating checkpoint');
  await store.write((tx) => tx.setSetting('after', 'x'));
  t.is(seen[2]!.ino, seen[0]!.ino);
});

test('durability: a -wal file removed under the store: the sync still reaches the file SQLite writes', async (t) => {
  const log = captureLogger();
  const synced: number[] = [];
  const store = t.context.open({
    logger: log.logger,
    syncWal: async (fd) => {
      synced.push(fs.fstatSync(fd).ino);
      await fdatasyncFd(fd);
    },
  });
  await store.write((tx) => tx.insertVolume(volume('before')));
  const walIno = fs.statSync(`${t.context.dbPath}-wal`).ino;
  fs.unlinkSync(`${t.context.dbPath}-wal`);
  await store.write((tx) => tx.insertVolume(volume('after')));
  await store.write((tx) => tx.insertVolume(volume('after2')));
  t.deepEqual(synced, [walIno, walIno, walIno], 'the deleted file SQLite still appends to');
  t.is(log.lines().filter((l) => l.level === 'warn' && /no longer names/.test(String(l.msg))).length, 1, 'warned once');
  await store.close();
  const again = t.context.open();
  t.truthy(again.getVolumeByName('after2'), 'checkpointed into the database on close');
});

test('durability: a failed fdatasync rejects its units and every later write, with one clear log line', async (t) => {
  const sync = controlledSync(t);
  const log = captureLogger();
  const store = t.context.open({ syncWal: sync.syncWal, logger: log.logger });
  const a = store.write((tx) => tx.insertVolume(volume('a')));
  const boom = new Error('own failure');
  const own = store.write(() => {
    throw boom;
  });
  await turns();
  const b = store.write((tx) => tx.insertVolume(volume('b'))); // commits while sync 1 is in flight
  await turns();
  t.is(store.stats().commits, 2);
  const eio = Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
  sync.calls[0]!.fail(eio);
  const errA = await rejectsKind(t, a, 'unavailable');
  t.is(errA.cause, eio);
  await t.throwsAsync(own, { is: boom }, 'a unit that threw keeps its own error');
  await rejectsKind(t, b, 'unavailable');
  // Later writes are refused, whether queued now or later; no further sync is attempted.
  await rejectsKind(t, store.write((tx) => tx.insertVolume(volume('c'))), 'unavailable');
  t.is(sync.calls.length, 1);
  t.is(store.getVolume('vol-c'), undefined);
  const errors = log.lines().filter((l) => l.level === 'error');
  t.is(errors.length, 1);
  t.regex(String(errors[0]!.msg), /fdatasync of the SQLite WAL failed.*refuses all further writes/);
  t.regex(String(errors[0]!.error), /EIO/);
  await store.close();
});

test('durability: a unit queued when the sync fails is rejected without running', async (t) => {
  const sync = controlledSync(t);
  const store = t.context.open({ syncWal: sync.syncWal });
  const a = store.write((tx) => tx.insertVolume(volume('a')));
  await turns();
  let ran = false;
  // Queued in the same turn as the failure: its batch runs after the store failed.
  sync.calls[0]!.fail(new Error('EIO'));
  const late = store.write((tx) => {
    ran = true;
    tx.insertVolume(volume('late'));
  });
  await rejectsKind(t, a, 'unavailable');
  await rejectsKind(t, late, 'unavailable');
  t.false(ran);
});

test('durability: close waits for the sync in flight, then closes', async (t) => {
  const sync = controlledSync(t);
  const store = t.context.open({ syncWal: sync.syncWal });
  const a = track(store.write((tx) => tx.insertVolume(volume('a'))));
  await turns();
  const closed = track(store.close());
  await turns();
  t.false(closed.settled(), 'close waits for durability');
  t.false(a.settled());
  sync.calls[0]!.done();
  await a.p;
  await closed.p;
  t.truthy(t.context.open().getVolumeByName('a'));
});

test('durability: an in-memory store resolves without any WAL sync', async (t) => {
  let calls = 0;
  const store = openSqliteStore({
    path: ':memory:',
    syncWal: () => {
      calls++;
      return Promise.resolve();
    },
  });
  await store.write((tx) => tx.insertVolume(volume('m')));
  t.is(calls, 0);
  t.is(store.stats().walSyncs, 0);
  await store.close();
});

test('durability: fdatasyncFd (the default syncWal) really calls fdatasync: ok on an open file, EBADF on a closed descriptor', async (t) => {
  const file = path.join(t.context.dir, 'f');
  fs.writeFileSync(file, 'x');
  const fd = fs.openSync(file, 'r');
  await t.notThrowsAsync(fdatasyncFd(fd));
  fs.closeSync(fd);
  const err = await t.throwsAsync(fdatasyncFd(fd));
  t.is((err as NodeJS.ErrnoException | undefined)?.code, 'EBADF');
});

test('durability: a slow fdatasync is counted and logged, rate-limited; fast ones are not', async (t) => {
  const log = captureLogger();
  let delayMs = 0;
  const store = t.context.open({
    logger: log.logger,
    // No real fdatasync: its time on a shared disk is what this test must not depend on.
    syncWal: (fd) => (delayMs > 0 ? new Promise<void>((resolve) => setTimeout(resolve, delayMs)) : Promise.resolve(void fd)),
  });
  await store.write((tx) => tx.insertVolume(volume('fast')));
  t.is(store.stats().slowWalSyncs, 0);
  const slowLines = () => log.lines().filter((l) => l.level === 'warn' && l.msg === 'slow WAL fdatasync');
  t.is(slowLines().length, 0);
  delayMs = 70;
  await store.write((tx) => tx.insertVolume(volume('slow1')));
  await store.write((tx) => tx.insertVolume(volume('slow2')));
  const s = store.stats();
  t.is(s.slowWalSyncs, 2);
  t.true(s.maxWalSyncMs >= 60, `max ${s.maxWalSyncMs} ms`);
  const lines = slowLines();
  t.is(lines.length, 1, 'the second slow sync within 10 s is counted, not logged');
  t.is(lines[0]!['slow_syncs'], 1);
  t.true(Number(lines[0]!['max_ms']) >= 60);
  await store.close();
});
