/**
 * Shamir-sealed servers and reseal, with real server processes: init 3-of-5, sealed mode
 * (only health and UnsealService answer), share refusals (mistyped, wrong, duplicate), the
 * unseal, restart (sealed again, shares forgotten); reseal shamir -> keyfile -> passphrase
 * -> shamir with the server starting after each and every secret still opening.
 */
import test from 'ava';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { cli, clientsFor, initDataDir, runServerCommand, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';
import { destroyWrappingKey, insertVolumes, openAllSecrets, openServerSecrets, unsealDataDir } from '../helpers/master-key-helpers.js';
import { decodeShare, encodeShare } from '../../server/src/master-key/shamir-sealer.js';
import { loadSodium } from '../../shared/src/sodium.js';

const SHARE_LINE = /^\s*share (\d+): (vkms1[-a-z2-7]+)$/gm;

function sharesFrom(stdout: string): Map<number, string> {
  return new Map([...stdout.matchAll(SHARE_LINE)].map((m) => [Number(m[1]), m[2]!]));
}

function writeShareFiles(dir: string, shares: Map<number, string>): Map<number, string> {
  const files = new Map<number, string>();
  for (const [i, s] of shares) {
    const f = join(dir, `my-share-${i}`);
    writeFileSync(f, `${s}\n`, { mode: 0o600 });
    files.set(i, f);
  }
  return files;
}

const admin = (server: ServerProcess, data: string) => (...args: string[]) => cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), ...args]);

