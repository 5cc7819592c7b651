/**
 * The server side of the agent stream, driven by a scripted agent over real mTLS: desired
 * state with key packets on hello, reports visible in `guest show` / `host show`, a move
 * that completes only after the destination confirms, and a revoked host's stream closed.
 */
import anyTest, { type TestFn } from 'ava';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { GuestPhase, KeyPacket, VolumePhase } from '../../shared/src/api.js';
import { openSealed } from '../../shared/src/box.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { cli, initDataDir, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';
import { FakeAgent, enrollFakeHost, type FakeHost } from '../helpers/fake-agent.js';

type Host = FakeHost;

interface Ctx {
  dir: { path: string; remove: () => void };
  server: ServerProcess;
  hosts: Record<string, Host>;
}
const test = anyTest as TestFn<Ctx>;

const xml = (name: string, vols: string[]) =>
  `<domain type='kvm'><name>${name}</name><devices>${vols.map((v, i) => `<disk type='volume' device='disk'><source pool='virtkm' volume='${v}'/><target dev='vd${'abc'[i]}'/></disk>`).join('')}</devices></domain>`;

const admin = (t: { context: Ctx }, ...args: string[]) => cli(['--server', t.context.server.address, '--credentials', join(t.context.server.dataDir, 'admin.pem'), ...args]);

async function enroll(t: { context: Ctx }, name: string): Promise<Host> {
  const token = (JSON.parse((await admin(t, 'host', 'token', 'create', name, '--json')).stdout) as { token: string }).token;
  return enrollFakeHost(t.context.server.enrollAddress, name, token);
}

test.before(async (t) => {
  await loadSodium();
  const dir = tempDir();
  initDataDir(join(dir.path, 'data'));
  const server = await startServer(join(dir.path, 'data'));
  t.context = { dir, server, hosts: {} };
  t.context.hosts['hv1'] = await enroll(t, 'hv1');
  t.context.hosts['hv2'] = await enroll(t, 'hv2');
});

test.after.always(async (t) => {
  await t.context.server?.stop();
  t.context.dir?.remove();
});

