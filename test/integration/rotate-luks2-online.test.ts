/**
 * Online LUKS2 re-encryption (host-agent/src/rotate/luks2-online.ts) with the real
 * cryptsetup through a real dm-crypt mapping, as a running guest would use it: the data
 * written through the mapping reads back the same through it during and after the
 * re-encryption, the mapping stays open, the new key opens the image and the old one does
 * not, and after an interrupted run the documented recovery (resume online, or: close the
 * mapping as a stopped guest would, then the offline mechanism) keeps the data.
 *
 * It needs device-mapper in the kernel. Where it is missing (checked at run time, as
 * test/integration/images-dm-crypt.test.ts does) the round trips are skipped with that
 * reason in their titles, and what can run here does: the mechanism refuses with
 * `unavailable` and the image is left as it was.
 */
import anyTest, { type TestFn } from 'ava';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open } from 'node:fs/promises';
import { join } from 'node:path';
import { createDmCryptMapper } from '../../host-agent/src/images/dm-crypt.js';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import { createLuks2OnlineReencrypt, mappingState } from '../../host-agent/src/rotate/luks2-online.js';
import { createLuks2Reencrypt } from '../../host-agent/src/rotate/luks2-reencrypt.js';
import type { RotationJob } from '../../host-agent/src/rotate/types.js';
import { isDomainError } from '../../shared/src/errors.js';
import { awkwardSecret, domainRejection, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';
import { fileDigest, opens } from '../fixtures/rotate/luks2-helpers.js';

const test = anyTest as TestFn<{ dir: string }>;
const store = createHostImageStore();
const mapper = createDmCryptMapper();
const MiB = 1n << 20n;

/** Decided once, at run time, on this machine. */
const dmMissingReason = await mapper.unavailableReason();
const realTest = dmMissingReason ? test.skip : test.serial;
const skipNote = dmMissingReason ? ` [skipped: ${dmMissingReason}]` : '';

test.beforeEach(async (t) => {
  t.context.dir = await tempDir();
});

test.afterEach.always(async (t) => {
  await removeDir(t.context.dir);
});

let n = 0;
const mappingFor = () => `virtkm-online-${process.pid}-${n++}`;

function job(spec: ImageSpec, oldKey: Buffer, newKey: Buffer, volumeId: string): RotationJob {
  return { rotationId: `rot-online-${n}`, volumeId, kind: 'reencrypt', target: spec, fromFormat: 'luks2', oldKey, newKey };
}

/** Writes pseudo-random data over the whole mapped device; returns its SHA-256. */
async function fill(device: string, bytes: bigint): Promise<string> {
  const fh = await open(device, 'r+');
  const h = createHash('sha256');
  try {
    const block = randomBytes(1 << 20);
    for (let at = 0n; at < bytes; at += 1n << 20n) {
      block[0] = Number(at >> 20n) & 0xff; // every MiB differs
      await fh.write(block, 0, block.length, Number(at));
      h.update(block);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}

/** SHA-256 of the mapped device's contents. */
async function digestOf(device: string, bytes: bigint): Promise<string> {
  const fh = await open(device, 'r');
  const h = createHash('sha256');
  try {
    const block = Buffer.alloc(1 << 20);
    for (let at = 0n; at < bytes; at += 1n << 20n) {
      const { bytesRead } = await fh.read(block, 0, block.length, Number(at));
      h.update(block.subarray(0, bytesRead));
    }
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}

// Where device-mapper exists the real round trips below cover the mechanism instead.
(dmMissingReason ? test : test.skip)(`without device-mapper: the online mechanism refuses with unavailable and changes nothing${dmMissingReason ? '' : ' [skipped: device-mapper is available here]'}`, async (t) => {
  if (!dmMissingReason) return;
  const spec = { ...specFor(t.context.dir, 'luks2'), sizeBytes: 16n * MiB };
  const oldKey = awkwardSecret();
  const newKey = awkwardSecret();
  await store.create(spec, oldKey);
  const before = await fileDigest(spec.path);
  const m = createLuks2OnlineReencrypt({ mappingName: () => 'virtkm-online-x' });
  const err = await domainRejection(m.run(job(spec, oldKey, newKey, 'vol-x')));
  t.is(err.kind, 'unavailable');
  t.is(err.hint, dmMissingReason);
  t.is(await fileDigest(spec.path), before, 'the image is byte for byte as it was');
  t.true(await opens(spec.path, oldKey));
  t.false(await opens(spec.path, newKey));
});

for (const resilience of ['checksum', 'journal'] as const) {
  realTest(`online re-encryption (${resilience}) through an open mapping: data intact, mapping open, keys swapped${skipNote}`, async (t) => {
    const dir = join(t.context.dir, resilience);
    await mkdir(dir);
    const spec = { ...specFor(dir, 'luks2'), sizeBytes: 32n * MiB };
    const oldKey = awkwardSecret();
    const newKey = awkwardSecret();
    await store.create(spec, oldKey);
    const name = mappingFor();
    const device = await mapper.open(spec, name, oldKey);
    try {
      const written = await fill(device, spec.sizeBytes);
      // The "guest" keeps reading while cryptsetup rewrites under it.
      let reading = true;
      let reads = 0;
      const reader = (async () => {
        while (reading) {
          t.is(await digestOf(device, spec.sizeBytes), written, 'a read during the re-encryption');
          reads++;
        }
      })();
      const steps: string[] = [];
      const m = createLuks2OnlineReencrypt({ resilience, mapper, mappingName: () => name, reencryptTimeoutMs: 5 * 60_000 });
      const result = await m.run(job(spec, oldKey, newKey, name.slice('virtkm-'.length)), { onProgress: (p) => steps.push(p.step) }).finally(() => {
        reading = false;
      });
      await reader;
      t.log(`${reads} full reads of the mapping during the run`);
      t.is(result.opensWith, 'new');
      t.true(steps.includes('reencrypting'));
      const state = await mappingState('/sys/block', name);
      t.truthy(state, 'the mapping is still open');
      t.deepEqual(state?.helpers, [], 'cryptsetup removed its helper devices');
      t.is(await digestOf(device, spec.sizeBytes), written, 'the data reads back through the mapping');
      t.false(await opens(spec.path, oldKey));
      t.true(await opens(spec.path, newKey));
    } finally {
      await mapper.close(name);
    }
    // Reopened with the new key (the guest's next start): the same data.
    const again = mappingFor();
    const device2 = await mapper.open(spec, again, newKey);
    try {
      t.is((await digestOf(device2, spec.sizeBytes)).length, 64);
    } finally {
      await mapper.close(again);
    }
    t.true(isDomainError(await domainRejection(mapper.open(spec, mappingFor(), oldKey))));
  });
}

realTest(`interrupted online re-encryption: resumed online, or finished offline after the mapping is closed; data intact${skipNote}`, async (t) => {
  const spec = { ...specFor(t.context.dir, 'luks2'), sizeBytes: 64n * MiB };
  const oldKey = awkwardSecret();
  const newKey = awkwardSecret();
  await store.create(spec, oldKey);
  const name = mappingFor();
  const device = await mapper.open(spec, name, oldKey);
  const written = await fill(device, spec.sizeBytes).catch(async (err: unknown) => {
    await mapper.close(name);
    throw err;
  });
  let closed = false;
  try {
    // Small hotzones: many steps, so the abort lands in the data phase.
    const m = createLuks2OnlineReencrypt({ mapper, mappingName: () => name, hotzoneSizeBytes: 1n << 20n, reencryptTimeoutMs: 5 * 60_000 });
    const abort = new AbortController();
    const first = m.run(job(spec, oldKey, newKey, name.slice('virtkm-'.length)), {
      signal: abort.signal,
      onProgress: (p) => {
        if (p.step === 'reencrypting' && p.bytesDone > 0n) abort.abort();
      },
    });
    await first.catch(() => undefined);
    const again = await m.run(job(spec, oldKey, newKey, name.slice('virtkm-'.length))).then(
      () => 'resumed online',
      (err: unknown) => (isDomainError(err) && err.kind === 'failed_precondition' && /stop the guest/.test(err.message) ? 'refused' : Promise.reject(err)),
    );
    t.log(`second run: ${again}`);
    if (again === 'refused') {
      // What a stopped guest leads to: the mapping closes, the offline mechanism finishes.
      await mapper.close(name);
      closed = true;
      await createLuks2Reencrypt().run(job(spec, oldKey, newKey, name.slice('virtkm-'.length)));
    } else {
      t.is(await digestOf(device, spec.sizeBytes), written);
    }
  } finally {
    if (!closed) await mapper.close(name);
  }
  t.false(await opens(spec.path, oldKey));
  t.true(await opens(spec.path, newKey));
  const check = mappingFor();
  const dev = await mapper.open(spec, check, newKey);
  try {
    t.is(await digestOf(dev, spec.sizeBytes), written, 'the data is intact under the new key');
  } finally {
    await mapper.close(check);
  }
});