test('a 3-of-5 Shamir server starts sealed, refuses bad shares, unseals with three and seals again on restart', async (t) => {
  await loadSodium();
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    const init = initDataDir(data, ['--sealer', 'shamir', '--shares', '5', '--threshold', '3']);
    const shares = sharesFrom(init.stdout);
    t.deepEqual([...shares.keys()], [1, 2, 3, 4, 5], init.stdout);
    t.regex(init.stdout, /Shamir shares, 3 of 5/);
    t.false(existsSync(join(data, 'master.kek')), 'no key file for a Shamir data directory');
    const recordText = readFileSync(join(data, 'master-key.json'), 'utf8');
    for (const s of shares.values()) t.false(recordText.includes(s.slice(6, 26)), 'no share in master-key.json');
    const files = writeShareFiles(dir.path, shares);

    let server = await startServer(data);
    let run = admin(server, data);
    t.regex((await run('unseal', 'status')).stdout, /^sealed: 0 of the 3 shares needed/);
    // Every other service answers FAILED_PRECONDITION "server is sealed" (one gate for all).
    const refused = await run('volume', 'create', 'early', '--size', '1G', '--format', 'luks');
    t.is(refused.code, 1);
    t.regex(refused.stderr, /server is sealed/);
    const clients = clientsFor(server.address, join(data, 'admin.pem'));
    const code = await new Promise<number | undefined>((resolve) => clients.hosts.listHosts({ page: { pageSize: 10, pageToken: '' } }, (err: ServiceError | null) => resolve(err?.code)));
    clients.close();
    t.is(code, GrpcStatus.FAILED_PRECONDITION);

    t.regex((await run('unseal', '--share-file', files.get(1)!)).stdout, /share 1 accepted; sealed: 1 of the 3/);
    t.regex((await run('unseal', '--share-file', files.get(4)!)).stdout, /share 4 accepted; sealed: 2 of the 3 shares needed have been given \(shares 1, 4\)/);
    t.regex((await run('volume', 'list')).stderr, /server is sealed/, 'two shares are not enough');

    // A mistyped share (one character changed): refused as such.
    const typo = shares.get(2)!.replace(/(.{12})(.)/, (_m, a: string, c: string) => a + (c === 'a' ? 'b' : 'a'));
    writeFileSync(join(dir.path, 'typo'), typo, { mode: 0o600 });
    const r1 = await run('unseal', '--share-file', join(dir.path, 'typo'));
    t.is(r1.code, 2);
    t.regex(r1.stderr, /mistyped or damaged: its checksum does not match/);
    t.false(r1.stderr.includes(typo.slice(6, 20)), 'the share is not echoed');
    // A well-formed share with the right set and index but a wrong value.
    const real = decodeShare(Buffer.from(shares.get(2)!));
    const forged = encodeShare(Buffer.from(real.setId, 'hex'), 2, Buffer.alloc(32, 7));
    writeFileSync(join(dir.path, 'forged'), forged, { mode: 0o600 });
    const r2 = await run('unseal', '--share-file', join(dir.path, 'forged'));
    t.is(r2.code, 4);
    t.regex(r2.stderr, /share 2 is wrong/);
    // A duplicate.
    const r3 = await run('unseal', '--share-file', files.get(4)!);
    t.is(r3.code, 1);
    t.regex(r3.stderr, /share 4 has already been submitted/);
    t.regex((await run('unseal', 'status')).stdout, /2 of the 3 shares needed/, 'refused shares consumed nothing');

    t.regex((await run('unseal', '--share-file', files.get(2)!)).stdout, /share 2 accepted; the server is now unsealed/);
    t.regex((await run('unseal', 'status')).stdout, /^unsealed \(master key sealed with shamir\)/);
    t.is((await run('volume', 'create', 'kept-a', '--size', '1G', '--format', 'luks')).code, 0);
    t.is((await run('volume', 'create', 'kept-b', '--size', '2G', '--format', 'luks2')).code, 0);
    const after = await run('unseal', '--share-file', files.get(5)!);
    t.regex(after.stderr, /not sealed/);
    t.is(await server.stop(), 0);

    // Restart: sealed again, earlier shares forgotten; another three shares unseal it.
    server = await startServer(data);
    run = admin(server, data);
    t.regex((await run('unseal', 'status')).stdout, /^sealed: 0 of the 3/);
    t.regex((await run('volume', 'show', 'kept-a')).stderr, /server is sealed/);
    for (const i of [5, 3, 1]) t.is((await run('unseal', '--share-file', files.get(i)!)).code, 0);
    const shown = await run('volume', 'show', 'kept-b', '--json');
    t.is(shown.code, 0, shown.stderr);
    t.is((JSON.parse(shown.stdout) as { name: string }).name, 'kept-b');
    const audit = await run('audit', 'list', '--action', 'unseal.share', '--json');
    const outcomes = (JSON.parse(audit.stdout) as { outcome: string }[]).map((e) => e.outcome);
    t.is(outcomes.filter((o) => o === 'ok').length, 6);
    t.true(outcomes.filter((o) => o === 'denied').length >= 3);
    t.is(await server.stop(), 0);
    t.false(server.logs().includes(shares.get(1)!.slice(6, 26)), 'no share in the server log');
  } finally {
    dir.remove();
  }
});

