/**
 * Server process life cycle: passphrase-sealed master key, graceful shutdown on SIGTERM,
 * process hygiene, restart keeps data.
 */
import test from 'ava';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { kernelDiscardsLockedPages, madviseShimPath, mayLockUnlimited } from '../../shared/src/memory-lock.js';
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

/** Rss-proportional (Pss) and locked kB of a process, from /proc/<pid>/smaps_rollup. */
function lockedOf(pid: number): { pssKb: number; lockedKb: number; vmLckKb: number; vmRssKb: number } {
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (text: string, field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(text)?.[1] ?? -1);
  return { pssKb: kb(rollup, 'Pss'), lockedKb: kb(rollup, 'Locked'), vmLckKb: kb(status, 'VmLck'), vmRssKb: kb(status, 'VmRSS') };
}

const wholeLockSkip = !existsSync(madviseShimPath()) ? 'the madvise library is not built' : !mayLockUnlimited() ? 'no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK' : !kernelDiscardsLockedPages() ? 'the kernel has no MADV_DONTNEED_LOCKED' : undefined;
const wholeLockTest = wholeLockSkip ? test.skip : test;

wholeLockTest(`the server process is non-dumpable and locks all of its memory (the default --memory-lock auto)${wholeLockSkip ? ` [skipped: ${wholeLockSkip}]` : ''}`, async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    initDataDir(data);
    const server = await startServer(data);
    t.regex(await waitForLog(server, /"msg":"starting"/), /"msg":"starting".*"dumpable":false,"memory_locked":true,"secrets_locked":true/);
    const m = lockedOf(server.proc.pid!);
    t.true(m.lockedKb >= m.pssKb - 64, `every resident page is locked: Locked ${m.lockedKb} kB, Pss ${m.pssKb} kB`);
    t.true(m.vmLckKb > m.vmRssKb, 'VmLck covers all mappings');
    // Serves normally while locked: a write and a read over mTLS.
    const admin = ['--server', server.address, '--credentials', join(data, 'admin.pem')];
    t.is((await cli([...admin, 'volume', 'create', 'locked-1', '--size', '1G', '--format', 'luks'])).code, 0);
    t.is((await cli([...admin, 'volume', 'show', 'locked-1'])).code, 0);
    t.is(await server.stop(), 0);
  } finally {
    dir.remove();
  }
});

test('with --memory-lock off the server locks only its key arena and says why', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    initDataDir(data);
    const server = await startServer(data, ['--memory-lock', 'off']);
    t.regex(await waitForLog(server, /"msg":"starting"/), /"msg":"starting".*"dumpable":false,"memory_locked":false,"secrets_locked":true/);
    const m = lockedOf(server.proc.pid!);
    t.true(m.vmLckKb >= 1024 && m.vmLckKb < m.vmRssKb, `the key arena is locked, not the whole process (VmLck ${m.vmLckKb} kB, VmRSS ${m.vmRssKb} kB)`);
    t.false(readFileSync(`/proc/${server.proc.pid!}/maps`, 'utf8').includes('libvirtkm-madvise-locked.so'), 'no relaunch with the library');
    t.is(await server.stop(), 0);
  } finally {
    dir.remove();
  }
});

test('--durability full-sync is taken (the store then runs synchronous=FULL: sqlite-store unit tests) and serves; data written with it is there under the default; an unknown mode is refused', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    initDataDir(data);
    t.regex(runServerCommand(['run', '--data-dir', data, '--durability', 'sometimes']).stderr, /--durability must be one of async-wal-sync, full-sync/);
    const server = await startServer(data, ['--durability', 'full-sync']);
    t.regex(await waitForLog(server, /"msg":"starting"/), /"durability":"full-sync"/);
    const admin = ['--server', server.address, '--credentials', join(data, 'admin.pem')];
    t.is((await cli([...admin, 'volume', 'create', 'durable-1', '--size', '1G', '--format', 'luks'])).code, 0);
    t.is(await server.stop(), 0);
    // The default, after a restart on the same data: the volume is there.
    const again = await startServer(data);
    t.regex(await waitForLog(again, /"msg":"starting"/), /"durability":"async-wal-sync"/);
    t.is((await cli([...admin.map((a) => (a === server.address ? again.address : a)), 'volume', 'show', 'durable-1'])).code, 0);
    t.is(await again.stop(), 0);
  } finally {
    dir.remove();
  }
});

test('an unknown --memory-lock mode is refused', (t) => {
  const r = runServerCommand(['run', '--data-dir', '/nonexistent', '--memory-lock', 'sometimes']);
  t.is(r.code, 2, 'invalid arguments exit with 2');
  t.regex(r.stderr, /--memory-lock must be one of auto, require, off/);
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
