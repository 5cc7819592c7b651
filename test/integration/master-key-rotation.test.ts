/**
 * Master key rotation with real processes: `virtkm-server rotate-master-key` over a few
 * thousand volumes, killed with SIGKILL at random points (on each progress step it prints,
 * and at random delays after the unseal); after every kill the server starts
 * (settling the interrupted rotation) and every sealed secret opens with the master key
 * master-key.json then holds, with the same plaintext as before. A Shamir directory
 * rotates with shares from files and keeps its shares.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SERVER_BIN, cli, initDataDir, runServerCommand, startServer, tempDir } from '../helpers/server-harness.js';
import { committedMasterKeyId, destroyWrappingKey, insertVolumes, openAllSecrets, openServerSecrets, unsealDataDir } from '../helpers/master-key-helpers.js';

const VOLUMES = 3000;

/** Runs rotate-master-key and kills it with SIGKILL once `step` is printed (+ delayMs), or after delayMs when step is undefined. */
function rotateAndKill(data: string, step: string | undefined, delayMs: number): Promise<{ killed: boolean; stdout: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [SERVER_BIN, 'rotate-master-key', '--data-dir', data], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    const kill = () => {
      timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    };
    if (step === undefined) kill();
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (step !== undefined && timer === undefined && stdout.includes(`step ${step}`)) kill();
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const guard = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`rotation hung: ${stdout} ${stderr}`));
    }, 120_000);
    child.once('exit', (code, signal) => {
      clearTimeout(guard);
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL' && code !== 0) reject(new Error(`rotation failed (${code}): ${stderr}`));
      else resolve({ killed: signal === 'SIGKILL', stdout });
    });
  });
}

test('rotate-master-key killed at random points: the server starts with one of the two keys and every secret opens', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  const db = join(data, 'virtkm.db');
  try {
    initDataDir(data);
    const k0 = await unsealDataDir(data);
    await insertVolumes(db, k0, VOLUMES);
    const expected = await openAllSecrets(db, k0);
    destroyWrappingKey(k0);
    t.is(expected.size, VOLUMES);

    const seenIds = new Set<string>([JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')).keyId as string]);
    let rotations = 0;
    const plan: [string | undefined, number][] = [
      ['unsealed', 0],
      ['next-record', 0],
      ['next-record', 3],
      ['next-secrets', 0],
      ['next-secrets', 2],
      ['committed', 0],
      ['committed', 1],
      ['swapped', 0],
      // Random points from the unseal on (node's own start-up takes most of a second and
      // would swallow plain random delays): the rewrap transaction, the renames.
      ...Array.from({ length: 6 }, (): [string, number] => ['unsealed', Math.floor(Math.random() * 250)]),
      [undefined, Math.floor(Math.random() * 1500)],
    ];
    for (const [step, delay] of plan) {
      const r = await rotateAndKill(data, step, delay);
      if (!r.killed || r.stdout.includes('step committed')) rotations++;
      t.log(`kill at ${step ?? 'random'} +${delay} ms: ${r.killed ? 'killed' : 'finished'} after ${r.stdout.trim().split('\n').pop() ?? '(nothing)'}`);
      // The server settles the directory and starts.
      const server = await startServer(data);
      const shown = await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'volume', 'show', 'bulk-42']);
      t.is(shown.code, 0, shown.stderr);
      t.is(await server.stop(), 0);
      t.false(readdirSync(data).some((f) => f.endsWith('.next') || f === 'master-key.next.json'), 'no rotation leftovers after start');
      // Every secret opens under the key master-key.json holds, unchanged.
      const key = await unsealDataDir(data);
      const id = Buffer.from(key.id).toString('hex');
      t.is(await committedMasterKeyId(db), id, 'the database names the key of master-key.json');
      t.deepEqual(await openAllSecrets(db, key), expected);
      openServerSecrets(data, key);
      destroyWrappingKey(key);
      seenIds.add(id);
    }
    t.true(rotations >= 3, 'several rotations committed');
    t.true(seenIds.size >= 3, 'the master key did change');
    // An uninterrupted rotation, and its audit event.
    const r = runServerCommand(['rotate-master-key', '--data-dir', data]);
    t.is(r.code, 0, r.stderr);
    t.regex(r.stdout, new RegExp(`${VOLUMES} volume secrets and 2 server secrets rewrapped`));
    const key = await unsealDataDir(data);
    t.deepEqual(await openAllSecrets(db, key), expected);
    destroyWrappingKey(key);
  } finally {
    dir.remove();
  }
});

test('a Shamir data directory rotates with shares from files and keeps its shares', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  try {
    const init = initDataDir(data, ['--sealer', 'shamir', '--shares', '3', '--threshold', '2']);
    const shares = [...init.stdout.matchAll(/share (\d): (vkms1[-a-z2-7]+)/g)].map((m) => {
      const f = join(dir.path, `s${m[1]}`);
      writeFileSync(f, m[2]!, { mode: 0o600 });
      return f;
    });
    t.is(shares.length, 3);
    const before = JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { keyId: string; params: unknown };
    const few = runServerCommand(['rotate-master-key', '--data-dir', data, '--share-file', shares[0]!]);
    t.not(few.code, 0);
    t.regex(few.stderr, /1 of the 2 shares needed/);
    const r = runServerCommand(['rotate-master-key', '--data-dir', data, '--share-file', shares[0]!, shares[2]!]);
    t.is(r.code, 0, r.stderr);
    const after = JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { keyId: string; params: unknown };
    t.not(after.keyId, before.keyId);
    t.deepEqual(after.params, before.params, 'same share set');
    t.false(existsSync(join(data, 'master-key.next.json')));
    const server = await startServer(data);
    for (const f of [shares[1]!, shares[2]!]) t.is((await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'unseal', '--share-file', f])).code, 0);
    t.is((await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'volume', 'create', 'after-rotation', '--size', '1G', '--format', 'luks'])).code, 0);
    t.is(await server.stop(), 0);
  } finally {
    dir.remove();
  }
});