test('reseal shamir -> keyfile -> passphrase -> shamir keeps the master key; the server starts after each and every secret opens', async (t) => {
  await loadSodium();
  const dir = tempDir();
  const data = join(dir.path, 'data');
  const pass = join(dir.path, 'pass');
  const wrongPass = join(dir.path, 'wrong');
  writeFileSync(pass, 'reseal me please\n', { mode: 0o600 });
  writeFileSync(wrongPass, 'not it\n', { mode: 0o600 });
  try {
    const init = initDataDir(data, ['--sealer', 'shamir', '--shares', '3', '--threshold', '2']);
    const first = writeShareFiles(dir.path, sharesFrom(init.stdout));
    const keyId = () => (JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { keyId: string; sealer: string });
    const originalId = keyId().keyId;
    const key0 = await unsealDataDir(data, { shareFiles: [first.get(1)!, first.get(3)!] });
    await insertVolumes(join(data, 'virtkm.db'), key0, 50);
    const expected = await openAllSecrets(join(data, 'virtkm.db'), key0);
    destroyWrappingKey(key0);
    t.is(expected.size, 50);

    const checkStarts = async (extra: string[] = [], shareFiles: string[] = []) => {
      const server = await startServer(data, extra);
      const run = admin(server, data);
      for (const f of shareFiles) t.is((await run('unseal', '--share-file', f)).code, 0);
      const shown = await run('volume', 'show', 'bulk-7');
      t.is(shown.code, 0, shown.stderr);
      t.is(await server.stop(), 0);
    };
    const checkSecrets = async (how: Parameters<typeof unsealDataDir>[1]) => {
      const key = await unsealDataDir(data, how);
      t.is(Buffer.from(key.id).toString('hex'), originalId, 'the same master key');
      t.deepEqual(await openAllSecrets(join(data, 'virtkm.db'), key), expected);
      openServerSecrets(data, key);
      destroyWrappingKey(key);
    };
    await checkStarts([], [first.get(2)!, first.get(3)!]);

    // shamir -> keyfile, with two of the current shares from files.
    let r = runServerCommand(['reseal', '--data-dir', data, '--to', 'keyfile', '--share-file', first.get(1)!, first.get(2)!]);
    t.is(r.code, 0, r.stderr);
    t.is(keyId().sealer, 'keyfile');
    t.true(existsSync(join(data, 'master.kek')));
    t.false(existsSync(join(data, 'transport.kek')), 'the transport key goes with sealed mode');
    await checkSecrets({ keyfile: true });
    await checkStarts();

    // keyfile -> passphrase; the key file is removed.
    r = runServerCommand(['reseal', '--data-dir', data, '--to', 'passphrase', '--new-passphrase-file', pass, '--kdf-ops', '1', '--kdf-mem-mib', '8']);
    t.is(r.code, 0, r.stderr);
    t.is(keyId().sealer, 'passphrase');
    t.false(existsSync(join(data, 'master.kek')));
    await checkSecrets({ passphraseFile: pass });
    await checkStarts(['--passphrase-file', pass]);

    // A wrong current credential changes nothing.
    const before = readFileSync(join(data, 'master-key.json'));
    r = runServerCommand(['reseal', '--data-dir', data, '--to', 'keyfile', '--passphrase-file', wrongPass]);
    t.not(r.code, 0);
    t.regex(r.stderr, /wrong passphrase/);
    t.deepEqual(readFileSync(join(data, 'master-key.json')), before);
    t.false(existsSync(join(data, 'master.kek.new')));

    // passphrase -> shamir, shares written to files; the old shares no longer count.
    const out = join(dir.path, 'shares');
    mkdirSync(out, { mode: 0o700 });
    r = runServerCommand(['reseal', '--data-dir', data, '--to', 'shamir', '--passphrase-file', pass, '--shares', '2', '--threshold', '2', '--shares-out-dir', out]);
    t.is(r.code, 0, r.stderr);
    t.notRegex(r.stdout, /vkms1-/, 'shares went to files, not stdout');
    const files = readdirSync(out).map((f) => join(out, f));
    t.is(files.length, 2);
    t.is(keyId().sealer, 'shamir');
    await checkSecrets({ shareFiles: files });
    const server = await startServer(data);
    const run = admin(server, data);
    const old = await run('unseal', '--share-file', first.get(1)!);
    t.regex(old.stderr, /belongs to another share set/);
    for (const f of files) t.is((await run('unseal', '--share-file', f)).code, 0);
    t.is((await run('volume', 'show', 'bulk-3')).code, 0);
    t.is(await server.stop(), 0);
    // While the server runs, reseal is refused by the lock.
    const running = await startServer(data);
    r = runServerCommand(['reseal', '--data-dir', data, '--to', 'keyfile', '--share-file', ...files]);
    t.is(r.code, 1);
    t.regex(r.stderr, /in use by another process/);
    t.is(await running.stop(), 0);
  } finally {
    dir.remove();
  }
});
