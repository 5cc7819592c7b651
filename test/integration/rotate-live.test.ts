/**
 * Live re-encryption (host-agent/src/rotate/live-copy.ts) of a real running guest: a tiny
 * KVM/TCG guest booted from a QEMU LUKS image by the real libvirtd of
 * test/helpers/libvirt-harness.ts. The guest's "writes" during the copy are made by QEMU
 * itself (HMP qemu-io on the guest's virtio disk), so they go through the same block layer
 * and mirror as a guest's own writes would. Data is checked with qemu-io (read-only,
 * force-share) under the new key while the guest runs, and again after a restart.
 *
 * The crash test runs the mechanism in a process of its own (run-mechanism.ts with
 * live-copy-fixture.ts), kills it with SIGKILL at random moments, writes through the guest,
 * and runs it again; 20 chained rotations (key v1 -> v2 -> ... -> v21) of one guest.
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DomainError } from '../../shared/src/errors.js';
import { runTool } from '../../shared/src/run-tool.js';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';
import { createLibvirtFfi } from '../../host-agent/src/libvirt/libvirt-ffi.js';
import type { DomainState, Libvirt } from '../../host-agent/src/libvirt/ports.js';
import { secretOwnerTag } from '../../host-agent/src/reconcile/reconciler.js';
import { secretUuidFor } from '../../host-agent/src/reconcile/render-domain.js';
import { createLiveCopy, liveCopyJournalPath, liveCopyTempPath } from '../../host-agent/src/rotate/live-copy.js';
import type { RotationJob, RotationProgress } from '../../host-agent/src/rotate/types.js';
import { serialiseJob } from '../fixtures/rotate/run-mechanism.js';
import { bootSector, createLuksImage, ensureLibvirtd, guestDir, guestDomainXml, libvirtTest, sweep, virsh, waitForFileText } from '../helpers/libvirt-harness.js';

const test = anyTest as TestFn<unknown>;
const env = await ensureLibvirtd();
const RUN = randomBytes(3).toString('hex');
const HOST = `host-${RUN}`;
const BOOT_MESSAGE = 'VIRTKM-LIVE-OK';
const MiB = 1024 * 1024;
const IMAGE_MIB = 32;
const sha256 = (s: string): Buffer => createHash('sha256').update(s).digest();

test.after.always(() => {
  if (!env.skipReason) sweep(`vkl-${RUN}-`, `virtkm:vl-${RUN}-`);
});

/** One guest booted from a LUKS image holding the boot sector and a pattern. */
interface Guest {
  name: string;
  volumeId: string;
  path: string;
  serial: string;
  lv: Libvirt;
  /** Every state the poller saw while it ran. */
  states: Set<DomainState | 'undefined'>;
  stopPolling(): Promise<void>;
}

