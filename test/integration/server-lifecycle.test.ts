/**
 * Server process life cycle: passphrase-sealed master key, graceful shutdown on SIGTERM,
 * process hygiene, restart keeps data.
 */
import test from 'ava';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, initDataDir, runServerCommand, startServer, tempDir, waitForLog } from '../helpers/server-harness.js';

test('a passphrase-sealed server starts only with the right passphrase and keeps its data across restarts', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  const good = join(dir.path, 'pass');
  const bad = join(dir.path, 'wrong');
  writeFileSync(good, 'correct horse battery staple\n', { mode: 0o600 });
  writeFileSync(bad, 'incorrect horse\n', { mode: 0o600 });
  try {
    initDataDir(data, ['--passphrase-file', good, '--kdf-ops', '2', '--kdf-mem-mib', '16']);
    const refused = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0', '--passphrase-file', bad]);
    t.not(refused.code, 0);
    t.regex(refused.stderr, /wrong passphrase/);

    let server = await startServer(data, ['--passphrase-file', good]);
    const run = (...args: string[]) => cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), ...args]);
    t.is((await run('volume', 'create', 'kept', '--size', '1G', '--format', 'luks')).code, 0);
    t.is(await server.stop(), 0, 'SIGTERM shuts down cleanly');
    t.regex(await waitForLog(server, /"msg":"stopped"/), /"msg":"stopped"/);

    server = await startServer(data, ['--passphrase-file', good]);
    const shown = await run('volume', 'show', 'kept', '--json');
    t.is(shown.code, 0, shown.stderr);
    t.is((JSON.parse(shown.stdout) as { name: string }).name, 'kept');
    t.is(await server.stop(), 0);
  } finally {
    dir.remove();
  }
});

test('the server process is non-dumpable and locks its key memory (not the whole process)', async (t) => {
  // mlockall() aborts V8 at its first heap shrink (see shared/src/process-hygiene.ts): the
  // server locks a key arena instead (shared/src/locked-memory.ts) and says so.
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    initDataDir(data);
    const server = await startServer(data);
    const status = readFileSync(`/proc/${server.proc.pid}/status`, 'utf8');
    t.regex(await waitForLog(server, /"msg":"starting"/), /"msg":"starting".*"dumpable":false,"memory_locked":false,"secrets_locked":true/);
    const locked = Number(/VmLck:\s+(\d+)/.exec(status)?.[1] ?? '-1');
    const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? '-1');
    t.true(locked >= 1024 && locked < rss, `the key arena is locked, not the whole process (VmLck ${locked} kB, VmRSS ${rss} kB)`);
    t.is(await server.stop(), 0);
  } finally {
    dir.remove();
  }
});

test('a second server on the same data directory refuses to start and the first keeps serving', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    initDataDir(data);
    const server = await startServer(data);
    const second = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
    t.is(second.code, 1);
    t.regex(second.stderr, /the database is in use by another process/);
    const r = await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'volume', 'create', 'still-ok', '--size', '1G', '--format', 'luks']);
    t.is(r.code, 0, r.stderr);
    t.is(await server.stop(), 0);
  } finally {
    dir.remove();
  }
});
