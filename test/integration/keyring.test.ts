/**
 * The agent's kernel keyring (shared/src/keyring.ts) against the real kernel keyring:
 * logon keys listed in /proc/keys and unreadable from user space, possessed by the
 * agent's children and by no one else, unlinked by unlink/retain and by the reconciler's
 * wipe path; and the dm-crypt mapper naming such a key in a plain mapping's table instead
 * of the key (argv checked against a fake device-mapper; the real mapping needs
 * device-mapper, which these machines lack, and skips visibly).
 *
 * The test process joins a private session keyring once (as the agent does); tests are
 * serial and each uses a keyring of its own name.
 */
import anyTest, { type TestFn } from 'ava';
import { spawnSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { GuestPhase, KeyPacket, VolumeFormat, type DesiredGuest, type DesiredState } from '../../shared/src/api.js';
import { boxRecipient, generateBoxKeyPair, sealToRecipient } from '../../shared/src/box.js';
import { generateWrappingKey } from '../../shared/src/envelope.js';
import { isDomainError } from '../../shared/src/errors.js';
import {
  KEY_SPEC,
  KeyctlError,
  VOLUME_KEY_PERM,
  createVolumeKeyring,
  describeKey,
  keyringUnavailableReason,
  openVolumeKeyring,
  readKey,
  searchKey,
  volumeKeyDescription,
} from '../../shared/src/keyring.js';
import { createLogger, silentLogger } from '../../shared/src/log.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { openKeyCache } from '../../host-agent/src/cache/key-cache.js';
import { createDmCryptMapper } from '../../host-agent/src/images/dm-crypt.js';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import { reconcile } from '../../host-agent/src/reconcile/reconciler.js';
import type { DmCryptPort, ImageInfo, ImagePort } from '../../host-agent/src/reconcile/ports.js';
import { createFakeLibvirt } from '../fakes/fake-libvirt.js';
import { ensureDebianPackages } from '../helpers/debian-packages.js';
import { domainRejection, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';

const test = anyTest as TestFn<{ dir: string }>;

/** keyctl (and libkeyutils1, which it depends on) installed when missing; decided once. */
const skipReason = ensureDebianPackages(['keyutils', 'libkeyutils1'], ['keyctl']) ?? keyringUnavailableReason();
const keyringTest = skipReason ? test.skip : test.serial;
const skipNote = skipReason ? ` [skipped: ${skipReason}]` : '';
if (skipReason) {
  test('kernel keyring tests are skipped here', (t) => {
    t.log(`SKIPPED: ${skipReason}`);
    t.pass();
  });
}

const mapper = createDmCryptMapper();
const dmMissingReason = await mapper.unavailableReason();
const realDmTest = dmMissingReason || skipReason ? test.skip : test.serial;
const dmSkipNote = dmMissingReason ? ' [skipped: no device-mapper in this kernel]' : skipNote;

test.before(async () => {
  await loadSodium();
});

test.beforeEach(async (t) => {
  t.context.dir = await tempDir();
});

test.afterEach.always(async (t) => {
  await removeDir(t.context.dir);
});

/** The /proc/keys lines that mention `needle`. */
async function procKeys(needle: string): Promise<string[]> {
  return (await readFile('/proc/keys', 'utf8')).split('\n').filter((l) => l.includes(needle));
}

/** Waits (bounded) until /proc/keys no longer lists `needle`: the kernel's key GC is asynchronous. */
async function goneFromProcKeys(needle: string, timeoutMs = 5000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while ((await procKeys(needle)).length > 0) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 25));
  }
  return true;
}

