/**
 * The LUKS2 rotation mechanisms (luks2-rekey, luks2-reencrypt) with the real cryptsetup on
 * image files: the data survives (a plaintext checksum read without device-mapper, see
 * test/fixtures/rotate/luks2-helpers.ts), the old key is refused and the new one accepted,
 * bad input changes nothing, a second run is a no-op, failures roll back.
 */
import anyTest, { type TestFn } from 'ava';
import { spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, truncate } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import { finishedDataPhase, readLuks2Metadata } from '../../host-agent/src/rotate/luks2-finalize.js';
import { createLuks2Reencrypt } from '../../host-agent/src/rotate/luks2-reencrypt.js';
import { createLuks2Rekey, rekeyBackupPaths } from '../../host-agent/src/rotate/luks2-rekey.js';
import type { RotationJob, RotationMechanism, RotationProgress } from '../../host-agent/src/rotate/types.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, domainRejection, listDir, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';
import { fileDigest, luks2Json, opens, plaintextDigest, volumeKey, writePattern } from '../fixtures/rotate/luks2-helpers.js';

interface Ctx {
  dir: string;
  scratch: string;
}
const test = anyTest as TestFn<Ctx>;
const store = createHostImageStore();
const MiB = 1n << 20n;

test.before(async (t) => {
  t.context.dir = await tempDir();
  t.context.scratch = await tempDir();
});

test.after.always(async (t) => {
  await removeDir(t.context.dir);
  await removeDir(t.context.scratch);
});

interface Volume {
  spec: ImageSpec;
  oldKey: Buffer;
  newKey: Buffer;
  /** SHA-256 of the plaintext written into the payload. */
  digest: string;
  /** The volume key before the rotation. */
  vk: Buffer;
}

let n = 0;
/** A luks2 image under the old key with a known pattern in its whole payload. */
async function volume(t: { context: Ctx }, overrides: Partial<ImageSpec> = {}): Promise<Volume> {
  // A directory of its own: tests run concurrently and check for leftovers next to the image.
  const dir = join(t.context.dir, `v${n++}`);
  await mkdir(dir);
  const spec = { ...specFor(dir, 'luks2'), sizeBytes: 16n * MiB, ...overrides };
  const oldKey = awkwardSecret();
  await store.create(spec, oldKey);
  const vk = await volumeKey(spec.path, oldKey, t.context.scratch);
  const digest = await writePattern(spec, vk, spec.path);
  return { spec, oldKey, newKey: awkwardSecret(), digest, vk };
}

function job(v: Volume, kind: 'rekey' | 'reencrypt', overrides: Partial<RotationJob> = {}): RotationJob {
  return { rotationId: `rot-${kind}-${n++}`, volumeId: 'vol', kind, target: v.spec, fromFormat: 'luks2', oldKey: v.oldKey, newKey: v.newKey, ...overrides };
}

/** A runner that fails (exit 1) the first cryptsetup command whose verb is `verb`, and runs everything else. */
function failing(verb: string): RunTool {
  let failed = false;
  return async (file, args, options) => {
    if (!failed && args[0] === verb) {
      failed = true;
      return { code: 1, stdout: '', stderr: 'injected failure', truncated: false };
    }
    return runTool(file, args, options);
  };
}

/** Hidden files next to the image (header backups, temporaries): none should be left. */
async function leftovers(v: Volume): Promise<string[]> {
  return (await listDir(dirname(v.spec.path))).filter((name) => name.startsWith('.'));
}

test('rekey: new passphrase, same volume key, data intact, old key refused, backup removed; a second run changes nothing', async (t) => {
  const v = await volume(t);
  const j = job(v, 'rekey');
  const steps: string[] = [];
  const r = await createLuks2Rekey().run(j, { onProgress: (p) => steps.push(p.step) });
  t.deepEqual(r, { opensWith: 'new', verified: true, bytesRewritten: 0n });
  t.false(await store.testKey(v.spec.path, v.spec, v.oldKey));
  t.true(await store.testKey(v.spec.path, v.spec, v.newKey));
  const vk = await volumeKey(v.spec.path, v.newKey, t.context.scratch);
  t.true(vk.equals(v.vk), 'a rekey keeps the volume key');
  t.is(await plaintextDigest(v.spec, vk), v.digest);
  t.deepEqual(Object.keys((await luks2Json(v.spec.path)).keyslots).length, 1, 'only the new keyslot is left');
  t.true(steps.includes('adding key') && steps.includes('removing old keyslot'), steps.join(','));
  t.deepEqual(await leftovers(v), [], 'no header backup or temporary left');

  const before = await fileDigest(v.spec.path);
  const again = await createLuks2Rekey().run(j);
  t.is(again.opensWith, 'new');
  t.is(await fileDigest(v.spec.path), before, 'the second run wrote nothing');
});

