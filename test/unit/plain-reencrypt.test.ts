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
  // Only the image and the "done" marker (what makes a second run a no-op).
  t.deepEqual((await readdir(s.dir)).sort(), ['.vol.img.virtkm-rot-rot1.plain-state', 'vol.img']);
  t.is((await readFile(plainRotationNames(s.spec.path, 'rot1').state, 'utf8')).trim(), 'done');

  const before = await readFile(s.spec.path);
  const again = await createPlainReencrypt({ mapper }).run(s.job);
  t.is(again.bytesRewritten, 0n);
  t.true((await readFile(s.spec.path)).equals(before), 'the second run changed nothing');
  t.is(mapper.calls.length, 4, 'and opened no mapping');
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

test('resume: "copied" with the copy present renames it; "copied" without it (renamed before the crash) only records "done"; "copying" starts over', async (t) => {
  const s = await setup(t);
  const names = plainRotationNames(s.spec.path, 'rot1');
  const mapper = fakeMapper(s.devDir);
  // A crash after "copied": the verified copy is there.
  await writeFile(names.copy, xor(s.plaintext, s.newKey));
  await writeFile(names.state, 'copied\n');
  await createPlainReencrypt({ mapper }).run(s.job);
  t.deepEqual(mapper.calls, [], 'no copy made again');
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext));
  t.deepEqual((await readdir(s.dir)).sort(), ['.vol.img.virtkm-rot-rot1.plain-state', 'vol.img']);

  // A crash after the rename, before "done".
  await writeFile(names.state, 'copied\n');
  await createPlainReencrypt({ mapper }).run(s.job);
  t.true(xor(await readFile(s.spec.path), s.newKey).equals(s.plaintext), 'the renamed image is kept as it is');
  t.is((await readFile(names.state, 'utf8')).trim(), 'done');

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
