/**
 * The plain dm-crypt re-encryption against a fake DmCryptMapper (this machine has no
 * device-mapper; test/integration/rotate-plain.test.ts runs the real one where it exists).
 * The fake "decrypts" with a toy cipher (XOR with the key) into a device file on open and
 * writes it back on close, so the sequence of mappings, the data and the files around the
 * image can all be checked.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DmCryptMapper, ImageSpec } from '../../host-agent/src/images/types.js';
import { readRotationMark } from '../../host-agent/src/rotate/common.js';
import { createPlainReencrypt, plainRotationNames } from '../../host-agent/src/rotate/plain-reencrypt.js';
import type { RotationJob } from '../../host-agent/src/rotate/types.js';
import { isDomainError, type DomainError } from '../../shared/src/errors.js';

interface Ctx {
  dir: string;
}
const test = anyTest as TestFn<Ctx>;

test.beforeEach(async (t) => {
  t.context.dir = await mkdtemp(join(tmpdir(), 'virtkm-plain-rot-'));
});
test.afterEach.always(async (t) => {
  await rm(t.context.dir, { recursive: true, force: true });
});

function xor(data: Buffer, key: Uint8Array): Buffer {
  const out = Buffer.alloc(data.length);
  for (let i = 0; i < data.length; i++) out[i] = (data[i] ?? 0) ^ (key[i % key.length] ?? 0);
  return out;
}

interface FakeMapper extends DmCryptMapper {
  calls: string[];
  open_: Map<string, { backing: string; key: Buffer; device: string }>;
}

function fakeMapper(devDir: string, reason?: string, failOpen?: string): FakeMapper {
  const open_ = new Map<string, { backing: string; key: Buffer; device: string }>();
  const calls: string[] = [];
  return {
    calls,
    open_,
    unavailableReason: () => Promise.resolve(reason),
    async open(spec: ImageSpec, name: string, secret: Uint8Array) {
      calls.push(`open ${name} ${spec.path.split('/').pop() ?? ''}`);
      if (name === failOpen) throw new Error('injected open failure');
      const device = join(devDir, name);
      await writeFile(device, xor(await readFile(spec.path), secret));
      open_.set(name, { backing: spec.path, key: Buffer.from(secret), device });
      return device;
    },
    async close(name: string) {
      const m = open_.get(name);
      if (!m) return;
      calls.push(`close ${name}`);
      await writeFile(m.backing, xor(await readFile(m.device), m.key));
      await unlink(m.device);
      open_.delete(name);
    },
    list: () => Promise.resolve([...open_.keys()]),
  };
}

async function setup(t: { context: Ctx }, size = 3 * 4096 + 512) {
  const dir = join(t.context.dir, 'images');
  const devDir = join(t.context.dir, 'dev');
  await Promise.all([rm(dir, { recursive: true, force: true }), rm(devDir, { recursive: true, force: true })]);
  await import('node:fs/promises').then(async (fs) => {
    await fs.mkdir(dir);
    await fs.mkdir(devDir);
  });
  const spec: ImageSpec = { path: join(dir, 'vol.img'), format: 'plain', sizeBytes: BigInt(size), cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 };
  const oldKey = randomBytes(64);
  const newKey = randomBytes(64);
  const plaintext = randomBytes(size);
  await writeFile(spec.path, xor(plaintext, oldKey));
  const job: RotationJob = { rotationId: 'rot1', volumeId: 'vol', kind: 'reencrypt', target: spec, fromFormat: 'plain', oldKey, newKey };
  return { dir, devDir, spec, oldKey, newKey, plaintext, job };
}

async function rejection(p: Promise<unknown>): Promise<DomainError> {
  try {
    await p;
  } catch (err) {
    if (isDomainError(err)) return err;
    throw err;
  }
  throw new Error('expected a DomainError');
}

test('copies through an old and a new mapping, verifies, closes, renames; the data is under the new key', async (t) => {
  const s = await setup(t);
  const mapper = fakeMapper(s.devDir);
  const steps = new Set<string>();
  const r = await createPlainReencrypt({ mapper, chunkBytes: 4096 }).run(s.job, { onProgress: (p) => steps.add(p.step) });
  t.deepEqual(r, { opensWith: 'new', verified: true, bytesRewritten: BigInt(s.plaintext.length) });
  t.deepEqual(mapper.calls, ['open virtkm-rot-rot1-old vol.img', 'open virtkm-rot-rot1-new .vol.img.virtkm-rot-rot1.plain-copy', 'close virtkm-rot-rot1-new', 'close virtkm-rot-rot1-old']);
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext), 'the image holds the plaintext under the new key');
  t.false(xor(await readFile(s.spec.path), s.oldKey).equals(s.plaintext));
  t.deepEqual([...steps], ['copying', 'verifying', 'replacing']);
  t.deepEqual(mapper.open_.size, 0, 'no mapping left open');
  // Only the image: the state file went; the image's mark is what makes a second run a no-op.
  t.deepEqual(await readdir(s.dir), ['vol.img']);
  t.is(await readRotationMark(s.spec.path), 'rot1');

  const before = await readFile(s.spec.path);
  const again = await createPlainReencrypt({ mapper }).run(s.job);
  t.is(again.bytesRewritten, 0n);
  t.true((await readFile(s.spec.path)).equals(before), 'the second run changed nothing');
  t.is(mapper.calls.length, 4, 'and opened no mapping');
  t.deepEqual(await readdir(s.dir), ['vol.img'], 'and left no file');
});

test('the mark of another rotation is no record of this one: the next rotation re-encrypts', async (t) => {
  const s = await setup(t);
  const mapper = fakeMapper(s.devDir);
  await createPlainReencrypt({ mapper }).run(s.job);
  t.is(await readRotationMark(s.spec.path), 'rot1');
  const third = randomBytes(64);
  const r = await createPlainReencrypt({ mapper }).run({ ...s.job, rotationId: 'rot2', oldKey: s.newKey, newKey: third });
  t.is(r.bytesRewritten, BigInt(s.plaintext.length));
  t.true(xor(await readFile(s.spec.path), third).equals(s.plaintext), 'the data is under the third key');
  t.is(await readRotationMark(s.spec.path), 'rot2');
  t.deepEqual(await readdir(s.dir), ['vol.img']);
});

test('upgrade: a "done" state file of an earlier version becomes a mark and goes; the image is not touched', async (t) => {
  const s = await setup(t);
  const names = plainRotationNames(s.spec.path, 'rot1');
  const mapper = fakeMapper(s.devDir);
  // What an earlier version left: the image under the new key, unmarked, and "done".
  await writeFile(s.spec.path, xor(s.plaintext, s.newKey));
  await writeFile(names.state, 'done\n');
  t.is(await readRotationMark(s.spec.path), undefined);
  const r = await createPlainReencrypt({ mapper }).run(s.job);
  t.is(r.bytesRewritten, 0n);
  t.deepEqual(mapper.calls, []);
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext));
  t.is(await readRotationMark(s.spec.path), 'rot1');
  t.deepEqual(await readdir(s.dir), ['vol.img']);
  // And once it is gone, a run still knows.
  await createPlainReencrypt({ mapper }).run(s.job);
  t.deepEqual(mapper.calls, []);
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext));
});

test('without state file and without this rotation\'s mark, the image is taken as untouched: a run re-encrypts it', async (t) => {
  // The other side of the mark check: it is what stands between a repeated run and data
  // re-encrypted with the wrong key, so it must really be read.
  const s = await setup(t);
  const mapper = fakeMapper(s.devDir);
  await createPlainReencrypt({ mapper }).run({ ...s.job, rotationId: 'other' });
  t.is(await readRotationMark(s.spec.path), 'other');
  await createPlainReencrypt({ mapper }).run(s.job);
  t.is(mapper.calls.length, 8, 'rot1 ran in full although "other" was done');
});

test('without device-mapper: failed_precondition naming the reason, nothing written', async (t) => {
  const s = await setup(t);
  const mapper = fakeMapper(s.devDir, 'no device-mapper in this kernel');
  const before = await readFile(s.spec.path);
  const e = await rejection(createPlainReencrypt({ mapper }).run(s.job));
  t.is(e.kind, 'failed_precondition');
  t.regex(e.message, /device-mapper/);
  t.is(e.hint, 'no device-mapper in this kernel');
  t.deepEqual(mapper.calls, []);
  t.true((await readFile(s.spec.path)).equals(before));
  t.deepEqual(await readdir(s.dir), ['vol.img']);
});

test('a failure while copying closes the mappings and removes the copy and the state: the image is untouched', async (t) => {
  const s = await setup(t);
  const mapper = fakeMapper(s.devDir, undefined, 'virtkm-rot-rot1-new');
  const before = await readFile(s.spec.path);
  await t.throwsAsync(createPlainReencrypt({ mapper }).run(s.job), { message: 'injected open failure' });
  t.deepEqual(mapper.calls, ['open virtkm-rot-rot1-old vol.img', 'open virtkm-rot-rot1-new .vol.img.virtkm-rot-rot1.plain-copy', 'close virtkm-rot-rot1-old']);
  t.true((await readFile(s.spec.path)).equals(before));
  t.deepEqual(await readdir(s.dir), ['vol.img']);
  // And a later run succeeds.
  await createPlainReencrypt({ mapper: fakeMapper(s.devDir) }).run(s.job);
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext));
});

test('resume: "copied" with the copy present renames it; "copied" without it (renamed before the crash) only removes the state; "copying" starts over', async (t) => {
  const s = await setup(t);
  const names = plainRotationNames(s.spec.path, 'rot1');
  const mapper = fakeMapper(s.devDir);
  // A crash after "copied": the verified copy is there (unmarked, as an earlier version left it).
  await writeFile(names.copy, xor(s.plaintext, s.newKey));
  await writeFile(names.state, 'copied\n');
  await createPlainReencrypt({ mapper }).run(s.job);
  t.deepEqual(mapper.calls, [], 'no copy made again');
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext));
  t.deepEqual(await readdir(s.dir), ['vol.img']);
  t.is(await readRotationMark(s.spec.path), 'rot1');

  // A crash after the rename, before the state file went (a half-written next state too).
  await writeFile(names.state, 'copied\n');
  await writeFile(names.stateNext, 'do');
  await createPlainReencrypt({ mapper }).run(s.job);
  t.deepEqual(mapper.calls, []);
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext), 'the renamed image is kept as it is');
  t.deepEqual(await readdir(s.dir), ['vol.img']);

  // A crash while copying: a half copy and stale mappings.
  const t2 = await setup(t);
  const m2 = fakeMapper(t2.devDir);
  const n2 = plainRotationNames(t2.spec.path, 'rot1');
  await writeFile(n2.copy, randomBytes(100));
  await writeFile(n2.state, 'copying\n');
  await createPlainReencrypt({ mapper: m2 }).run(t2.job);
  t.true(xor(await readFile(t2.spec.path), t2.newKey).equals(t2.plaintext));
});

test('bad input is invalid_argument and touches nothing', async (t) => {
  const s = await setup(t);
  const mapper = fakeMapper(s.devDir);
  const cases: Partial<RotationJob>[] = [
    { kind: 'rekey' },
    { fromFormat: 'luks2' },
    { newKey: randomBytes(32) },
    { newKey: s.job.oldKey },
    { oldKey: undefined },
    { rotationId: 'a/b' },
  ];
  for (const c of cases) t.is((await rejection(createPlainReencrypt({ mapper }).run({ ...s.job, ...c }))).kind, 'invalid_argument', JSON.stringify(Object.keys(c)));
  t.deepEqual(mapper.calls, []);
  t.deepEqual(await readdir(s.dir), ['vol.img']);
  t.throws(() => createPlainReencrypt({ mapper, chunkBytes: 100 }), { message: /chunkBytes/ });
});
