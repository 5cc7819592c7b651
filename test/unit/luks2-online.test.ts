/**
 * Online LUKS2 re-encryption (host-agent/src/rotate/luks2-online.ts) and the driver's
 * choice of it, without device-mapper: the argument lists, the reading of a mapping's
 * device stack from a fake sysfs (the volume's own LUKS2 mapping over a loop device, and
 * the helper devices cryptsetup stacks under it), and the mechanism's decisions against a
 * scripted cryptsetup: what it runs, and what it refuses before anything changes. The real
 * round trip is test/integration/rotate-luks2-online.test.ts (it needs device-mapper).
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createDmCryptMapper } from '../../host-agent/src/images/dm-crypt.js';
import type { ImageSpec, ImageStore } from '../../host-agent/src/images/types.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';
import { chooseMechanism, type RotationMechanisms } from '../../host-agent/src/rotate/driver.js';
import { createLuks2OnlineReencrypt, mappingMismatch, mappingState, onlineReencryptArgs, onlineResumeArgs } from '../../host-agent/src/rotate/luks2-online.js';
import type { RotationJob, RotationMechanism } from '../../host-agent/src/rotate/types.js';
import { isDomainError, type DomainError } from '../../shared/src/errors.js';
import type { RunTool, RunToolOptions, ToolResult } from '../../shared/src/run-tool.js';

const test = anyTest as TestFn<{ dir: string; sys: string; image: string }>;

const UUID = '6b1c2a3e-9f00-4d6e-8a1b-0123456789ab';
const UUID_HEX = UUID.replace(/-/g, '');
const MAPPING = 'virtkm-vol1';

test.beforeEach(async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'virtkm-online-'));
  const image = join(dir, 'vol1.img');
  await writeFile(image, '');
  await truncate(image, (16 + 32) << 20);
  t.context = { dir, sys: join(dir, 'sys-block'), image };
});

test.afterEach.always(async (t) => {
  await rm(t.context.dir, { recursive: true, force: true });
});

/** A dm device in the fake sysfs. */
async function dm(sys: string, entry: string, name: string, uuid: string, slaves: string[], suspended = false): Promise<void> {
  await mkdir(join(sys, entry, 'dm'), { recursive: true });
  await mkdir(join(sys, entry, 'slaves'), { recursive: true });
  await writeFile(join(sys, entry, 'dm', 'name'), `${name}\n`);
  await writeFile(join(sys, entry, 'dm', 'uuid'), `${uuid}\n`);
  await writeFile(join(sys, entry, 'dm', 'suspended'), suspended ? '1\n' : '0\n');
  // As in sysfs: slaves/<dev> links to the device's own directory.
  for (const s of slaves) await symlink(join(sys, s), join(sys, entry, 'slaves', s));
}

async function loop(sys: string, entry: string, backing: string): Promise<void> {
  await mkdir(join(sys, entry, 'loop'), { recursive: true });
  await writeFile(join(sys, entry, 'loop', 'backing_file'), `${backing}\n`);
  await writeFile(join(sys, entry, 'dev'), '7:3\n');
}

/** The volume's mapping straight over its loop device (a guest running, no re-encryption). */
async function plainStack(sys: string, image: string, uuid = `CRYPT-LUKS2-${UUID_HEX}-${MAPPING}`): Promise<void> {
  await dm(sys, 'dm-0', MAPPING, uuid, ['loop3']);
  await loop(sys, 'loop3', image);
}

/** What an interrupted online re-encryption leaves: mapping -> overlay -> hotzone (suspended) -> loop. */
async function helperStack(sys: string, image: string): Promise<void> {
  await dm(sys, 'dm-0', MAPPING, `CRYPT-LUKS2-${UUID_HEX}-${MAPPING}`, ['dm-1']);
  await dm(sys, 'dm-1', `${MAPPING}-overlay`, `CRYPT-SUBDEV-${UUID_HEX}-${MAPPING}-overlay`, ['dm-2', 'loop3']);
  await dm(sys, 'dm-2', `${MAPPING}-hotzone-forward`, `CRYPT-SUBDEV-${UUID_HEX}-${MAPPING}-hotzone-forward`, ['loop3'], true);
  await loop(sys, 'loop3', image);
}

const target = (path: string): ImageSpec => ({ path, format: 'luks2', sizeBytes: 32n << 20n, cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 });

