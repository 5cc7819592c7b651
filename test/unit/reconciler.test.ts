/**
 * The agent's reconciler against fakes of libvirt, the image tools and dm-crypt (the real
 * ones are covered by the libvirt and images integration tests), with the real key cache,
 * real key packets and real domain XML rendering.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GuestPhase, KeyPacket, RotationKind, RotationPhase, VolumeFormat, VolumePhase, type DesiredGuest, type DesiredState } from '../../shared/src/api.js';
import { boxRecipient, generateBoxKeyPair, sealToRecipient, type BoxKeyPair } from '../../shared/src/box.js';
import { generateWrappingKey } from '../../shared/src/envelope.js';
import { silentLogger } from '../../shared/src/log.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { openKeyCache, type KeyCache } from '../../host-agent/src/cache/key-cache.js';
import { imagePath, reconcile, type ReconcilerDeps } from '../../host-agent/src/reconcile/reconciler.js';
import type { DmCryptPort, ImageInfo, ImagePort } from '../../host-agent/src/reconcile/ports.js';
import { createFakeLibvirt, type FakeLibvirt } from '../fakes/fake-libvirt.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';

interface Ctx {
  dir: string;
  box: BoxKeyPair;
  hostId: string;
  libvirt: FakeLibvirt;
  images: ImagePort & { files: Map<string, { kind: ImageInfo['kind']; key: Buffer; uuid?: string }>; created: string[]; keyTests: number };
  cache: KeyCache;
  deps: ReconcilerDeps;
}
const test = anyTest as TestFn<Ctx>;

test.before(async () => {
  await loadSodium();
});

test.beforeEach((t) => {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-reconcile-'));
  const box = generateBoxKeyPair();
  const hostId = randomUUID();
  const libvirt = createFakeLibvirt();
  const files = new Map<string, { kind: ImageInfo['kind']; key: Buffer; uuid?: string }>();
  const created: string[] = [];
  const images: Ctx['images'] = {
    files,
    created,
    keyTests: 0,
    async create(spec: { path: string; format: string }, secret: Uint8Array) {
      if (files.has(spec.path)) throw new Error('exists');
      files.set(spec.path, { kind: spec.format === 'luks' ? 'luks1' : spec.format === 'qcow2-luks' ? 'qcow2-luks' : spec.format === 'luks2' ? 'luks2' : 'raw', key: Buffer.from(secret), uuid: randomUUID() });
      libvirt.imageKeys.set(spec.path, luksPassphrase(secret));
      created.push(spec.path);
    },
    async inspect(path: string): Promise<ImageInfo> {
      const f = files.get(path);
      return f ? { exists: true, kind: f.kind, ...(f.uuid ? { uuid: f.uuid } : {}) } : { exists: false, kind: 'missing' };
    },
    async remove(path: string) {
      files.delete(path);
    },
    async testKey(path: string, _spec: unknown, secret: Uint8Array) {
      images.keyTests++;
      return files.get(path)?.key.equals(Buffer.from(secret)) ?? false;
    },
  };
  const dmcrypt: DmCryptPort = {
    unavailableReason: async () => 'no device-mapper in this kernel',
    open: async () => {
      throw new Error('unreachable');
    },
    close: async () => undefined,
    list: async () => [],
  };
  const cache = openKeyCache(join(dir, 'cache'), generateWrappingKey(), hostId);
  t.context = { dir, box, hostId, libvirt, images, cache, deps: { hostId, box, libvirt, images, dmcrypt, cache, imageDir: dir, logger: silentLogger } };
});

test.afterEach.always((t) => {
  t.context.cache.close();
  rmSync(t.context.dir, { recursive: true, force: true });
});

/** A desired guest with one luks volume, its packet sealed to `box` for `hostId`. */
function guest(t: { context: Ctx }, o: { secret: Buffer; volumeId?: string; run?: boolean; autostart?: boolean; format?: VolumeFormat; mayCreate?: boolean; packetHost?: string; generation?: bigint; guestId?: string }): DesiredGuest {
  const volumeId = o.volumeId ?? randomUUID();
  const packet = KeyPacket.encode({ type: 'virtkm.keypacket.v1', volumeId, keyVersion: 1, hostId: o.packetHost ?? t.context.hostId, mechanism: o.format ?? VolumeFormat.VOLUME_FORMAT_LUKS, cipher: undefined, sizeBytes: 1n << 30n, secret: o.secret, issuedAt: '' }).finish();
  const name = `g-${volumeId.slice(0, 8)}`;
  return {
    guestId: o.guestId ?? randomUUID(),
    name,
    domainXml: `<domain type='kvm'><name>${name}</name><memory unit='MiB'>64</memory><devices><disk type='volume' device='disk'><source pool='virtkm' volume='vol-${volumeId.slice(0, 8)}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
    autostart: o.autostart ?? true,
    generation: o.generation ?? 1n,
    run: o.run ?? true,
    volumes: [
      {
        volumeId,
        name: `vol-${volumeId.slice(0, 8)}`,
        format: o.format ?? VolumeFormat.VOLUME_FORMAT_LUKS,
        cipher: { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 },
        sizeBytes: 1n << 30n,
        keyVersion: 1,
        packet: { volumeId, keyVersion: 1, sealed: Buffer.from(sealToRecipient(packet, boxRecipient(t.context.box.publicKey))) },
        mayCreate: o.mayCreate ?? true,
        rotation: undefined,
      },
    ],
  };
}
const state = (revision: bigint, guests: DesiredGuest[], deleteImages: DesiredState['deleteImages'] = []): DesiredState => ({ revision, guests, issuedAt: '', deleteImages });

test('creates the image, defines the secret and domain, starts it; the same state again changes nothing', async (t) => {
  const secret = randomBytes(32);
  const g = guest(t, { secret });
  const r1 = await reconcile(state(1n, [g]), t.context.deps);
  t.is(r1.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r1.guests[0]!.reason);
  t.is(r1.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_READY);
  t.true(r1.volumes[0]!.created);
  t.is(t.context.images.created.length, 1);
  const xml = t.context.libvirt.domainXml.get(g.name)!;
  t.regex(xml, /<encryption format="luks">/);
  t.regex(xml, new RegExp(`<source file="${imagePath(t.context.dir, g.volumes[0]!.volumeId, 'luks')}"/>`));
  t.regex(xml, new RegExp(`<virtkm:guest xmlns:virtkm="urn:virtkm:1" id="${g.guestId}" generation="1" host="${t.context.hostId}"/>`));
  t.false(xml.includes("pool='virtkm'") || xml.includes('pool="virtkm"'), 'no managed-pool reference reaches libvirt');
  const secretValue = [...t.context.libvirt.secretValues.values()][0]!;
  t.true(secretValue.equals(luksPassphrase(secret)), 'libvirt gets the hex passphrase the image was made with');

  const r2 = await reconcile(state(1n, [g]), t.context.deps);
  t.is(r2.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING);
  t.false(r2.volumes[0]!.created);
  t.is(t.context.images.created.length, 1, 'idempotent: no second image');
  // The cache file never holds the secret in clear.
  t.is(readFileSync(join(t.context.dir, 'cache')).indexOf(secret), -1);
});

test('fails closed: a wrong key, a missing image that existed, or an image of another kind is reported, never repaired', async (t) => {
  const secret = randomBytes(32);
  const wrong = guest(t, { secret });
  const path = imagePath(t.context.dir, wrong.volumes[0]!.volumeId, 'luks');
  t.context.images.files.set(path, { kind: 'luks1', key: randomBytes(32) });
  const r = await reconcile(state(1n, [wrong]), t.context.deps);
  t.is(r.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_WRONG_KEY);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_FAILED);
  t.regex(r.guests[0]!.reason, /wrong key/);
  t.is(t.context.libvirt.domainXml.size, 0, 'no domain is defined over a disk that does not open');

  const gone = guest(t, { secret: randomBytes(32), mayCreate: false });
  const r2 = await reconcile(state(2n, [gone]), t.context.deps);
  t.is(r2.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_MISSING);
  t.is(t.context.images.created.length, 0);

  const raw = guest(t, { secret: randomBytes(32) });
  t.context.images.files.set(imagePath(t.context.dir, raw.volumes[0]!.volumeId, 'luks'), { kind: 'raw', key: Buffer.alloc(0) });
  const r3 = await reconcile(state(3n, [raw]), t.context.deps);
  t.is(r3.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_FAILED);
  t.regex(r3.volumes[0]!.reason, /image is raw, expected luks1/);
});

test('a packet sealed for another host is refused; dm-crypt volumes report why they cannot open here', async (t) => {
  const foreign = guest(t, { secret: randomBytes(32), packetHost: randomUUID() });
  const r = await reconcile(state(1n, [foreign]), t.context.deps);
  t.is(r.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_PENDING);
  t.is(r.volumes[0]!.reason, 'no key yet');
  const dm = guest(t, { secret: randomBytes(32), format: VolumeFormat.VOLUME_FORMAT_LUKS2 });
  const r2 = await reconcile(state(2n, [dm]), t.context.deps);
  t.is(r2.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_FAILED);
  t.regex(r2.volumes[0]!.reason, /dm-crypt unavailable: no device-mapper/);
});

test('a guest no longer desired is stopped, undefined, its secret removed and its key dropped from the cache', async (t) => {
  const secret = randomBytes(32);
  const g = guest(t, { secret });
  await reconcile(state(1n, [g]), t.context.deps);
  t.is(t.context.cache.entries().length, 1);
  const r = await reconcile(state(2n, []), t.context.deps);
  t.deepEqual(r.guests.map((x) => [x.guestId, x.phase]), [[g.guestId, GuestPhase.GUEST_PHASE_WIPED]]);
  t.is(t.context.libvirt.domainXml.size, 0);
  t.is(t.context.libvirt.secretValues.size, 0);
  t.is(t.context.cache.entries().length, 0);
  t.is(readFileSync(join(t.context.dir, 'cache')).indexOf(secret), -1);
  t.true(t.context.images.files.has(imagePath(t.context.dir, g.volumes[0]!.volumeId, 'luks')), 'images stay unless deleted on purpose');
});

test('run=false stops a running guest and keeps it defined (the source side of a move)', async (t) => {
  const g = guest(t, { secret: randomBytes(32) });
  await reconcile(state(1n, [g]), t.context.deps);
  const r = await reconcile(state(2n, [{ ...g, run: false, generation: 2n, volumes: g.volumes.map((v) => ({ ...v, packet: undefined })) }]), t.context.deps);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_STOPPED);
  t.is(t.context.libvirt.states.get(g.name), 'shutoff');
  t.is(r.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_READY, 'the cached key still serves');
});

test('offline: after a restart the cached state starts autostart guests only, with keys from the cache', async (t) => {
  const a = guest(t, { secret: randomBytes(32), autostart: true });
  const b = guest(t, { secret: randomBytes(32), autostart: false });
  await reconcile(state(1n, [a, b]), t.context.deps);
  // "Reboot": libvirt forgets ephemeral secrets and domains stop; the cache file survives.
  for (const uuid of [...t.context.libvirt.secretValues.keys()]) await t.context.libvirt.secrets.undefine(uuid);
  for (const name of t.context.libvirt.states.keys()) t.context.libvirt.states.set(name, 'shutoff');
  const cached = t.context.cache.lastDesired();
  t.truthy(cached);
  const { DesiredState: DS } = await import('../../shared/src/api.js');
  const desired = DS.decode(cached!);
  t.true(desired.guests.every((g) => g.volumes.every((v) => v.packet === undefined)), 'the cache keeps no packets');
  const r = await reconcile(desired, t.context.deps, true);
  const phases = Object.fromEntries(r.guests.map((g) => [g.guestId, g.phase]));
  t.is(phases[a.guestId], GuestPhase.GUEST_PHASE_RUNNING);
  t.is(phases[b.guestId], GuestPhase.GUEST_PHASE_DEFINED);
});

test('images are deleted only when asked, and never one a desired guest uses', async (t) => {
  const g = guest(t, { secret: randomBytes(32) });
  await reconcile(state(1n, [g]), t.context.deps);
  const path = imagePath(t.context.dir, g.volumes[0]!.volumeId, 'luks');
  const keepIt = await reconcile(state(2n, [g], [{ volumeId: g.volumes[0]!.volumeId, format: VolumeFormat.VOLUME_FORMAT_LUKS }]), t.context.deps);
  t.deepEqual(keepIt.deletedImages, []);
  t.true(t.context.images.files.has(path), 'in use: kept');
  const gone = await reconcile(state(3n, [], [{ volumeId: g.volumes[0]!.volumeId, format: VolumeFormat.VOLUME_FORMAT_LUKS }]), t.context.deps);
  t.deepEqual(gone.deletedImages, [g.volumes[0]!.volumeId]);
  t.false(t.context.images.files.has(path));
});

test('a key checked against an image header is not checked again while the header is the same', async (t) => {
  const secret = randomBytes(32);
  const g = guest(t, { secret });
  const path = imagePath(t.context.dir, g.volumes[0]!.volumeId, 'luks');
  t.context.images.files.set(path, { kind: 'luks1', key: secret, uuid: randomUUID() });
  t.context.libvirt.imageKeys.set(path, luksPassphrase(secret));
  await reconcile(state(1n, [g]), t.context.deps);
  t.is(t.context.images.keyTests, 1);
  await reconcile(state(1n, [g]), t.context.deps);
  t.is(t.context.images.keyTests, 1, 'same header: no second check');
  // Another image under the same path (a new header) is checked again, and refused.
  t.context.images.files.set(path, { kind: 'luks1', key: randomBytes(32), uuid: randomUUID() });
  const r = await reconcile(state(2n, [g]), t.context.deps);
  t.is(t.context.images.keyTests, 2);
  t.is(r.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_WRONG_KEY);
});

test('a running guest whose key is not here yet keeps running (pending); a failing disk stops it (failed)', async (t) => {
  const g = guest(t, { secret: randomBytes(32) });
  await reconcile(state(1n, [g]), t.context.deps);
  t.is(t.context.libvirt.states.get(g.name), 'running');
  // The cache is lost (a re-enrolled host) and the state comes without packets.
  t.context.cache.replace([]);
  const noKey = { ...g, volumes: g.volumes.map((v) => ({ ...v, packet: undefined })) };
  const r = await reconcile(state(2n, [noKey]), t.context.deps);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_PENDING);
  t.is(t.context.libvirt.states.get(g.name), 'running', 'QEMU still holds its key: no power cycle');
  // The image turns out not to open with the key: fail closed.
  t.context.images.files.set(imagePath(t.context.dir, g.volumes[0]!.volumeId, 'luks'), { kind: 'luks1', key: randomBytes(32), uuid: randomUUID() });
  const r2 = await reconcile(state(3n, [g]), t.context.deps);
  t.is(r2.guests[0]!.phase, GuestPhase.GUEST_PHASE_FAILED);
  t.is(t.context.libvirt.states.get(g.name), 'shutoff');
});

test('an image deletion leaves a file of an unexpected kind alone', async (t) => {
  const volumeId = randomUUID();
  const path = imagePath(t.context.dir, volumeId, 'luks');
  t.context.images.files.set(path, { kind: 'raw', key: Buffer.alloc(0) });
  const r = await reconcile(state(1n, [], [{ volumeId, format: VolumeFormat.VOLUME_FORMAT_LUKS }]), t.context.deps);
  t.deepEqual(r.deletedImages, []);
  t.true(t.context.images.files.has(path));
});

test('a raw volume whose guest made its disk look like LUKS or qcow2 still starts, and its image can be deleted', async (t) => {
  // A raw volume's bytes are the guest's: luksFormat on the whole disk gives it a LUKS
  // header. It must not be refused as "image is luks1, expected raw".
  for (const looksLike of ['luks1', 'luks2', 'qcow2'] as const) {
    const g = guest(t, { secret: Buffer.alloc(0), format: VolumeFormat.VOLUME_FORMAT_RAW });
    const v = g.volumes[0]!;
    g.volumes[0] = { ...v, keyVersion: 0, packet: undefined };
    const path = imagePath(t.context.dir, v.volumeId, 'raw');
    t.context.images.files.set(path, { kind: looksLike, key: Buffer.alloc(0) });
    const r = await reconcile(state(1n, [g]), t.context.deps);
    t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, `raw volume that looks like ${looksLike}: ${r.volumes[0]!.reason}`);
    t.is(t.context.libvirt.states.get(g.name), 'running');
    t.regex(t.context.libvirt.domainXml.get(g.name) ?? '', /<driver[^>]*type=["']raw["']/, 'the domain pins the format: QEMU does not probe');
    t.false(t.context.images.created.includes(path), 'nothing was created over it');
    // Deleted with its volume: the file is removed (it is what virtkm made there).
    const gone = await reconcile(state(2n, [], [{ volumeId: v.volumeId, format: VolumeFormat.VOLUME_FORMAT_RAW }]), t.context.deps);
    t.deepEqual(gone.deletedImages, [v.volumeId]);
    t.false(t.context.images.files.has(path));
  }
  // An encrypted format still refuses a file of another kind (never overwrite, never
  // hand a guest an encrypted image as plain bytes).
  const enc = guest(t, { secret: randomBytes(32) });
  t.context.images.files.set(imagePath(t.context.dir, enc.volumes[0]!.volumeId, 'luks'), { kind: 'qcow2', key: Buffer.alloc(0) });
  const r = await reconcile(state(3n, [enc]), t.context.deps);
  t.regex(r.volumes[0]!.reason, /image is qcow2, expected luks1/);
});

test("another agent's domains and secrets on the same libvirtd are left alone", async (t) => {
  const mine = guest(t, { secret: randomBytes(32) });
  await reconcile(state(1n, [mine]), t.context.deps);
  // A second agent (another host id) shares this libvirtd.
  const other = { ...t.context.deps, hostId: randomUUID() };
  const theirs = guest({ context: { ...t.context, hostId: other.hostId } }, { secret: randomBytes(32) });
  await reconcile(state(1n, [theirs]), other);
  t.is(t.context.libvirt.states.get(theirs.name), 'running');
  // This host's next pass (its desired state unchanged) must not wipe the other's guest.
  const r = await reconcile(state(2n, [mine]), t.context.deps);
  t.deepEqual(r.guests.map((g) => g.phase), [GuestPhase.GUEST_PHASE_RUNNING]);
  t.is(t.context.libvirt.states.get(theirs.name), 'running');
  t.is(t.context.libvirt.secretValues.size, 2);
});

test('dm-crypt: a mapping is open while its guest should run and closed once it stops', async (t) => {
  const open = new Set<string>();
  const calls: string[] = [];
  const dmcrypt: DmCryptPort = {
    unavailableReason: async () => undefined,
    open: async (_spec, name) => {
      calls.push(`open ${name}`);
      open.add(name);
      return `/dev/mapper/${name}`;
    },
    close: async (name) => {
      calls.push(`close ${name}`);
      open.delete(name);
    },
    list: async () => [...open],
  };
  const deps = { ...t.context.deps, dmcrypt };
  const g = guest(t, { secret: randomBytes(32), format: VolumeFormat.VOLUME_FORMAT_LUKS2 });
  const r = await reconcile(state(1n, [g]), deps);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r.guests[0]!.reason);
  t.regex(t.context.libvirt.domainXml.get(g.name)!, /<source dev="\/dev\/mapper\/virtkm-[0-9a-f-]+"\/>/);
  t.is(open.size, 1);
  const stop = { ...g, run: false, generation: 2n };
  const r2 = await reconcile(state(2n, [stop]), deps);
  t.is(r2.guests[0]!.phase, GuestPhase.GUEST_PHASE_STOPPED);
  t.is(open.size, 0, 'closed once the guest stopped');
  t.deepEqual(calls.map((c) => c.split(' ')[0]), ['open', 'close']);
  await reconcile(state(3n, []), deps);
  t.is(open.size, 0);
});

// --- Key rotation orders -------------------------------------------------------------------

/** A sealed key packet of one version of a volume for this host. */
function sealedPacket(t: { context: Ctx }, volumeId: string, keyVersion: number, secret: Buffer) {
  const packet = KeyPacket.encode({ type: 'virtkm.keypacket.v1', volumeId, keyVersion, hostId: t.context.hostId, mechanism: VolumeFormat.VOLUME_FORMAT_LUKS, cipher: undefined, sizeBytes: 1n << 30n, secret, issuedAt: '' }).finish();
  return { volumeId, keyVersion, sealed: Buffer.from(sealToRecipient(packet, boxRecipient(t.context.box.publicKey))) };
}

/** A fake mechanism that changes the fake image's key when `finish` is called. */
function fakeMechanism(t: { context: Ctx }, name: string) {
  const calls: { rotationId: string; newKey: Buffer }[] = [];
  let release: (() => void) | undefined;
  let failWith: Error | undefined;
  const mechanism = {
    name,
    async run(job: { rotationId: string; target: { path: string }; newKey?: Uint8Array }, hooks?: { onProgress?: (p: { step: string; bytesDone: bigint; bytesTotal: bigint; bytesPerSecond: number }) => void }) {
      calls.push({ rotationId: job.rotationId, newKey: Buffer.from(job.newKey!) });
      hooks?.onProgress?.({ step: 'copying', bytesDone: 1n, bytesTotal: 4n, bytesPerSecond: 10 });
      await new Promise<void>((r) => (release = r));
      if (failWith) throw failWith;
      const f = t.context.images.files.get(job.target.path)!;
      f.key = Buffer.from(job.newKey!);
      t.context.libvirt.imageKeys.set(job.target.path, luksPassphrase(job.newKey!));
      return { opensWith: 'new' as const, verified: true, bytesRewritten: 4n };
    },
  };
  return {
    mechanism,
    calls,
    finish: () => release?.(),
    fail: (e: Error) => {
      failWith = e;
      release?.();
    },
  };
}

async function withDriver(t: { context: Ctx }) {
  const { createRotationDriver } = await import('../../host-agent/src/rotate/driver.js');
  const live = fakeMechanism(t, 'live');
  const convert = fakeMechanism(t, 'convert');
  const other = fakeMechanism(t, 'other');
  const changes: number[] = [];
  const progress: unknown[] = [];
  const driver = createRotationDriver({
    mechanisms: { liveCopy: live.mechanism, qemuConvert: convert.mechanism, qemuRekey: other.mechanism, luks2Rekey: other.mechanism, luks2Reencrypt: other.mechanism, plainReencrypt: other.mechanism } as never,
    testKey: (spec, key) => t.context.images.testKey(spec.path, spec, key),
    onChange: () => changes.push(1),
    onProgress: (s) => progress.push(...s),
    logger: silentLogger,
    progressIntervalMs: 1,
    retryDelayMs: 0,
  });
  t.context.deps = { ...t.context.deps, rotations: driver };
  return { driver, live, convert, changes, progress };
}

const tick = () => new Promise((r) => setTimeout(r, 20));

test('a live rotation of a running guest: the job owns the disk and its secret until done; then the new version is used and both keys are cached until the server confirms', async (t) => {
  const { live, changes, progress } = await withDriver(t);
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const g = guest(t, { secret: oldKey });
  const vid = g.volumes[0]!.volumeId;
  const r0 = await reconcile(state(1n, [g]), t.context.deps);
  t.is(r0.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING);
  const xmlBefore = t.context.libvirt.domainXml.get(g.name)!;

  const ordered: DesiredGuest = { ...g, volumes: [{ ...g.volumes[0]!, rotation: { rotationId: 'rot-1', kind: RotationKind.ROTATION_KIND_REENCRYPT, targetVersion: 2, targetPacket: sealedPacket(t, vid, 2, newKey), targetFormat: 0 } }] };
  const r1 = await reconcile(state(2n, [ordered]), t.context.deps);
  t.is(live.calls.length, 1, 'a running guest gets the live mechanism');
  t.true(live.calls[0]!.newKey.equals(newKey));
  t.is(r1.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_RUNNING);
  t.is(r1.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, 'the guest keeps running');
  t.is(t.context.libvirt.domainXml.get(g.name), xmlBefore, 'the domain is left alone while the copy runs');
  await tick();
  t.true(progress.length > 0, 'progress is pushed between reports');

  live.finish();
  await tick();
  t.true(changes.length > 0, 'a finished job asks for a new pass');
  const r2 = await reconcile(state(2n, [ordered]), t.context.deps);
  t.is(r2.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_DONE);
  t.is(r2.volumes[0]!.keyVersion, 2);
  t.is(r2.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_READY);
  t.is(r2.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING);
  const xmlAfter = t.context.libvirt.domainXml.get(g.name)!;
  t.not(xmlAfter, xmlBefore, 'the definition names the new version secret');
  t.true([...t.context.libvirt.secretValues.values()].some((v) => v.equals(luksPassphrase(newKey))));
  t.truthy(t.context.cache.get(vid, 1), 'the old key stays cached until the server confirms');
  t.truthy(t.context.cache.get(vid, 2));
  t.is(live.calls.length, 1, 'a done job is not run again');

  // The server confirmed: version 2 is active, no order.
  const confirmed: DesiredGuest = { ...g, generation: 2n, volumes: [{ ...g.volumes[0]!, keyVersion: 2, packet: sealedPacket(t, vid, 2, newKey), rotation: undefined }] };
  const r3 = await reconcile(state(3n, [confirmed]), t.context.deps);
  t.is(r3.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_READY);
  t.deepEqual(r3.rotations, []);
  t.is(t.context.cache.get(vid, 1), undefined, 'the old key left the cache');
});

test('an offline rotation keeps a stopped guest stopped until it ends; a failure keeps the old key in use and is reported', async (t) => {
  const { convert } = await withDriver(t);
  const oldKey = randomBytes(32);
  const g = guest(t, { secret: oldKey, run: false });
  const vid = g.volumes[0]!.volumeId;
  await reconcile(state(1n, [g]), t.context.deps);
  const order = (id: string, v: number) => ({ rotationId: id, kind: RotationKind.ROTATION_KIND_REENCRYPT, targetVersion: v, targetPacket: sealedPacket(t, vid, v, randomBytes(32)), targetFormat: 0 });
  const running: DesiredGuest = { ...g, run: true, volumes: [{ ...g.volumes[0]!, rotation: order('rot-2', 2) }] };
  const r1 = await reconcile(state(2n, [running]), t.context.deps);
  t.is(convert.calls.length, 1, 'a stopped guest gets the offline mechanism');
  t.is(r1.guests[0]!.phase, GuestPhase.GUEST_PHASE_PENDING, r1.guests[0]!.reason);
  t.regex(r1.guests[0]!.reason, /key rotation in progress/);
  t.not(await t.context.libvirt.domains.state(g.name), 'running');

  const { errors } = await import('../../shared/src/errors.js');
  convert.fail(errors.tooLarge('not enough free space for the copy'));
  await tick();
  const r2 = await reconcile(state(2n, [running]), t.context.deps);
  t.is(r2.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_FAILED);
  t.regex(r2.rotations[0]!.reason, /free space/);
  t.is(r2.volumes[0]!.keyVersion, 1);
  t.is(r2.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, 'the guest starts with the old key');
});