for (const resilience of ['checksum', 'journal'] as const) {
  test(`reencrypt (${resilience}): new volume key, every block rewritten, data intact, old key refused; a second run changes nothing`, async (t) => {
    const v = await volume(t, resilience === 'journal' ? { sectorSize: 4096 } : {});
    const j = job(v, 'reencrypt');
    const progress: RotationProgress[] = [];
    const mechanism = createLuks2Reencrypt({ resilience });
    const r = await mechanism.run(j, { onProgress: (p) => progress.push(p) });
    t.deepEqual(r, { opensWith: 'new', verified: false, bytesRewritten: v.spec.sizeBytes });
    t.false(await opens(v.spec.path, v.oldKey));
    t.true(await opens(v.spec.path, v.newKey));
    const vk = await volumeKey(v.spec.path, v.newKey, t.context.scratch);
    t.false(vk.equals(v.vk), 'a new volume key');
    t.is(await plaintextDigest(v.spec, vk), v.digest, 'the plaintext is unchanged');
    t.not(await plaintextDigest(v.spec, v.vk), v.digest, 'the old volume key no longer decrypts the data');
    const meta = await luks2Json(v.spec.path);
    t.deepEqual(Object.keys(meta.keyslots).length, 1);
    t.is(meta.config.requirements, undefined, 'no re-encryption left pending');
    t.is((meta.segments['0'] as { sector_size: number }).sector_size, v.spec.sectorSize, 'the sector size is kept');
    const last = progress.filter((p) => p.step === 'reencrypting').at(-1);
    t.is(last?.bytesTotal, v.spec.sizeBytes, 'progress reports the payload size');
    t.deepEqual(await leftovers(v), []);

    const before = await fileDigest(v.spec.path);
    const again = await mechanism.run(j);
    t.deepEqual(again, { opensWith: 'new', verified: false, bytesRewritten: 0n });
    t.is(await fileDigest(v.spec.path), before, 'the second run wrote nothing');
  });
}

for (const kind of ['rekey', 'reencrypt'] as const) {
  const make = (): RotationMechanism => (kind === 'rekey' ? createLuks2Rekey() : createLuks2Reencrypt());

  test(`${kind}: a wrong old key is failed_precondition and changes no byte`, async (t) => {
    const v = await volume(t);
    const before = await fileDigest(v.spec.path);
    const e = await domainRejection(make().run(job(v, kind, { oldKey: awkwardSecret() })));
    t.is(e.kind, 'failed_precondition');
    t.is(await fileDigest(v.spec.path), before);
    t.deepEqual(await leftovers(v), []);
  });

  test(`${kind}: a truncated header is a clear failed_precondition and the file is left as it is`, async (t) => {
    const v = await volume(t);
    const cut = join(t.context.dir, `cut-${kind}.img`);
    await copyFile(v.spec.path, cut);
    await truncate(cut, 4096);
    const before = await readFile(cut);
    const e = await domainRejection(make().run(job(v, kind, { target: { ...v.spec, path: cut } })));
    t.is(e.kind, 'failed_precondition');
    t.regex(e.message, /damaged/);
    t.true((await readFile(cut)).equals(before));
  });

  test(`${kind}: a job that does not fit is invalid_argument and touches nothing`, async (t) => {
    const v = await volume(t);
    const before = await fileDigest(v.spec.path);
    const other = kind === 'rekey' ? 'reencrypt' : 'rekey';
    const cases: Partial<RotationJob>[] = [
      { kind: other },
      { newKey: v.oldKey },
      { newKey: undefined },
      { rotationId: '../escape' },
      { fromFormat: 'luks' },
      { target: { ...v.spec, format: 'qcow2-luks' } },
      { target: { ...v.spec, path: 'relative.img' } },
    ];
    for (const c of cases) {
      const e = await domainRejection(make().run(job(v, kind, c)));
      t.is(e.kind, 'invalid_argument', JSON.stringify(Object.keys(c)));
    }
    t.is(await fileDigest(v.spec.path), before);
  });

  test(`${kind}: a missing image is not_found, a LUKS1 image failed_precondition`, async (t) => {
    const v = await volume(t);
    t.is((await domainRejection(make().run(job(v, kind, { target: { ...v.spec, path: join(t.context.dir, 'none.img') } })))).kind, 'not_found');
    const luks1 = { ...specFor(t.context.dir, 'luks'), path: join(t.context.dir, `luks1-${kind}.img`) };
    await store.create(luks1, v.oldKey);
    t.is((await domainRejection(make().run(job(v, kind, { target: { ...v.spec, path: luks1.path } })))).kind, 'failed_precondition');
  });
}

