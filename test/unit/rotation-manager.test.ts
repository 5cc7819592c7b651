/**
 * The server's rotation logic over a real (in-memory) SQLite store and a real key vault:
 * queueing, dispatch with the per-host limit, a host's confirmation and failure, stale
 * reports, grace periods and compromise, policies (age, after a move), and that the store
 * holds every key that might open an image at every step.
 */
import anyTest, { type TestFn } from 'ava';
import { loadSodium } from '../../shared/src/sodium.js';
import { generateWrappingKey, open, seal, volumeSecretAad } from '../../shared/src/envelope.js';
import { DomainError } from '../../shared/src/errors.js';
import { silentLogger } from '../../shared/src/log.js';
import type { GuestRecord, HostRecord, VolumeRecord } from '../../server/src/domain/model.js';
import { createRotationManager, effectivePolicy, type RotationManager, type RotationStatusInput } from '../../server/src/rotation/rotation-manager.js';
import { openSqliteStore, type SqliteStore } from '../../server/src/store/sqlite-store.js';
import { createKeyVault } from '../../server/src/vault/key-vault.js';

interface Ctx {
  store: SqliteStore;
  manager: RotationManager;
  clock: { t: number; now: () => Date };
  notified: string[];
  master: ReturnType<typeof generateWrappingKey>;
}
const test = anyTest as TestFn<Ctx>;

const T0 = Date.parse('2026-01-01T00:00:00.000Z');
const iso = (ms: number) => new Date(ms).toISOString();

test.before(async () => {
  await loadSodium();
});

test.beforeEach(async (t) => {
  const store = openSqliteStore({ path: ':memory:' });
  const master = generateWrappingKey();
  const vault = createKeyVault({ id: master.id.slice(), bytes: master.bytes.slice() });
  const clock = { t: T0, now: () => new Date(clock.t) };
  const notified: string[] = [];
  const manager = createRotationManager({
    store,
    vault,
    clock,
    notifier: { hostsChanged: (ids) => void notified.push(...[...ids].filter((x): x is string => typeof x === 'string')) },
    logger: silentLogger,
    settings: { maxPerHost: 2, graceSeconds: 3600 },
  });
  t.context = { store, manager, clock, notified, master };
  await store.write((tx) => {
    for (const h of ['h1', 'h2']) {
      const host: HostRecord = { id: h, name: `host-${h}`, state: 'enrolled', boxPublicKey: new Uint8Array(32), certSerial: `s-${h}`, enrolledAt: iso(T0), revokedAt: null, lastSeenAt: null, desiredRevision: 0 };
      tx.insertHost(host);
    }
  });
});

test.afterEach.always(async (t) => {
  await t.context.store.close();
});

/** Volumes v1..vn (materialized) used by guest g on host h1. */
async function setup(t: { context: Ctx }, n: number, opts: { materialized?: boolean; hostId?: string | null } = {}): Promise<VolumeRecord[]> {
  const { store, master } = t.context;
  const vols: VolumeRecord[] = [];
  await store.write((tx) => {
    for (let i = 1; i <= n; i++) {
      const v: VolumeRecord = { id: `v${i}`, name: `vol${i}`, sizeBytes: 1n << 30n, format: 'qcow2-luks', cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512, activeVersion: 1, createdAt: iso(T0) };
      tx.insertVolume(v);
      // A sealed secret made under the same master key as the vault's.
      const secret = new Uint8Array(32).fill(i);
      tx.insertKeyVersion({ volumeId: v.id, version: 1, state: 'active', sealed: sealWith(master, secret, v.id, 1), createdAt: iso(T0) });
      vols.push(v);
    }
    const g: GuestRecord = { id: 'g', name: 'guest', domainXml: '<domain/>', hostId: opts.hostId === undefined ? 'h1' : opts.hostId, autostart: true, createdAt: iso(T0), updatedAt: iso(T0), generation: 1, volumeIds: vols.map((v) => v.id), handoffFromHostId: null };
    tx.upsertGuest(g);
    if (opts.materialized !== false) tx.markMaterialized(vols.map((v) => v.id), iso(T0));
  });
  return vols;
}

function sealWith(m: ReturnType<typeof generateWrappingKey>, s: Uint8Array, id: string, v: number): Uint8Array {
  return seal(s, m, volumeSecretAad(id, v));
}

