/**
 * The reconciler and a volume's dm-crypt mapping while a LUKS2 re-encryption runs, against
 * fakes of libvirt, the image tools, dm-crypt and the keyring (as in
 * reconciler-keyring.test.ts) and the real rotation driver with fake mechanisms (as in
 * reconciler.test.ts). Every dm-crypt call, domain start and stop and mechanism run goes
 * into one ordered list of events, and each mechanism run records whether the volume's
 * mapping was open when it began:
 *   - a running guest's order runs online (luks2-online.ts) through the open mapping, which
 *     no pass closes until the job is done, and the guest keeps running;
 *   - a stopped guest's order runs offline on the image file: the guest does not start and
 *     no mapping of the volume is opened until it is done;
 *   - an offline job never starts while a mapping of the volume is still open (the guest
 *     shut down by itself, or closing the mapping failed): `cryptsetup reencrypt
 *     --force-offline-reencrypt` must not rewrite an image under a live mapping.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GuestPhase, KeyPacket, RotationKind, RotationPhase, VolumeFormat, VolumePhase, type DesiredGuest, type DesiredState } from '../../shared/src/api.js';
import { boxRecipient, generateBoxKeyPair, sealToRecipient, type BoxKeyPair } from '../../shared/src/box.js';
import { generateWrappingKey } from '../../shared/src/envelope.js';
import { silentLogger } from '../../shared/src/log.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { openKeyCache, type KeyCache } from '../../host-agent/src/cache/key-cache.js';
import { reconcile, type ReconcilerDeps } from '../../host-agent/src/reconcile/reconciler.js';
import type { DmCryptPort, ImageInfo, ImagePort } from '../../host-agent/src/reconcile/ports.js';
import { createRotationDriver } from '../../host-agent/src/rotate/driver.js';
import type { RotationMechanism } from '../../host-agent/src/rotate/types.js';
import { createFakeLibvirt, type FakeLibvirt } from '../fakes/fake-libvirt.js';
import { createFakeKeyring, type FakeKeyring } from '../fakes/fake-keyring.js';

interface Ctx {
  dir: string;
  box: BoxKeyPair;
  hostId: string;
  libvirt: FakeLibvirt;
  files: Map<string, { kind: ImageInfo['kind']; key: Buffer; uuid: string }>;
  keyring: FakeKeyring;
  cache: KeyCache;
  /** Open mappings: name -> the key description dm-crypt was given. */
  mappings: Map<string, string | undefined>;
  /** dm-crypt calls, domain starts and stops, mechanism runs: in order. */
  events: string[];
  /** Mappings whose close fails (as `cryptsetup close` of a busy device does). */
  failClose: Set<string>;
  deps: ReconcilerDeps;
}
const test = anyTest as TestFn<Ctx>;

test.before(async () => {
  await loadSodium();
});

test.beforeEach((t) => {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-reconcile-dm-rotation-'));
  const box = generateBoxKeyPair();
  const hostId = randomUUID();
  const events: string[] = [];
  const libvirt = createFakeLibvirt();
  const { start, destroy } = libvirt.domains;
  libvirt.domains.start = async (name) => {
    events.push(`start ${name}`);
    return start(name);
  };
  libvirt.domains.destroy = async (name) => {
    events.push(`destroy ${name}`);
    return destroy(name);
  };
  const files: Ctx['files'] = new Map();
  const images: ImagePort = {
    async create(spec, secret) {
      files.set(spec.path, { kind: spec.format === 'luks2' ? 'luks2' : 'raw', key: Buffer.from(secret), uuid: randomUUID() });
    },
    async inspect(path) {
      const f = files.get(path);
      return f ? { exists: true, kind: f.kind, uuid: f.uuid } : { exists: false, kind: 'missing' };
    },
    async remove(path) {
      files.delete(path);
    },
    async testKey(path, _spec, secret) {
      return files.get(path)?.key.equals(Buffer.from(secret)) ?? false;
    },
  };
  const mappings = new Map<string, string | undefined>();
  const failClose = new Set<string>();
  const dmcrypt: DmCryptPort = {
    unavailableReason: async () => undefined,
    // As the real mapper: opening a mapping that is already there (over the same image)
    // changes nothing.
    open: async (_spec, name, _secret, keyDescription) => {
      events.push(`open ${name}`);
      if (!mappings.has(name)) mappings.set(name, keyDescription);
      return `/dev/mapper/${name}`;
    },
    close: async (name) => {
      events.push(`close ${name}`);
      if (failClose.has(name)) throw new Error(`cryptsetup close ${name}: device busy`);
      mappings.delete(name);
    },
    list: async () => [...mappings.keys()],
  };
  const keyring = createFakeKeyring();
  const cache = openKeyCache(join(dir, 'cache'), generateWrappingKey(), hostId);
  t.context = {
    dir,
    box,
    hostId,
    libvirt,
    files,
    keyring,
    cache,
    mappings,
    events,
    failClose,
    deps: { hostId, box, libvirt, images, dmcrypt, keyring, cache, imageDir: dir, logger: silentLogger },
  };
});

