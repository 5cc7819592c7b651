/**
 * dm-crypt mappings for luks2 and plain volumes. Opening needs device-mapper in the kernel:
 * where it is missing (checked at run time) the real round trips are skipped with that
 * reason in their titles, and what can run here does: the availability check, the refusal
 * to open, the fail-closed kind check, and the sysfs-driven logic against a fake sysfs.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createDmCryptMapper, NO_DEVICE_MAPPER } from '../../host-agent/src/images/dm-crypt.js';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, domainRejection, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';

const test = anyTest as TestFn<{ dir: string }>;
const store = createHostImageStore();
const mapper = createDmCryptMapper();

/** Decided once, at run time, on this machine. */
const dmMissingReason = await mapper.unavailableReason();
const realTest = dmMissingReason ? test.skip : test.serial;
const skipNote = dmMissingReason ? ' [skipped: no device-mapper in this kernel]' : '';

test.beforeEach(async (t) => {
  t.context.dir = await tempDir();
});

test.afterEach.always(async (t) => {
  await removeDir(t.context.dir);
});

test('unavailableReason agrees with /proc/misc and /sys/module/dm_mod', async (t) => {
  const misc = await readFile('/proc/misc', 'utf8').catch(() => '');
  const present = /\sdevice-mapper$/m.test(misc) || existsSync('/sys/module/dm_mod/initstate');
  t.is(dmMissingReason === undefined, present);
  t.log(present ? 'device-mapper is available: the real round trips run' : `device-mapper is missing: ${String(dmMissingReason)}`);
});

test('without device-mapper: open is unavailable (after the kind check), close and list have nothing to do; a (stray) /dev/mapper/control changes nothing', async (t) => {
  if (!dmMissingReason) {
    t.pass('device-mapper is available here; covered by the real round trips');
    return;
  }
  const spec = specFor(t.context.dir, 'luks2');
  const secret = awkwardSecret();
  await store.create(spec, secret);
  const err = await domainRejection(mapper.open(spec, 'virtkm-test-luks2', secret));
  t.is(err.kind, 'unavailable');
  t.is(err.hint, NO_DEVICE_MAPPER);
  t.deepEqual(await mapper.list(), []);
  await t.notThrowsAsync(mapper.close('virtkm-test-luks2'));
  // Evidence that the refusal is right: cryptsetup itself cannot open it here.
  const r = await runTool('cryptsetup', ['open', '--type', 'luks2', '--key-file', '-', spec.path, 'virtkm-test-evidence'], { stdin: Buffer.from('x') });
  t.not(r.code, 0);
  t.log(`cryptsetup open here: exit ${r.code}: ${r.stderr.trim().split('\n')[0] ?? ''}`);
});

test('fail closed: a LUKS or qcow2 image is never opened as plain, a raw file never as luks2', async (t) => {
  const { dir } = t.context;
  const luks2 = specFor(dir, 'luks2');
  await store.create(luks2, awkwardSecret());
  const asPlain = { ...luks2, format: 'plain' as const };
  t.is((await domainRejection(mapper.open(asPlain, 'virtkm-x', randomBytes(64)))).kind, 'failed_precondition');
  const raw = specFor(dir, 'plain');
  await store.create(raw, randomBytes(64));
  t.is((await domainRejection(mapper.open({ ...raw, format: 'luks2' }, 'virtkm-y', awkwardSecret()))).kind, 'failed_precondition');
  t.is((await domainRejection(mapper.open({ ...raw, path: join(dir, 'none.img') }, 'virtkm-z', randomBytes(64)))).kind, 'not_found');
});

test('names and formats are checked before anything runs', async (t) => {
  const spec = specFor(t.context.dir, 'plain');
  for (const name of ['x', 'virtkm-', 'virtkm-a/b', 'virtkm-a b', `virtkm-${'a'.repeat(200)}`, 'other-prefix']) {
    t.is((await domainRejection(mapper.open(spec, name, randomBytes(64)))).kind, 'invalid_argument', name);
  }
  t.is((await domainRejection(mapper.open({ ...specFor(t.context.dir, 'qcow2-luks') }, 'virtkm-q', awkwardSecret()))).kind, 'invalid_argument');
  t.is((await domainRejection(mapper.open(spec, 'virtkm-short-key', randomBytes(32)))).kind, 'invalid_argument', 'plain key must be keySizeBits/8 bytes');
  t.is((await domainRejection(mapper.close('../etc'))).kind, 'invalid_argument');
});