const status = (r: { id: string; volumeId: string; toVersion: number }, phase: RotationStatusInput['phase'], extra: Partial<RotationStatusInput> = {}): RotationStatusInput => ({
  rotationId: r.id,
  volumeId: r.volumeId,
  phase,
  step: phase,
  bytesDone: 0,
  bytesTotal: 0,
  bytesPerSecond: 0,
  reason: '',
  mechanism: 'qemu-img convert',
  targetVersion: r.toVersion,
  ...extra,
});

test('a manual rotation runs on the guest host, respects the per-host limit, and completes on confirmation', async (t) => {
  const { store, manager } = t.context;
  await setup(t, 3);
  const { rotations, skipped } = await manager.start({ guest: 'g' }, 'reencrypt', '', 'admin:alice');
  t.is(rotations.length, 3);
  t.deepEqual(skipped, []);
  const running = rotations.filter((r) => r.state === 'running');
  const queued = rotations.filter((r) => r.state === 'queued');
  t.is(running.length, 2, 'two per host');
  t.is(queued.length, 1);
  t.regex(queued[0]!.step, /host busy/);
  const r1 = running[0]!;
  t.is(r1.hostId, 'h1');
  t.is(r1.toVersion, 2);
  // The new version exists, pending, and both keys are in the store.
  const kv = store.getKeyVersions(r1.volumeId);
  t.deepEqual(kv.map((k) => [k.version, k.state]), [[1, 'active'], [2, 'pending']]);
  // A second request for the same volume is skipped, not doubled.
  const again = await manager.start({ volume: r1.volumeId }, 'rekey', 'manual', 'admin:alice');
  t.deepEqual(again.skipped, [store.getVolume(r1.volumeId)!.name]);
  t.is(again.rotations.length, 0);

  // Progress, then done.
  await manager.onHostStatuses('h1', [status(r1, 'running', { step: 'copying', bytesDone: 50, bytesTotal: 100, bytesPerSecond: 10 })]);
  t.is(store.getRotation(r1.id)!.bytesDone, 50);
  const gen = store.getGuest('g')!.generation;
  await manager.onHostStatuses('h1', [status(r1, 'done')]);
  const done = store.getRotation(r1.id)!;
  t.is(done.state, 'done');
  t.is(store.getVolume(r1.volumeId)!.activeVersion, 2);
  const after = store.getKeyVersions(r1.volumeId);
  t.deepEqual(after.map((k) => [k.version, k.state]), [[1, 'retired'], [2, 'active']]);
  t.is(after[0]!.destroyAfter, iso(T0 + 3600_000), 'destroyed after the grace period');
  t.not(after[0]!.sealed, null, 'kept during the grace period');
  t.is(store.getGuest('g')!.generation, gen + 1, 'the guest is redefined with the new secret');
  // The slot freed: the queued one started.
  t.is(store.getRotation(queued[0]!.id)!.state, 'running');
  // The new version's secret opens under the master key with its own AAD.
  t.notThrows(() => open(after[1]!.sealed!, t.context.master, volumeSecretAad(r1.volumeId, 2)));

  // Grace period over: the scheduler destroys the retired version.
  t.context.clock.t = T0 + 3601_000;
  await manager.tick();
  const shredded = store.getKeyVersions(r1.volumeId)[0]!;
  t.is(shredded.state, 'destroyed');
  t.is(shredded.sealed, null);
  t.true(store.listAuditEvents({ pageSize: 100, pageToken: '', action: 'key.destroy' }).items.length >= 1);
});

test('reports from another host, for another version, or for a finished rotation change nothing', async (t) => {
  const { store, manager } = t.context;
  await setup(t, 1);
  const [r] = (await manager.start({ volume: 'v1' }, 'rekey', 'manual', 'admin:a')).rotations;
  t.is(r!.state, 'running');
  await manager.onHostStatuses('h2', [status(r!, 'done')]);
  await manager.onHostStatuses('h1', [status({ ...r!, toVersion: 7 }, 'done')]);
  t.is(store.getRotation(r!.id)!.state, 'running');
  t.is(store.getVolume('v1')!.activeVersion, 1);
  await manager.onHostStatuses('h1', [status(r!, 'done')]);
  await manager.onHostStatuses('h1', [status(r!, 'failed', { reason: 'late' })]);
  t.is(store.getRotation(r!.id)!.state, 'done', 'a late failure does not undo a confirmed rotation');
});

