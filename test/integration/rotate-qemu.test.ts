/**
 * The QEMU rotation mechanisms with the real qemu-img and qemu-io: rekey (qemu-img amend)
 * and offline re-encryption (qemu-img convert) of luks and qcow2-luks images, encrypting
 * and decrypting, bad input (wrong key, another kind of image, too little space, a running
 * guest), the header backup restore of the rekey, cancellation, and running twice. A data
 * pattern written with qemu-io before each rotation must read back intact with the new key.
 */
import anyTest, { type TestFn } from 'ava';
import { spawn } from 'node:child_process';
import { chmod, mkdir, open, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import type { ImageKind, ImageSpec } from '../../host-agent/src/images/types.js';
import { createQemuConvert } from '../../host-agent/src/rotate/qemu-convert.js';
import { createQemuRekey, rekeyBackupPath } from '../../host-agent/src/rotate/qemu-rekey.js';
import type { RotationMechanism, RotationProgress } from '../../host-agent/src/rotate/types.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, domainRejection, listDir, qemuIo, removeDir, tempDir } from '../fixtures/images/image-helpers.js';
import { fileHash, job, patternIntact, rotationFiles, TEST_IMAGE_BYTES, testSpec, writePattern } from '../fixtures/rotate/qemu-rotate-helpers.js';

const test = anyTest as TestFn<{ dir: string }>;
const store = createHostImageStore();
const rekey = createQemuRekey();
const convert = createQemuConvert();
const FORMATS = ['luks', 'qcow2-luks'] as const;
type QemuFormat = (typeof FORMATS)[number];

// Probes for the tests that need more than qemu-img: decided once, before any test is
// declared (ava wants declarations in the first tick), and skipped visibly.

/** Why a tmpfs cannot be mounted here (undefined when it can). */
async function tmpfsUnavailable(): Promise<string | undefined> {
  const dir = await tempDir();
  try {
    const m = await runTool('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir], { timeoutMs: 10_000 });
    if (m.code !== 0) return `cannot mount a tmpfs (needs root): ${m.stderr.trim()}`;
    await runTool('umount', [dir], { timeoutMs: 10_000 });
    return undefined;
  } catch (err) {
    return `cannot mount a tmpfs: ${String(err)}`;
  } finally {
    await removeDir(dir);
  }
}

async function qemuSystemUnavailable(): Promise<string | undefined> {
  try {
    const r = await runTool('qemu-system-x86_64', ['--version'], { timeoutMs: 10_000 });
    return r.code === 0 ? undefined : 'qemu-system-x86_64 does not run';
  } catch {
    return 'qemu-system-x86_64 is not installed (Debian package qemu-system-x86)';
  }
}

const noTmpfs = await tmpfsUnavailable();
const noQemuSystem = await qemuSystemUnavailable();

test.beforeEach(async (t) => {
  t.context.dir = await tempDir();
});
test.afterEach.always(async (t) => {
  await removeDir(t.context.dir);
});

/** A fresh image with the pattern written under `key`. */
async function patterned(dir: string, format: QemuFormat, key: Uint8Array, name = `vol-${format}.img`): Promise<ImageSpec> {
  const spec = testSpec(join(dir, name), format);
  await store.create(spec, key);
  await writePattern(spec.path, format, key);
  return spec;
}

/** Everything a refused run must leave as it was: the bytes of the image and the directory. */
async function snapshot(spec: { path: string }, dir: string): Promise<{ hash: string; names: string[] }> {
  return { hash: await fileHash(spec.path), names: await listDir(dir) };
}


// --- Happy paths ---

for (const format of FORMATS) {
  for (const [name, mechanism, kind] of [
    ['rekey', rekey, 'rekey'],
    ['convert', convert, 'reencrypt'],
  ] as const) {
    test.serial(`${name} ${format}: the pattern reads back with the new key, the old key no longer opens, no leftovers, a second run changes nothing`, async (t) => {
      const { dir } = t.context;
      const oldKey = awkwardSecret();
      const newKey = awkwardSecret();
      const spec = await patterned(dir, format, oldKey);
      await chmod(spec.path, 0o640);
      const j = job(`rot-${name}-1`, kind, spec, format, oldKey, newKey);
      const reports: RotationProgress[] = [];
      const started = Date.now();
      const result = await mechanism.run(j, { onProgress: (p) => reports.push(p) });
      t.log(`${name} ${format}: ${Date.now() - started} ms, steps ${[...new Set(reports.map((r) => r.step))].join(', ')}`);

      t.deepEqual(result, { opensWith: 'new', verified: true, bytesRewritten: kind === 'rekey' ? 0n : TEST_IMAGE_BYTES });
      t.true(await patternIntact(spec.path, format, newKey), 'pattern with the new key');
      t.false(await store.testKey(spec.path, spec, oldKey), 'the old key no longer opens');
      t.false(await patternIntact(spec.path, format, oldKey));
      t.deepEqual(await rotationFiles(spec.path), [], 'no backup or copy left');
      t.deepEqual(await listDir(dir), [`vol-${format}.img`]);
      t.is((await stat(spec.path)).mode & 0o777, 0o640, 'the mode of the image is kept');
      // The caller's key buffers are not wiped by the mechanism.
      t.true(oldKey.some((b) => b !== 0) && newKey.some((b) => b !== 0));

      if (kind === 'reencrypt') {
        const copying = reports.filter((r) => r.step === 'copying');
        t.true(copying.length >= 2, 'copy progress reported');
        t.true(copying.every((r) => r.bytesTotal === TEST_IMAGE_BYTES && r.bytesDone <= r.bytesTotal));
        t.is(copying.at(-1)?.bytesDone, TEST_IMAGE_BYTES);
        t.true(copying.some((r) => r.bytesPerSecond > 0), 'a rate was reported');
        t.true(reports.some((r) => r.step === 'verifying' && r.bytesDone === TEST_IMAGE_BYTES), 'verification progress reported');
      } else {
        for (const step of ['header backup', 'adding keyslot', 'removing old keyslot', 'done']) t.true(reports.some((r) => r.step === step), step);
      }

      const before = await fileHash(spec.path);
      const again = await mechanism.run(j);
      t.is(again.opensWith, 'new');
      t.is(await fileHash(spec.path), before, 'the second run changed nothing');
      t.deepEqual(await listDir(dir), [`vol-${format}.img`]);
    });
  }

  test.serial(`convert ${format}: the data key changes (new LUKS UUID), rekey keeps it`, async (t) => {
    const { dir } = t.context;
    const [k1, k2, k3] = [awkwardSecret(), awkwardSecret(), awkwardSecret()];
    const spec = await patterned(dir, format, k1);
    const uuid0 = (await store.inspect(spec.path)).uuid;
    await rekey.run(job('rot-a', 'rekey', spec, format, k1, k2));
    const uuid1 = (await store.inspect(spec.path)).uuid;
    await convert.run(job('rot-b', 'reencrypt', spec, format, k2, k3));
    const uuid2 = (await store.inspect(spec.path)).uuid;
    t.truthy(uuid0);
    t.is(uuid1, uuid0, 'rekey keeps the header (and the data key)');
    t.not(uuid2, uuid0, 'convert writes a new header');
    t.true(await patternIntact(spec.path, format, k3));
    t.false(await store.testKey(spec.path, spec, k2));
  });
}

// --- Encrypting and decrypting by the same path ---

for (const [from, to] of [
  ['raw', 'luks'],
  ['qcow2', 'qcow2-luks'],
  ['luks', 'raw'],
  ['qcow2-luks', 'qcow2'],
] as const) {
  test.serial(`convert ${from} -> ${to}: the pattern reads back`, async (t) => {
    const { dir } = t.context;
    const path = join(dir, 'vol.img');
    const key = awkwardSecret();
    if (from === 'raw' || from === 'qcow2') {
      const r = await runTool('qemu-img', ['create', '-q', '-f', from, path, TEST_IMAGE_BYTES.toString()], { timeoutMs: 60_000 });
      t.is(r.code, 0, r.stderr);
      await writePattern(path, from);
    } else {
      await store.create(testSpec(path, from), key);
      await writePattern(path, from, key);
    }
    const encrypting = to === 'luks' || to === 'qcow2-luks';
    const target = encrypting ? testSpec(path, to) : { path, format: to, sizeBytes: TEST_IMAGE_BYTES };
    const j = job('rot-x', 'reencrypt', target, from, encrypting ? undefined : key, encrypting ? key : undefined);
    const result = await convert.run(j);
    t.is(result.opensWith, 'new');
    const kinds: Record<typeof to, ImageKind> = { luks: 'luks1', 'qcow2-luks': 'qcow2-luks', raw: 'raw', qcow2: 'qcow2' };
    t.is((await store.inspect(path)).kind, kinds[to]);
    t.true(await patternIntact(path, to, encrypting ? key : undefined));
    if (encrypting) t.false(await fileContains32(path, 0x5a), 'no plaintext pattern left in the file');
    t.deepEqual(await listDir(dir), ['vol.img']);
    const before = await fileHash(path);
    await convert.run(j);
    t.is(await fileHash(path), before, 'the second run changed nothing');
  });
}

/** True when the file holds 32 KiB of the byte `b` somewhere (the pattern in clear). */
async function fileContains32(path: string, b: number): Promise<boolean> {
  return (await readFile(path)).indexOf(Buffer.alloc(32 << 10, b)) >= 0;
}

// --- Bad input: a clear error, nothing changed ---

for (const format of FORMATS) {
  for (const [name, mechanism, kind] of [
    ['rekey', rekey, 'rekey'],
    ['convert', convert, 'reencrypt'],
  ] as const) {
    test.serial(`${name} ${format}: refuses bad input and changes nothing`, async (t) => {
      const { dir } = t.context;
      const key = awkwardSecret();
      const spec = await patterned(dir, format, key);
      const other = format === 'luks' ? 'qcow2-luks' : 'luks';
      const otherSpec = await patterned(dir, other, key, 'other.img');
      const before = await snapshot(spec, dir);
      const otherBefore = await fileHash(otherSpec.path);

      const wrongOld = await domainRejection(mechanism.run(job('rot-bad', kind, spec, format, awkwardSecret(), awkwardSecret())));
      t.is(wrongOld.kind, 'failed_precondition', 'wrong old key');
      t.notRegex(wrongOld.message, /vol-|\/tmp\//, 'no path in the message');
      // The image of another kind at the path (a job for luks on a qcow2-luks image, ...).
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind, { ...spec, path: otherSpec.path }, format, key, awkwardSecret())))).kind, 'failed_precondition', 'another kind');
      const rawPath = join(dir, 'raw.img');
      await writeFile(rawPath, '');
      await truncate(rawPath, Number(TEST_IMAGE_BYTES));
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind, { ...spec, path: rawPath }, format, key, awkwardSecret())))).kind, 'failed_precondition', 'a raw file');
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind, { ...spec, path: join(dir, 'missing.img') }, format, key, awkwardSecret())))).kind, 'not_found');
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind, spec, format, key, key)))).kind, 'invalid_argument', 'same key');
      t.is((await domainRejection(mechanism.run(job('../x', kind, spec, format, key, awkwardSecret())))).kind, 'invalid_argument', 'rotation id');
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind === 'rekey' ? 'reencrypt' : 'rekey', spec, format, key, awkwardSecret())))).kind, 'invalid_argument', 'other kind of rotation');
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind, spec, format, undefined, awkwardSecret())))).kind, 'invalid_argument', 'no old key');
      t.is((await domainRejection(mechanism.run(job('rot-bad', kind, { ...spec, format: 'luks2' }, 'luks2', key, awkwardSecret())))).kind, 'invalid_argument', 'luks2');

      t.deepEqual(await snapshot(spec, dir), { ...before, names: [...before.names, 'raw.img'].sort() });
      t.is(await fileHash(otherSpec.path), otherBefore);
      t.true(await patternIntact(spec.path, format, key));
    });
  }
}