test('onlineReencryptArgs: --active-name, never --force-offline-reencrypt, the key on stdin, same cipher and sector size', (t) => {
  const args = onlineReencryptArgs({ mapping: MAPPING, slot: 3, resilience: 'journal', target: target('/x.img'), hotzoneSizeBytes: 64n << 20n });
  t.is(args[0], 'reencrypt');
  t.false(args.includes('--force-offline-reencrypt'));
  t.false(args.includes('/x.img'), 'the image path is not given: the active mapping is');
  const at = (flag: string) => args[args.indexOf(flag) + 1];
  t.is(at('--active-name'), MAPPING);
  t.is(at('--key-file'), '-');
  t.is(at('--key-slot'), '3');
  t.is(at('--resilience'), 'journal');
  t.is(at('--hotzone-size'), String(64 << 20));
  t.is(at('--sector-size'), '512');
  t.is(at('--cipher'), 'aes-xts-plain64');
  t.is(at('--key-size'), '512');
  t.true(args.includes('--progress-json'));
  t.false(onlineReencryptArgs({ mapping: MAPPING, slot: 0, resilience: 'checksum', target: target('/x.img') }).includes('--hotzone-size'));
  // Bad input is refused before anything runs.
  for (const bad of [
    () => onlineReencryptArgs({ mapping: 'other', slot: 0, resilience: 'checksum', target: target('/x.img') }),
    () => onlineReencryptArgs({ mapping: 'virtkm-a b', slot: 0, resilience: 'checksum', target: target('/x.img') }),
    () => onlineReencryptArgs({ mapping: MAPPING, slot: 32, resilience: 'checksum', target: target('/x.img') }),
    () => onlineReencryptArgs({ mapping: MAPPING, slot: 0, resilience: 'none' as 'checksum', target: target('/x.img') }),
  ]) {
    const err = t.throws(bad);
    t.true(isDomainError(err) && err.kind === 'invalid_argument');
  }
});

test('onlineResumeArgs: --resume-only on the active name', (t) => {
  const args = onlineResumeArgs(MAPPING);
  t.deepEqual(args.slice(0, 2), ['reencrypt', '--resume-only']);
  t.is(args[args.indexOf('--active-name') + 1], MAPPING);
  t.false(args.includes('--force-offline-reencrypt'));
  t.false(args.includes('--hotzone-size'));
  t.true(onlineResumeArgs(MAPPING, 16n << 20n).includes('--hotzone-size'));
});

test('mappingState: the stack below the mapping, helper devices and suspended ones; missing mapping', async (t) => {
  const { sys, image } = t.context;
  t.is(await mappingState(sys, MAPPING), undefined, 'no sysfs at all');
  await helperStack(sys, image);
  const s = await mappingState(sys, MAPPING);
  t.truthy(s);
  t.is(s?.uuid, `CRYPT-LUKS2-${UUID_HEX}-${MAPPING}`);
  t.deepEqual(s?.helpers.sort(), [`${MAPPING}-hotzone-forward`, `${MAPPING}-overlay`]);
  t.deepEqual(s?.suspended, [`${MAPPING}-hotzone-forward`]);
  t.deepEqual(s?.backingFiles, [image]);
  t.is(await mappingState(sys, 'virtkm-other'), undefined);
});

test('mappingMismatch: only the LUKS2 mapping of this image (its LUKS UUID, its file below)', async (t) => {
  const { sys, image, dir } = t.context;
  await plainStack(sys, image);
  const s = (await mappingState(sys, MAPPING))!;
  t.is(await mappingMismatch(s, image, UUID, MAPPING), undefined);
  t.regex((await mappingMismatch(s, image, '00000000-0000-0000-0000-000000000000', MAPPING)) ?? '', /another LUKS2 volume/);
  t.regex((await mappingMismatch(s, image, undefined, MAPPING)) ?? '', /no LUKS UUID/);
  const other = join(dir, 'other.img');
  await writeFile(other, 'x');
  t.regex((await mappingMismatch(s, other, UUID, MAPPING)) ?? '', /not backed by the image/);
  t.regex((await mappingMismatch({ ...s, uuid: `CRYPT-PLAIN-${MAPPING}` }, image, UUID, MAPPING)) ?? '', /not a LUKS2 mapping/);
  // dm cuts uuids at 128 characters: a long name's tail may be missing, never different.
  t.is(await mappingMismatch({ ...s, uuid: `CRYPT-LUKS2-${UUID_HEX}-${MAPPING.slice(0, 8)}` }, image, UUID, MAPPING), undefined);
  t.regex((await mappingMismatch({ ...s, uuid: `CRYPT-LUKS2-${UUID_HEX}-virtkm-vol2` }, image, UUID, MAPPING)) ?? '', /another LUKS2 volume/);
});