test.afterEach.always(async (t) => {
  await t.context.deps.rotations?.stop();
  t.context.cache.close();
  rmSync(t.context.dir, { recursive: true, force: true });
});

/** A sealed key packet of one version of a volume for this host. */
function sealedPacket(t: { context: Ctx }, volumeId: string, keyVersion: number, secret: Buffer) {
  const packet = KeyPacket.encode({ type: 'virtkm.keypacket.v1', volumeId, keyVersion, hostId: t.context.hostId, mechanism: VolumeFormat.VOLUME_FORMAT_LUKS2, cipher: undefined, sizeBytes: 1n << 30n, secret, issuedAt: '' }).finish();
  return { volumeId, keyVersion, sealed: Buffer.from(sealToRecipient(packet, boxRecipient(t.context.box.publicKey))) };
}

/** A desired guest with one luks2 volume at key version 1. */
function guest(t: { context: Ctx }, secret: Buffer, run: boolean): DesiredGuest {
  const volumeId = randomUUID();
  const name = `g-${volumeId.slice(0, 8)}`;
  return {
    guestId: randomUUID(),
    name,
    domainXml: `<domain type='kvm'><name>${name}</name><memory unit='MiB'>64</memory><devices><disk type='volume' device='disk'><source pool='virtkm' volume='vol-${volumeId.slice(0, 8)}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
    autostart: true,
    generation: 1n,
    run,
    volumes: [
      {
        volumeId,
        name: `vol-${volumeId.slice(0, 8)}`,
        format: VolumeFormat.VOLUME_FORMAT_LUKS2,
        cipher: { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 },
        sizeBytes: 1n << 30n,
        keyVersion: 1,
        packet: sealedPacket(t, volumeId, 1, secret),
        mayCreate: true,
        rotation: undefined,
      },
    ],
  };
}

/** `g` with a re-encryption order to version 2 under `newKey`. */
function ordered(t: { context: Ctx }, g: DesiredGuest, rotationId: string, newKey: Buffer, run = g.run): DesiredGuest {
  const v = g.volumes[0]!;
  return { ...g, run, volumes: [{ ...v, rotation: { rotationId, kind: RotationKind.ROTATION_KIND_REENCRYPT, targetVersion: 2, targetPacket: sealedPacket(t, v.volumeId, 2, newKey), targetFormat: 0 } }] };
}

const state = (revision: bigint, guests: DesiredGuest[]): DesiredState => ({ revision, guests, issuedAt: '', deleteImages: [] });
const mapOf = (g: DesiredGuest) => `virtkm-${g.volumes[0]!.volumeId}`;
const descOf = (g: DesiredGuest, v: number) => `virtkm:${g.volumes[0]!.volumeId}:v${v}`;
const tick = () => new Promise((r) => setTimeout(r, 20));

/**
 * A fake mechanism: it records each run, with whether the volume's mapping was open when
 * it began, and gives the fake image the new key when `finish` is called.
 */
function fakeMechanism(t: { context: Ctx }, name: string) {
  const runs: { volumeId: string; mappedAtStart: boolean }[] = [];
  let release: (() => void) | undefined;
  const mechanism: RotationMechanism = {
    name,
    async run(job, hooks) {
      const mapping = `virtkm-${job.volumeId}`;
      t.context.events.push(`run ${name}`);
      runs.push({ volumeId: job.volumeId, mappedAtStart: t.context.mappings.has(mapping) });
      hooks?.onProgress?.({ step: 'reencrypting', bytesDone: 1n, bytesTotal: 4n, bytesPerSecond: 10 });
      // Until `finish`, or until the driver aborts the job (its stop() at the end of a test).
      await new Promise<void>((r) => {
        release = r;
        hooks?.signal?.addEventListener('abort', () => r(), { once: true });
      });
      if (hooks?.signal?.aborted) throw new Error('aborted');
      t.context.files.get(job.target.path)!.key = Buffer.from(job.newKey!);
      return { opensWith: 'new', verified: false, bytesRewritten: 4n };
    },
  };
  return { mechanism, runs, finish: () => release?.() };
}

/** The real rotation driver with fake mechanisms: luks2Online and luks2Reencrypt (offline) are watched. */
function withDriver(t: { context: Ctx }) {
  const online = fakeMechanism(t, 'luks2-online');
  const offline = fakeMechanism(t, 'luks2-offline');
  const other = fakeMechanism(t, 'other');
  const driver = createRotationDriver({
    mechanisms: { qemuRekey: other.mechanism, qemuConvert: other.mechanism, liveCopy: other.mechanism, luks2Rekey: other.mechanism, luks2Reencrypt: offline.mechanism, luks2Online: online.mechanism, plainReencrypt: other.mechanism },
    testKey: (spec, key) => t.context.deps.images.testKey(spec.path, spec, key),
    onChange: () => undefined,
    onProgress: () => undefined,
    logger: silentLogger,
    progressIntervalMs: 1,
    retryDelayMs: 0,
  });
  t.context.deps = { ...t.context.deps, rotations: driver };
  return { online, offline, other };
}

test("a running guest's re-encryption runs online: its mapping stays open and the guest runs throughout; then the new version is used", async (t) => {
  const { online, offline } = withDriver(t);
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const g = guest(t, oldKey, true);
  const r0 = await reconcile(state(1n, [g]), t.context.deps);
  t.is(r0.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r0.guests[0]!.reason);
  t.true(t.context.mappings.has(mapOf(g)));
  const xmlBefore = t.context.libvirt.domainXml.get(g.name)!;
  const since = t.context.events.length;

  const o = ordered(t, g, 'rot-online', newKey);
  for (let pass = 0; pass < 3; pass++) {
    const r = await reconcile(state(2n, [o]), t.context.deps);
    t.is(r.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_RUNNING, `pass ${pass}`);
    t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r.guests[0]!.reason);
    t.is(r.volumes[0]!.keyVersion, 1, 'the active version until the job is done');
    t.true(t.context.mappings.has(mapOf(g)), `pass ${pass}: the mapping the job re-encrypts through stays open`);
    t.is(t.context.libvirt.states.get(g.name), 'running');
    t.is(t.context.libvirt.domainXml.get(g.name), xmlBefore, 'the domain is left alone while the job runs');
    await tick();
  }
  t.is(online.runs.length, 1, 'one online job, not restarted by later passes');
  t.true(online.runs[0]!.mappedAtStart, 'the online job starts on the open mapping');
  t.is(offline.runs.length, 0, 'no offline re-encryption of a running guest');
  t.false(t.context.events.includes(`close ${mapOf(g)}`), 'no pass closed the mapping while the job ran');
  t.false(t.context.events.some((e) => e.startsWith('destroy')), 'the guest was never stopped');

  online.finish();
  await tick();
  const r = await reconcile(state(2n, [o]), t.context.deps);
  t.is(r.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_DONE);
  t.is(r.volumes[0]!.keyVersion, 2, 'the volume is reported at the new version');
  t.is(r.volumes[0]!.phase, VolumePhase.VOLUME_PHASE_READY, r.volumes[0]!.reason);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r.guests[0]!.reason);
  t.is(t.context.libvirt.states.get(g.name), 'running');
  t.true(t.context.mappings.has(mapOf(g)), 'the mapping is still open after the job');
  t.false(t.context.events.includes(`close ${mapOf(g)}`));
  t.false(t.context.events.slice(since).some((e) => e.startsWith('destroy') || e.startsWith('start ')), 'no power cycle: the guest kept running');
  t.regex(t.context.libvirt.domainXml.get(g.name)!, new RegExp(`<source dev="/dev/mapper/${mapOf(g)}"/>`), 'the redefined domain still uses the mapping');
  // The new version's key is the one in use: the agent keyring holds it, the old one is gone.
  t.true(t.context.keyring.keys.get(descOf(g, 2))?.equals(newKey), "the new version's key is loaded");
  t.false(t.context.keyring.keys.has(descOf(g, 1)), "the old version's key was unlinked");
  t.truthy(t.context.cache.get(g.volumes[0]!.volumeId, 1), 'the old key stays cached until the server confirms');
});

test("a stopped guest's re-encryption runs offline: the guest does not start and no mapping is opened until it is done", async (t) => {
  const { online, offline } = withDriver(t);
  const newKey = randomBytes(32);
  const g = guest(t, randomBytes(32), false);
  await reconcile(state(1n, [g]), t.context.deps);
  t.is(t.context.libvirt.states.get(g.name), 'shutoff');
  t.is(t.context.mappings.size, 0, 'a stopped guest has no mapping');

  // The order comes with run=true: the guest must wait for the job.
  const o = ordered(t, g, 'rot-offline', newKey, true);
  for (let pass = 0; pass < 3; pass++) {
    const r = await reconcile(state(2n, [o]), t.context.deps);
    t.is(r.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_RUNNING, `pass ${pass}`);
    t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_PENDING, r.guests[0]!.reason);
    t.regex(r.guests[0]!.reason, /key rotation in progress/);
    t.not(t.context.libvirt.states.get(g.name), 'running');
    t.is(t.context.mappings.size, 0, `pass ${pass}: no mapping while the image is rewritten`);
    await tick();
  }
  t.is(offline.runs.length, 1);
  t.false(offline.runs[0]!.mappedAtStart);
  t.is(online.runs.length, 0);
  t.false(t.context.events.some((e) => e.startsWith('open ') || e.startsWith('start ')), 'neither opened nor started while the job ran');

  offline.finish();
  await tick();
  const r = await reconcile(state(2n, [o]), t.context.deps);
  t.is(r.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_DONE);
  t.is(r.volumes[0]!.keyVersion, 2);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r.guests[0]!.reason);
  t.is(t.context.mappings.get(mapOf(g)), descOf(g, 2), 'opened once done, with the new version key');
  const ev = t.context.events;
  t.true(ev.indexOf('run luks2-offline') < ev.indexOf(`open ${mapOf(g)}`));
  t.true(ev.indexOf(`open ${mapOf(g)}`) < ev.indexOf(`start ${g.name}`));
});

test('an offline re-encryption never starts while the volume mapping of a guest that shut down by itself is still open', async (t) => {
  const { online, offline } = withDriver(t);
  const newKey = randomBytes(32);
  const g = guest(t, randomBytes(32), true);
  await reconcile(state(1n, [g]), t.context.deps);
  t.true(t.context.mappings.has(mapOf(g)));
  // The guest powers off from inside: libvirt says shutoff, the agent's mapping is still open.
  t.context.libvirt.states.set(g.name, 'shutoff');
  t.context.libvirt.liveDisks.delete(g.name);

  const o = ordered(t, g, 'rot-hazard', newKey);
  const r1 = await reconcile(state(2n, [o]), t.context.deps);
  t.log('events:', t.context.events.join(', '));
  t.is(online.runs.length, 0, 'the guest is stopped: not online');
  // The hazard: the job started in planRotations, before this pass's clean-up closed the mapping.
  t.true(offline.runs.every((x) => !x.mappedAtStart), 'the offline re-encryption started over an open mapping');
  t.is(offline.runs.length, 0, 'no job starts in a pass that finds the mapping open');
  t.is(r1.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_WAITING);
  t.regex(r1.rotations[0]!.reason, /mapping is still open/);
  t.not(t.context.libvirt.states.get(g.name), 'running', 'the guest is not started again meanwhile');
  t.false(t.context.mappings.has(mapOf(g)), 'the mapping was closed at the end of the pass');

  // The next pass (the agent's resync) starts the job, after the close.
  const r2 = await reconcile(state(2n, [o]), t.context.deps);
  t.is(r2.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_RUNNING);
  t.is(offline.runs.length, 1);
  t.false(offline.runs[0]!.mappedAtStart);
  const ev = t.context.events;
  t.true(ev.lastIndexOf(`close ${mapOf(g)}`) < ev.indexOf('run luks2-offline'), 'closed before the run started');
  t.false(ev.slice(ev.indexOf('run luks2-offline')).some((e) => e.startsWith('open ') || e.startsWith('start ')));

  offline.finish();
  await tick();
  const r3 = await reconcile(state(2n, [o]), t.context.deps);
  t.is(r3.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_DONE);
  t.is(r3.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r3.guests[0]!.reason);
  t.is(t.context.mappings.get(mapOf(g)), descOf(g, 2));
});

test('an offline re-encryption waits while closing a stopped guest mapping fails, and starts once it is closed', async (t) => {
  const { offline } = withDriver(t);
  const g = guest(t, randomBytes(32), true);
  await reconcile(state(1n, [g]), t.context.deps);
  // Stopped by the admin; closing the mapping fails (e.g. a device still busy).
  t.context.failClose.add(mapOf(g));
  const stopped = { ...g, run: false, generation: 2n };
  await reconcile(state(2n, [stopped]), t.context.deps);
  t.is(t.context.libvirt.states.get(g.name), 'shutoff');
  t.true(t.context.mappings.has(mapOf(g)), 'the close failed');

  const o = ordered(t, stopped, 'rot-busy-close', randomBytes(32));
  for (let pass = 0; pass < 2; pass++) {
    const r = await reconcile(state(3n, [o]), t.context.deps);
    t.is(r.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_WAITING, `pass ${pass}`);
    t.regex(r.rotations[0]!.reason, /mapping is still open/);
  }
  t.is(offline.runs.length, 0, 'nothing rewrites the image while its mapping is open');

  t.context.failClose.clear();
  await reconcile(state(3n, [o]), t.context.deps); // closes it at the end
  t.false(t.context.mappings.has(mapOf(g)));
  const r = await reconcile(state(3n, [o]), t.context.deps);
  t.is(r.rotations[0]!.phase, RotationPhase.ROTATION_PHASE_RUNNING);
  t.is(offline.runs.length, 1);
  t.false(offline.runs[0]!.mappedAtStart);
});

test('a guest stopped in the same pass as its order arrives: planning sees it running, so no offline job starts over its mapping', async (t) => {
  const { online, offline } = withDriver(t);
  const g = guest(t, randomBytes(32), true);
  await reconcile(state(1n, [g]), t.context.deps);
  const o = ordered(t, { ...g, generation: 2n }, 'rot-same-pass', randomBytes(32), false);
  await reconcile(state(2n, [o]), t.context.deps);
  t.log('events:', t.context.events.join(', '));
  t.is(offline.runs.length, 0, 'no offline job in the pass that found the guest running');
  t.is(online.runs.length, 1, 'the job planned for the running guest is the online one');
  t.true(online.runs[0]!.mappedAtStart);
  t.true(t.context.mappings.has(mapOf(g)), 'its mapping stays open while the online job runs');
});
