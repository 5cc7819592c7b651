/**
 * ImageStore.testKey with the real tools, and data written and read back through qemu-io
 * with the key on fd 3. The secrets contain 0x00 and 0x0a on purpose.
 */
import anyTest, { type TestFn } from 'ava';
import { readdirSync, readFileSync } from 'node:fs';
import { copyFile, readFile, truncate } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, domainRejection, qemuIo, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';

interface Volume {
  spec: ImageSpec;
  secret: Buffer;
}
interface Ctx {
  dir: string;
  luks: Volume;
  qcow2Luks: Volume;
  luks2: Volume;
}
const test = anyTest as TestFn<Ctx>;
const store = createHostImageStore();

test.before(async (t) => {
  const dir = await tempDir();
  t.context.dir = dir;
  const make = async (format: 'luks' | 'qcow2-luks' | 'luks2'): Promise<Volume> => {
    const v = { spec: specFor(dir, format), secret: awkwardSecret() };
    await store.create(v.spec, v.secret);
    return v;
  };
  [t.context.luks, t.context.qcow2Luks, t.context.luks2] = await Promise.all([make('luks'), make('qcow2-luks'), make('luks2')]);
});

test.after.always(async (t) => {
  await removeDir(t.context.dir);
});

for (const name of ['luks', 'qcow2Luks', 'luks2'] as const) {
  test(`testKey ${name}: true with the right key, false with wrong ones`, async (t) => {
    const { spec, secret } = t.context[name];
    let started = process.hrtime.bigint();
    t.true(await store.testKey(spec.path, spec, secret));
    t.log(`right key: ${Number(process.hrtime.bigint() - started) / 1e6} ms`);
    const flipped = Buffer.from(secret);
    flipped[31] = (flipped[31] ?? 0) ^ 1;
    started = process.hrtime.bigint();
    t.false(await store.testKey(spec.path, spec, flipped));
    t.log(`wrong key: ${Number(process.hrtime.bigint() - started) / 1e6} ms`);
    t.false(await store.testKey(spec.path, spec, awkwardSecret()));
    // The secret up to its first newline, as a line-oriented reader would take it, is wrong.
    t.false(await store.testKey(spec.path, spec, Buffer.concat([secret.subarray(0, 1), Buffer.alloc(15, 0x41)])));
  });
}

test('testKey refuses what it cannot answer: missing image, wrong kind, damaged header, plain, bad secret', async (t) => {
  const { dir, luks, luks2 } = t.context;
  const missing = { ...luks.spec, path: join(dir, 'missing.img') };
  t.is((await domainRejection(store.testKey(missing.path, missing, luks.secret))).kind, 'not_found');
  // A LUKS1 image checked as luks2, and a LUKS2 image checked as qcow2-luks.
  t.is((await domainRejection(store.testKey(luks.spec.path, { ...luks.spec, format: 'luks2' }, luks.secret))).kind, 'failed_precondition');
  t.is((await domainRejection(store.testKey(luks2.spec.path, { ...luks2.spec, format: 'qcow2-luks', sectorSize: 512 }, luks2.secret))).kind, 'failed_precondition');
  const cut = join(dir, 'cut.img');
  await copyFile(luks.spec.path, cut);
  await truncate(cut, 4096);
  t.is((await domainRejection(store.testKey(cut, luks.spec, luks.secret))).kind, 'failed_precondition', 'a damaged header is not a wrong key');
  const plain = specFor(dir, 'plain');
  t.is((await domainRejection(store.testKey(plain.path, plain, Buffer.alloc(64)))).kind, 'failed_precondition');
  t.is((await domainRejection(store.testKey(luks.spec.path, luks.spec, Buffer.alloc(4)))).kind, 'invalid_argument');
});

test('testKey answers while another process holds the image open for writing (a running guest)', async (t) => {
  const { spec, secret } = t.context.qcow2Luks;
  const passphrase = luksPassphrase(secret);
  const node = { driver: 'qcow2', encrypt: { format: 'luks', 'key-secret': 'sec0' }, file: { driver: 'file', filename: spec.path } };
  // qemu-io with the image open read-write (and locked) for a few seconds.
  const holder = runTool('qemu-io', ['--object', 'secret,id=sec0,format=raw,file=/dev/fd/3', `json:${JSON.stringify(node)}`, '-c', 'sleep 4000'], { fds: [passphrase] });
  await new Promise((r) => setTimeout(r, 1500));
  t.true(await store.testKey(spec.path, spec, secret));
  t.false(await store.testKey(spec.path, spec, awkwardSecret()));
  const held = await holder;
  t.is(held.code, 0, held.stderr);
});