async function qemuIo(path: string, secret: Uint8Array, commands: string[]): Promise<{ ok: boolean; out: string }> {
  const pass = luksPassphrase(secret);
  try {
    const args = ['-r', '-U', '--object', 'secret,id=s0,format=raw,file=/dev/fd/3', '--image-opts', `driver=luks,key-secret=s0,file.filename=${path}`];
    for (const c of commands) args.push('-c', c);
    const r = await runTool('qemu-io', args, { fds: [pass], timeoutMs: 60_000 });
    const out = r.stdout + r.stderr;
    return { ok: r.code === 0 && !/fail|error|can't open/i.test(out), out };
  } finally {
    pass.fill(0);
  }
}

/** Writes through the running guest's disk (QEMU's own qemu-io on the virtio device). */
function guestWrite(name: string, pattern: number, offset: number, length: number): void {
  const r = virsh(['qemu-monitor-command', name, '--hmp', `qemu-io -d virtio-disk0/virtio-backend "write -P 0x${pattern.toString(16)} ${offset} ${length}"`]);
  if (r.code !== 0 || /error|fail/i.test(r.stdout)) throw new Error(`guest write failed: ${r.stdout} ${r.stderr}`);
}

async function defineSecret(lv: Libvirt, volumeId: string, version: number, secret: Uint8Array): Promise<string> {
  const uuid = secretUuidFor(volumeId, version, sha256);
  await lv.secrets.define({ uuid, volumeId, description: `virtkm volume ${volumeId} key v${version}${secretOwnerTag(HOST)}` });
  const pass = luksPassphrase(secret);
  try {
    await lv.secrets.setValue(uuid, pass);
  } finally {
    pass.fill(0);
  }
  return uuid;
}

async function startGuest(t: ExecutionContext, tag: string, key: Uint8Array): Promise<Guest> {
  const dir = guestDir('virtkm-live-');
  const name = `vkl-${RUN}-${tag}`;
  const volumeId = `vl-${RUN}-${tag}`;
  const path = join(dir.path, `${volumeId}.img`);
  const serial = join(dir.path, 'serial.log');
  const lv = createLibvirtFfi();
  t.teardown(async () => {
    sweep(name, `virtkm:${volumeId}`);
    await lv.close();
    dir.remove();
  });
  const content = Buffer.alloc(IMAGE_MIB * MiB);
  bootSector(BOOT_MESSAGE).copy(content, 0);
  const pass = luksPassphrase(key);
  try {
    await createLuksImage(path, pass, { content });
  } finally {
    pass.fill(0);
  }
  // The pattern written before the guest starts.
  const pattern = await qemuIoWrite(path, key, 'write -P 0xab 4M 4M');
  t.true(pattern, 'pattern written with qemu-io');
  const secretUuid = await defineSecret(lv, volumeId, 1, key);
  await lv.domains.define(guestDomainXml({ name, domainType: env.domainType, marker: { guestId: `g-${tag}`, generation: 1, hostId: HOST }, disk: { path, secretUuid }, serialLog: serial }));
  await lv.domains.start(name);
  t.true(await waitForFileText(serial, BOOT_MESSAGE, 60_000), 'the guest booted from its encrypted disk');
  const states = new Set<DomainState | 'undefined'>();
  let polling = true;
  const poller = (async () => {
    const watcher = createLibvirtFfi({ connections: 1 });
    try {
      while (polling) {
        // libvirtd may be restarted by another test file meanwhile: its guests keep running,
        // and the state is simply not known for that moment.
        const state = await watcher.domains.state(name).catch((err: unknown) => {
          if (err instanceof DomainError && err.kind === 'unavailable') return null;
          throw err;
        });
        if (state !== null) states.add(state ?? 'undefined');
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      await watcher.close();
    }
  })();
  // A test that fails before it stops the poller must not leave it polling (a live loop
  // and its libvirt connection would keep the test file's worker from ending).
  t.teardown(async () => {
    polling = false;
    await poller.catch(() => undefined);
  });
  return {
    name,
    volumeId,
    path,
    serial,
    lv,
    states,
    async stopPolling() {
      polling = false;
      await poller;
    },
  };
}

async function qemuIoWrite(path: string, secret: Uint8Array, command: string): Promise<boolean> {
  const pass = luksPassphrase(secret);
  try {
    const r = await runTool('qemu-io', ['--object', 'secret,id=s0,format=raw,file=/dev/fd/3', '--image-opts', `driver=luks,key-secret=s0,file.filename=${path}`, '-c', command], { fds: [pass], timeoutMs: 60_000 });
    return r.code === 0;
  } finally {
    pass.fill(0);
  }
}

function jobFor(g: Guest, rotationId: string, oldKey: Uint8Array, newKey: Uint8Array): RotationJob {
  return {
    rotationId,
    volumeId: g.volumeId,
    kind: 'reencrypt',
    target: { path: g.path, format: 'luks', sizeBytes: BigInt(IMAGE_MIB * MiB), cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 },
    fromFormat: 'luks',
    oldKey,
    newKey,
  };
}

function secretsOf(volumeId: string): string {
  return virsh(['secret-list']).stdout.split('\n').filter((l) => l.includes(`virtkm:${volumeId}`)).join('\n');
}

/** Restarts the guest from its persistent definition and waits for the boot message. */
async function restartGuest(t: ExecutionContext, g: Guest): Promise<void> {
  await g.lv.domains.destroy(g.name);
  writeFileSync(g.serial, '');
  await g.lv.domains.start(g.name);
  t.true(await waitForFileText(g.serial, BOOT_MESSAGE, 60_000), 'the guest boots again from the re-encrypted disk');
  t.is(await g.lv.domains.state(g.name), 'running');
}

libvirtTest(test, env, 'live: a running guest is re-encrypted with blockcopy, keeps running, and restarts with the new key', async (t) => {
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const g = await startGuest(t, 'main', oldKey);
  const mechanism = createLiveCopy({
    libvirt: g.lv,
    images: createHostImageStore({ iterTimesMs: [50, 50, 100, 100, 150, 200] }),
    hostId: HOST,
    locate: () => ({ domain: g.name, disk: 'vda', oldKeyVersion: 1, newKeyVersion: 2 }),
    pollIntervalMs: 20,
  });
  const steps: RotationProgress[] = [];
  let wroteDuringCopy = false;
  const started = Date.now();
  const result = await mechanism.run(jobFor(g, `r-${RUN}-main`, oldKey, newKey), {
    onProgress: (p) => {
      steps.push(p);
      if (p.step === 'copying' && !wroteDuringCopy) {
        wroteDuringCopy = true;
        guestWrite(g.name, 0xcd, 12 * MiB, 64 * 1024);
      }
    },
  });
  t.log(`live re-encryption of ${IMAGE_MIB} MiB took ${Date.now() - started} ms; steps: ${[...new Set(steps.map((s) => s.step))].join(', ')}`);
  // One more write after the pivot: it must land in the new image under its canonical name.
  guestWrite(g.name, 0xef, 20 * MiB, 64 * 1024);
  await g.stopPolling();
  t.deepEqual([...g.states], ['running'], 'the guest ran throughout');
  t.is(result.opensWith, 'new');
  t.is(result.bytesRewritten, BigInt(IMAGE_MIB * MiB));
  t.true(wroteDuringCopy, 'the guest wrote during the copy');
  t.true(steps.some((s) => s.step === 'copying' && s.bytesTotal > 0n), 'progress came from the block job');
  // Nothing left behind next to the image.
  t.false(existsSync(liveCopyTempPath(g.path, `r-${RUN}-main`)));
  t.false(existsSync(liveCopyJournalPath(g.path, `r-${RUN}-main`)));
  t.deepEqual(readdirSync(join(g.path, '..')).sort(), ['serial.log', `${g.volumeId}.img`]);
  // The canonical image, read while the guest runs: every write with the new key, none with the old.
  const read = await qemuIo(g.path, newKey, ['read -P 0xab 4M 4M', 'read -P 0xcd 12M 64k', 'read -P 0xef 20M 64k']);
  t.true(read.ok, read.out);
  t.false((await qemuIo(g.path, oldKey, ['read 0 512'])).ok, 'the old key does not open the canonical image');
  // Only the new version's secret is defined; the definition names the canonical path and it.
  const newUuid = secretUuidFor(g.volumeId, 2, sha256);
  t.true(secretsOf(g.volumeId).includes(newUuid));
  t.false(secretsOf(g.volumeId).includes(secretUuidFor(g.volumeId, 1, sha256)));
  const inactive = await g.lv.domains.xml(g.name, { inactive: true });
  t.true(inactive.includes(`file='${g.path}'`) && inactive.includes(newUuid), 'the persistent definition names the canonical image and the new secret');
  // The next start uses the new key.
  await restartGuest(t, g);
  const disk = await g.lv.domains.disk(g.name, 'vda');
  t.is(disk?.sourcePath, g.path);
  t.is(disk?.secretUuid, newUuid);
  const after = await qemuIo(g.path, newKey, ['read -P 0xab 4M 4M', 'read -P 0xcd 12M 64k', 'read -P 0xef 20M 64k']);
  t.true(after.ok, after.out);
  // A second live rotation of the same guest after the restart (v2 -> v3) works as well.
  const third = randomBytes(32);
  const again = createLiveCopy({
    libvirt: g.lv,
    images: createHostImageStore({ iterTimesMs: [50, 50, 100, 100, 150, 200] }),
    hostId: HOST,
    locate: () => ({ domain: g.name, disk: 'vda', oldKeyVersion: 2, newKeyVersion: 3 }),
    pollIntervalMs: 20,
  });
  t.is((await again.run(jobFor(g, `r-${RUN}-main2`, newKey, third))).opensWith, 'new');
  t.true((await qemuIo(g.path, third, ['read -P 0xab 4M 4M', 'read -P 0xef 20M 64k'])).ok);
  await g.lv.domains.destroy(g.name);
});

libvirtTest(test, env, 'live: a stopped guest is refused with failed_precondition and nothing changes', async (t) => {
  const oldKey = randomBytes(32);
  const g = await startGuest(t, 'stopped', oldKey);
  await g.stopPolling();
  await g.lv.domains.destroy(g.name);
  const before = secretsOf(g.volumeId);
  const mechanism = createLiveCopy({
    libvirt: g.lv,
    images: createHostImageStore({ iterTimesMs: [50, 100] }),
    hostId: HOST,
    locate: () => ({ domain: g.name, disk: 'vda', oldKeyVersion: 1, newKeyVersion: 2 }),
  });
  const err = await t.throwsAsync(mechanism.run(jobFor(g, `r-${RUN}-stopped`, oldKey, randomBytes(32))), { instanceOf: DomainError });
  t.is(err?.kind, 'failed_precondition');
  t.is(secretsOf(g.volumeId), before);
  t.deepEqual(readdirSync(join(g.path, '..')).sort(), ['serial.log', `${g.volumeId}.img`]);
  t.true((await qemuIo(g.path, oldKey, ['read -P 0xab 4M 4M'])).ok);
  // A job that does not fit the mechanism is refused before anything is looked at.
  const bad = await t.throwsAsync(mechanism.run({ ...jobFor(g, `r-${RUN}-bad`, oldKey, randomBytes(32)), kind: 'rekey' }), { instanceOf: DomainError });
  t.is(bad?.kind, 'invalid_argument');
});

// ----- crash test ----------------------------------------------------------------------

const RUNNER = fileURLToPath(new URL('../fixtures/rotate/run-mechanism.js', import.meta.url));
const KILL_POINTS = Number(process.env['VIRTKM_LIVE_KILL_POINTS'] ?? 20);
const STEPS = ['creating', 'copying', 'pivot', 'finishing', 'verifying'];

interface RunnerOutcome {
  code: number | null;
  killed: boolean;
  lastStep: string;
  result?: unknown;
  error?: { kind: string; message: string };
  stderr: string;
}

/**
 * Runs the mechanism in its own process. Kills it with SIGKILL after `kill.afterMs`, counted
 * from the start or, with `kill.onStep`, from the moment it reports that step.
 */
function runInProcess(job: RotationJob, envVars: Record<string, string>, kill?: { afterMs: number; onStep?: string }): Promise<RunnerOutcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [RUNNER, './live-copy-fixture.js', 'createLiveCopyFromEnv'], { env: { ...process.env, ...envVars }, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let killed = false;
    let killer: NodeJS.Timeout | undefined;
    const arm = (): void => {
      if (kill && !killer) killer = setTimeout(() => ((killed = child.kill('SIGKILL')), undefined), kill.afterMs);
    };
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (kill?.onStep && out.includes(`"step":"${kill.onStep}"`)) arm();
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    if (!kill?.onStep) arm();
    const guard = setTimeout(() => child.kill('SIGKILL'), 180_000);
    child.on('error', reject);
    child.on('close', (code) => {
      if (killer) clearTimeout(killer);
      clearTimeout(guard);
      const lines = out.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { progress?: { step: string }; result?: unknown; error?: { kind: string; message: string } });
      const steps = lines.filter((l) => l.progress).map((l) => l.progress?.step ?? '');
      const last = lines.at(-1);
      if (!killed && code !== 0 && !last?.error) reject(new Error(`runner failed (${code}): ${err.slice(0, 500)}`));
      resolve({ code, killed: killed && !last?.result && !last?.error, lastStep: steps.at(-1) ?? '(none)', result: last?.result, error: last?.error, stderr: err.slice(0, 800) });
    });
    child.stdin.end(serialiseJob(job));
  });
}

