/**
 * The rotation driver's choice when a live copy was interrupted: the agent died during a
 * live re-encryption and the guest stopped before the agent came back. After the pivot the
 * copy holds the guest's newest data and the image at the canonical path is stale, so the
 * live copy must run again (it finishes offline or rolls back), never an offline mechanism
 * on the stale image. Fakes for the mechanisms; the journal is a real file.
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { silentLogger } from '../../shared/src/log.js';
import { createRotationDriver, hasLiveCopyJournal, type OrderContext, type RotationMechanisms } from '../../host-agent/src/rotate/driver.js';
import { legacyLiveCopyPaths, liveCopyJournalPath } from '../../host-agent/src/rotate/live-copy.js';
import type { RotationJob, RotationMechanism } from '../../host-agent/src/rotate/types.js';

function recorder(name: string, calls: string[]): RotationMechanism {
  return {
    name,
    run(job: RotationJob) {
      calls.push(`${name}:${job.kind}:${job.rotationId}`);
      return Promise.resolve({ opensWith: 'new' as const, verified: true, bytesRewritten: 0n });
    },
  } as unknown as RotationMechanism;
}

function setup() {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-driver-'));
  const calls: string[] = [];
  const mechanisms: RotationMechanisms = {
    liveCopy: recorder('live', calls),
    qemuConvert: recorder('convert', calls),
    qemuRekey: recorder('rekey', calls),
    luks2Rekey: recorder('luks2-rekey', calls),
    luks2Reencrypt: recorder('luks2-reencrypt', calls),
    plainReencrypt: recorder('plain', calls),
  };
  const driver = createRotationDriver({ mechanisms, testKey: () => Promise.resolve(true), onChange: () => undefined, onProgress: () => undefined, logger: silentLogger, retryDelayMs: 0 });
  const order = (rotationId: string, kind: 'rekey' | 'reencrypt', guestRunning: boolean): OrderContext =>
    ({
      rotationId,
      volumeId: 'vol-1',
      kind,
      fromVersion: 1,
      targetVersion: 2,
      spec: { path: join(dir, 'vol-1.img'), format: 'luks', sizeBytes: 1n << 20n, cipher: 'aes-xts-plain64', keySizeBits: 512 },
      oldKey: randomBytes(32),
      newKey: randomBytes(32),
      guestRunning,
    }) as unknown as OrderContext;
  return { dir, calls, driver, order, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

const settle = () => new Promise((r) => setTimeout(r, 20));

test('a stopped guest without a live journal gets the offline mechanism of its order', async (t) => {
  const s = setup();
  try {
    const reencrypt = s.order('rot-a', 'reencrypt', false);
    const rekey = s.order('rot-b', 'rekey', false);
    t.false(hasLiveCopyJournal(reencrypt));
    t.true(s.driver.ensure(reencrypt).offline);
    s.driver.ensure(rekey);
    await settle();
    t.deepEqual(s.calls.sort(), ['convert:reencrypt:rot-a', 'rekey:rekey:rot-b']);
  } finally {
    await s.driver.stop();
    s.remove();
  }
});

test('a stopped guest whose live copy left its journal gets the live copy again (offline), for a rekey order too', async (t) => {
  const s = setup();
  try {
    const reencrypt = s.order('rot-c', 'reencrypt', false);
    const rekey = s.order('rot-d', 'rekey', false);
    writeFileSync(liveCopyJournalPath(reencrypt.spec.path, 'rot-c'), JSON.stringify({ v: 1, rotationId: 'rot-c', phase: 'pivoting' }));
    // An earlier version's journal name counts too (an agent upgraded in the middle).
    writeFileSync(legacyLiveCopyPaths(rekey.spec.path, 'rot-d').journal, JSON.stringify({ v: 1, rotationId: 'rot-d', phase: 'pivoting' }));
    t.true(hasLiveCopyJournal(reencrypt));
    t.true(hasLiveCopyJournal(rekey));
    const status = s.driver.ensure(reencrypt);
    t.true(status.offline, 'the guest must not start while the copy is finished');
    s.driver.ensure(rekey);
    await settle();
    t.deepEqual(s.calls.sort(), ['live:reencrypt:rot-c', 'live:reencrypt:rot-d']);
  } finally {
    await s.driver.stop();
    s.remove();
  }
});

test("another rotation's live journal does not divert an order", async (t) => {
  const s = setup();
  try {
    const o = s.order('rot-e', 'reencrypt', false);
    writeFileSync(liveCopyJournalPath(o.spec.path, 'rot-other'), '{}');
    t.false(hasLiveCopyJournal(o));
    s.driver.ensure(o);
    await settle();
    t.deepEqual(s.calls, ['convert:reencrypt:rot-e']);
  } finally {
    await s.driver.stop();
    s.remove();
  }
});