// --- Too little space for the copy ---

(noTmpfs ? test.skip : test.serial)(`convert: too little free space is resource_exhausted with nothing written${noTmpfs ? ` [skipped: ${noTmpfs}]` : ''}`, async (t) => {
  const mnt = join(t.context.dir, 'small');
  await mkdir(mnt);
  const m = await runTool('mount', ['-t', 'tmpfs', '-o', 'size=20m,mode=0700', 'tmpfs', mnt], { timeoutMs: 10_000 });
  t.is(m.code, 0, m.stderr);
  try {
    for (const format of FORMATS) {
      const key = awkwardSecret();
      const spec = await patterned(mnt, format, key);
      // luks: a 32 MiB copy is written in full (36 MiB needed, 20 MiB disk); qcow2-luks:
      // sparse, so fill 8 MiB more to make the copy too large for what is left.
      if (format === 'qcow2-luks') t.is((await qemuIo(spec.path, format, key, ['write -P 0x77 4M 8M'])).code, 0);
      const before = await snapshot(spec, mnt);
      const err = await domainRejection(convert.run(job(`rot-nospace-${format}`, 'reencrypt', spec, format, key, awkwardSecret())));
      t.is(err.kind, 'resource_exhausted', `${format}: ${err.message}`);
      t.regex(err.message, /free space/);
      t.deepEqual(await snapshot(spec, mnt), before, `${format}: nothing written`);
      t.true(await store.testKey(spec.path, spec, key));
      await store.remove(spec.path);
    }
  } finally {
    await runTool('umount', [mnt], { timeoutMs: 30_000 });
  }
});

