/**
 * The reconciler and the agent's kernel keyring, against fakes of libvirt, the image tools,
 * dm-crypt and the keyring (test/fakes/fake-keyring.ts; the real keyring is covered by
 * test/integration/keyring.test.ts): the key of each open dm-crypt mapping is loaded and
 * handed to dm-crypt by reference, and unlinked once the mapping is closed (guest stopped
 * or wiped).
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GuestPhase, KeyPacket, VolumeFormat, type DesiredGuest, type DesiredState } from '../../shared/src/api.js';
import { boxRecipient, generateBoxKeyPair, sealToRecipient } from '../../shared/src/box.js';
import { generateWrappingKey } from '../../shared/src/envelope.js';
import { silentLogger } from '../../shared/src/log.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { openKeyCache } from '../../host-agent/src/cache/key-cache.js';
import { reconcile, type ReconcilerDeps } from '../../host-agent/src/reconcile/reconciler.js';
import type { DmCryptPort, ImageInfo, ImagePort } from '../../host-agent/src/reconcile/ports.js';
import { createFakeLibvirt } from '../fakes/fake-libvirt.js';
import { createFakeKeyring, type FakeKeyring } from '../fakes/fake-keyring.js';

interface Ctx {
  dir: string;
  deps: ReconcilerDeps;
  keyring: FakeKeyring;
  /** Open mappings: name -> the key description dm-crypt was given. */
  mappings: Map<string, string | undefined>;
  /** Every dm-crypt and keyring call, in order. */
  calls: string[];
  failOpen: Set<string>;
  close: () => void;
}
const test = anyTest as TestFn<Ctx>;

test.before(async () => {
  await loadSodium();
});

test.beforeEach((t) => {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-reconcile-keyring-'));
  const box = generateBoxKeyPair();
  const hostId = randomUUID();
  const libvirt = createFakeLibvirt();
  const files = new Map<string, { kind: ImageInfo['kind']; key: Buffer }>();
  const images: ImagePort = {
    async create(spec, secret) {
      files.set(spec.path, { kind: spec.format === 'luks2' ? 'luks2' : 'raw', key: Buffer.from(secret) });
    },
    async inspect(path) {
      const f = files.get(path);
      return f ? { exists: true, kind: f.kind } : { exists: false, kind: 'missing' };
    },
    async remove(path) {
      files.delete(path);
    },
    async testKey(path, _spec, secret) {
      return files.get(path)?.key.equals(Buffer.from(secret)) ?? false;
    },
  };
  const keyring = createFakeKeyring();
  const calls: string[] = [];
  const mappings = new Map<string, string | undefined>();
  const failOpen = new Set<string>();
  // The keyring's calls go into the same ordered list as dm-crypt's.
  const recordedKeyring = {
    load: (volumeId: string, keyVersion: number, secret: Uint8Array) => {
      const d = keyring.load(volumeId, keyVersion, secret);
      calls.push(`load ${String(d)}`);
      return d;
    },
    retain: (keep: ReadonlySet<string>) => {
      const dropped = keyring.retain(keep);
      for (const d of dropped) calls.push(`unlink ${d}`);
      return dropped;
    },
  };
  const dmcrypt: DmCryptPort = {
    unavailableReason: async () => undefined,
    open: async (_spec, name, _secret, keyDescription) => {
      calls.push(`open ${name}`);
      if (failOpen.has(name)) throw new Error('dmsetup failed');
      mappings.set(name, keyDescription);
      return `/dev/mapper/${name}`;
    },
    close: async (name) => {
      calls.push(`close ${name}`);
      mappings.delete(name);
    },
    list: async () => [...mappings.keys()],
  };
  const cache = openKeyCache(join(dir, 'cache'), generateWrappingKey(), hostId);
  t.context = {
    dir,
    keyring,
    mappings,
    calls,
    failOpen,
    close: () => cache.close(),
    deps: { hostId, box, libvirt, images, dmcrypt, keyring: recordedKeyring, cache, imageDir: dir, logger: silentLogger },
  };
});

test.afterEach.always((t) => {
  t.context.close();
  rmSync(t.context.dir, { recursive: true, force: true });
});

