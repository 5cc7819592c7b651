/**
 * ImageStore.create with the real qemu-img and cryptsetup: every format, never overwriting,
 * no temporary file left by a failed create, no secret in clear in the image, and the
 * evidence behind the passphrase encoding (QEMU refuses raw bytes, cryptsetup takes them).
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { lstat, readFile, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createHostImageStore, LUKS2_DATA_OFFSET_BYTES } from '../../host-agent/src/images/image-store.js';
import { removeStaleTemporaries } from '../../host-agent/src/images/files.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';
import type { ImageFormat, ImageKind, ImageSpec } from '../../host-agent/src/images/types.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, domainRejection, fileContains, listDir, removeDir, secretFor, specFor, tempDir } from '../fixtures/images/image-helpers.js';

const test = anyTest as TestFn<{ dir: string }>;

test.beforeEach(async (t) => {
  t.context.dir = await tempDir();
});

test.afterEach.always(async (t) => {
  await removeDir(t.context.dir);
});

const store = createHostImageStore();

const cases: { format: ImageFormat; kind: ImageKind; overrides?: Partial<ImageSpec> }[] = [
  { format: 'luks', kind: 'luks1' },
  { format: 'qcow2-luks', kind: 'qcow2-luks' },
  { format: 'luks2', kind: 'luks2' },
  { format: 'luks2', kind: 'luks2', overrides: { sectorSize: 4096, keySizeBits: 256 } },
  { format: 'plain', kind: 'raw' },
  { format: 'luks', kind: 'luks1', overrides: { keySizeBits: 256, cipher: 'twofish-xts-plain64' } },
];

for (const c of cases) {
  const label = `${c.format}${c.overrides ? ` ${JSON.stringify(c.overrides)}` : ''}`;
  test(`create ${label}: inspect reports ${c.kind} and the size; owner-only file; no secret in clear; no temporary left`, async (t) => {
    const spec = specFor(t.context.dir, c.format, c.overrides);
    const secret = secretFor(spec);
    const started = process.hrtime.bigint();
    await store.create(spec, secret);
    t.log(`created in ${Number(process.hrtime.bigint() - started) / 1e6} ms`);

    const info = await store.inspect(spec.path);
    t.is(info.kind, c.kind);
    t.true(info.exists);
    t.is(info.virtualSizeBytes, spec.sizeBytes);
    t.is(info.damaged, undefined);
    if (c.format !== 'plain') t.regex(info.uuid ?? '', /^[0-9a-f-]{36}$/);

    const st = await lstat(spec.path);
    t.is(st.mode & 0o777, 0o600);
    if (c.format === 'luks2') t.is(BigInt(st.size), spec.sizeBytes + LUKS2_DATA_OFFSET_BYTES);
    if (c.format === 'plain') t.is(BigInt(st.size), spec.sizeBytes);
    t.deepEqual(await listDir(t.context.dir), [spec.path.split('/').pop()]);

    t.false(await fileContains(spec.path, secret), 'raw secret in the image');
    const hex = luksPassphrase(secret);
    t.false(await fileContains(spec.path, hex), 'hex passphrase in the image');
    t.false(await fileContains(spec.path, secret.subarray(0, 16)), 'half of the secret in the image');
  });
}

test('create refuses an existing file, a zero-length file and a dangling symlink, and leaves them as they were', async (t) => {
  const { dir } = t.context;
  const full = specFor(dir, 'luks');
  await writeFile(full.path, 'precious data');
  const empty = specFor(dir, 'qcow2-luks');
  await writeFile(empty.path, '');
  const link = specFor(dir, 'luks2');
  await symlink(join(dir, 'nowhere'), link.path);
  for (const spec of [full, empty, link, { ...specFor(dir, 'plain'), path: full.path }]) {
    const err = await domainRejection(store.create(spec, secretFor(spec)));
    t.is(err.kind, 'already_exists', spec.format);
    t.false(err.message.includes(dir), 'no path in the message');
  }
  t.is(await readFile(full.path, 'utf8'), 'precious data');
  t.is((await lstat(empty.path)).size, 0);
  t.true((await lstat(link.path)).isSymbolicLink());
  t.is((await listDir(dir)).length, 3, 'no temporary file left');
});

test('two concurrent creates of one path: one wins, the other is already_exists, nothing else is left', async (t) => {
  const spec = specFor(t.context.dir, 'luks');
  const results = await Promise.allSettled([store.create(spec, awkwardSecret()), store.create(spec, awkwardSecret())]);
  t.is(results.filter((r) => r.status === 'fulfilled').length, 1);
  const failed = results.find((r) => r.status === 'rejected');
  t.is((failed?.reason as { kind?: string } | undefined)?.kind, 'already_exists');
  t.deepEqual(await listDir(t.context.dir), ['vol-luks.img']);
});

test('invalid specs are refused before anything is written', async (t) => {
  const { dir } = t.context;
  const bad: Partial<ImageSpec>[] = [
    { cipher: 'aes-cbc-essiv:sha256' },
    { cipher: 'des-xts-plain64' },
    { cipher: 'aes-xts-plain64,iter-time=1' },
    { keySizeBits: 384 as 256 },
    { sectorSize: 4096 },
    { sizeBytes: 1000n },
    { sizeBytes: 0n },
    { path: 'relative/vol.img' },
    { path: `${dir}/../x.img` },
  ];
  for (const overrides of bad) {
    const spec = specFor(dir, 'luks', overrides);
    const err = await domainRejection(store.create(spec, awkwardSecret()));
    t.is(err.kind, 'invalid_argument', JSON.stringify(overrides, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)));
  }
  const plain = specFor(dir, 'plain');
  t.is((await domainRejection(store.create(plain, randomBytes(32)))).kind, 'invalid_argument', 'plain key must be keySizeBits/8 bytes');
  t.is((await domainRejection(store.create(specFor(dir, 'luks2'), randomBytes(8)))).kind, 'invalid_argument', 'secret too short');
  t.deepEqual(await listDir(dir), []);
});

test('luks2 with a cipher this kernel lacks fails cleanly (serpent is not built into every kernel)', async (t) => {
  const spec = specFor(t.context.dir, 'luks2', { cipher: 'serpent-xts-plain64' });
  // cryptsetup encrypts the keyslot through the kernel's crypto API, so the kernel decides.
  const kernelHasSerpent = (await readFile('/proc/crypto', 'utf8')).split('\n').some((l) => /^name\s+:\s+serpent$/.test(l));
  if (kernelHasSerpent) {
    await store.create(spec, awkwardSecret());
    t.is((await store.inspect(spec.path)).kind, 'luks2');
    t.log('this kernel has serpent: the create succeeded');
    return;
  }
  const err = await domainRejection(store.create(spec, awkwardSecret()));
  t.is(err.kind, 'invalid_argument');
  t.deepEqual(await listDir(t.context.dir), [], 'the temporary file that cryptsetup had started on is gone');
  t.log('this kernel has no serpent: cryptsetup refused, nothing left behind');
});

test('a missing directory is not_found', async (t) => {
  const spec = { ...specFor(t.context.dir, 'luks'), path: join(t.context.dir, 'no-such-dir', 'vol.img') };
  t.is((await domainRejection(store.create(spec, awkwardSecret()))).kind, 'not_found');
});

test('a failing tool leaves no temporary file (qemu-img, cryptsetup, and a missing binary)', async (t) => {
  const { dir } = t.context;
  const seen: string[] = [];
  // The tool runs for real against the temporary file, then "fails".
  const failing: RunTool = async (file, args, options) => {
    const target = args.find((a) => a.startsWith(dir));
    if (target) seen.push(target);
    await runTool(file, args, options);
    return { code: 1, stdout: '', stderr: 'injected failure', truncated: false };
  };
  const failingStore = createHostImageStore({ run: failing, iterTimesMs: [100] });
  for (const format of ['luks', 'qcow2-luks', 'luks2'] as const) {
    const spec = specFor(dir, format);
    const err = await domainRejection(failingStore.create(spec, awkwardSecret()));
    t.true(err.kind === 'internal' || err.kind === 'invalid_argument', `${format}: ${err.kind}`);
  }
  t.is(seen.length, 3, 'the tools did write temporary files');
  t.deepEqual(await listDir(dir), [], 'and they are gone');

  const noQemu = createHostImageStore({ qemuImg: '/nonexistent/qemu-img' });
  const err = await domainRejection(noQemu.create(specFor(dir, 'qcow2-luks'), awkwardSecret()));
  t.is(err.kind, 'unavailable');
  t.regex(err.hint ?? '', /qemu-utils/);
  const noCryptsetup = createHostImageStore({ cryptsetup: '/nonexistent/cryptsetup' });
  t.is((await domainRejection(noCryptsetup.create(specFor(dir, 'luks2'), awkwardSecret()))).kind, 'unavailable');
  t.deepEqual(await listDir(dir), []);
});

test('qemu-img create is retried with a longer iter-time ("Unable to get accurate CPU usage")', async (t) => {
  const iterTimes: string[] = [];
  let calls = 0;
  const flaky: RunTool = async (file, args, options) => {
    const o = args[args.indexOf('-o') + 1] ?? '';
    iterTimes.push(/iter-time=(\d+)/.exec(o)?.[1] ?? '?');
    if (calls++ === 0) return { code: 1, stdout: '', stderr: 'qemu-img: x: Unable to get accurate CPU usage', truncated: false };
    return runTool(file, args, options);
  };
  const spec = specFor(t.context.dir, 'qcow2-luks');
  await createHostImageStore({ run: flaky, iterTimesMs: [50, 150, 150, 150, 150, 150, 150, 150, 150, 150] }).create(spec, awkwardSecret());
  // The injected failure, then the real qemu-img (which may itself need a retry or two).
  t.deepEqual(iterTimes.slice(0, 2), ['50', '150']);
  t.is((await store.inspect(spec.path)).kind, 'qcow2-luks');

  // With real qemu-img, the retries get there even with a tiny iter-time.
  const spec2 = specFor(t.context.dir, 'luks');
  await createHostImageStore({ iterTimesMs: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1] }).create(spec2, awkwardSecret());
  t.is((await store.inspect(spec2.path)).kind, 'luks1');
});

test('remove deletes an image, is a no-op when it is gone, and refuses directories', async (t) => {
  const spec = specFor(t.context.dir, 'plain');
  await store.create(spec, secretFor(spec));
  await store.remove(spec.path);
  t.deepEqual(await listDir(t.context.dir), []);
  await t.notThrowsAsync(store.remove(spec.path));
  t.is((await domainRejection(store.remove(t.context.dir))).kind, 'failed_precondition');
});

test('removeStaleTemporaries deletes only old temporary files of interrupted creates', async (t) => {
  const { dir } = t.context;
  const old = join(dir, '.vol.img.virtkm-tmp-0123456789ab');
  const young = join(dir, '.vol2.img.virtkm-tmp-0123456789ac');
  await writeFile(old, 'x');
  await writeFile(young, 'x');
  await writeFile(join(dir, 'vol.img'), 'x');
  const past = new Date(Date.now() - 2 * 3600_000);
  await utimes(old, past, past);
  t.deepEqual(await removeStaleTemporaries(dir), ['.vol.img.virtkm-tmp-0123456789ab']);
  t.deepEqual(await listDir(dir), ['.vol2.img.virtkm-tmp-0123456789ac', 'vol.img']);
});

// --- Evidence for the passphrase encoding (see host-agent/src/images/passphrase.ts) ---

test('evidence: QEMU refuses a raw secret with NUL or non-UTF-8 bytes, which is why the passphrase is hex', async (t) => {
  const { dir } = t.context;
  for (const raw of [Buffer.from([0x61, 0x00, 0x62]), Buffer.from([0xff, 0xfe, 0x41]), awkwardSecret()]) {
    const r = await runTool('qemu-img', ['create', '-q', '-f', 'luks', '--object', 'secret,id=s,format=raw,file=/dev/fd/3', '-o', 'key-secret=s,iter-time=100', join(dir, 'raw.img'), '1M'], { fds: [raw] });
    t.not(r.code, 0);
    t.regex(r.stderr, /not valid UTF-8/);
  }
  const hex = luksPassphrase(awkwardSecret());
  // Retried like the store does: QEMU's PBKDF2 calibration fails now and then on its own.
  let ok;
  for (let attempt = 0; attempt < 8; attempt++) {
    ok = await runTool('qemu-img', ['create', '-q', '-f', 'luks', '--object', 'secret,id=s,format=raw,file=/dev/fd/3', '-o', 'key-secret=s,iter-time=100', join(dir, 'hex.img'), '1M'], { fds: [hex] });
    if (ok.code === 0) break;
  }
  t.is(ok?.code, 0, ok?.stderr);
});

test('evidence: cryptsetup --key-file - takes raw bytes with 0x00 and 0x0a exactly, without stopping at a newline', async (t) => {
  const path = join(t.context.dir, 'raw-luks2.img');
  await writeFile(path, Buffer.alloc(20 << 20));
  const raw = awkwardSecret();
  const fmt = await runTool('cryptsetup', ['luksFormat', '--type', 'luks2', '--batch-mode', '--key-file', '-', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', path], { stdin: raw });
  t.is(fmt.code, 0, fmt.stderr);
  const test = (key: Uint8Array) => runTool('cryptsetup', ['open', '--test-passphrase', '--key-file', '-', path], { stdin: key });
  t.is((await test(raw)).code, 0);
  t.is((await test(raw.subarray(0, 1))).code, 2, 'the bytes before the first newline are not enough');
  t.is((await test(Buffer.concat([raw, Buffer.from('\n')]))).code, 2, 'a trailing newline is part of the key');
});

test('a LUKS2 image made by virtkm opens with the hex passphrase through plain cryptsetup and QEMU-style secret bytes agree', async (t) => {
  // One header, two readers: cryptsetup with the hex on stdin (as virtkm does) and the
  // same bytes from a file descriptor (as QEMU would get them).
  const spec = specFor(t.context.dir, 'luks2');
  const secret = awkwardSecret();
  await store.create(spec, secret);
  const hex = luksPassphrase(secret);
  t.is((await runTool('cryptsetup', ['open', '--test-passphrase', '--key-file', '-', spec.path], { stdin: hex })).code, 0);
  t.is((await runTool('cryptsetup', ['open', '--test-passphrase', '--key-file', '/dev/fd/3', spec.path], { fds: [hex] })).code, 0);
  t.is((await runTool('cryptsetup', ['open', '--test-passphrase', '--key-file', '-', spec.path], { stdin: secret })).code, 2, 'the raw secret is not the passphrase');
});