libvirtTest(test, env, `live crash: ${KILL_POINTS} rotations killed at random moments and resumed; the guest runs and the data stays`, async (t) => {
  t.timeout(30 * 60_000);
  const keys = [randomBytes(32)];
  const g = await startGuest(t, 'crash', keys[0] as Buffer);
  const started = Date.now();
  const killedAt: string[] = [];
  const written: { pattern: number; offset: number }[] = [];
  // Rotation 1 runs without a kill: its duration spreads the kill points of the others
  // over a whole run (create, secrets, copy, pivot, rename, verify).
  let fullRunMs = 3000;
  for (let i = 1; i <= KILL_POINTS + 1; i++) {
    keys.push(randomBytes(32));
    const oldKey = keys[i - 1] as Buffer;
    const newKey = keys[i] as Buffer;
    const job = jobFor(g, `r-${RUN}-c${i}`, oldKey, newKey);
    const vars = { VIRTKM_LIVE_DOMAIN: g.name, VIRTKM_LIVE_DISK: 'vda', VIRTKM_LIVE_OLD_VERSION: String(i), VIRTKM_LIVE_NEW_VERSION: String(i + 1), VIRTKM_LIVE_HOST: HOST };
    // Even rotations: a random moment of the whole run; odd ones: a random moment shortly
    // after a randomly chosen step, so the late and short phases are hit too.
    const onStep = i % 2 === 1 ? STEPS[Math.floor(Math.random() * STEPS.length)] : undefined;
    const kill = i === 1 ? undefined : { afterMs: onStep ? Math.floor(Math.random() * 400) : 50 + Math.floor(Math.random() * fullRunMs), onStep };
    const t0 = Date.now();
    const first = await runInProcess(job, vars, kill);
    if (i === 1) fullRunMs = Date.now() - t0;
    else killedAt.push(`${onStep ? `${onStep}+` : ''}${kill?.afterMs}ms/${first.killed ? first.lastStep : 'finished'}`);
    // A run that ends on its own succeeds, or fails as unavailable when libvirtd is being
    // restarted by another test (then it counts as one more interruption).
    if (!first.killed) t.true(first.result !== undefined || first.error?.kind === 'unavailable', `run ${i} without a kill: ${JSON.stringify(first.error)} ${first.stderr}`);
    // The guest writes between the crash and the resume (a copy may still be mirroring).
    const w = { pattern: 0x10 + (i % 0xe0), offset: 16 * MiB + i * 64 * 1024 };
    guestWrite(g.name, w.pattern, w.offset, 4096);
    written.push(w);
    let second = await runInProcess(job, vars);
    for (let retry = 0; retry < 5 && second.error?.kind === 'unavailable'; retry++) {
      t.log(`rotation ${i}: libvirt unavailable (${second.error.message}), retrying`);
      await new Promise((r) => setTimeout(r, 3000));
      second = await runInProcess(job, vars);
    }
    t.truthy(second.result, `resumed run ${i} (killed at ${killedAt.at(-1)}): ${JSON.stringify(second.error)} ${second.stderr}`);
    t.is(await g.lv.domains.state(g.name), 'running', `the guest runs after rotation ${i}`);
    const checks = ['read -P 0xab 4M 4M', ...written.map((x) => `read -P 0x${x.pattern.toString(16)} ${x.offset} 4096`)];
    const read = await qemuIo(g.path, newKey, checks);
    t.true(read.ok, `rotation ${i}: data under the new key: ${read.out.slice(0, 300)}`);
    t.false((await qemuIo(g.path, oldKey, ['read 0 512'])).ok, `rotation ${i}: the old key no longer opens the image`);
    const left = readdirSync(join(g.path, '..')).sort();
    t.deepEqual(left, ['serial.log', `${g.volumeId}.img`], `rotation ${i}: no leftovers (${left.join(' ')}; killed at ${killedAt.at(-1)})`);
  }
  await g.stopPolling();
  t.deepEqual([...g.states], ['running'], 'the guest ran throughout all rotations');
  t.log(`an unkilled run took ${fullRunMs} ms; kill points (delay/last step reported): ${killedAt.join(', ')}`);
  t.log(`${KILL_POINTS} killed-and-resumed rotations took ${Math.round((Date.now() - started) / 1000)} s`);
  t.true(killedAt.filter((k) => !k.endsWith('finished')).length >= Math.ceil(KILL_POINTS / 2), 'most runs were killed mid-way');
  await restartGuest(t, g);
  const final = await qemuIo(g.path, keys[KILL_POINTS + 1] as Buffer, ['read -P 0xab 4M 4M', ...written.map((x) => `read -P 0x${x.pattern.toString(16)} ${x.offset} 4096`)]);
  t.true(final.ok, final.out);
  await g.lv.domains.destroy(g.name);
});
