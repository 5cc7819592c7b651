/**
 * `virtkm` key rotation commands against the real server process: rotations of volumes
 * that no host has created yet (they complete at once), rotations carried out by a host
 * (a scripted agent speaking the agent protocol over the real mTLS stream sends progress
 * and the outcome) followed by `rotation watch` and `--wait`, live bars on a (scripted)
 * terminal, policies, and bad input.
 */
import anyTest, { type TestFn } from 'ava';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { KeyPacket, RotationKind, RotationPhase, type RotationStatus } from '../../shared/src/api.js';
import { openSealed } from '../../shared/src/box.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { main as cliMain } from '../../server/src/cli/main.js';
import type { CliTerminal } from '../../server/src/cli/terminal.js';
import { cli, initDataDir, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';
import { FakeAgent, enrollFakeHost, type FakeHost } from '../helpers/fake-agent.js';

type Host = FakeHost;

interface Ctx {
  dir: { path: string; remove: () => void };
  server: ServerProcess;
  hv1: Host;
  /** Made by one test, used by the next (ava gives each test a shallow copy of the context). */
  shared: { agent: FakeAgent; hotId: string; guestId: string };
}
const test = anyTest as TestFn<Ctx>;

const MiB = 1024 * 1024;
/** The grace period the server runs with here (destroy_after = retired_at + this). */
const GRACE_SECONDS = 86_400;

const status = (rotationId: string, volumeId: string, targetVersion: number, phase: RotationPhase, done: number, total: number, rate: number, step: string, reason = ''): RotationStatus => ({
  rotationId,
  volumeId,
  phase,
  step,
  bytesDone: BigInt(done),
  bytesTotal: BigInt(total),
  bytesPerSecond: BigInt(rate),
  reason,
  mechanism: 'qemu-img convert',
  targetVersion,
});

const connArgs = (t: { context: Ctx }) => ['--server', t.context.server.address, '--credentials', join(t.context.server.dataDir, 'admin.pem')];
const admin = (t: { context: Ctx }, ...args: string[]) => cli([...connArgs(t), ...args]);
const json = <T>(r: { code: number; stdout: string; stderr: string }): T => {
  if (r.code !== 0) throw new Error(`exit ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
};

/** The CLI run in-process whose output can be read while it runs. */
function running(t: { context: Ctx }, args: string[], terminal?: CliTerminal) {
  let stdout = '';
  let stderr = '';
  const done = cliMain([...connArgs(t), ...args], { stdout: (s) => (stdout += s), stderr: (s) => (stderr += s), env: { HOME: '/nonexistent' }, ...(terminal ? { terminal } : {}) });
  return { done, out: () => stdout, err: () => stderr };
}

/** Waits for `pred` (polling), at most `ms`. */
async function eventually(pred: () => boolean | Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Rejects when a promise takes longer than `ms`. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} did not end within ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

/** A scripted terminal: answers, an interrupt button and a TTY-like capture stream. */
function fakeTerminal(answer: boolean) {
  const screen = { text: '' };
  const asked: string[] = [];
  let interrupt: (() => void) | undefined;
  const terminal: CliTerminal = {
    stdinIsTty: true,
    stdoutIsTty: true,
    stdoutStream: { isTTY: true, columns: 160, write: (s: string) => ((screen.text += s), true) },
    confirm: (q) => {
      asked.push(q);
      return Promise.resolve(answer);
    },
    onInterrupt: (h) => {
      interrupt = h;
      return () => (interrupt = undefined);
    },
  };
  return { terminal, screen, asked, interrupt: () => interrupt?.() };
}

interface VolumeJson {
  id: string;
  active_key_version: number;
  key_versions: { version: number; state: string; created_at: string; retired_at: string; destroy_after: string }[];
  rotation: RotationJson | null;
}
interface RotationJson {
  id: string;
  volume: string;
  kind: string;
  state: string;
  from_version: number;
  to_version: number;
  host: string;
  mechanism: string;
  bytes_done: string;
  error: string;
  step: string;
}
interface StartJson {
  rotations: RotationJson[];
  skipped: string[];
}

test.before(async (t) => {
  await loadSodium();
  const dir = tempDir();
  initDataDir(join(dir.path, 'data'));
  const server = await startServer(join(dir.path, 'data'), ['--key-grace', '1d']);
  t.context = { dir, server, shared: {} } as Ctx;
  const token = json<{ token: string }>(await admin(t, 'host', 'token', 'create', 'hv1', '--json')).token;
  t.context.hv1 = await enrollFakeHost(server.enrollAddress, 'hv1', token);
});

test.after.always(async (t) => {
  t.context.shared?.agent?.close();
  await t.context.server?.stop();
  t.context.dir?.remove();
});

test.serial('a volume no host created yet rotates at once: version 2 active, version 1 retired with its destroy time', async (t) => {
  t.is(json<{ active_key_version: number }>(await admin(t, 'volume', 'create', 'cold', '--size', '64M', '--format', 'luks', '--json')).active_key_version, 1);
  const started = json<StartJson>(await admin(t, 'volume', 'rotate', 'cold', '--json'));
  t.deepEqual(started.skipped, []);
  t.is(started.rotations.length, 1);
  const r = started.rotations[0]!;
  t.like(r, { volume: 'cold', kind: 'rekey', state: 'done', from_version: 1, to_version: 2, mechanism: 'none (no image yet)' });

  const v = json<VolumeJson>(await admin(t, 'volume', 'show', 'cold', '--json'));
  t.is(v.active_key_version, 2);
  const v1 = v.key_versions.find((k) => k.version === 1)!;
  const v2 = v.key_versions.find((k) => k.version === 2)!;
  t.is(v2.state, 'active');
  t.is(v1.state, 'retired');
  t.truthy(v1.retired_at);
  t.is((Date.parse(v1.destroy_after) - Date.parse(v1.retired_at)) / 1000, GRACE_SECONDS, 'destroyed after the grace period');
  t.is(v2.retired_at, '');
  t.like(v.rotation, { id: r.id, state: 'done' });

  const human = await admin(t, 'volume', 'show', 'cold');
  t.regex(human.stdout, /^ {2}v1 {2}retired .* retired \S+, destroy after \S+$/m);
  t.regex(human.stdout, /^ {2}v2 {2}active {4}\S+$/m);
  t.regex(human.stdout, new RegExp(`^rotation: +${r.id} done \\(rekey, reason manual\\), v1 -> v2$`, 'm'));

  const all = json<RotationJson[]>(await admin(t, 'rotation', 'list', '--json'));
  t.like(all.find((x) => x.id === r.id), { state: 'done', volume: 'cold' });
  t.is(json<RotationJson[]>(await admin(t, 'rotation', 'list', '--state', 'done', '--volume', 'cold', '--json')).length, 1);
  t.deepEqual(json<RotationJson[]>(await admin(t, 'rotation', 'list', '--state', 'queued', '--state', 'running', '--volume', 'cold', '--json')), []);
  t.like(json<RotationJson>(await admin(t, 'rotation', 'show', r.id, '--json')), { id: r.id, state: 'done', to_version: 2 });
  const table = await admin(t, 'rotation', 'list');
  t.regex(table.stdout, /^ID\s+VOLUME\s+KIND\s+STATE/m);
  t.regex(table.stdout, new RegExp(`^${r.id}\\s+cold\\s+rekey\\s+done\\s+manual\\s+v1 -> v2`, 'm'));

  // Human output, --reencrypt, and --wait on a rotation that is already over.
  const again = await admin(t, 'volume', 'rotate', 'cold', '--reencrypt', '--reason', 'audit finding 12', '--wait');
  t.is(again.code, 0, again.stderr);
  t.regex(again.stdout, /^started 1 rotation \(reencrypt, reason audit finding 12\):$/m);
  t.regex(again.stdout, /cold\s+done\s+v2 -> v3\s+done: v2 -> v3 by none \(no image yet\)/);
  t.regex(again.stdout, /^1 rotation ended: 1 done, 0 failed$/m);
  t.is(json<VolumeJson>(await admin(t, 'volume', 'show', 'cold', '--json')).active_key_version, 3);
});

test.serial('bad input: unknown targets, conflicting flags, rotate --all without confirmation change nothing', async (t) => {
  const before = json<RotationJson[]>(await admin(t, 'rotation', 'list', '--json')).length;
  const unknown = await admin(t, 'volume', 'rotate', 'nope');
  t.is(unknown.code, 3);
  t.regex(unknown.stderr, /^virtkm: volume "nope" not found/m);
  const unknownGuest = await admin(t, 'guest', 'rotate', 'nope');
  t.is(unknownGuest.code, 3);
  t.regex(unknownGuest.stderr, /^virtkm: .*not found/m);
  const unknownHost = await admin(t, 'host', 'rotate', 'nope');
  t.is(unknownHost.code, 3);
  t.regex(unknownHost.stderr, /^virtkm: host "nope" not found/m);
  const both = await admin(t, 'volume', 'rotate', 'cold', '--rekey', '--reencrypt');
  t.is(both.code, 2);
  t.regex(both.stderr, /^virtkm: option '--reencrypt' cannot be used with option '--rekey'/m);
  const longReason = await admin(t, 'volume', 'rotate', 'cold', '--reason', 'x'.repeat(201));
  t.is(longReason.code, 2);
  t.regex(longReason.stderr, /^virtkm: reason is longer than 200 characters/m);

  const noYes = await admin(t, 'rotate', '--all', '--reason', 'compromise');
  t.is(noYes.code, 2);
  t.regex(noYes.stderr, /^virtkm: refusing to rotate every volume without confirmation\nvirtkm: hint: add --yes/m);
  const noAll = await admin(t, 'rotate', '--yes');
  t.is(noAll.code, 2);
  t.regex(noAll.stderr, /^virtkm: rotate needs --all/m);
  // On a terminal the question is asked; "no" changes nothing.
  const tty = fakeTerminal(false);
  const declined = running(t, ['rotate', '--all', '--reason', 'compromise'], tty.terminal);
  t.is(await declined.done, 1);
  t.deepEqual(tty.asked, ['re-encrypt EVERY volume (reason: compromise)? [y/N] ']);
  t.regex(declined.err(), /^virtkm: not confirmed: nothing was rotated/m);

  t.is(json<RotationJson[]>(await admin(t, 'rotation', 'list', '--json')).length, before, 'no rotation was created');
  const badState = await admin(t, 'rotation', 'list', '--state', 'sleeping');
  t.is(badState.code, 2);
  t.regex(badState.stderr, /^virtkm: option '--state <state...>' argument 'sleeping' is invalid/m);
  const missing = await admin(t, 'rotation', 'show', '00000000-0000-4000-8000-000000000000');
  t.is(missing.code, 3);
  t.regex(missing.stderr, /^virtkm: rotation not found/m);
  const watchMissing = await within(admin(t, 'rotation', 'watch', '00000000-0000-4000-8000-000000000000'), 10_000, 'watch of an unknown id');
  t.is(watchMissing.code, 3);
  t.regex(watchMissing.stderr, /^virtkm: rotation 00000000-0000-4000-8000-000000000000 not found/m);
  const nothingOpen = await admin(t, 'rotation', 'watch');
  t.is(nothingOpen.code, 0);
  t.is(nothingOpen.stdout, 'no rotation is queued or running\n');
});

test.serial('policies: set, merge, list and delete; invalid durations and scopes are refused', async (t) => {
  const g = json<{ scope: string; max_key_age: string; max_key_age_seconds: string; kind: string }>(await admin(t, 'policy', 'set', '--global', '--max-age', '90d', '--kind', 'reencrypt', '--json'));
  t.like(g, { scope: 'global', max_key_age: '90d', max_key_age_seconds: String(90 * 86400), kind: 'reencrypt' });
  const human = await admin(t, 'policy', 'set', '--volume', 'cold', '--reencrypt-after-move', '1d');
  t.is(human.code, 0, human.stderr);
  t.is(human.stdout, 'set the volume cold policy: max key age unlimited, kind rekey, re-encrypt after a move within 1d\n');
  // Fields not given keep their value.
  const merged = json<{ max_key_age: string; reencrypt_after_move: string; target_name: string }>(await admin(t, 'policy', 'set', '--volume', 'cold', '--max-age', '1d12h', '--json'));
  t.like(merged, { max_key_age: '36h', reencrypt_after_move: '1d', target_name: 'cold' });

  const list = json<{ scope: string; target_name: string; max_key_age: string }[]>(await admin(t, 'policy', 'list', '--json'));
  t.deepEqual(list.map((p) => [p.scope, p.target_name, p.max_key_age]).sort(), [['global', '', '90d'], ['volume', 'cold', '36h']]);
  const table = await admin(t, 'policy', 'list');
  t.regex(table.stdout, /^volume\s+cold\s+36h\s+rekey\s+1d\s/m);

  for (const [args, re] of [
    [['--global', '--max-age', '3x'], /^virtkm: --max-age must look like 90s, 15m, 12h, 7d, 2w or 1y \(got "3x"\)/m],
    [['--global', '--reencrypt-after-move', '-1d'], /^virtkm: --reencrypt-after-move must look like/m],
    [['--global', '--max-age', '200y'], /^virtkm: max key age must be between 0 and \d+ seconds/m],
    [['--max-age', '1d'], /^virtkm: give exactly one of --global, --volume VOLUME, --guest GUEST/m],
    [['--global', '--volume', 'cold', '--max-age', '1d'], /^virtkm: give exactly one of/m],
    [['--global'], /^virtkm: nothing to set/m],
    [['--global', '--kind', 'shred'], /^virtkm: option '--kind <kind>' argument 'shred' is invalid/m],
  ] as [string[], RegExp][]) {
    const r = await admin(t, 'policy', 'set', ...args);
    t.is(r.code, 2, args.join(' '));
    t.regex(r.stderr, re);
  }
  const unknown = await admin(t, 'policy', 'set', '--volume', 'nope', '--max-age', '1d');
  t.is(unknown.code, 3);
  t.deepEqual(json<unknown[]>(await admin(t, 'policy', 'list', '--json')).length, 2, 'refused input changed nothing');

  t.is((await admin(t, 'policy', 'delete', '--volume', 'cold')).stdout, 'deleted the volume cold policy\n');
  const again = await admin(t, 'policy', 'delete', '--volume', 'cold');
  t.is(again.code, 3);
  t.regex(again.stderr, /^virtkm: rotation policy not found/m);
  t.is((await admin(t, 'policy', 'delete', '--global')).code, 0);
  t.deepEqual(json<unknown[]>(await admin(t, 'policy', 'list', '--json')), []);
});

test.serial('a rotation on a host: watch prints its progress and ends when done; a second one is skipped', async (t) => {
  const hot = json<{ id: string }>(await admin(t, 'volume', 'create', 'hot', '--size', '64M', '--format', 'qcow2-luks', '--json'));
  const xml = join(t.context.dir.path, 'g1.xml');
  writeFileSync(xml, `<domain type='kvm'><name>g1</name><devices><disk type='volume' device='disk'><source pool='virtkm' volume='hot'/><target dev='vda'/></disk></devices></domain>`);
  const g = json<{ id: string }>(await admin(t, 'guest', 'define', 'g1', '--xml', xml, '--host', 'hv1', '--json'));
  t.context.shared.hotId = hot.id;
  t.context.shared.guestId = g.id;
  const agent = (t.context.shared.agent = new FakeAgent(t.context.server.address, t.context.hv1));
  const s1 = await agent.until(() => (agent.latest()?.guests.length === 1 ? agent.latest() : undefined), 'desired state with g1');
  // The image now exists on hv1 (volume ready): from here on its key changes on the host.
  agent.report(s1.revision, [{ guestId: g.id, generation: s1.guests[0]!.generation }], [{ volumeId: hot.id, keyVersion: 1 }]);
  await eventually(async () => json<{ volume_reports: { phase: string }[] }>(await admin(t, 'guest', 'show', 'g1', '--json')).volume_reports[0]?.phase === 'ready', 'hot ready on hv1');

  const started = json<StartJson>(await admin(t, 'volume', 'rotate', 'hot', '--reencrypt', '--json'));
  const r = started.rotations[0]!;
  t.like(r, { volume: 'hot', kind: 'reencrypt', state: 'running', from_version: 1, to_version: 2, host: 'hv1' });
  const { state, order } = await agent.order(r.id);
  t.is(order.kind, RotationKind.ROTATION_KIND_REENCRYPT);
  t.is(order.targetVersion, 2);
  const packet = KeyPacket.decode(openSealed(order.targetPacket!.sealed, t.context.hv1.box));
  t.is(packet.keyVersion, 2);
  t.is(packet.volumeId, hot.id);
  packet.secret.fill(0);

  // While it runs, another rotation of the same volume is skipped, not queued.
  const second = json<StartJson>(await admin(t, 'volume', 'rotate', 'hot', '--json'));
  t.deepEqual(second, { rotations: [], skipped: ['hot'] });
  const secondHuman = await admin(t, 'guest', 'rotate', 'g1');
  t.is(secondHuman.code, 0, secondHuman.stderr);
  t.is(secondHuman.stdout, 'no rotation started\nskipped (a rotation of theirs is already queued or running): hot\n');

  const watch = running(t, ['rotation', 'watch', r.id]);
  await eventually(() => /state=running/.test(watch.out()), 'the current state first');
  const steps = [4, 8, 12];
  for (const n of steps) {
    agent.progress([status(r.id, hot.id, 2, RotationPhase.ROTATION_PHASE_RUNNING, n * MiB, 16 * MiB, 2 * MiB, 'copying')]);
    await eventually(() => watch.out().includes(`done=${n * MiB} `), `progress line ${n} MiB`);
  }
  const show = await admin(t, 'volume', 'show', 'hot');
  t.regex(show.stdout, /^ {2}progress: {2}75% \(12\.0 MiB of 16\.0 MiB\) at 2\.0 MiB\/s, ETA 2s; copying$/m);
  t.regex(show.stdout, /^ {2}mechanism: qemu-img convert on hv1$/m);
  const listed = json<RotationJson[]>(await admin(t, 'rotation', 'list', '--state', 'running', '--json'));
  t.deepEqual(listed.map((x) => [x.id, x.bytes_done]), [[r.id, String(12 * MiB)]]);
  t.is((await Promise.race([watch.done, new Promise((res) => setTimeout(() => res('still watching'), 300))])), 'still watching');

  agent.report(state.revision, [{ guestId: g.id, generation: state.guests[0]!.generation }], [{ volumeId: hot.id, keyVersion: 2 }], [status(r.id, hot.id, 2, RotationPhase.ROTATION_PHASE_DONE, 16 * MiB, 16 * MiB, 2 * MiB, 'done')]);
  t.is(await within(watch.done, 10_000, 'rotation watch'), 0, watch.err());
  const lines = watch.out().trim().split('\n');
  t.true(lines.every((l) => l.startsWith('time=') && l.includes(` rotation=${r.id} volume=hot kind=reencrypt `)), watch.out());
  t.regex(lines.find((l) => l.includes(`done=${4 * MiB} `))!, / state=running step=copying done=4194304 total=16777216 rate=2097152 eta=6 host=hv1 mechanism="qemu-img convert"$/);
  t.regex(lines.at(-1)!, / state=done step=done done=16777216 total=16777216 /);

  const v = json<VolumeJson>(await admin(t, 'volume', 'show', 'hot', '--json'));
  t.is(v.active_key_version, 2);
  t.is(v.key_versions.find((k) => k.version === 1)?.state, 'retired');
  t.like(v.rotation, { id: r.id, state: 'done', mechanism: 'qemu-img convert' });
});

test.serial('--wait follows a rotation and exits 1 when the host reports it failed', async (t) => {
  const { agent, hotId, guestId } = t.context.shared;
  const wait = running(t, ['guest', 'rotate', 'g1', '--rekey', '--wait']);
  await eventually(() => /^started 1 rotation \(rekey, reason manual\):$/m.test(wait.out()), 'the rotation started');
  const id = /^([0-9a-f-]{36})\s+hot\s+running/m.exec(wait.out())?.[1];
  t.truthy(id, wait.out());
  const { state, order } = await agent.order(id!);
  t.is(order.kind, RotationKind.ROTATION_KIND_REKEY);
  t.is(order.targetVersion, 3);
  agent.report(state.revision, [{ guestId, generation: state.guests[0]!.generation }], [{ volumeId: hotId, keyVersion: 2 }], [
    status(id!, hotId, 3, RotationPhase.ROTATION_PHASE_FAILED, 0, 0, 0, 'given up', 'not enough free space for the copy'),
  ]);
  t.is(await within(wait.done, 10_000, 'rotate --wait'), 1);
  t.regex(wait.out(), /^1 rotation ended: 0 done, 1 failed\n {2}hot \(\S+\): failed: not enough free space for the copy$/m);
  t.regex(wait.err(), /^virtkm: 1 of 1 rotation failed\nvirtkm: hint: virtkm rotation show ID/m);
  const v = json<VolumeJson>(await admin(t, 'volume', 'show', 'hot', '--json'));
  t.is(v.active_key_version, 2, 'the active key stays');
  t.is(v.key_versions.find((k) => k.version === 3)?.state, 'retired');
  t.like(v.rotation, { id: id!, state: 'failed', error: 'not enough free space for the copy' });
});

test.serial('on a terminal: live progress bars; Ctrl-C ends the watching, not the rotation', async (t) => {
  const { agent, hotId, guestId } = t.context.shared;
  const started = json<StartJson>(await admin(t, 'host', 'rotate', 'hv1', '--reencrypt', '--json'));
  t.is(started.rotations.length, 1);
  const r = started.rotations[0]!;
  const { state } = await agent.order(r.id);

  const first = fakeTerminal(true);
  const interrupted = running(t, ['rotation', 'watch'], first.terminal);
  await eventually(() => first.screen.text.includes('hot'), 'a bar for hot');
  first.interrupt();
  t.is(await within(interrupted.done, 10_000, 'interrupted watch'), 1);
  t.regex(interrupted.err(), /^virtkm: interrupted: the rotations go on on the server/m);
  t.is(json<RotationJson>(await admin(t, 'rotation', 'show', r.id, '--json')).state, 'running');

  const tty = fakeTerminal(true);
  const watch = running(t, ['rotation', 'watch', r.id], tty.terminal);
  await eventually(() => tty.screen.text.includes('hot'), 'a bar for hot');
  agent.progress([status(r.id, hotId, r.to_version, RotationPhase.ROTATION_PHASE_RUNNING, 8 * MiB, 16 * MiB, 4 * MiB, 'copying')]);
  await eventually(() => tty.screen.text.includes('50% 8.0 MiB/16.0 MiB  4.0 MiB/s  ETA 2s  copying'), 'a half-full bar', 5_000);
  agent.report(state.revision, [{ guestId, generation: state.guests[0]!.generation }], [{ volumeId: hotId, keyVersion: r.to_version }], [
    status(r.id, hotId, r.to_version, RotationPhase.ROTATION_PHASE_DONE, 16 * MiB, 16 * MiB, 4 * MiB, 'done'),
  ]);
  t.is(await within(watch.done, 10_000, 'watch on a terminal'), 0, watch.err());
  t.regex(tty.screen.text, /hot +█+ done: v2 -> v4 by qemu-img convert/);
  t.true(tty.screen.text.includes('\x1b[?25h'), 'the cursor is shown again');
  t.is(watch.out(), '1 rotation ended: 1 done, 0 failed\n');
});

test.serial('rotate --all --reason compromise --yes: re-encrypts everything, old keys of finished rotations are destroyed at once', async (t) => {
  json(await admin(t, 'volume', 'create', 'cold2', '--size', '64M', '--format', 'luks2', '--json'));
  const all = json<StartJson>(await admin(t, 'rotate', '--all', '--reason', 'compromise', '--yes', '--json'));
  t.deepEqual(all.skipped, []);
  t.deepEqual(all.rotations.map((r) => [r.volume, r.kind, r.state]).sort(), [
    ['cold', 'reencrypt', 'done'],
    ['cold2', 'reencrypt', 'done'],
    ['hot', 'reencrypt', 'running'],
  ]);
  const cold2 = json<VolumeJson>(await admin(t, 'volume', 'show', 'cold2', '--json'));
  const old = cold2.key_versions.find((k) => k.version === 1)!;
  t.is(old.state, 'destroyed');
  t.is(old.destroy_after, old.retired_at, 'no grace period after a compromise');
  const human = await admin(t, 'volume', 'show', 'cold2');
  t.regex(human.stdout, /^ {2}v1 {2}destroyed .* retired (\S+), destroyed \1$/m);

  // The host finishes its part: then the old key of hot goes at once too.
  const { agent, hotId, guestId } = t.context.shared;
  const hot = all.rotations.find((r) => r.volume === 'hot')!;
  const { state } = await agent.order(hot.id);
  agent.report(state.revision, [{ guestId, generation: state.guests[0]!.generation }], [{ volumeId: hotId, keyVersion: hot.to_version }], [
    status(hot.id, hotId, hot.to_version, RotationPhase.ROTATION_PHASE_DONE, 16 * MiB, 16 * MiB, 4 * MiB, 'done'),
  ]);
  const waited = await within(admin(t, 'rotation', 'watch', hot.id, '--json'), 10_000, 'watch --json');
  t.is(waited.code, 0, waited.stderr);
  const last = JSON.parse(waited.stdout.trim().split('\n').at(-1)!) as RotationJson;
  t.like(last, { id: hot.id, state: 'done' });
  await eventually(async () => json<VolumeJson>(await admin(t, 'volume', 'show', 'hot', '--json')).key_versions.find((k) => k.version === hot.from_version)?.state === 'destroyed', 'the old key of hot destroyed');
  t.pass();
});
