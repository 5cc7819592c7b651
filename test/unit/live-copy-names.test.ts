/**
 * The live copy's file names (host-agent/src/rotate/live-copy.ts) with a fake libvirt and
 * a fake image port: today's names come from common.ts (`.<image>.virtkm-rot-<id>.live-*`),
 * and a rotation an earlier version was killed in (`.<image>.rot-<id>.new` / `.json`) is
 * still found and finished or cleaned. The guest is stopped here, where only the files
 * decide (test/integration/rotate-live.test.ts runs the running-guest paths for real).
 * The fake "image" holds the hex of the key that opens it.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import type { DomainDisk, Libvirt, SecretInfo } from '../../host-agent/src/libvirt/ports.js';
import type { ImagePort } from '../../host-agent/src/reconcile/ports.js';
import { createLiveCopy, legacyLiveCopyPaths, liveCopyJournalPath, liveCopyTempPath } from '../../host-agent/src/rotate/live-copy.js';
import type { RotationJob } from '../../host-agent/src/rotate/types.js';
import { isDomainError } from '../../shared/src/errors.js';

const test = anyTest as TestFn<{ dir: string }>;

test.beforeEach(async (t) => {
  t.context.dir = await mkdtemp(join(tmpdir(), 'virtkm-live-names-'));
});
test.afterEach.always(async (t) => {
  await rm(t.context.dir, { recursive: true, force: true });
});

/** A stopped guest whose disk vda is `path`; records the secrets defined. */
function fakeLibvirt(path: string): Libvirt & { secretsDefined: string[] } {
  const secrets: SecretInfo[] = [];
  const secretsDefined: string[] = [];
  const disk: DomainDisk = { target: 'vda', sourcePath: path, secretUuid: undefined, mirror: undefined };
  const no = (): Promise<never> => Promise.reject(new Error('not expected with a stopped guest'));
  return {
    secretsDefined,
    secrets: {
      define: (d) => {
        secretsDefined.push(d.uuid);
        if (!secrets.some((s) => s.uuid === d.uuid)) secrets.push({ uuid: d.uuid, usageType: 'volume', usageId: `virtkm:${d.volumeId}`, volumeId: d.volumeId, description: d.description, private: true, ephemeral: true });
        return Promise.resolve();
      },
      setValue: () => Promise.resolve(),
      undefine: (uuid) => {
        secrets.splice(secrets.findIndex((s) => s.uuid === uuid), 1);
        return Promise.resolve();
      },
      list: () => Promise.resolve([...secrets]),
    },
    domains: {
      define: no,
      undefine: no,
      start: no,
      destroy: no,
      state: () => Promise.resolve('shutoff'),
      list: () => Promise.resolve([{ name: 'g1', uuid: '00000000-0000-4000-8000-000000000001', state: 'shutoff', autostart: false, persistent: false, marker: undefined }]),
      xml: no,
      disk: () => Promise.resolve(disk),
      blockCopy: no,
      blockJob: () => Promise.resolve(undefined),
      blockJobAbort: no,
    },
    close: () => Promise.resolve(),
  };
}

function fakeImages(): ImagePort {
  return {
    create: () => Promise.reject(new Error('no image is created with a stopped guest')),
    inspect: () => Promise.reject(new Error('not used')),
    remove: () => Promise.reject(new Error('not used')),
    testKey: async (path, _spec, key) => (await readFile(path, 'utf8')) === Buffer.from(key).toString('hex'),
  };
}

async function setup(t: { context: { dir: string } }) {
  const path = join(t.context.dir, 'vol.img');
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  await writeFile(path, oldKey.toString('hex'));
  const spec: ImageSpec = { path, format: 'luks', sizeBytes: 1n << 20n, cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 };
  const job: RotationJob = { rotationId: 'r1', volumeId: 'vol1', kind: 'reencrypt', target: spec, fromFormat: 'luks', oldKey, newKey };
  const libvirt = fakeLibvirt(path);
  const mechanism = createLiveCopy({ libvirt, images: fakeImages(), hostId: 'h1', locate: () => ({ domain: 'g1', disk: 'vda', oldKeyVersion: 1, newKeyVersion: 2 }) });
  return { path, oldKey, newKey, job, libvirt, mechanism };
}

test('names: the common prefix, with purposes of their own', (t) => {
  t.is(liveCopyTempPath('/img/vol.img', 'r1'), '/img/.vol.img.virtkm-rot-r1.live-new');
  t.is(liveCopyJournalPath('/img/vol.img', 'r1'), '/img/.vol.img.virtkm-rot-r1.live-journal');
  t.deepEqual(legacyLiveCopyPaths('/img/vol.img', 'r1'), { temp: '/img/.vol.img.rot-r1.new', journal: '/img/.vol.img.rot-r1.json' });
});

for (const naming of ['current', 'earlier version'] as const) {
  test(`guest stopped after the pivot (${naming}'s names): the destination becomes the image, the journal goes`, async (t) => {
    const s = await setup(t);
    const legacy = legacyLiveCopyPaths(s.path, 'r1');
    const temp = naming === 'current' ? liveCopyTempPath(s.path, 'r1') : legacy.temp;
    const journal = naming === 'current' ? liveCopyJournalPath(s.path, 'r1') : legacy.journal;
    await writeFile(temp, s.newKey.toString('hex'));
    await writeFile(journal, JSON.stringify({ v: 1, rotationId: 'r1', phase: 'pivoting' }));
    const r = await s.mechanism.run(s.job);
    t.is(r.opensWith, 'new');
    t.is(await readFile(s.path, 'utf8'), s.newKey.toString('hex'), 'the copy (the newest data) is the image now');
    t.deepEqual(await readdir(t.context.dir), ['vol.img'], 'no file of the rotation is left');
    t.is(s.libvirt.secretsDefined.at(-1), (await s.libvirt.secrets.list())[0]?.uuid, 'one secret left, the last defined: the new version');
  });

  test(`guest stopped before the pivot (${naming}'s names): the destination and journal are dropped, the image stays`, async (t) => {
    const s = await setup(t);
    const legacy = legacyLiveCopyPaths(s.path, 'r1');
    const temp = naming === 'current' ? liveCopyTempPath(s.path, 'r1') : legacy.temp;
    const journal = naming === 'current' ? liveCopyJournalPath(s.path, 'r1') : legacy.journal;
    await writeFile(temp, s.newKey.toString('hex'));
    await writeFile(journal, JSON.stringify({ v: 1, rotationId: 'r1', phase: 'copying' }));
    const err = await s.mechanism.run(s.job).catch((e: unknown) => e);
    t.true(isDomainError(err) && err.kind === 'failed_precondition');
    t.is(await readFile(s.path, 'utf8'), s.oldKey.toString('hex'));
    t.deepEqual(await readdir(t.context.dir), ['vol.img'], 'the half copy and the journal are gone');
  });
}