test('the dm-crypt mapper lists the volume mapping, never the helper devices under it (the reconciler would close them)', async (t) => {
  const { sys, image, dir } = t.context;
  await helperStack(sys, image);
  const procMisc = join(dir, 'misc');
  await writeFile(procMisc, ' 236 device-mapper\n');
  const m = createDmCryptMapper({ sysBlockDir: sys, procMisc, sysModuleDir: join(dir, 'none') });
  t.deepEqual(await m.list(), [MAPPING]);
});

// --- The mechanism against a scripted cryptsetup --------------------------------------------

interface Call {
  args: readonly string[];
  stdin?: string;
}

/**
 * A cryptsetup that keeps keyslots (passphrase hex per slot) and answers luksDump, open
 * --test-passphrase, luksAddKey, luksKillSlot and reencrypt (online: ends with the new key
 * only, like cryptsetup with --key-slot).
 */
function fakeCryptsetup(initial: Record<number, Buffer>, opts: { reencrypting?: boolean; reencryptExit?: number } = {}) {
  const slots = new Map<number, string>(Object.entries(initial).map(([k, v]) => [Number(k), v.toString('hex')]));
  let reencrypting = opts.reencrypting ?? false;
  const calls: Call[] = [];
  const slot = (offset: number) => ({ type: 'luks2', key_size: 64, area: { type: 'raw', offset: String(offset), size: '258048', encryption: 'aes-xts-plain64', key_size: 64 } });
  const dump = () => {
    const keyslots: Record<string, unknown> = {};
    [...slots.keys()].forEach((id, i) => (keyslots[String(id)] = slot(32768 + i * 258048)));
    if (reencrypting) keyslots['9'] = { type: 'reencrypt', key_size: 1, mode: 'reencrypt', direction: 'forward', area: { type: 'checksum', offset: '806912', size: '4096', hash: 'sha256', sector_size: 4096 } };
    const segments = reencrypting ? { '0': { type: 'crypt', offset: '16777216', size: 'dynamic', flags: ['in-reencryption'] }, '1': { type: 'crypt', flags: ['backup-previous'] } } : { '0': { type: 'crypt', offset: '16777216', size: 'dynamic' } };
    return JSON.stringify({ keyslots, tokens: {}, segments, digests: { '0': { type: 'pbkdf2', keyslots: [...slots.keys()].map(String), segments: ['0'], salt: 's', digest: 'd' } }, config: { json_size: '12288', keyslots_size: '16744448', ...(reencrypting ? { requirements: { mandatory: ['online-reencrypt-v2'] } } : {}) } });
  };
  const run: RunTool = (_file: string, args: readonly string[], o?: RunToolOptions): Promise<ToolResult> => {
    const stdin = o?.stdin ? Buffer.from(o.stdin).toString('hex') : undefined;
    calls.push({ args: [...args], ...(stdin ? { stdin } : {}) });
    const ok = (stdout = ''): Promise<ToolResult> => Promise.resolve({ code: 0, stdout, stderr: '', truncated: false });
    const code = (c: number): Promise<ToolResult> => Promise.resolve({ code: c, stdout: '', stderr: 'scripted', truncated: false });
    const at = (flag: string) => args[args.indexOf(flag) + 1];
    switch (args[0]) {
      case 'luksDump':
        return ok(dump());
      case 'open': {
        const only = args.includes('--key-slot') ? Number(at('--key-slot')) : undefined;
        const match = [...slots].some(([id, p]) => p === stdin && (only === undefined || only === id));
        return match ? ok() : code(2);
      }
      case 'luksAddKey':
        slots.set(Number(at('--new-key-slot')), Buffer.from(o?.fds?.[0] ?? new Uint8Array(0)).toString('hex'));
        return ok();
      case 'luksKillSlot':
        slots.delete(Number(args[args.length - 1]));
        return ok();
      case 'reencrypt': {
        if (opts.reencryptExit) return code(opts.reencryptExit);
        o?.onStdout?.(Buffer.from('{"device_bytes":"33554432","device_size":"33554432","speed":"1000"}\n'));
        const keep = args.includes('--key-slot') ? Number(at('--key-slot')) : [...slots].find(([, p]) => p === stdin)?.[0];
        const pass = keep === undefined ? undefined : slots.get(keep);
        slots.clear();
        if (keep !== undefined && pass) slots.set(keep, pass);
        reencrypting = false;
        return ok();
      }
      default:
        return code(1);
    }
  };
  return { run, calls, slots };
}