function keyctl(args: string[], prefix: string[] = []): { code: number; stdout: string; stderr: string } {
  const argv = [...prefix, 'keyctl', ...args];
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', timeout: 10_000 });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

keyringTest(`a loaded volume key is a logon key in /proc/keys that user space cannot read${skipNote}`, async (t) => {
  const ring = createVolumeKeyring({ name: 'virtkm-test-read' });
  const volumeId = randomUUID();
  const secret = randomBytes(64);
  const description = ring.load(volumeId, 3, secret)!;
  t.is(description, `virtkm:${volumeId}:v3`);
  t.deepEqual(ring.list(), [description]);

  const lines = await procKeys(description);
  t.is(lines.length, 1, 'listed once in /proc/keys');
  // "<serial> <flags> <usage> <timeout> <perm> <uid> <gid> <type> <description>: <size>"
  t.regex(lines[0]!, new RegExp(` logon +${description}: 64$`));
  t.is((await procKeys('virtkm-test-read')).length, 1, 'the agent keyring is listed too');

  const id = searchKey(KEY_SPEC.session, 'logon', description)!;
  t.truthy(id);
  const d = describeKey(id);
  t.is(d.type, 'logon');
  t.is(d.description, description);
  t.is(d.perm, VOLUME_KEY_PERM, 'possessor: view, write, search, link, setattr; owner: view');

  // Reading back is refused, through the module and through keyctl(1), root or not.
  const err = t.throws(() => readKey(id), { instanceOf: KeyctlError });
  t.true(err?.code === 'EOPNOTSUPP' || err?.code === 'EACCES', String(err?.message));
  t.false(String(err?.message).includes(secret.toString('hex')));
  for (const verb of ['read', 'print', 'pipe']) {
    const r = keyctl([verb, String(id)]);
    t.not(r.code, 0, `keyctl ${verb} must fail`);
    t.regex(r.stderr, /Operation not supported|Permission denied/);
    t.false(r.stdout.includes(secret.toString('hex')));
  }

  // A child (as dmsetup or cryptsetup would be) possesses it through the session keyring...
  const child = keyctl(['search', '@s', 'logon', description]);
  t.is(child.code, 0, child.stderr);
  t.is(Number(child.stdout.trim()), id);
  // ...a process in another session does not find it.
  const stranger = keyctl(['search', '@s', 'logon', description], ['keyctl', 'session', '-']);
  t.not(stranger.code, 0, 'not reachable from another session');
  t.regex(stranger.stderr, /Required key not available/);

  t.true(ring.unlink(description));
});

keyringTest(`loading again replaces the key in place; unlink removes it from the keyring and /proc/keys${skipNote}`, async (t) => {
  const ring = createVolumeKeyring({ name: 'virtkm-test-unlink' });
  const volumeId = randomUUID();
  const description = ring.load(volumeId, 1, randomBytes(32))!;
  const id = searchKey(ring.id, 'logon', description);
  t.is(ring.load(volumeId, 1, randomBytes(32)), description);
  t.is(searchKey(ring.id, 'logon', description), id, 'same key, new payload');
  t.deepEqual(ring.list(), [description]);

  t.true(ring.unlink(description));
  t.deepEqual(ring.list(), []);
  t.is(searchKey(KEY_SPEC.session, 'logon', description), undefined);
  t.true(await goneFromProcKeys(description), 'the key is destroyed once unlinked');
  t.false(ring.unlink(description), 'unlinking again finds nothing');
});

keyringTest(`retain keeps the listed keys and unlinks the others; bad input is refused and adds nothing${skipNote}`, async (t) => {
  const ring = createVolumeKeyring({ name: 'virtkm-test-retain' });
  const ids = [randomUUID(), randomUUID(), randomUUID()];
  const descs = ids.map((v) => ring.load(v, 1, randomBytes(64))!);
  t.deepEqual(ring.retain(new Set([descs[1]!])), [descs[0]!, descs[2]!].sort());
  t.deepEqual(ring.list(), [descs[1]!]);
  t.true(await goneFromProcKeys(descs[0]!));

  t.throws(() => ring.load('bad id with spaces', 1, randomBytes(32)), { message: /invalid volume id/ });
  t.throws(() => ring.load('vol:colon', 1, randomBytes(32)), { message: /invalid volume id/ });
  t.throws(() => ring.load(randomUUID(), -1, randomBytes(32)), { message: /invalid key version/ });
  t.throws(() => ring.load(randomUUID(), 1, new Uint8Array(0)), { message: /empty key/ });
  t.deepEqual(ring.list(), [descs[1]!], 'nothing was added');
  ring.retain(new Set());
  t.deepEqual(ring.list(), []);
});

keyringTest(`the reconciler with the real keyring: a wiped guest's key leaves /proc/keys${skipNote}`, async (t) => {
  const logs: string[] = [];
  const ring = openVolumeKeyring(createLogger({ component: 'test', level: 'debug', write: (l) => logs.push(l) }), { name: 'virtkm-test-reconcile' });
  t.not(ring.id, 0, logs.join('\n'));
  const hostId = randomUUID();
  const box = generateBoxKeyPair();
  const libvirt = createFakeLibvirt();
  const files = new Map<string, ImageInfo['kind']>();
  const images: ImagePort = {
    create: async (spec) => void files.set(spec.path, 'raw'),
    inspect: async (path) => (files.has(path) ? { exists: true, kind: files.get(path)! } : { exists: false, kind: 'missing' }),
    remove: async (path) => void files.delete(path),
    testKey: async () => true,
  };
  const open = new Map<string, string | undefined>();
  const dmcrypt: DmCryptPort = {
    unavailableReason: async () => undefined,
    open: async (_spec, name, _secret, keyDescription) => {
      // What dm-crypt needs: the key named in the table is findable from a child process.
      if (keyDescription) t.is(keyctl(['search', '@s', 'logon', keyDescription]).code, 0);
      open.set(name, keyDescription);
      return `/dev/mapper/${name}`;
    },
    close: async (name) => void open.delete(name),
    list: async () => [...open.keys()],
  };
  const cache = openKeyCache(join(t.context.dir, 'cache'), generateWrappingKey(), hostId);
  const deps = { hostId, box, libvirt, images, dmcrypt, keyring: ring, cache, imageDir: t.context.dir, logger: silentLogger };
  try {
    const volumeId = randomUUID();
    const secret = randomBytes(64);
    const packet = KeyPacket.encode({ type: 'virtkm.keypacket.v1', volumeId, keyVersion: 1, hostId, mechanism: VolumeFormat.VOLUME_FORMAT_PLAIN, cipher: undefined, sizeBytes: 16n << 20n, secret, issuedAt: '' }).finish();
    const name = `g-${volumeId.slice(0, 8)}`;
    const g: DesiredGuest = {
      guestId: randomUUID(),
      name,
      domainXml: `<domain type='kvm'><name>${name}</name><memory unit='MiB'>64</memory><devices><disk type='volume' device='disk'><source pool='virtkm' volume='v1'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
      autostart: true,
      generation: 1n,
      run: true,
      volumes: [
        {
          volumeId,
          name: 'v1',
          format: VolumeFormat.VOLUME_FORMAT_PLAIN,
          cipher: { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 },
          sizeBytes: 16n << 20n,
          keyVersion: 1,
          packet: { volumeId, keyVersion: 1, sealed: Buffer.from(sealToRecipient(packet, boxRecipient(box.publicKey))) },
          mayCreate: true,
          rotation: undefined,
        },
      ],
    };
    const state = (revision: bigint, guests: DesiredGuest[]): DesiredState => ({ revision, guests, issuedAt: '', deleteImages: [] });
    const description = volumeKeyDescription(volumeId, 1);

    const r1 = await reconcile(state(1n, [g]), deps);
    t.is(r1.guests[0]!.phase, GuestPhase.GUEST_PHASE_RUNNING, r1.guests[0]!.reason);
    t.is(open.get(`virtkm-${volumeId}`), description, 'dm-crypt got the key by reference');
    t.is((await procKeys(description)).length, 1, 'the key is in the kernel keyring while the mapping is open');
    t.deepEqual(ring.list(), [description]);

    const r2 = await reconcile(state(2n, []), deps);
    t.true(r2.guests.some((x) => x.guestId === g.guestId && x.phase === GuestPhase.GUEST_PHASE_WIPED));
    t.is(open.size, 0);
    t.deepEqual(ring.list(), []);
    t.true(await goneFromProcKeys(description), 'wiping the guest unlinked its key');
  } finally {
    cache.close();
    ring.retain(new Set());
  }
});

/** A fake device-mapper (sysfs and /proc/misc) with no mapping open yet. */
async function fakeDeviceMapper(root: string): Promise<{ sysBlockDir: string; procMisc: string; sysModuleDir: string }> {
  const sysBlockDir = join(root, 'sys-block');
  await mkdir(sysBlockDir, { recursive: true });
  const procMisc = join(root, 'misc');
  await writeFile(procMisc, ' 236 device-mapper\n');
  return { sysBlockDir, procMisc, sysModuleDir: join(root, 'no-modules') };
}

test('plain by keyring reference: dmsetup gets a table that names the logon key, never the key; the loop device is released', async (t) => {
  const { dir } = t.context;
  const store = createHostImageStore();
  const spec = specFor(dir, 'plain', { sectorSize: 4096 });
  const key = randomBytes(64);
  await store.create(spec, key);
  const calls: { file: string; args: string[]; stdin: boolean }[] = [];
  let failCreate = false;
  const recording: RunTool = async (file, args, options) => {
    if (file === 'dmsetup' || file === 'losetup' || file === 'cryptsetup') {
      calls.push({ file, args: [...args], stdin: options?.stdin !== undefined });
      if (file === 'losetup' && args[0] === '--find') return { code: 0, stdout: '/dev/loop7\n', stderr: '', truncated: false };
      if (file === 'dmsetup' && failCreate) return { code: 1, stdout: '', stderr: 'device-mapper: reload ioctl failed: Required key not available', truncated: false };
      return { code: 0, stdout: '', stderr: '', truncated: false };
    }
    return runTool(file, args, options);
  };
  const fake = createDmCryptMapper({ run: recording, ...(await fakeDeviceMapper(dir)) });
  const description = `virtkm:${randomUUID()}:v1`;
  t.is(await fake.open(spec, 'virtkm-vol1', key, description), '/dev/mapper/virtkm-vol1');
  const sectors = Number(spec.sizeBytes / 512n);
  t.deepEqual(calls, [
    { file: 'losetup', args: ['--find', '--show', '--', spec.path], stdin: false },
    {
      file: 'dmsetup',
      args: ['create', 'virtkm-vol1', '--uuid', 'CRYPT-PLAIN-virtkm-vol1', '--table', `0 ${sectors} crypt aes-xts-plain64 :64:logon:${description} 0 /dev/loop7 0 1 sector_size:4096`],
      stdin: false,
    },
    { file: 'losetup', args: ['--detach', '/dev/loop7'], stdin: false },
  ]);
  t.false(JSON.stringify(calls).includes(key.toString('hex')), 'the key is nowhere in argv');
  t.false(calls.some((c) => c.stdin), 'and on no stdin either: it stays in the kernel');

  // dmsetup fails: the loop device is released all the same and the error is a DomainError.
  calls.length = 0;
  failCreate = true;
  const err = await domainRejection(fake.open(spec, 'virtkm-vol2', key, description));
  t.true(isDomainError(err));
  t.deepEqual(calls.map((c) => `${c.file} ${c.args[0]!}`), ['losetup --find', 'dmsetup create', 'losetup --detach']);

  // Without a key description plain still goes to cryptsetup with the key on stdin.
  calls.length = 0;
  await fake.open(spec, 'virtkm-vol3', key);
  t.deepEqual(calls.map((c) => [c.file, c.args[0], c.stdin]), [['cryptsetup', 'open', true]]);

  // A description that would not be a single dm table word is refused before anything runs.
  calls.length = 0;
  t.is((await domainRejection(fake.open(spec, 'virtkm-vol4', key, 'virtkm:x 0 /dev/sda'))).kind, 'invalid_argument');
  t.is((await domainRejection(fake.open(spec, 'virtkm-vol4', key, 'nocolon'))).kind, 'invalid_argument');
  t.deepEqual(calls, []);
});

realDmTest(`plain by keyring reference with real device-mapper: data written through it reads back through cryptsetup's own mapping${dmSkipNote}`, async (t) => {
  const { dir } = t.context;
  const store = createHostImageStore();
  const spec = specFor(dir, 'plain');
  const key = randomBytes(64);
  await store.create(spec, key);
  const ring = createVolumeKeyring({ name: 'virtkm-test-dm' });
  const description = ring.load(randomUUID(), 1, key)!;
  const name = `virtkm-kr-${process.pid}`;
  const marker = randomBytes(4096);
  try {
    const dev = await mapper.open(spec, name, key, description);
    const table = await runTool('dmsetup', ['table', '--showkeys', name]);
    t.true(table.stdout.includes(`:64:logon:${description}`), table.stdout);
    t.false(table.stdout.includes(key.toString('hex')), 'the table holds a reference, not the key');
    await writeFile(dev, marker, { flag: 'r+' });
    await mapper.close(name);
    // cryptsetup's own plain mapping with the key on stdin reads the same plaintext.
    const again = await mapper.open(spec, name, key);
    const back = (await readFile(again)).subarray(0, 4096);
    t.true(back.equals(marker));
  } finally {
    await mapper.close(name).catch(() => undefined);
    ring.retain(new Set());
    t.false(existsSync(`/dev/mapper/${name}`));
  }
});
