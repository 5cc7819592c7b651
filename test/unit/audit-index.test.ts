/**
 * The audit index by target (server/src/store/sqlite-store.ts attachAuditIndex): a database
 * file of its own, written in the same transactions as the audit log, and brought back to
 * exactly the audit log at every open, whatever state a crash, a restore or a damaged file
 * left it in. Every check reads through the store's own `audit list --target` query and
 * compares with a scan of the audit log itself.
 */
import test, { type ExecutionContext } from 'ava';
import Database from 'better-sqlite3';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MIGRATIONS } from '../../server/src/store/migrations.js';
import { auditIndexPath, openSqliteStore, type SqliteStore } from '../../server/src/store/sqlite-store.js';
import { createLogger } from '../../shared/src/log.js';

/** Opens the store with a logger that keeps what the repair at open said. */
function openLogged(path: string): { store: SqliteStore; repair: () => Record<string, unknown> | undefined } {
  const out: string[] = [];
  const store = openSqliteStore({ path, logger: createLogger({ component: 'store', level: 'debug', write: (l) => out.push(l) }) });
  return { store, repair: () => out.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'audit index brought up to date') };
}

function hashOf(path: string, seq: number): string {
  const db = new Database(path, { readonly: true });
  try {
    return db.prepare<[number], string>('SELECT hash FROM audit_log WHERE seq = ?').pluck().get(seq)!;
  } finally {
    db.close();
  }
}

const TARGETS = ['vol-a', 'vol-b', 'vol-c', 'vol-d'];

function withDir(fn: (t: ExecutionContext, path: string) => Promise<void>): (t: ExecutionContext) => Promise<void> {
  return async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'virtkm-auditix-'));
    try {
      await fn(t, join(dir, 'virtkm.db'));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
}

async function append(store: SqliteStore, n: number, offset = 0): Promise<void> {
  await store.write((tx) => {
    for (let i = 0; i < n; i++) tx.appendAudit({ actor: 'host:h', action: i % 3 ? 'key.release' : 'volume.create', target: TARGETS[(i + offset) % TARGETS.length]!, outcome: 'ok' });
  });
}

/** A database at `path` with `n` audit entries, closed again. */
async function seeded(path: string, n: number): Promise<void> {
  const store = openSqliteStore({ path });
  await append(store, n);
  await store.close();
}

/** seqs per target through the store's query (the index), and by a scan of the log. */
function byIndex(store: SqliteStore, target: string, action?: string): number[] {
  const out: number[] = [];
  let pageToken = '';
  for (;;) {
    const page = store.listAuditEvents({ pageSize: 7, pageToken, target, action });
    out.push(...page.items.map((e) => e.seq));
    if (!page.nextPageToken) return out;
    pageToken = page.nextPageToken;
  }
}
function byScan(path: string, target: string, action?: string): number[] {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    const rows = db.prepare<[], { seq: number; target: string; action: string }>('SELECT seq, target, action FROM audit_log ORDER BY seq').all();
    return rows.filter((r) => r.target === target && (action === undefined || r.action === action)).map((r) => r.seq);
  } finally {
    db.close();
  }
}

function assertIndexMatches(t: ExecutionContext, store: SqliteStore, path: string): void {
  for (const target of [...TARGETS, 'nobody']) {
    t.deepEqual(byIndex(store, target), byScan(path, target), `target ${target}`);
    t.deepEqual(byIndex(store, target, 'key.release'), byScan(path, target, 'key.release'), `target ${target}, key.release`);
  }
}

/** Opens the audit index file directly (the store closed) and runs `fn` on it. */
function editIndex(path: string, fn: (db: Database.Database) => void): void {
  const db = new Database(auditIndexPath(path), { fileMustExist: true });
  try {
    fn(db);
  } finally {
    db.close();
  }
}

test(
  'entries are indexed as they are written; a rolled-back unit leaves no index entry; the file is 0600',
  withDir(async (t, path) => {
    const store = openSqliteStore({ path });
    try {
      await append(store, 30);
      await store
        .write((tx) => {
          tx.appendAudit({ actor: 'x', action: 'key.release', target: 'vol-a', outcome: 'ok' });
          throw new Error('unit fails after its append');
        })
        .catch(() => undefined);
      await append(store, 5, 1);
      assertIndexMatches(t, store, path);
      t.is(byIndex(store, 'vol-a').length, byScan(path, 'vol-a').length);
    } finally {
      await store.close();
    }
    t.is(statSync(auditIndexPath(path)).mode & 0o777, 0o600);
    // The index's state followed every batch: nothing to repair at the next open.
    const again = openLogged(path);
    t.is(again.repair(), undefined);
    assertIndexMatches(t, again.store, path);
    await again.store.close();
  }),
);