const fakeImages = (uuid = UUID) => ({ inspect: () => Promise.resolve({ exists: true, kind: 'luks2', uuid }) }) as unknown as ImageStore;
const dmPresent = { unavailableReason: () => Promise.resolve(undefined) };

function job(path: string, oldKey: Buffer, newKey: Buffer): RotationJob {
  return { rotationId: 'rot-online-1', volumeId: 'vol1', kind: 'reencrypt', target: target(path), fromFormat: 'luks2', oldKey, newKey };
}

async function rejection(p: Promise<unknown>): Promise<DomainError> {
  try {
    await p;
  } catch (err) {
    if (isDomainError(err)) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

const mutating = (calls: Call[]) => calls.filter((c) => ['luksAddKey', 'luksKillSlot', 'reencrypt', 'repair'].includes(String(c.args[0])));

test('mechanism: adds the new key, re-encrypts through the active mapping with the new passphrase on stdin, checks both keys after', async (t) => {
  const { sys, image } = t.context;
  await plainStack(sys, image);
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const cs = fakeCryptsetup({ 0: luksPassphrase(oldKey) });
  const steps: string[] = [];
  const m = createLuks2OnlineReencrypt({ run: cs.run, images: fakeImages(), mapper: dmPresent, sysBlockDir: sys, mappingName: (j) => `virtkm-${j.volumeId}` });
  const result = await m.run(job(image, oldKey, newKey), { onProgress: (p) => steps.push(p.step) });
  t.deepEqual(result, { opensWith: 'new', verified: false, bytesRewritten: 32n << 20n });
  const order = mutating(cs.calls).map((c) => c.args[0]);
  t.deepEqual(order, ['luksAddKey', 'reencrypt']);
  const re = cs.calls.find((c) => c.args[0] === 'reencrypt')!;
  t.is(re.args[re.args.indexOf('--active-name') + 1], MAPPING);
  t.false(re.args.includes('--force-offline-reencrypt'));
  t.is(re.args[re.args.indexOf('--key-slot') + 1], '1');
  t.is(re.stdin, luksPassphrase(newKey).toString('hex'), 'the new passphrase on stdin');
  // No secret in any argv.
  for (const c of cs.calls) for (const a of c.args) t.false(a.includes(luksPassphrase(newKey).toString('hex')) || a.includes(luksPassphrase(oldKey).toString('hex')));
  t.deepEqual([...cs.slots.keys()], [1]);
  t.true(steps.includes('reencrypting') && steps.includes('verifying'));
  // A second run finds it finished and changes nothing.
  const before = mutating(cs.calls).length;
  await m.run(job(image, oldKey, newKey));
  t.is(mutating(cs.calls).length, before);
});

test('mechanism refuses before changing anything: no device-mapper, mapping not open, mapping of another volume', async (t) => {
  const { sys, image } = t.context;
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const make = (cs: ReturnType<typeof fakeCryptsetup>, mapper: { unavailableReason(): Promise<string | undefined> } = dmPresent, uuid = UUID) => createLuks2OnlineReencrypt({ run: cs.run, images: fakeImages(uuid), mapper, sysBlockDir: sys, mappingName: (j) => `virtkm-${j.volumeId}` });

  const noDm = fakeCryptsetup({ 0: luksPassphrase(oldKey) });
  const e1 = await rejection(make(noDm, { unavailableReason: () => Promise.resolve('no device-mapper in this kernel') }).run(job(image, oldKey, newKey)));
  t.is(e1.kind, 'unavailable');
  t.is(noDm.calls.length, 0);

  const notOpen = fakeCryptsetup({ 0: luksPassphrase(oldKey) });
  const e2 = await rejection(make(notOpen).run(job(image, oldKey, newKey)));
  t.is(e2.kind, 'failed_precondition');
  t.regex(e2.message, /mapping virtkm-vol1 is not open/);
  t.deepEqual(mutating(notOpen.calls), []);

  await plainStack(sys, image);
  const other = fakeCryptsetup({ 0: luksPassphrase(oldKey) });
  const e3 = await rejection(make(other, dmPresent, '11111111-2222-3333-4444-555555555555').run(job(image, oldKey, newKey)));
  t.is(e3.kind, 'failed_precondition');
  t.regex(e3.message, /another LUKS2 volume/);
  t.deepEqual(mutating(other.calls), []);

  t.throws(() => createLuks2OnlineReencrypt({ mappingName: () => MAPPING, resilience: 'none' as 'checksum' }), { message: /resilience/ });
  t.throws(() => createLuks2OnlineReencrypt({ mappingName: () => MAPPING, hotzoneSizeBytes: 1000n }), { message: /hotzone/ });
});

test('mechanism after a crash: resumes online when no helper device is left; refuses ("stop the guest") when cryptsetup left its stack', async (t) => {
  const { sys, image } = t.context;
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const make = (cs: ReturnType<typeof fakeCryptsetup>) => createLuks2OnlineReencrypt({ run: cs.run, images: fakeImages(), mapper: dmPresent, sysBlockDir: sys, mappingName: (j) => `virtkm-${j.volumeId}` });

  // Killed right after initialising: the header says re-encryption, the mapping is as it was.
  await plainStack(sys, image);
  const init = fakeCryptsetup({ 0: luksPassphrase(oldKey), 1: luksPassphrase(newKey) }, { reencrypting: true });
  await make(init).run(job(image, oldKey, newKey));
  const resumed = mutating(init.calls);
  t.is(resumed.length, 1);
  t.deepEqual(resumed[0]?.args.slice(0, 2), ['reencrypt', '--resume-only']);
  t.is(resumed[0]?.args[resumed[0].args.indexOf('--active-name') + 1], MAPPING);

  // Killed in the data phase: helper devices (one suspended) under the mapping.
  await rm(sys, { recursive: true, force: true });
  await helperStack(sys, image);
  const mid = fakeCryptsetup({ 0: luksPassphrase(oldKey), 1: luksPassphrase(newKey) }, { reencrypting: true });
  const e = await rejection(make(mid).run(job(image, oldKey, newKey)));
  t.is(e.kind, 'failed_precondition');
  t.regex(e.message, /stop the guest/);
  t.deepEqual(mutating(mid.calls), [], 'nothing run on the stack cryptsetup left');
});

test('mechanism: a failed reencrypt that never initialised removes the keyslot it added', async (t) => {
  const { sys, image } = t.context;
  await plainStack(sys, image);
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const cs = fakeCryptsetup({ 0: luksPassphrase(oldKey) }, { reencryptExit: 1 });
  const m = createLuks2OnlineReencrypt({ run: cs.run, images: fakeImages(), mapper: dmPresent, sysBlockDir: sys, mappingName: (j) => `virtkm-${j.volumeId}` });
  await rejection(m.run(job(image, oldKey, newKey)));
  t.deepEqual(mutating(cs.calls).map((c) => c.args[0]), ['luksAddKey', 'reencrypt', 'luksKillSlot']);
  t.deepEqual([...cs.slots.keys()], [0], 'only the old key, as before');
});

// --- The driver's choice ------------------------------------------------------------------

const named = (name: string): RotationMechanism => ({ name, run: () => Promise.reject(new Error('not run')) });
const mechanisms = (withOnline: boolean): RotationMechanisms => ({
  qemuRekey: named('qemu-rekey'),
  qemuConvert: named('qemu-convert'),
  liveCopy: named('live-copy'),
  luks2Rekey: named('luks2-rekey'),
  luks2Reencrypt: named('luks2-reencrypt'),
  ...(withOnline ? { luks2Online: named('luks2-online-reencrypt') } : {}),
  plainReencrypt: named('plain-reencrypt'),
});

test('driver: luks2 reencrypt with the guest running goes online (not offline: the guest keeps running); stopped, offline; without the online mechanism it waits', (t) => {
  const running = chooseMechanism(mechanisms(true), { kind: 'reencrypt', guestRunning: true, format: 'luks2' });
  t.true('mechanism' in running && running.mechanism.name === 'luks2-online-reencrypt' && running.offline === false);
  const stopped = chooseMechanism(mechanisms(true), { kind: 'reencrypt', guestRunning: false, format: 'luks2' });
  t.true('mechanism' in stopped && stopped.mechanism.name === 'luks2-reencrypt' && stopped.offline === true);
  const rekey = chooseMechanism(mechanisms(true), { kind: 'rekey', guestRunning: true, format: 'luks2' });
  t.true('mechanism' in rekey && rekey.mechanism.name === 'luks2-rekey');
  const none = chooseMechanism(mechanisms(false), { kind: 'reencrypt', guestRunning: true, format: 'luks2' });
  t.true('wait' in none && /stop the guest/.test(none.wait));
  // Plain dm-crypt is unchanged: offline only.
  t.true('wait' in chooseMechanism(mechanisms(true), { kind: 'reencrypt', guestRunning: true, format: 'plain' }));
});