// --- A running guest holds the image ---

(noQemuSystem ? test.skip : test.serial)(`rekey and convert refuse an image a running guest holds${noQemuSystem ? ` [skipped: ${noQemuSystem}]` : ''}`, async (t) => {
  const { dir } = t.context;
  const key = awkwardSecret();
  const spec = await patterned(dir, 'luks', key);
  const before = await snapshot(spec, dir);
  // A paused guest (-S) with the image as its disk: QEMU takes the image's write lock at start.
  const guest = spawn('qemu-system-x86_64', ['-nodefaults', '-display', 'none', '-machine', 'accel=tcg', '-m', '32', '-S', '-drive', `file=${spec.path},format=raw,if=virtio`], { stdio: 'ignore' });
  try {
    const inode = (await stat(spec.path)).ino;
    const deadline = Date.now() + 30_000;
    // The lock shows in /proc/locks (OFD lock on byte 201: "write not shared").
    while (!(await readFile('/proc/locks', 'utf8')).split('\n').some((l) => l.includes(`:${inode} 201 201`))) {
      if (Date.now() > deadline || guest.exitCode !== null) throw new Error('the guest did not take the image lock');
      await new Promise((r) => setTimeout(r, 200));
    }
    for (const [mechanism, kind] of [
      [rekey, 'rekey'],
      [convert, 'reencrypt'],
    ] as const) {
      const err = await domainRejection(mechanism.run(job('rot-busy', kind, spec, 'luks', key, awkwardSecret())));
      t.is(err.kind, 'failed_precondition', `${kind}: ${err.message}`);
      t.regex(err.message, /in use/);
    }
    t.deepEqual(await snapshot(spec, dir), before);
  } finally {
    guest.kill('SIGKILL');
    await new Promise((r) => (guest.exitCode !== null || guest.signalCode !== null ? r(undefined) : guest.once('exit', r)));
  }
  t.true(await patternIntact(spec.path, 'luks', key));
});

