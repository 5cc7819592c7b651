/**
 * Tampering with the audit log in the database is reported by `virtkm audit verify`.
 */
import test from 'ava';
import Database from 'better-sqlite3';
import { join } from 'node:path';
import { cli, initDataDir, startServer, tempDir } from '../helpers/server-harness.js';

test('an edited, deleted or reordered audit entry is reported', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  initDataDir(data);
  // The running server holds the database exclusively: tamper while it is stopped, as an
  // attacker with the files would, and verify after it restarts.
  let server = await startServer(data);
  const run = (...args: string[]) => cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), ...args]);
  const tamper = async (fn: (db: Database.Database) => void) => {
    await server.stop();
    const db = new Database(join(data, 'virtkm.db'));
    try {
      fn(db);
    } finally {
      db.close();
    }
    server = await startServer(data);
  };
  try {
    for (let i = 0; i < 5; i++) t.is((await run('volume', 'create', `v${i}`, '--size', '1G', '--format', 'luks')).code, 0);
    const ok = await run('audit', 'verify');
    t.is(ok.code, 0);
    t.regex(ok.stdout, /audit log OK: \d+ events/);

    let rows: { seq: number }[] = [];
    let original = { target: '' };
    await tamper((db) => {
      rows = db.prepare('SELECT seq FROM audit_log ORDER BY seq').all() as { seq: number }[];
      original = db.prepare('SELECT target FROM audit_log WHERE seq = ?').get(rows[3]!.seq) as { target: string };
      db.prepare('UPDATE audit_log SET target = ? WHERE seq = ?').run('forged', rows[3]!.seq);
    });
    t.true(rows.length >= 7);
    const target = rows[3]!.seq;
    const edited = await run('audit', 'verify', '--json');
    t.is(edited.code, 6);
    const report = JSON.parse(edited.stdout) as { ok: boolean; first_bad_seq: string; problem: string };
    t.false(report.ok);
    t.is(report.first_bad_seq, String(target));
    await tamper((db) => db.prepare('UPDATE audit_log SET target = ? WHERE seq = ?').run(original.target, target));
    t.is((await run('audit', 'verify')).code, 0, 'restoring the field restores the chain');

    await tamper((db) => db.prepare('DELETE FROM audit_log WHERE seq = ?').run(rows[2]!.seq));
    const deleted = await run('audit', 'verify');
    t.is(deleted.code, 6);
    t.regex(deleted.stdout, /audit log BROKEN at event \d+/);
  } finally {
    await server.stop();
    dir.remove();
  }
});