test('a failed rotation keeps the active key and retires the pending one after the grace period', async (t) => {
  const { store, manager } = t.context;
  await setup(t, 1);
  const [r] = (await manager.start({ volume: 'vol1' }, 'reencrypt', 'manual', 'admin:a')).rotations;
  await manager.onHostStatuses('h1', [status(r!, 'failed', { reason: 'not enough free space for the copy' })]);
  const f = store.getRotation(r!.id)!;
  t.is(f.state, 'failed');
  t.is(f.error, 'not enough free space for the copy');
  t.is(store.getVolume('v1')!.activeVersion, 1);
  const kv = store.getKeyVersions('v1');
  t.deepEqual(kv.map((k) => [k.version, k.state]), [[1, 'active'], [2, 'retired']]);
  t.not(kv[1]!.sealed, null);
  // A new rotation may start again and uses a fresh version number.
  const [r2] = (await manager.start({ volume: 'v1' }, 'reencrypt', 'manual', 'admin:a')).rotations;
  t.is(r2!.toVersion, 3);
});

test('compromise: first in line, re-encrypts, and the old key is destroyed as soon as the new one is confirmed', async (t) => {
  const { store, manager } = t.context;
  await setup(t, 3);
  await manager.start({ volume: 'v1' }, 'rekey', 'manual', 'admin:a');
  await manager.start({ volume: 'v2' }, 'rekey', 'manual', 'admin:a');
  const [c] = (await manager.start({ volume: 'v3' }, 'reencrypt', 'compromise', 'admin:a')).rotations;
  t.is(c!.state, 'queued', 'host busy');
  t.is(c!.priority, 100);
  const r1 = store.openRotationOfVolume('v1')!;
  await manager.onHostStatuses('h1', [status(r1, 'done')]);
  const started = store.getRotation(c!.id)!;
  t.is(started.state, 'running');
  await manager.onHostStatuses('h1', [status(started, 'done')]);
  const kv = store.getKeyVersions('v3');
  t.deepEqual(kv.map((k) => [k.version, k.state]), [[1, 'destroyed'], [2, 'active']]);
  t.is(kv[0]!.sealed, null);
});

test('a volume whose image was never created switches versions at once; one without a host waits', async (t) => {
  const { store, manager } = t.context;
  await setup(t, 1, { materialized: false });
  const [r] = (await manager.start({ volume: 'v1' }, 'rekey', 'manual', 'admin:a')).rotations;
  t.is(r!.state, 'done');
  t.is(r!.mechanism, 'none (no image yet)');
  t.is(store.getVolume('v1')!.activeVersion, 2);

  await store.write((tx) => tx.upsertGuest({ ...tx.getGuest('g')!, hostId: null }));
  await store.write((tx) => tx.markMaterialized(['v1'], iso(T0)));
  const [w] = (await manager.start({ volume: 'v1' }, 'rekey', 'manual', 'admin:a')).rotations;
  t.is(w!.state, 'queued');
  t.regex(w!.step, /no guest using the volume is placed/);
});

test('bad selections: unknown volume, guest or host', async (t) => {
  const { manager } = t.context;
  await setup(t, 1);
  for (const target of [{ volume: 'nope' }, { guest: 'nope' }, { host: 'nope' }]) {
    const err = await t.throwsAsync(manager.start(target as never, 'rekey', '', 'admin:a'), { instanceOf: DomainError });
    t.is(err.kind, 'not_found');
  }
  const err = await t.throwsAsync(manager.start({ all: true }, 'rekey', 'x'.repeat(201), 'admin:a'), { instanceOf: DomainError });
  t.is(err.kind, 'invalid_argument');
});