// --- Rekey: the header backup brings back an image that no key opens ---

for (const format of FORMATS) {
  test.serial(`rekey ${format}: restores the header backup when no key opens the image, then finishes`, async (t) => {
    const { dir } = t.context;
    const [oldKey, newKey] = [awkwardSecret(), awkwardSecret()];
    const spec = await patterned(dir, format, oldKey);
    const j = job('rot-torn', 'rekey', spec, format, oldKey, newKey);
    // A run that dies just before removing the old keyslot: both keys open, backup taken.
    const dying: RunTool = async (file, args, options) => {
      if (args[0] === 'amend' && args.some((a) => a.includes('state=inactive'))) throw new Error('simulated crash');
      return runTool(file, args, options);
    };
    t.is((await domainRejection(createQemuRekey({ run: dying }).run(j))).kind, 'internal');
    t.true(await store.testKey(spec.path, spec, oldKey));
    t.true(await store.testKey(spec.path, spec, newKey));
    const backup = rekeyBackupPath(j);
    t.deepEqual(await rotationFiles(spec.path), [backup.split('/').pop()]);
    t.is((await stat(backup)).mode & 0o777, 0o600, 'the backup is owner-only');

    // Destroy the LUKS header (a torn write): the start of the raw image, or of the LUKS
    // header clusters inside the qcow2 file.
    const fh = await open(spec.path, 'r+');
    try {
      const at = format === 'luks' ? 0 : 0x40000;
      await fh.write(Buffer.alloc(4096), 0, 4096, at);
    } finally {
      await fh.close();
    }
    if (format === 'qcow2-luks') t.is((await readFile(spec.path)).readUInt32BE(0x40000), 0, 'LUKS header of the qcow2 at 256 KiB');
    t.false(await store.testKey(spec.path, spec, oldKey).catch(() => false));
    t.false(await store.testKey(spec.path, spec, newKey).catch(() => false));

    const result = await rekey.run(j);
    t.is(result.opensWith, 'new');
    t.true(await patternIntact(spec.path, format, newKey));
    t.false(await store.testKey(spec.path, spec, oldKey));
    t.deepEqual(await rotationFiles(spec.path), []);
  });
}