test(
  'a lost index file is rebuilt from the audit log at open',
  withDir(async (t, path) => {
    await seeded(path, 40);
    for (const f of [auditIndexPath(path), `${auditIndexPath(path)}-wal`]) rmSync(f, { force: true });
    const store = openSqliteStore({ path });
    try {
      t.true(existsSync(auditIndexPath(path)));
      assertIndexMatches(t, store, path);
      t.is(byIndex(store, 'vol-b').length, 10);
    } finally {
      await store.close();
    }
  }),
);

test(
  'an index behind the log (its last commit lost) gets only the missing entries at open',
  withDir(async (t, path) => {
    await seeded(path, 40);
    const hash25 = hashOf(path, 25);
    editIndex(path, (db) => {
      db.prepare('DELETE FROM by_target WHERE seq > 25').run();
      db.prepare('UPDATE state SET upto = 25, upto_hash = ?').run(hash25);
    });
    const { store, repair } = openLogged(path);
    try {
      assertIndexMatches(t, store, path);
      t.like(repair(), { covered_before: 25, audit_entries: 40, rebuilt: false, added: 15, removed: 0 });
    } finally {
      await store.close();
    }
    const again = openLogged(path);
    t.is(again.repair(), undefined, 'nothing to do at the next open');
    await again.store.close();
  }),
);

test(
  'an index of another history (same length, other targets, other hash) is rebuilt, and a stale entry never shows another target',
  withDir(async (t, path) => {
    await seeded(path, 20);
    editIndex(path, (db) => {
      // Every entry filed under the wrong target, as an index from another database would be.
      db.prepare("UPDATE by_target SET target = 'vol-z' || target").run();
      db.prepare("UPDATE state SET upto_hash = 'not the hash'").run();
    });
    const { store, repair } = openLogged(path);
    try {
      assertIndexMatches(t, store, path);
      t.like(repair(), { rebuilt: true, added: 20, removed: 20 });
    } finally {
      await store.close();
    }
  }),
);

test(
  'an index ahead of the log (the log lost its last commit, or was restored alone) loses the extra entries at open',
  withDir(async (t, path) => {
    await seeded(path, 20);
    editIndex(path, (db) => {
      const ins = db.prepare('INSERT INTO by_target (target, seq) VALUES (?, ?)');
      for (let seq = 21; seq <= 30; seq++) ins.run(TARGETS[seq % TARGETS.length], seq);
      db.prepare('UPDATE state SET upto = 30').run();
    });
    const logged = openLogged(path);
    const store = logged.store;
    try {
      assertIndexMatches(t, store, path);
      t.like(logged.repair(), { covered_before: 30, audit_entries: 20, rebuilt: true });
      // New entries take the seqs the phantom entries had, under their own targets.
      await append(store, 10, 2);
      assertIndexMatches(t, store, path);
    } finally {
      await store.close();
    }
  }),
);

test(
  'an index file that is not a database is replaced and rebuilt',
  withDir(async (t, path) => {
    await seeded(path, 12);
    rmSync(`${auditIndexPath(path)}-wal`, { force: true });
    writeFileSync(auditIndexPath(path), Buffer.alloc(8192, 0x5a));
    const store = openSqliteStore({ path });
    try {
      assertIndexMatches(t, store, path);
      t.is(byIndex(store, 'vol-c').length, 3);
    } finally {
      await store.close();
    }
  }),
);

test(
  'a database from before the index moved (schema v4, index in the main file) gets its whole log indexed',
  withDir(async (t, path) => {
    const db = new Database(path);
    try {
      db.exec('CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL) STRICT;');
      for (const m of MIGRATIONS.filter((x) => x.version <= 4)) {
        db.exec(m.sql);
        db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)').run(m.version, m.name, '2026-01-01T00:00:00.000Z');
      }
      const ins = db.prepare("INSERT INTO audit_log (seq, time, actor, action, target, outcome, detail_json, prev_hash, hash) VALUES (?, 't', 'a', ?, ?, 'ok', '{}', 'p', 'h')");
      for (let seq = 1; seq <= 50; seq++) ins.run(seq, seq % 2 ? 'key.release' : 'volume.create', TARGETS[seq % TARGETS.length]);
    } finally {
      db.close();
    }
    const store = openSqliteStore({ path });
    try {
      assertIndexMatches(t, store, path);
      t.is(byIndex(store, 'vol-a').length, 12);
    } finally {
      await store.close();
    }
    const raw = new Database(path, { readonly: true });
    try {
      t.is(raw.prepare("SELECT count(*) AS n FROM sqlite_schema WHERE name = 'audit_by_target'").pluck().get(), 0, 'the old index is dropped from the main file');
    } finally {
      raw.close();
    }
  }),
);