/** A desired guest with one dm-crypt volume whose packet is sealed to this host. */
function guest(t: { context: Ctx }, format: VolumeFormat, secret: Buffer, o: { run?: boolean; generation?: bigint; guestId?: string; volumeId?: string } = {}): DesiredGuest {
  const volumeId = o.volumeId ?? randomUUID();
  const packet = KeyPacket.encode({ type: 'virtkm.keypacket.v1', volumeId, keyVersion: 1, hostId: t.context.deps.hostId, mechanism: format, cipher: undefined, sizeBytes: 1n << 30n, secret, issuedAt: '' }).finish();
  const name = `g-${volumeId.slice(0, 8)}`;
  return {
    guestId: o.guestId ?? randomUUID(),
    name,
    domainXml: `<domain type='kvm'><name>${name}</name><memory unit='MiB'>64</memory><devices><disk type='volume' device='disk'><source pool='virtkm' volume='vol-${volumeId.slice(0, 8)}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
    autostart: true,
    generation: o.generation ?? 1n,
    run: o.run ?? true,
    volumes: [
      {
        volumeId,
        name: `vol-${volumeId.slice(0, 8)}`,
        format,
        cipher: { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 },
        sizeBytes: 1n << 30n,
        keyVersion: 1,
        packet: { volumeId, keyVersion: 1, sealed: Buffer.from(sealToRecipient(packet, boxRecipient(t.context.deps.box.publicKey))) },
        mayCreate: true,
        rotation: undefined,
      },
    ],
  };
}
const state = (revision: bigint, guests: DesiredGuest[]): DesiredState => ({ revision, guests, issuedAt: '', deleteImages: [] });
const descOf = (g: DesiredGuest) => `virtkm:${g.volumes[0]!.volumeId}:v1`;
const mapOf = (g: DesiredGuest) => `virtkm-${g.volumes[0]!.volumeId}`;

test('each open dm-crypt mapping has its key in the keyring, handed to dm-crypt by reference', async (t) => {
  const plainKey = randomBytes(64);
  const luksKey = randomBytes(32);
  const plain = guest(t, VolumeFormat.VOLUME_FORMAT_PLAIN, plainKey);
  const luks2 = guest(t, VolumeFormat.VOLUME_FORMAT_LUKS2, luksKey);
  const r = await reconcile(state(1n, [plain, luks2]), t.context.deps);
  t.deepEqual(r.guests.map((g) => g.phase), [GuestPhase.GUEST_PHASE_RUNNING, GuestPhase.GUEST_PHASE_RUNNING], r.guests.map((g) => g.reason).join('; '));
  t.deepEqual([...t.context.keyring.keys.keys()].sort(), [descOf(plain), descOf(luks2)].sort());
  t.true(t.context.keyring.keys.get(descOf(plain))!.equals(plainKey), 'the keyring holds the volume key itself');
  t.true(t.context.keyring.keys.get(descOf(luks2))!.equals(luksKey));
  t.is(t.context.mappings.get(mapOf(plain)), descOf(plain), 'dm-crypt got the key description');
  t.is(t.context.mappings.get(mapOf(luks2)), descOf(luks2));
  // Loaded right before its mapping is opened.
  const i = t.context.calls.indexOf(`load ${descOf(plain)}`);
  t.is(t.context.calls[i + 1], `open ${mapOf(plain)}`);

  // The same state again: keys stay, nothing is unlinked.
  await reconcile(state(1n, [plain, luks2]), t.context.deps);
  t.false(t.context.calls.some((c) => c.startsWith('unlink')));
  t.is(t.context.keyring.keys.size, 2);
});

test('a stopped guest loses its mapping and its key; a wiped guest too, the key after the mapping', async (t) => {
  const a = guest(t, VolumeFormat.VOLUME_FORMAT_PLAIN, randomBytes(64));
  const b = guest(t, VolumeFormat.VOLUME_FORMAT_LUKS2, randomBytes(32));
  await reconcile(state(1n, [a, b]), t.context.deps);
  t.is(t.context.keyring.keys.size, 2);

  const stopped = { ...a, run: false, generation: 2n };
  const r2 = await reconcile(state(2n, [stopped, b]), t.context.deps);
  t.is(r2.guests[0]!.phase, GuestPhase.GUEST_PHASE_STOPPED);
  t.false(t.context.mappings.has(mapOf(a)));
  t.deepEqual([...t.context.keyring.keys.keys()], [descOf(b)], 'the stopped guest key was unlinked');

  // b is wiped (no longer desired): domain undefined, mapping closed, key unlinked.
  const before = t.context.calls.length;
  const r3 = await reconcile(state(3n, [stopped]), t.context.deps);
  t.true(r3.guests.some((g) => g.guestId === b.guestId && g.phase === GuestPhase.GUEST_PHASE_WIPED));
  t.is(t.context.keyring.keys.size, 0, 'no key left in the keyring');
  t.deepEqual(t.context.calls.slice(before), [`close ${mapOf(b)}`, `unlink ${descOf(b)}`]);
});

test('a key whose mapping fails to open does not stay in the keyring', async (t) => {
  const a = guest(t, VolumeFormat.VOLUME_FORMAT_PLAIN, randomBytes(64));
  t.context.failOpen.add(mapOf(a));
  const r = await reconcile(state(1n, [a]), t.context.deps);
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_FAILED);
  t.true(t.context.calls.includes(`load ${descOf(a)}`));
  t.is(t.context.keyring.keys.size, 0, 'unlinked at the end of the pass');
});

test('without a usable keyring (or without one at all) mappings still open, with the key on stdin', async (t) => {
  const failing = createFakeKeyring({ failLoad: true });
  const a = guest(t, VolumeFormat.VOLUME_FORMAT_PLAIN, randomBytes(64));
  const r = await reconcile(state(1n, [a]), { ...t.context.deps, keyring: failing });
  t.is(r.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING);
  t.true(t.context.mappings.has(mapOf(a)));
  t.is(t.context.mappings.get(mapOf(a)), undefined, 'no key description: the mapper uses stdin');

  const { keyring: _unused, ...noKeyring } = t.context.deps;
  const b = guest(t, VolumeFormat.VOLUME_FORMAT_PLAIN, randomBytes(64));
  const r2 = await reconcile(state(2n, [a, b]), noKeyring);
  t.deepEqual(r2.guests.map((g) => g.phase), [GuestPhase.GUEST_PHASE_RUNNING, GuestPhase.GUEST_PHASE_RUNNING]);
  t.is(t.context.mappings.get(mapOf(b)), undefined);
});