/** A fake /sys/block with one dm-crypt mapping over a loop device backed by `backing`. */
async function fakeSysfs(root: string, backing: string): Promise<{ sysBlockDir: string; procMisc: string; sysModuleDir: string }> {
  const sys = join(root, 'sys-block');
  await mkdir(join(sys, 'dm-0', 'dm'), { recursive: true });
  await mkdir(join(sys, 'dm-0', 'slaves'), { recursive: true });
  await writeFile(join(sys, 'dm-0', 'dm', 'name'), 'virtkm-vol1\n');
  await writeFile(join(sys, 'dm-0', 'dm', 'uuid'), 'CRYPT-LUKS2-0123-virtkm-vol1\n');
  await mkdir(join(sys, 'loop0', 'loop'), { recursive: true });
  await writeFile(join(sys, 'loop0', 'loop', 'backing_file'), `${backing}\n`);
  await symlink(join(sys, 'loop0'), join(sys, 'dm-0', 'slaves', 'loop0'));
  // Another dm device that is not dm-crypt, and a dm-crypt mapping that is not virtkm's.
  await mkdir(join(sys, 'dm-1', 'dm'), { recursive: true });
  await writeFile(join(sys, 'dm-1', 'dm', 'name'), 'virtkm-linear\n');
  await writeFile(join(sys, 'dm-1', 'dm', 'uuid'), 'LVM-abc\n');
  await mkdir(join(sys, 'dm-2', 'dm'), { recursive: true });
  await writeFile(join(sys, 'dm-2', 'dm', 'name'), 'cryptroot\n');
  await writeFile(join(sys, 'dm-2', 'dm', 'uuid'), 'CRYPT-LUKS2-feed-cryptroot\n');
  const procMisc = join(root, 'misc');
  await writeFile(procMisc, ' 236 device-mapper\n 183 hw_random\n');
  return { sysBlockDir: sys, procMisc, sysModuleDir: join(root, 'no-modules') };
}

test('with a (fake) device-mapper: list, idempotent open, a name taken by another image, close', async (t) => {
  const { dir } = t.context;
  const spec = specFor(dir, 'luks2');
  const secret = awkwardSecret();
  await store.create(spec, secret);
  const calls: string[][] = [];
  const recording: RunTool = async (file, args, options) => {
    if (file === 'cryptsetup' && (args[0] === 'open' || args[0] === 'close')) {
      calls.push([...args]);
      return { code: 0, stdout: '', stderr: '', truncated: false };
    }
    return runTool(file, args, options);
  };
  const fake = createDmCryptMapper({ run: recording, ...(await fakeSysfs(dir, spec.path)) });
  t.is(await fake.unavailableReason(), undefined);
  t.deepEqual(await fake.list(), ['virtkm-vol1']);

  t.is(await fake.open(spec, 'virtkm-vol1', secret), '/dev/mapper/virtkm-vol1');
  t.deepEqual(calls, [], 'already open over the same file: nothing to run');

  const other = specFor(dir, 'luks2', { path: join(dir, 'other.img') });
  await store.create(other, secret);
  t.is((await domainRejection(fake.open(other, 'virtkm-vol1', secret))).kind, 'already_exists');

  t.is(await fake.open(other, 'virtkm-vol2', secret), '/dev/mapper/virtkm-vol2');
  t.deepEqual(calls.at(-1), ['open', '--type', 'luks2', '--key-file', '-', other.path, 'virtkm-vol2']);
  t.false(calls.flat().some((a) => a.includes(luksHexOf(secret))), 'the key is not in argv');

  const plain = specFor(dir, 'plain', { sectorSize: 4096 });
  await store.create(plain, randomBytes(64));
  await fake.open(plain, 'virtkm-vol3', randomBytes(64));
  t.deepEqual(calls.at(-1), ['open', '--type', 'plain', '--cipher', 'aes-xts-plain64', '--key-size', '512', '--sector-size', '4096', '--offset', '0', '--skip', '0', '--key-file', '-', '--keyfile-size', '64', plain.path, 'virtkm-vol3']);

  await fake.close('virtkm-vol1');
  t.deepEqual(calls.at(-1), ['close', 'virtkm-vol1']);
  const before = calls.length;
  await fake.close('virtkm-not-open');
  t.is(calls.length, before, 'closing what is not open runs nothing');
});

function luksHexOf(secret: Buffer): string {
  return secret.toString('hex');
}

realTest(`luks2: open with the key on stdin, write through /dev/mapper, close, reopen, read back${skipNote}`, async (t) => {
  const spec = specFor(t.context.dir, 'luks2');
  const secret = awkwardSecret();
  await store.create(spec, secret);
  const name = `virtkm-test-${randomBytes(4).toString('hex')}`;
  const pattern = randomBytes(4096);
  try {
    const device = await mapper.open(spec, name, secret);
    t.true((await mapper.list()).includes(name));
    t.is(await mapper.open(spec, name, secret), device, 'idempotent');
    await writeFile(device, pattern);
    await mapper.close(name);
    t.false((await mapper.list()).includes(name));
    const again = await mapper.open(spec, name, secret);
    const back = (await readFile(again)).subarray(0, 4096);
    t.true(back.equals(pattern));
    t.is((await domainRejection(mapper.open(spec, `${name}-wrong`, awkwardSecret()))).kind, 'permission_denied');
  } finally {
    await mapper.close(name);
  }
});

realTest(`plain: open with the raw key on stdin, data round trip, a wrong key reads garbage${skipNote}`, async (t) => {
  const spec = specFor(t.context.dir, 'plain');
  const key = randomBytes(64);
  await store.create(spec, key);
  const name = `virtkm-test-${randomBytes(4).toString('hex')}`;
  const pattern = randomBytes(4096);
  try {
    const device = await mapper.open(spec, name, key);
    await writeFile(device, pattern);
    await mapper.close(name);
    t.false((await readFile(spec.path)).subarray(0, 4096).equals(pattern), 'ciphertext on disk');
    const again = await mapper.open(spec, name, key);
    t.true((await readFile(again)).subarray(0, 4096).equals(pattern));
    await mapper.close(name);
    const wrong = await mapper.open(spec, name, randomBytes(64));
    t.false((await readFile(wrong)).subarray(0, 4096).equals(pattern));
  } finally {
    await mapper.close(name);
  }
});