test.serial('desired state with sealed key packets on hello; reports show in guest and host views; move hands over', async (t) => {
  const vol = JSON.parse((await admin(t, 'volume', 'create', 'disk1', '--size', '1G', '--format', 'qcow2-luks', '--json')).stdout) as { id: string };
  const xmlFile = join(t.context.dir.path, 'g1.xml');
  writeFileSync(xmlFile, xml('g1', ['disk1']));
  const g = JSON.parse((await admin(t, 'guest', 'define', 'g1', '--xml', xmlFile, '--host', 'hv1', '--autostart', '--json')).stdout) as { id: string };

  const a1 = new FakeAgent(t.context.server.address, t.context.hosts['hv1']!);
  const s1 = await a1.until(() => a1.latest()?.guests.length === 1 ? a1.latest() : undefined, 'hv1 desired state');
  const dg = s1.guests[0]!;
  t.is(dg.guestId, g.id);
  t.true(dg.run);
  t.true(dg.autostart);
  const dv = dg.volumes[0]!;
  t.is(dv.volumeId, vol.id);
  t.truthy(dv.packet, 'a key packet comes with the first desired state');
  const packet = KeyPacket.decode(openSealed(dv.packet!.sealed, t.context.hosts['hv1']!.box));
  t.is(packet.volumeId, vol.id);
  t.is(packet.secret.length, 32);

  const host = JSON.parse((await admin(t, 'host', 'show', 'hv1', '--json')).stdout) as { connected: boolean; agent_version: string };
  t.true(host.connected);
  t.is(host.agent_version, 'test');

  a1.report(s1.revision, [{ guestId: g.id, generation: dg.generation, phase: GuestPhase.GUEST_PHASE_RUNNING }], [{ volumeId: vol.id, keyVersion: 1, phase: VolumePhase.VOLUME_PHASE_READY }]);
  let view: { phase: string; volume_reports: { phase: string; host: string }[]; handoff_from: string; host: string } | undefined;
  for (let i = 0; i < 50; i++) {
    view = JSON.parse((await admin(t, 'guest', 'show', 'g1', '--json')).stdout) as typeof view;
    if (view?.phase === 'running') break;
    await new Promise((r) => setTimeout(r, 100));
  }
  t.is(view?.phase, 'running', t.context.server.logs().split('\n').filter((l) => l.includes('error')).join('\n'));
  t.deepEqual(view?.volume_reports.map((r) => [r.host, r.phase]), [['hv1', 'ready']]);
  const hostView = JSON.parse((await admin(t, 'host', 'show', 'hv1', '--json')).stdout) as { placed_guests: { name: string; phase: string }[] };
  t.deepEqual(hostView.placed_guests.map((g) => [g.name, g.phase]), [['g1', 'running']]);

  // Move to hv2: hv1 keeps the guest but must stop it; hv2 gets the key and must not run it yet.
  const a2 = new FakeAgent(t.context.server.address, t.context.hosts['hv2']!);
  t.is((await admin(t, 'guest', 'move', 'g1', '--to', 'hv2')).code, 0);
  const src = await a1.until(() => a1.states.find((s) => s.guests.length === 1 && !s.guests[0]!.run), 'hv1 told to stop');
  t.is(src.guests[0]!.volumes[0]!.packet, undefined, 'the source gets no key again');
  const dst = await a2.until(() => a2.states.find((s) => s.guests.length === 1), 'hv2 receives the guest');
  t.false(dst.guests[0]!.run, 'the destination waits for the source to stop');
  t.truthy(dst.guests[0]!.volumes[0]!.packet);
  t.is((await admin(t, 'guest', 'move', 'g1', '--to', 'hv1')).code, 1, 'a second move waits for the first');
  view = JSON.parse((await admin(t, 'guest', 'show', 'g1', '--json')).stdout) as typeof view;
  t.is(view?.handoff_from, 'hv1');

  const gen = dst.guests[0]!.generation;
  a2.report(dst.revision, [{ guestId: g.id, generation: gen, phase: GuestPhase.GUEST_PHASE_DEFINED }], [{ volumeId: vol.id, keyVersion: 1, phase: VolumePhase.VOLUME_PHASE_READY }]);
  await new Promise((r) => setTimeout(r, 300));
  t.false(a1.latest()!.guests.length === 0, 'the source still holds the guest while it runs there');
  a1.report(src.revision, [{ guestId: g.id, generation: gen, phase: GuestPhase.GUEST_PHASE_STOPPED }], [{ volumeId: vol.id, keyVersion: 1, phase: VolumePhase.VOLUME_PHASE_READY }]);
  await a1.until(() => a1.latest()?.guests.length === 0, 'hv1 told to wipe');
  const final = await a2.until(() => a2.states.find((s) => s.guests[0]?.run === true), 'hv2 told to run');
  t.is(final.guests[0]!.guestId, g.id);
  const audit = JSON.parse((await admin(t, 'audit', 'list', '--action', 'guest.move.complete', '--json')).stdout) as { target: string }[];
  t.deepEqual(audit.map((e) => e.target), [g.id]);
  a1.close();
  a2.close();
});

test.serial('a revoked host loses its stream; bad reports close the stream with INVALID_ARGUMENT', async (t) => {
  const a2 = new FakeAgent(t.context.server.address, t.context.hosts['hv2']!);
  await a2.until(() => a2.latest(), 'desired state');
  a2.stream.write({ msg: { $case: 'report', value: { revision: 1n, guests: [{ guestId: 'x', generation: 1n, phase: 99 as GuestPhase, reason: '' }], volumes: [], deletedImages: [], rotations: [] } } });
  const bad = await a2.until(() => a2.ended, 'stream end');
  t.is(bad.code, status.INVALID_ARGUMENT);

  const again = new FakeAgent(t.context.server.address, t.context.hosts['hv2']!);
  await again.until(() => again.latest(), 'desired state');
  t.is((await admin(t, 'host', 'revoke', 'hv2')).code, 0);
  const end = await again.until(() => again.ended, 'revoked stream end');
  t.is(end.code, status.UNAUTHENTICATED);
  const after = new FakeAgent(t.context.server.address, t.context.hosts['hv2']!);
  const refused = await after.until(() => after.ended, 'refused');
  t.is(refused.code, status.UNAUTHENTICATED);
});