test.serial('rekey: a damaged image without a backup of this rotation is refused, not touched', async (t) => {
  const { dir } = t.context;
  const key = awkwardSecret();
  const spec = await patterned(dir, 'luks', key);
  const fh = await open(spec.path, 'r+');
  await fh.write(Buffer.alloc(512), 0, 512, 4096 * 2);
  await fh.close();
  // Keyslot 0's key material starts at 4 KiB (after the 592-byte header, aligned): zeroing
  // part of it makes the key fail while the header still looks fine.
  const before = await snapshot(spec, dir);
  t.is((await domainRejection(rekey.run(job('rot-dmg', 'rekey', spec, 'luks', key, awkwardSecret())))).kind, 'failed_precondition');
  t.deepEqual(await snapshot(spec, dir), before);
});

// --- Cancellation ---

test.serial('convert: an abort during the copy stops it; the image still opens with the old key and no copy is left', async (t) => {
  const { dir } = t.context;
  const [oldKey, newKey] = [awkwardSecret(), awkwardSecret()];
  const spec = await patterned(dir, 'luks', oldKey);
  const ac = new AbortController();
  const err = await domainRejection(
    convert.run(job('rot-abort', 'reencrypt', spec, 'luks', oldKey, newKey), {
      signal: ac.signal,
      onProgress: (p) => {
        if (p.step === 'copying') ac.abort();
      },
    }),
  );
  t.is(err.kind, 'unavailable');
  t.true(await patternIntact(spec.path, 'luks', oldKey));
  t.false(await store.testKey(spec.path, spec, newKey));
  t.deepEqual(await listDir(dir), [`vol-luks.img`]);
});

test.serial('mechanism names', (t) => {
  const names = ([rekey, convert] as RotationMechanism[]).map((m) => m.name);
  t.deepEqual(names, ['qemu-rekey', 'qemu-convert']);
});
