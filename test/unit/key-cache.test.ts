/**
 * The agent's sealed key cache file: round trip, binding to the host key and host id, and
 * the write order (the cache file is complete at every moment; the previous file's blocks
 * are zeroed only after the new file replaced it; crash leftovers are shredded at open).
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { existsSync, linkSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateWrappingKey } from '../../shared/src/envelope.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { openKeyCache, type CachedKey } from '../../host-agent/src/cache/key-cache.js';

await loadSodium();

const HOST = '6a1d7c9e-0000-4000-8000-000000000001';

function entry(volumeId: string, keyVersion: number, secret: Buffer): CachedKey {
  return { volumeId, keyVersion, guestIds: ['g1'], secret: Buffer.from(secret) };
}

function scratch(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-key-cache-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('a replaced cache reopens with the same entries and desired state; the file is 0600 and holds no secret in clear', (t) => {
  const dir = scratch(t);
  const path = join(dir, 'cache');
  const key = generateWrappingKey();
  const secret = randomBytes(32);
  const cache = openKeyCache(path, key, HOST);
  cache.replace([entry('vol-a', 1, secret)], Buffer.from('desired-1'));
  cache.close();
  t.is(statSync(path).mode & 0o777, 0o600);
  const raw = readFileSync(path);
  t.is(raw.indexOf(secret), -1, 'the secret is not in the file');
  t.is(raw.indexOf(Buffer.from(secret.toString('base64'))), -1, 'nor its base64 form');
  const again = openKeyCache(path, key, HOST);
  t.deepEqual(Buffer.from(again.get('vol-a', 1) ?? []), secret);
  t.deepEqual(Buffer.from(again.lastDesired() ?? []), Buffer.from('desired-1'));
  t.deepEqual(again.entries(), [{ volumeId: 'vol-a', keyVersion: 1, guestIds: ['g1'] }]);
  again.close();
});

test('another host key or another host id does not open the cache', (t) => {
  const dir = scratch(t);
  const path = join(dir, 'cache');
  const key = generateWrappingKey();
  const cache = openKeyCache(path, key, HOST);
  cache.replace([entry('vol-a', 1, randomBytes(32))]);
  cache.close();
  t.throws(() => openKeyCache(path, generateWrappingKey(), HOST), { message: /does not open with this host key/ });
  t.throws(() => openKeyCache(path, key, '6a1d7c9e-0000-4000-8000-000000000002'), { message: /does not open with this host key/ });
});

test('a write zeroes the previous file only after the new one replaced it, and leaves no second name behind', (t) => {
  const dir = scratch(t);
  const path = join(dir, 'cache');
  const key = generateWrappingKey();
  const cache = openKeyCache(path, key, HOST);
  cache.replace([entry('vol-a', 1, randomBytes(32))]);
  // A reader holding the old file (here: another name for its inode) sees its blocks zeroed
  // once the next write is done; the cache's own name holds the new, complete content.
  const observer = join(dir, 'observer');
  linkSync(path, observer);
  const before = readFileSync(observer);
  t.true(before.some((b) => b !== 0));
  cache.replace([entry('vol-a', 1, randomBytes(32)), entry('vol-b', 1, randomBytes(32))]);
  const oldNow = readFileSync(observer);
  t.is(oldNow.length, before.length);
  t.true(oldNow.every((b) => b === 0), 'the old file is zeroed');
  t.false(existsSync(`${path}.old`));
  t.false(existsSync(`${path}.tmp`));
  cache.close();
  const again = openKeyCache(path, key, HOST);
  t.deepEqual(again.entries().map((e) => e.volumeId), ['vol-a', 'vol-b']);
  again.close();
});

test('leftovers of a write interrupted by a crash are shredded at open; the cache opens with its last complete content', (t) => {
  const dir = scratch(t);
  const path = join(dir, 'cache');
  const key = generateWrappingKey();
  const secret = randomBytes(32);
  const cache = openKeyCache(path, key, HOST);
  cache.replace([entry('vol-a', 7, secret)]);
  cache.close();
  // A crash after the `.old` link (the same content) and with a half-written `.tmp`.
  linkSync(path, `${path}.old`);
  const partial = join(dir, 'partial');
  writeFileSync(`${path}.tmp`, readFileSync(path).subarray(0, 20));
  linkSync(`${path}.tmp`, partial);
  const again = openKeyCache(path, key, HOST);
  t.deepEqual(Buffer.from(again.get('vol-a', 7) ?? []), secret);
  t.false(existsSync(`${path}.old`), '.old removed');
  t.false(existsSync(`${path}.tmp`), '.tmp removed');
  t.true(readFileSync(partial).every((b) => b === 0), 'the partial file was zeroed before its removal');
  t.true(readFileSync(path).some((b) => b !== 0), 'the cache file itself is intact');
  again.close();
});