test('policies: keys older than the effective maximum age are rotated by the scheduler; a move queues a re-encryption', async (t) => {
  const { store, manager, clock } = t.context;
  await setup(t, 2);
  await store.write((tx) => {
    tx.upsertPolicy({ scope: 'global', targetId: '', maxKeyAgeSeconds: 86400, kind: 'rekey', reencryptAfterMoveSeconds: 0, updatedAt: iso(T0) });
    tx.upsertPolicy({ scope: 'volume', targetId: 'v2', maxKeyAgeSeconds: 0, kind: 'rekey', reencryptAfterMoveSeconds: 3600, updatedAt: iso(T0) });
  });
  t.is(effectivePolicy(store, 'v2')!.maxKeyAgeSeconds, 0, 'the volume policy wins over the global one');
  clock.t = T0 + 86400_000 - 1000;
  await manager.tick();
  t.is(store.openRotationOfVolume('v1'), undefined, 'not yet due');
  clock.t = T0 + 86400_000 + 1000;
  await manager.tick();
  const r = store.openRotationOfVolume('v1')!;
  t.is(r.reason, 'scheduled');
  t.is(r.kind, 'rekey');
  t.is(store.openRotationOfVolume('v2'), undefined, 'no age limit for v2');

  await manager.onMoveComplete('g');
  const m = store.openRotationOfVolume('v2')!;
  t.is(m.kind, 'reencrypt');
  t.is(m.reason, 'move');
  t.is(m.dueAt, iso(clock.t + 3600_000));
});

test('a queued rotation can be cancelled, a running one cannot; a compromise request upgrades a queued rotation', async (t) => {
  const { store, manager } = t.context;
  await setup(t, 4);
  const started = (await manager.start({ guest: 'g' }, 'rekey', 'manual', 'admin:a')).rotations;
  const running = started.filter((r) => r.state === 'running');
  const queued = started.filter((r) => r.state === 'queued');
  t.is(queued.length, 2);
  const err = await t.throwsAsync(manager.cancel(running[0]!.id, 'admin:a'), { instanceOf: DomainError });
  t.is(err.kind, 'failed_precondition');
  const c = await manager.cancel(queued[0]!.id, 'admin:a');
  t.is(c.state, 'failed');
  t.regex(c.error, /cancelled by admin:a/);
  t.is(store.openRotationOfVolume(queued[0]!.volumeId), undefined, 'the volume may be rotated again');
  t.is((await t.throwsAsync(manager.cancel('nope', 'admin:a'), { instanceOf: DomainError })).kind, 'not_found');

  const up = await manager.start({ volume: queued[1]!.volumeId }, 'reencrypt', 'compromise', 'admin:a');
  const r = store.getRotation(queued[1]!.id)!;
  t.is(up.rotations[0]!.id, r.id, 'the queued rotation is upgraded, not doubled');
  t.is(r.reason, 'compromise');
  t.is(r.kind, 'reencrypt');
  t.is(r.priority, 100);
  const onRunning = await manager.start({ volume: running[0]!.volumeId }, 'reencrypt', 'compromise', 'admin:a');
  t.is(onRunning.skipped.length, 1, 'a running rotation is reported as skipped');
  t.is(store.getRotation(running[0]!.id)!.reason, 'compromise', 'but its old key goes as soon as it completes');
  await manager.onHostStatuses('h1', [status(store.getRotation(running[0]!.id)!, 'done')]);
  t.is(store.getKeyVersions(running[0]!.volumeId)[0]!.state, 'destroyed');
});

test('the policy scan pages past volumes whose longer policy is not due yet', async (t) => {
  const { store, manager, clock } = t.context;
  const vols = await setup(t, 6);
  await store.write((tx) => {
    tx.upsertPolicy({ scope: 'global', targetId: '', maxKeyAgeSeconds: 60, kind: 'rekey', reencryptAfterMoveSeconds: 0, updatedAt: iso(T0) });
    // v1..v5 have a long policy of their own; only v6 is due under the global one.
    for (const v of vols.slice(0, 5)) tx.upsertPolicy({ scope: 'volume', targetId: v.id, maxKeyAgeSeconds: 86400, kind: 'rekey', reencryptAfterMoveSeconds: 0, updatedAt: iso(T0) });
  });
  const small = createRotationManager({ store, vault: createKeyVault({ id: t.context.master.id.slice(), bytes: t.context.master.bytes.slice() }), clock, notifier: { hostsChanged: () => undefined }, logger: silentLogger, settings: { scanLimit: 2, maxPerHost: 10 } });
  clock.t = T0 + 120_000;
  await small.tick();
  t.truthy(store.openRotationOfVolume('v6'), 'found behind five candidates that are not due');
  for (const v of vols.slice(0, 5)) t.is(store.openRotationOfVolume(v.id), undefined);
  void manager;
});

// ---- encrypting and decrypting ------------------------------------------------------