for (const name of ['luks', 'qcow2Luks'] as const) {
  test.serial(`data round trip through qemu-io on ${name}; wrong key reads nothing; no plaintext on disk`, async (t) => {
    const { spec, secret } = t.context[name];
    const format = spec.format as 'luks' | 'qcow2-luks';
    const w = await qemuIo(spec.path, format, secret, ['write -q -P 0xab 0 1M', 'write -q -P 0x5c 4M 64k']);
    t.is(w.code, 0, w.stderr);
    const r = await qemuIo(spec.path, format, secret, ['read -q -P 0xab 0 1M', 'read -q -P 0x5c 4M 64k'], true);
    t.is(r.code, 0, r.stderr);
    const mismatch = await qemuIo(spec.path, format, secret, ['read -q -P 0xac 0 4k'], true);
    t.not(mismatch.code, 0, 'a wrong pattern is noticed, so the check above means something');
    const wrong = await qemuIo(spec.path, format, awkwardSecret(), ['read -q -P 0xab 0 4k'], true);
    t.not(wrong.code, 0);
    const disk = await readFile(spec.path);
    t.is(disk.indexOf(Buffer.alloc(64, 0xab)), -1, 'the plaintext pattern is not on disk');
    t.is(disk.indexOf(Buffer.alloc(64, 0x5c)), -1);
    t.true(await store.testKey(spec.path, spec, secret), 'the key still opens it after writes');
  });
}

/** PIDs of this process's children running `tool` with an argument that contains `needle`. */
function childrenRunning(tool: string, needle: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'latin1');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const argv = readFileSync(`/proc/${name}/cmdline`, 'latin1').split('\0');
      if (ppid === process.pid && basename(argv[0] ?? '') === tool && argv.some((a) => a.includes(needle))) pids.push(Number(name));
    } catch {
      // Gone meanwhile.
    }
  }
  return pids;
}

test('testKey is unavailable, not "wrong key", while qemu-io is killed or another process holds the image without sharing reads; it answers again once released', async (t) => {
  const { dir } = t.context;
  // An image of its own: the other tests of this file run at the same time.
  const spec = specFor(dir, 'luks', { path: join(dir, 'busy.img') });
  const secret = awkwardSecret();
  await store.create(spec, secret);

  // 1. qemu-io killed by a signal (SIGKILL, as the OOM killer would) while it checks the key.
  let kills = 0;
  const killingRun: RunTool = async (file, args, options) => {
    const run = runTool(file, args, options);
    if (basename(file) !== 'qemu-io') return run;
    let settled = false;
    void run.finally(() => (settled = true)).catch(() => undefined);
    while (!settled) {
      for (const pid of childrenRunning('qemu-io', spec.path)) {
        process.kill(pid, 'SIGKILL');
        kills += 1;
      }
      await sleep(2);
    }
    return run;
  };
  const killed = await domainRejection(createHostImageStore({ run: killingRun }).testKey(spec.path, spec, secret));
  t.true(kills > 0, 'qemu-io was killed (the check ran long enough to be caught)');
  t.is(killed.kind, 'unavailable');
  t.regex(killed.message, /killed by a signal/);

  // 2. The image held by a process that shares no consistent reads: qemu-img amend while it
  // adds a keyslot (QEMU's LUKS driver takes the image for itself while it updates keys;
  // a long iter-time keeps it there). Aborted below, before it writes anything.
  const oldPass = luksPassphrase(secret);
  const newPass = luksPassphrase(awkwardSecret());
  const controller = new AbortController();
  const holder = runTool(
    'qemu-img',
    [
      'amend',
      '--object', 'secret,id=s0,format=raw,file=/dev/fd/3',
      '--object', 'secret,id=s1,format=raw,file=/dev/fd/4',
      '--image-opts', `driver=luks,key-secret=s0,file.filename=${spec.path}`,
      '-o', 'state=active,new-secret=s1,iter-time=60000',
    ],
    { fds: [oldPass, newPass], signal: controller.signal, killGraceMs: 1000 },
  ).catch((err: unknown) => err);
  try {
    // Held once a plain read-only open (no key, no force-share) is refused.
    const raw = `json:${JSON.stringify({ driver: 'raw', file: { driver: 'file', filename: spec.path } })}`;
    let held = false;
    for (const deadline = Date.now() + 20_000; !held && Date.now() < deadline; ) {
      held = (await runTool('qemu-io', ['-r', '-c', 'quit', raw])).code === 1;
      if (!held) await sleep(100);
    }
    t.true(held, 'qemu-img amend took the image within 20 s');
    const busyWrong = await domainRejection(store.testKey(spec.path, spec, awkwardSecret()));
    t.is(busyWrong.kind, 'unavailable', 'a wrong key while busy is no "wrong key" answer');
    t.regex(busyWrong.hint ?? '', /try again/);
    t.is((await domainRejection(store.testKey(spec.path, spec, secret))).kind, 'unavailable', 'nor is the right key "ok"');
  } finally {
    controller.abort();
    await holder;
    oldPass.fill(0);
    newPass.fill(0);
  }

  // 3. Released: the right key opens it, a wrong one does not.
  t.true(await store.testKey(spec.path, spec, secret));
  t.false(await store.testKey(spec.path, spec, awkwardSecret()));
});
