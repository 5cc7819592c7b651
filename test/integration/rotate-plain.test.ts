/**
 * The plain dm-crypt re-encryption with the real DmCryptMapper. Rotating needs
 * device-mapper: where the kernel has none (these machines), the real round trip is skipped
 * with that reason, and what runs is the refusal: a clear failed_precondition naming the
 * reason, with nothing written. The sequence itself is covered against a fake mapper in
 * test/unit/plain-reencrypt.test.ts.
 */
import anyTest, { type TestFn } from 'ava';
import { createHash, randomBytes } from 'node:crypto';
import { open, readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createDmCryptMapper } from '../../host-agent/src/images/dm-crypt.js';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import { createPlainReencrypt } from '../../host-agent/src/rotate/plain-reencrypt.js';
import type { RotationJob } from '../../host-agent/src/rotate/types.js';
import { domainRejection, removeDir, tempDir } from '../fixtures/images/image-helpers.js';

const test = anyTest as TestFn<{ dir: string }>;
const mapper = createDmCryptMapper();
const dmMissingReason = await mapper.unavailableReason();
const realTest = dmMissingReason ? test.skip : test.serial;
const skipNote = dmMissingReason ? ` [skipped: ${dmMissingReason}]` : '';

test.beforeEach(async (t) => {
  t.context.dir = await tempDir();
});
test.afterEach.always(async (t) => {
  await removeDir(t.context.dir);
});

function plainJob(dir: string): RotationJob {
  const spec: ImageSpec = { path: join(dir, 'vol.img'), format: 'plain', sizeBytes: 16n << 20n, cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 };
  return { rotationId: 'plain1', volumeId: 'vol', kind: 'reencrypt', target: spec, fromFormat: 'plain', oldKey: randomBytes(64), newKey: randomBytes(64) };
}

test('without device-mapper: failed_precondition naming the reason, the image untouched, no file created', async (t) => {
  if (!dmMissingReason) {
    t.pass('device-mapper is available here; covered by the real round trip');
    return;
  }
  const job = plainJob(t.context.dir);
  const content = randomBytes(1 << 20);
  await writeFile(job.target.path, content);
  const e = await domainRejection(createPlainReencrypt({ mapper }).run(job));
  t.is(e.kind, 'failed_precondition');
  t.regex(e.message, /device-mapper/);
  t.is(e.hint, dmMissingReason);
  t.true((await readFile(job.target.path)).equals(content));
  t.deepEqual(await readdir(t.context.dir), ['vol.img']);
  t.log(`refused as expected: ${e.message} (${String(e.hint)})`);
});

realTest(`plain: data written under the old key reads back under the new key after the rotation${skipNote}`, async (t) => {
  const job = plainJob(t.context.dir);
  const spec = job.target as ImageSpec;
  const size = Number(spec.sizeBytes);
  // The volume: a file of the volume's size, data written through an old-key mapping.
  await writeFile(spec.path, Buffer.alloc(0));
  await truncate(spec.path, size);
  const data = randomBytes(size);
  const dev = await mapper.open(spec, 'virtkm-test-plain-w', job.oldKey ?? new Uint8Array());
  const fh = await open(dev, 'r+');
  await fh.write(data, 0, size, 0);
  await fh.sync();
  await fh.close();
  await mapper.close('virtkm-test-plain-w');

  await createPlainReencrypt({ mapper }).run(job);
  const readBack = async (key: Uint8Array): Promise<string> => {
    const d = await mapper.open(spec, 'virtkm-test-plain-r', key);
    try {
      return createHash('sha256').update(await readFile(d)).digest('hex');
    } finally {
      await mapper.close('virtkm-test-plain-r');
    }
  };
  const expected = createHash('sha256').update(data).digest('hex');
  t.is(await readBack(job.newKey ?? new Uint8Array()), expected);
  t.not(await readBack(job.oldKey ?? new Uint8Array()), expected);
  t.deepEqual(await mapper.list(), []);
});