/** An unencrypted volume (no key version) used by guest g2 on host h1, materialized. */
async function setupPlain(t: { context: Ctx }, format: 'raw' | 'qcow2', opts: { materialized?: boolean } = {}): Promise<VolumeRecord> {
  const v: VolumeRecord = { id: `p-${format}`, name: `plain-${format}`, sizeBytes: 1n << 30n, format, cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512, activeVersion: 0, createdAt: iso(T0) };
  await t.context.store.write((tx) => {
    tx.insertVolume(v);
    tx.upsertGuest({ id: 'g2', name: 'guest2', domainXml: '<domain/>', hostId: 'h1', autostart: true, createdAt: iso(T0), updatedAt: iso(T0), generation: 1, volumeIds: [v.id], handoffFromHostId: null });
    if (opts.materialized !== false) tx.markMaterialized([v.id], iso(T0));
  });
  return v;
}

const actions = (store: SqliteStore) => store.listAuditEvents({ pageSize: 1000, pageToken: '' }).items.map((e) => e.action);

test('encrypt: v1 is pending while the host converts; done makes it active and the format luks in one step', async (t) => {
  const { store, manager } = t.context;
  const v = await setupPlain(t, 'raw');
  const { rotations } = await manager.start({ volume: v.id }, 'encrypt', '', 'admin:alice');
  const r = rotations[0]!;
  t.is(r.state, 'running');
  t.deepEqual([r.kind, r.fromVersion, r.toVersion], ['encrypt', 0, 1]);
  t.deepEqual(store.getKeyVersions(v.id).map((k) => [k.version, k.state]), [[1, 'pending']]);
  t.is(store.getVolume(v.id)!.format, 'raw', 'the format changes only when the host is done');
  t.is(store.getVolume(v.id)!.activeVersion, 0);
  const gen = store.getGuest('g2')!.generation;
  await manager.onHostStatuses('h1', [status(r, 'done')]);
  const after = store.getVolume(v.id)!;
  t.deepEqual([after.format, after.activeVersion], ['luks', 1]);
  t.deepEqual(store.getKeyVersions(v.id).map((k) => [k.version, k.state]), [[1, 'active']]);
  t.is(store.getGuest('g2')!.generation, gen + 1, 'the guest is redefined with the secret');
  t.is(store.getRotation(r.id)!.state, 'done');
  const a = actions(store);
  t.true(a.includes('volume.encrypt.request') && a.includes('volume.encrypt.start') && a.includes('volume.encrypt.done'));
  t.false(a.some((x) => x.startsWith('key.rotate.')), 'audited under its own actions');
});

test('decrypt: no new version; done makes the volume qcow2 and retires the key (at once for compromise)', async (t) => {
  const { store, manager } = t.context;
  const [v] = await setup(t, 1);
  const { rotations } = await manager.start({ volume: v!.id }, 'decrypt', 'compromise', 'admin:alice');
  const r = rotations[0]!;
  t.deepEqual([r.state, r.kind, r.fromVersion, r.toVersion], ['running', 'decrypt', 1, 0]);
  t.deepEqual(store.getKeyVersions(v!.id).map((k) => [k.version, k.state]), [[1, 'active']], 'no pending version');
  await manager.onHostStatuses('h1', [status(r, 'done')]);
  const after = store.getVolume(v!.id)!;
  t.deepEqual([after.format, after.activeVersion], ['qcow2', 0]);
  const kv = store.getKeyVersions(v!.id);
  t.is(kv[0]!.state, 'destroyed', 'compromise: the key is destroyed as soon as the image is decrypted');
  t.is(kv[0]!.sealed, null);
  t.true(actions(store).includes('volume.decrypt.done'));
  t.is(store.getActiveKey(v!.id), undefined, 'nothing to release any more');
});

test('decrypt with a normal reason keeps the retired key for the grace period; a failed decrypt changes nothing', async (t) => {
  const { store, manager } = t.context;
  const vols = await setup(t, 2);
  const ok = (await manager.start({ volume: vols[0]!.id }, 'decrypt', '', 'admin:alice')).rotations[0]!;
  const bad = (await manager.start({ volume: vols[1]!.id }, 'decrypt', '', 'admin:alice')).rotations[0]!;
  await manager.onHostStatuses('h1', [status(ok, 'done'), status(bad, 'failed', { reason: 'disk full' })]);
  const k0 = store.getKeyVersions(vols[0]!.id)[0]!;
  t.deepEqual([k0.state, k0.destroyAfter], ['retired', iso(T0 + 3600_000)]);
  t.not(k0.sealed, null);
  t.is(store.getRotation(bad.id)!.state, 'failed');
  t.deepEqual([store.getVolume(vols[1]!.id)!.format, store.getVolume(vols[1]!.id)!.activeVersion], ['qcow2-luks', 1]);
  t.deepEqual(store.getKeyVersions(vols[1]!.id).map((k) => [k.version, k.state]), [[1, 'active']]);
  t.true(actions(store).includes('volume.decrypt.fail'));
});