test('rekey: a failing luksKillSlot restores the header from the backup (only the old key opens, nothing left over)', async (t) => {
  const v = await volume(t);
  const before = await fileDigest(v.spec.path);
  const e = await domainRejection(createLuks2Rekey({ run: failing('luksKillSlot') }).run(job(v, 'rekey')));
  t.is(e.kind, 'invalid_argument', 'exit 1 of cryptsetup');
  t.true(await opens(v.spec.path, v.oldKey));
  t.false(await opens(v.spec.path, v.newKey));
  t.is(await fileDigest(v.spec.path), before, 'the header restore brought back every byte');
  t.deepEqual(await leftovers(v), []);
});

test('rekey: an image neither key opens is restored from the rotation\'s header backup, then rekeyed', async (t) => {
  const v = await volume(t);
  const j = job(v, 'rekey');
  const { backup } = rekeyBackupPaths(v.spec.path, j.rotationId);
  // The state a broken run could leave: a complete backup, and a header without the old key.
  t.is((await runTool('cryptsetup', ['luksHeaderBackup', '--header-backup-file', backup, v.spec.path])).code, 0);
  const other = awkwardSecret();
  const oldPass = luksPassphrase(v.oldKey);
  const otherPass = luksPassphrase(other);
  t.is((await runTool('cryptsetup', ['luksAddKey', '--batch-mode', '--key-file', '-', '--new-keyfile', '/dev/fd/3', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', v.spec.path], { stdin: oldPass, fds: [otherPass] })).code, 0);
  t.is((await runTool('cryptsetup', ['luksKillSlot', '--batch-mode', '--key-file', '-', v.spec.path, '0'], { stdin: otherPass })).code, 0);
  t.false(await opens(v.spec.path, v.oldKey));

  await createLuks2Rekey().run(j);
  t.true(await opens(v.spec.path, v.newKey));
  t.false(await opens(v.spec.path, v.oldKey));
  t.false(await opens(v.spec.path, other), 'the header came from the backup');
  t.is(await plaintextDigest(v.spec, await volumeKey(v.spec.path, v.newKey, t.context.scratch)), v.digest);
  t.deepEqual(await leftovers(v), []);
});

test('rekey: without a backup, an image neither key opens is refused', async (t) => {
  const v = await volume(t);
  const e = await domainRejection(createLuks2Rekey().run(job(v, 'rekey', { oldKey: awkwardSecret() })));
  t.is(e.kind, 'failed_precondition');
  t.regex(e.message, /neither/);
  t.deepEqual(await leftovers(v), []);
});

test('reencrypt: a reencrypt that fails before it starts removes the keyslot it added (nothing changed)', async (t) => {
  const v = await volume(t);
  const e = await domainRejection(createLuks2Reencrypt({ run: failing('reencrypt') }).run(job(v, 'reencrypt')));
  t.is(e.kind, 'invalid_argument');
  t.true(await opens(v.spec.path, v.oldKey));
  t.false(await opens(v.spec.path, v.newKey));
  t.is(Object.keys((await luks2Json(v.spec.path)).keyslots).length, 1);
  t.is(await plaintextDigest(v.spec, v.vk), v.digest);
});

test('reencrypt and rekey: a keyslot area too small is resource_exhausted before anything is written', async (t) => {
  const path = join(t.context.dir, 'small-area.img');
  const spec: ImageSpec = { ...specFor(t.context.dir, 'luks2'), path, sizeBytes: 16n * MiB };
  const oldKey = awkwardSecret();
  const pass = luksPassphrase(oldKey);
  await runTool('truncate', ['-s', String(32n * MiB), path]);
  // A header whose keyslot area holds the first keyslot only (256 KiB for a 512-bit key).
  const r = await runTool(
    'cryptsetup',
    ['luksFormat', '--type', 'luks2', '--batch-mode', '--key-file', '-', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--key-size', '512', '--luks2-keyslots-size', String(256 * 1024), '--offset', '32768', path],
    { stdin: pass },
  );
  pass.fill(0);
  t.is(r.code, 0, r.stderr);
  const before = await fileDigest(path);
  const v = { spec, oldKey, newKey: awkwardSecret(), digest: '', vk: Buffer.alloc(0) };
  t.is((await domainRejection(createLuks2Reencrypt().run(job(v, 'reencrypt')))).kind, 'resource_exhausted');
  t.is((await domainRejection(createLuks2Rekey().run(job(v, 'rekey')))).kind, 'resource_exhausted');
  t.is(await fileDigest(path), before);
});

/** Adds the new key's passphrase to the image with cryptsetup directly (the first step of a reencrypt rotation). */
async function addNewKey(v: Volume): Promise<void> {
  const oldPass = luksPassphrase(v.oldKey);
  const newPass = luksPassphrase(v.newKey);
  const r = await runTool('cryptsetup', ['luksAddKey', '--batch-mode', '--key-file', '-', '--new-keyfile', '/dev/fd/3', '--new-key-slot', '5', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', v.spec.path], { stdin: oldPass, fds: [newPass] });
  oldPass.fill(0);
  newPass.fill(0);
  if (r.code !== 0) throw new Error(r.stderr);
}

test('reencrypt: a re-encryption killed after its data phase, before cryptsetup finalised it, is finalised without rewriting the data', async (t) => {
  const v = await volume(t);
  await addNewKey(v);
  // cryptsetup prints its first progress line after the last hotzone's commit (one hotzone
  // covers this small image) and before its final metadata update; with the reader of its
  // stdout gone, that print kills it (SIGPIPE) exactly in the window.
  const child = spawn('cryptsetup', ['reencrypt', '--batch-mode', '--force-offline-reencrypt', '--key-file', '-', '--key-slot', '5', '--resilience', 'checksum', '--sector-size', '512', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--progress-json', v.spec.path], { stdio: ['pipe', 'pipe', 'ignore'] });
  child.stdout.destroy();
  const pass = luksPassphrase(v.newKey);
  child.stdin.end(pass);
  const ended = await new Promise<{ code: number | null; signal: string | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  pass.fill(0);
  t.is(ended.signal, 'SIGPIPE', 'cryptsetup died on its progress line');
  t.true(finishedDataPhase(await readLuks2Metadata(v.spec.path)), 'the header is in the finished-data, not-finalised state');
  t.false(await opens(v.spec.path, v.oldKey));
  t.true(await opens(v.spec.path, v.newKey));

  const steps: string[] = [];
  await createLuks2Reencrypt().run(job(v, 'reencrypt'), { onProgress: (p) => steps.push(p.step) });
  t.true(steps.includes('finalising'), steps.join(','));
  t.false(steps.includes('reencrypting'), 'cryptsetup was not asked to resume');
  const meta = await luks2Json(v.spec.path);
  t.deepEqual(Object.keys(meta.keyslots), ['1']);
  t.is(meta.config.requirements, undefined);
  t.deepEqual(Object.keys(meta.segments), ['0']);
  t.false(await opens(v.spec.path, v.oldKey));
  t.true(await opens(v.spec.path, v.newKey));
  const vk = await volumeKey(v.spec.path, v.newKey, t.context.scratch);
  t.false(vk.equals(v.vk));
  t.is(await plaintextDigest(v.spec, vk), v.digest, 'the data was not re-encrypted a second time');
  // cryptsetup accepts the header it did not write: a rekey of it works.
  const newer = awkwardSecret();
  await createLuks2Rekey().run(job(v, 'rekey', { oldKey: v.newKey, newKey: newer }));
  t.true(await opens(v.spec.path, newer));
});

test('reencrypt: a re-encryption initialised but not started is resumed by cryptsetup (not mistaken for a finished one)', async (t) => {
  const v = await volume(t);
  await addNewKey(v);
  const pass = luksPassphrase(v.newKey);
  const r = await runTool('cryptsetup', ['reencrypt', '--init-only', '--batch-mode', '--force-offline-reencrypt', '--key-file', '-', '--key-slot', '5', '--resilience', 'checksum', '--sector-size', '512', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', v.spec.path], { stdin: pass });
  pass.fill(0);
  t.is(r.code, 0, r.stderr);
  t.false(finishedDataPhase(await readLuks2Metadata(v.spec.path)));
  const steps: string[] = [];
  const result = await createLuks2Reencrypt().run(job(v, 'reencrypt'), { onProgress: (p) => steps.push(p.step) });
  t.is(result.bytesRewritten, v.spec.sizeBytes);
  t.true(steps.includes('recovering') && steps.includes('reencrypting'), steps.join(','));
  const vk = await volumeKey(v.spec.path, v.newKey, t.context.scratch);
  t.false(vk.equals(v.vk));
  t.is(await plaintextDigest(v.spec, vk), v.digest);
  t.false(await opens(v.spec.path, v.oldKey));
});

test('reencrypt: a keyslot bound to no data (cryptsetup killed while initialising) is removed, then the rotation runs; a rekey refuses such an image', async (t) => {
  const v = await volume(t);
  // What a `cryptsetup reencrypt` killed between creating the new volume key's keyslot
  // and recording the re-encryption leaves: an unbound keyslot under the new passphrase.
  const newPass = luksPassphrase(v.newKey);
  const r = await runTool('cryptsetup', ['luksAddKey', '--batch-mode', '--unbound', '--key-size', '512', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', v.spec.path, '/dev/fd/3'], { fds: [newPass] });
  newPass.fill(0);
  t.is(r.code, 0, r.stderr);
  await t.throwsAsync(opens(v.spec.path, v.newKey), { message: /exit|failed/ }, 'cryptsetup cannot answer for the new key');
  t.is((await domainRejection(createLuks2Rekey().run(job(v, 'rekey')))).kind, 'failed_precondition');

  await createLuks2Reencrypt().run(job(v, 'reencrypt'));
  t.true(await opens(v.spec.path, v.newKey));
  t.false(await opens(v.spec.path, v.oldKey));
  t.deepEqual(Object.keys((await luks2Json(v.spec.path)).keyslots).length, 1);
  t.is(await plaintextDigest(v.spec, await volumeKey(v.spec.path, v.newKey, t.context.scratch)), v.digest);
});

test('rekey: a header backup of another volume key (the image was re-encrypted since) is never restored', async (t) => {
  const v = await volume(t);
  const j = job(v, 'rekey');
  const { backup } = rekeyBackupPaths(v.spec.path, j.rotationId);
  t.is((await runTool('cryptsetup', ['luksHeaderBackup', '--header-backup-file', backup, v.spec.path])).code, 0);
  // Re-encrypted to a third key by another rotation: the backup's volume key is stale.
  const third = awkwardSecret();
  await createLuks2Reencrypt().run(job(v, 'reencrypt', { newKey: third }));
  const before = await fileDigest(v.spec.path);
  const e = await domainRejection(createLuks2Rekey().run(j));
  t.is(e.kind, 'failed_precondition');
  t.regex(e.message, /another volume key/);
  t.is(await fileDigest(v.spec.path), before, 'the image was not touched');
  t.true(await opens(v.spec.path, third));
});

test('reencrypt: aborting through the signal stops cryptsetup (unavailable) and a later run finishes with the data intact', async (t) => {
  const v = await volume(t, { sizeBytes: 64n * MiB });
  const j = job(v, 'reencrypt');
  const controller = new AbortController();
  const outcome = await createLuks2Reencrypt()
    // Shortly after cryptsetup reencrypt started (the step is reported just before it runs).
    .run(j, { signal: controller.signal, onProgress: (p) => { if (p.step === 'reencrypting' && p.bytesDone === 0n) setTimeout(() => controller.abort(), 150); } })
    .then(() => 'finished', (err: unknown) => (err as { kind?: string }).kind ?? 'other');
  // cryptsetup may have finished the little there was before the signal arrived.
  t.true(outcome === 'unavailable' || outcome === 'finished', outcome);
  const meta = await luks2Json(v.spec.path);
  const [o, nw] = [await opens(v.spec.path, v.oldKey), await opens(v.spec.path, v.newKey)];
  // (A small image is one hotzone: cryptsetup answers SIGTERM by finishing it, i.e. all of it.)
  t.log(`the aborted run: ${outcome}; then: ${meta.config.requirements ? 're-encryption in progress' : `${Object.keys(meta.keyslots).length} keyslot(s), none in progress`}, old key opens: ${o}, new key opens: ${nw}`);
  t.true(o || nw);
  await createLuks2Reencrypt().run(j);
  t.false(await opens(v.spec.path, v.oldKey));
  t.is(await plaintextDigest(v.spec, await volumeKey(v.spec.path, v.newKey, t.context.scratch)), v.digest);
  t.deepEqual(await leftovers(v), []);
});
