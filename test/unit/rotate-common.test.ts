/**
 * host-agent/src/rotate/common.ts: names of rotation files, leftovers, the free-space
 * check, throttled progress, and header backups (save, tamper detection, restore checks).
 * Plain files in a temporary directory, no tools.
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import {
  checkFreeSpace,
  checkRotationId,
  progressReporter,
  readHeaderBackup,
  removeFiles,
  restoreHeaderBackup,
  rotationFilePath,
  rotationLeftovers,
  sameSecret,
  saveHeaderBackup,
} from '../../host-agent/src/rotate/common.js';
import { legacyLiveCopyPaths, liveCopyJournalPath, liveCopyTempPath } from '../../host-agent/src/rotate/live-copy.js';
import type { RotationProgress } from '../../host-agent/src/rotate/types.js';
import { isDomainError } from '../../shared/src/errors.js';

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'virtkm-rotate-common-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function kindOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return isDomainError(err) ? err.kind : 'other';
  }
  return undefined;
}

test('rotation ids and file names', (t) => {
  t.is(checkRotationId('5f0c-aa_01'), '5f0c-aa_01');
  for (const bad of ['', '../x', 'a/b', '.hidden', 'x'.repeat(65), 'a b', 'é']) t.is(kindOf(() => checkRotationId(bad)), 'invalid_argument', bad);
  t.is(rotationFilePath('/var/lib/img/vol.qcow2', 'r1', 'copy'), '/var/lib/img/.vol.qcow2.virtkm-rot-r1.copy');
  t.is(kindOf(() => rotationFilePath('/var/lib/img/vol.qcow2', 'r1', '../x')), 'invalid_argument');
  // Not a create temporary (images/files.ts sweeps those after an hour).
  t.notRegex(rotationFilePath('/d/v', 'r1', 'hdr'), /virtkm-tmp-/);
});

test('leftovers: only this rotation of this image, including create temporaries of its files', async (t) => {
  await withDir(async (dir) => {
    const img = join(dir, 'vol.img');
    const names = ['vol.img', '.vol.img.virtkm-rot-r1.copy', '.vol.img.virtkm-rot-r1.hdr.tmp', '..vol.img.virtkm-rot-r1.copy.virtkm-tmp-0123456789ab', '.vol.img.virtkm-rot-r2.copy', '.other.img.virtkm-rot-r1.copy'];
    for (const n of names) await writeFile(join(dir, n), 'x');
    const left = await rotationLeftovers(img, 'r1');
    t.deepEqual(left.map((p) => p.slice(dir.length + 1)), ['..vol.img.virtkm-rot-r1.copy.virtkm-tmp-0123456789ab', '.vol.img.virtkm-rot-r1.copy', '.vol.img.virtkm-rot-r1.hdr.tmp']);
    await removeFiles([...left, join(dir, 'missing')], true);
    t.deepEqual(await rotationLeftovers(img, 'r1'), []);
    t.truthy(await stat(join(dir, '.vol.img.virtkm-rot-r2.copy')));
  });
});

test('free space check: resource_exhausted when too little, fine otherwise', async (t) => {
  await withDir(async (dir) => {
    await checkFreeSpace(dir, 1n);
    const err = await checkFreeSpace(dir, 1n << 62n).catch((e: unknown) => e);
    t.true(isDomainError(err) && err.kind === 'resource_exhausted');
  });
});

test('progress: throttled within a step, every step change reported, rate from the step start', (t) => {
  let now = 0;
  const seen: RotationProgress[] = [];
  const p = progressReporter({ onProgress: (x) => seen.push(x) }, 250, () => now);
  p.report('copying', 0n, 100n);
  now = 100;
  p.report('copying', 10n, 100n); // throttled
  now = 1000;
  p.report('copying', 50n, 100n);
  now = 1010;
  p.report('verifying', 0n, 100n); // new step: at once
  p.report('verifying', 100n, 100n, true); // forced
  t.deepEqual(
    seen.map((s) => [s.step, s.bytesDone]),
    [
      ['copying', 0n],
      ['copying', 50n],
      ['verifying', 0n],
      ['verifying', 100n],
    ],
  );
  t.is(seen[1]?.bytesPerSecond, 50);
  // A throwing consumer does not break the caller.
  t.notThrows(() => progressReporter({ onProgress: () => { throw new Error('x'); } }).report('a', 0n, 0n));
  t.notThrows(() => progressReporter(undefined).report('a', 0n, 0n));
});

test('sameSecret compares bytes', (t) => {
  const a = randomBytes(32);
  t.true(sameSecret(a, Buffer.from(a)));
  t.false(sameSecret(a, randomBytes(32)));
  t.false(sameSecret(a, a.subarray(1)));
});

test('header backup: saved owner-only, restored byte for byte, refused for another image, torn or tampered backups ignored', async (t) => {
  await withDir(async (dir) => {
    const img = join(dir, 'vol.img');
    const original = randomBytes(1 << 16);
    await writeFile(img, original);
    const backup = join(dir, '.vol.img.virtkm-rot-r1.hdr');
    const ranges = [
      { offset: 0, length: 4096 },
      { offset: 8192, length: 1000 },
    ];
    await saveHeaderBackup(img, backup, { layout: 'luks1', ranges, imageSize: original.length, identity: 'u-1' });
    t.is((await stat(backup)).mode & 0o777, 0o600);
    await t.throwsAsync(stat(`${backup}.tmp`));

    // Damage the image in and outside the ranges; a restore brings back the ranges only.
    const damaged = Buffer.from(original);
    damaged.fill(0, 0, 9000);
    damaged.fill(1, 20000, 20010);
    await writeFile(img, damaged);
    const b = await readHeaderBackup(backup);
    if (!b) return t.fail('backup not readable');
    t.is(b.identity, 'u-1');
    // Another layout, another identity: refused.
    t.is((await restoreHeaderBackup(img, b, 'qcow2-luks', undefined).catch((e: unknown) => (isDomainError(e) ? e.kind : 'other'))) ?? 'ok', 'failed_precondition');
    t.is((await restoreHeaderBackup(img, b, 'luks1', 'u-2').catch((e: unknown) => (isDomainError(e) ? e.kind : 'other'))) ?? 'ok', 'failed_precondition');
    await restoreHeaderBackup(img, b, 'luks1', undefined);
    const after = await readFile(img);
    t.true(after.subarray(0, 4096).equals(original.subarray(0, 4096)));
    t.true(after.subarray(8192, 9192).equals(original.subarray(8192, 9192)));
    t.true(after.subarray(4096, 8192).every((x) => x === 0), 'outside the ranges: untouched');
    t.true(after.subarray(20000, 20010).every((x) => x === 1));

    // A torn (cut) or altered backup is not used.
    const bytes = await readFile(backup);
    await writeFile(backup, bytes.subarray(0, bytes.length - 100));
    t.is(await readHeaderBackup(backup), undefined);
    bytes[200] = (bytes[200] ?? 0) ^ 1;
    await writeFile(backup, bytes);
    t.is(await readHeaderBackup(backup), undefined);
    t.is(await readHeaderBackup(join(dir, 'none')), undefined);
    return undefined;
  });
});

test('leftovers never include the live copy\'s files (named by live-copy.ts with common prefix, removed by it alone)', async (t) => {
  await withDir(async (dir) => {
    const img = join(dir, 'vol.img');
    const temp = liveCopyTempPath(img, 'r1');
    const journal = liveCopyJournalPath(img, 'r1');
    t.is(temp, join(dir, '.vol.img.virtkm-rot-r1.live-new'));
    t.is(journal, join(dir, '.vol.img.virtkm-rot-r1.live-journal'));
    for (const p of [temp, journal, `${journal}.tmp`, join(dir, `.${basename(temp)}.virtkm-tmp-0123456789ab`), join(dir, '.vol.img.virtkm-rot-r1.copy')]) await writeFile(p, 'x');
    // An offline mechanism of the same rotation sweeps its leftovers: the live copy's
    // destination (after a pivot: the guest's newest data) must survive that.
    t.deepEqual(await rotationLeftovers(img, 'r1'), [join(dir, '.vol.img.virtkm-rot-r1.copy')]);
    t.deepEqual(legacyLiveCopyPaths(img, 'r1'), { temp: join(dir, '.vol.img.rot-r1.new'), journal: join(dir, '.vol.img.rot-r1.json') });
  });
});