test('encrypt and decrypt refuse what does not fit, and change nothing', async (t) => {
  const { store, manager } = t.context;
  const [enc] = await setup(t, 1);
  const plain = await setupPlain(t, 'qcow2');
  const before = actions(store).length;
  const refused = async (p: Promise<unknown>, kind: DomainError['kind'], re: RegExp) => {
    const e = await t.throwsAsync(p, { instanceOf: DomainError });
    t.is(e?.kind, kind);
    t.regex(e?.message ?? '', re);
  };
  await refused(manager.start({ volume: enc!.id }, 'encrypt', '', 'admin:a'), 'failed_precondition', /already encrypted/);
  await refused(manager.start({ volume: plain.id }, 'decrypt', '', 'admin:a'), 'failed_precondition', /not encrypted/);
  await refused(manager.start({ volume: plain.id }, 'rekey', '', 'admin:a'), 'failed_precondition', /not encrypted/);
  await refused(manager.start({ guest: 'g' }, 'encrypt', '', 'admin:a'), 'invalid_argument', /single volume/);
  // A luks2 volume cannot be decrypted here (cryptsetup could, but not in this step).
  await store.write((tx) => {
    tx.insertVolume({ id: 'l2', name: 'vol-luks2', sizeBytes: 1n << 30n, format: 'luks2', cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512, activeVersion: 1, createdAt: iso(T0) });
    tx.insertKeyVersion({ volumeId: 'l2', version: 1, state: 'active', sealed: sealWith(t.context.master, new Uint8Array(32), 'l2', 1), createdAt: iso(T0) });
  });
  await refused(manager.start({ volume: 'l2' }, 'decrypt', '', 'admin:a'), 'failed_precondition', /luks2 volume cannot be decrypted/);
  t.is(store.listRotations({ pageSize: 100, pageToken: '' }).items.length, 0, 'no rotation recorded');
  t.is(actions(store).length, before, 'nothing audited: no request was accepted');
  // A group rotation skips the unencrypted volume instead of failing.
  const all = await manager.start({ all: true }, 'rekey', '', 'admin:a');
  t.false(all.rotations.some((r) => r.volumeId === plain.id));
  t.true(all.rotations.some((r) => r.volumeId === enc!.id));
});

test('an unencrypted volume never created anywhere is encrypted at once; policies ignore unencrypted volumes', async (t) => {
  const { store, manager, clock } = t.context;
  const v = await setupPlain(t, 'raw', { materialized: false });
  const r = (await manager.start({ volume: v.id }, 'encrypt', '', 'admin:a')).rotations[0]!;
  t.is(r.state, 'done');
  t.deepEqual([store.getVolume(v.id)!.format, store.getVolume(v.id)!.activeVersion], ['luks', 1]);
  // Decrypt it again (no image yet either), then age every key: nothing is scheduled for it.
  const d = (await manager.start({ volume: v.id }, 'decrypt', '', 'admin:a')).rotations[0]!;
  t.is(d.state, 'done');
  t.deepEqual([store.getVolume(v.id)!.format, store.getVolume(v.id)!.activeVersion], ['raw', 0]);
  await store.write((tx) => tx.upsertPolicy({ scope: 'global', targetId: '', maxKeyAgeSeconds: 60, kind: 'rekey', reencryptAfterMoveSeconds: 0, updatedAt: iso(T0) }));
  clock.t = T0 + 3600_000;
  await manager.tick();
  t.is(store.openRotationOfVolume(v.id), undefined, 'no key, nothing to rotate');
  // Encrypting again uses the next unused version number (versions are never reused).
  const again = (await manager.start({ volume: v.id }, 'encrypt', '', 'admin:a')).rotations[0]!;
  t.is(again.toVersion, 2);
});
