/**
 * A move between two hosts on one machine: host A is the machine's libvirtd, host B a
 * second libvirtd in its own mount namespace; the image directory is shared storage. The
 * destination receives the key and defines the guest, the source stops it, the destination
 * starts it only after that, and the source wipes domain, secret and cached key only after
 * the destination confirmed.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openKeyCache } from '../../host-agent/src/cache/key-cache.js';
import { KEY_ID_LENGTH } from '../../shared/src/envelope.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { enrollAgent, startAgent, until, type AgentProcess } from '../helpers/agent-harness.js';
import { ensureLibvirtd, guestDir, libvirtTest, startNamespacedHost, virsh, type LibvirtEnv, type NamespacedHost } from '../helpers/libvirt-harness.js';
import { cli, initDataDir, startServer, tempDir } from '../helpers/server-harness.js';

const test = anyTest as TestFn<unknown>;
const env: LibvirtEnv = await ensureLibvirtd();

function cacheEntries(state: string): number {
  const host = JSON.parse(readFileSync(join(state, 'host.json'), 'utf8')) as { host_id: string };
  const raw = readFileSync(join(state, 'cache.key'));
  const cache = openKeyCache(join(state, 'key-cache'), { id: raw.subarray(0, KEY_ID_LENGTH), bytes: raw.subarray(KEY_ID_LENGTH) }, host.host_id);
  const n = cache.entries().length;
  cache.close();
  return n;
}

libvirtTest(test, env, 'a guest moves from host A to host B: handover before wipe, never running on both', async (t) => {
  await loadSodium();
  const dir = tempDir();
  const images = guestDir('virtkm-move-images-');
  const data = join(dir.path, 'data');
  initDataDir(data);
  const server = await startServer(data);
  const admin = (...args: string[]) => cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), ...args]);
  const name = `vkm-move-${randomBytes(3).toString('hex')}`;
  let hostB: NamespacedHost | undefined;
  const agents: AgentProcess[] = [];
  try {
    hostB = await startNamespacedHost();
    const b = hostB;
    const stateA = await enrollAgent(admin, server.enrollAddress, dir.path, 'hv-a');
    const stateB = await enrollAgent(admin, server.enrollAddress, dir.path, 'hv-b');
    agents.push(startAgent(stateA, images.path, server.address));
    agents.push(startAgent(stateB, images.path, server.address, b.prefix));
    t.is((await admin('volume', 'create', `${name}-disk`, '--size', '16M', '--format', 'luks')).code, 0);
    const xml = `<domain type='${env.domainType}'><name>${name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices><disk type='volume' device='disk'><source pool='virtkm' volume='${name}-disk'/><target dev='vda' bus='virtio'/></disk><memballoon model='none'/></devices></domain>`;
    writeFileSync(join(dir.path, 'g.xml'), xml);
    t.is((await admin('guest', 'define', name, '--xml', join(dir.path, 'g.xml'), '--host', 'hv-a', '--autostart')).code, 0);
    await until('running on A', () => virsh(['domstate', name]).stdout.trim() === 'running');
    await until('A cached the key', () => cacheEntries(stateA) === 1);

    const moved = await admin('guest', 'move', name, '--to', 'hv-b');
    t.is(moved.code, 0, moved.stderr);
    t.regex(moved.stdout, /hv-a hands it over once it has stopped it/);
    // Watch both hosts until B runs the guest; they must never run it at the same time.
    let both = false;
    await until(
      'running on B',
      () => {
        const onA = virsh(['domstate', name]).stdout.trim() === 'running';
        const onB = b.virsh(['domstate', name]).stdout.trim() === 'running';
        both ||= onA && onB;
        return onB;
      },
      120_000,
    );
    t.false(both, 'never running on both hosts');
    await until('wiped on A', () => virsh(['domstate', name]).code !== 0);
    t.false(virsh(['secret-list']).stdout.includes('virtkm:'), 'no virtkm secret left on A');
    t.true(b.virsh(['secret-list']).stdout.includes('virtkm:'), 'B holds the secret');
    await until('A dropped the key from its cache', () => cacheEntries(stateA) === 0);
    const g = JSON.parse((await admin('guest', 'show', name, '--json')).stdout) as { host: string; handoff_from: string; phase: string };
    t.is(g.host, 'hv-b');
    t.is(g.handoff_from, '');
    const audit = JSON.parse((await admin('audit', 'list', '--action', 'guest.move.complete', '--json')).stdout) as { detail: { from: string; to: string } }[];
    t.deepEqual(audit.map((e) => [e.detail.from, e.detail.to]), [['hv-a', 'hv-b']]);
  } finally {
    for (const a of agents) a.proc.kill('SIGTERM');
    await server.stop();
    virsh(['destroy', name]);
    virsh(['undefine', name]);
    await hostB?.stop();
    images.remove();
    dir.remove();
  }
}, { serial: true });
