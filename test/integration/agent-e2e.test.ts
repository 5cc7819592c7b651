/**
 * End to end on a real libvirt host: the real server, the real agent process, libvirtd,
 * QEMU and qemu-img. A guest defined through the CLI runs with its encrypted disk; a disk
 * with another key fails clearly; agent and libvirtd restarted with the server down bring
 * the autostart guest back from the sealed cache; deleting the guest wipes it.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openKeyCache } from '../../host-agent/src/cache/key-cache.js';
import { KEY_ID_LENGTH } from '../../shared/src/envelope.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { createLuksImage, ensureLibvirtd, guestDir, libvirtTest, restartLibvirtd, virsh, type LibvirtEnv } from '../helpers/libvirt-harness.js';
import { cli, initDataDir, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';
import { enrollAgent, freePort, startAgent, until, type AgentProcess } from '../helpers/agent-harness.js';

const test = anyTest as TestFn<unknown>;
const env: LibvirtEnv = await ensureLibvirtd();

const domState = (name: string) => virsh(['domstate', name]).stdout.trim();

libvirtTest(test, env, 'a guest defined through the CLI runs on a real host; wrong keys fail clearly; it comes back from the cache; delete wipes it; revocation is reported', async (t) => {
  await loadSodium();
  const dir = tempDir();
  const images = guestDir('virtkm-e2e-images-');
  const port = await freePort();
  const data = join(dir.path, 'data');
  initDataDir(data);
  let server: ServerProcess | undefined = await startServer(data, ['--listen', `127.0.0.1:${port}`]);
  const admin = (...args: string[]) => cli(['--server', `127.0.0.1:${port}`, '--credentials', join(data, 'admin.pem'), ...args]);
  let agent: AgentProcess | undefined;
  const guestName = `vkm-e2e-${randomBytes(3).toString('hex')}`;
  const badName = `${guestName}-bad`;
  try {
    // Enroll the host with the agent itself.
    const state = await enrollAgent(admin, server.enrollAddress, dir.path, 'hv-e2e');
    agent = startAgent(state, images.path, `127.0.0.1:${port}`);
    await until('agent connected', async () => (JSON.parse((await admin('host', 'show', 'hv-e2e', '--json')).stdout) as { connected: boolean }).connected);

    // A guest with an encrypted qcow2 disk, created by the agent.
    t.is((await admin('volume', 'create', `${guestName}-disk`, '--size', '16M', '--format', 'qcow2-luks')).code, 0);
    const xml = `<domain type='${env.domainType}'><name>${guestName}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices><disk type='volume' device='disk'><source pool='virtkm' volume='${guestName}-disk'/><target dev='vda' bus='virtio'/></disk><memballoon model='none'/></devices></domain>`;
    writeFileSync(join(dir.path, 'g.xml'), xml);
    const def = await admin('guest', 'define', guestName, '--xml', join(dir.path, 'g.xml'), '--host', 'hv-e2e', '--autostart');
    t.is(def.code, 0, def.stderr);
    const shown = await until('guest running', async () => {
      const g = JSON.parse((await admin('guest', 'show', guestName, '--json')).stdout) as { phase: string; phase_reason: string; volume_reports: { phase: string; host: string }[] };
      return g.phase === 'running' ? g : undefined;
    });
    t.deepEqual(shown.volume_reports.map((r) => [r.host, r.phase]), [['hv-e2e', 'ready']]);
    t.is(domState(guestName), 'running');
    const secrets = virsh(['secret-list']).stdout;
    const uuid = /([0-9a-f-]{36})\s+volume virtkm:/.exec(secrets)?.[1];
    t.truthy(uuid, secrets);
    t.not(virsh(['secret-get-value', uuid!]).code, 0, 'the libvirt secret is private');

    // A volume whose image exists with another key: reported, never started, never reformatted.
    const bad = JSON.parse((await admin('volume', 'create', `${badName}-disk`, '--size', '16M', '--format', 'luks', '--json')).stdout) as { id: string };
    const badImage = join(images.path, `${bad.id}.img`);
    await createLuksImage(badImage, Buffer.from(randomBytes(32).toString('hex')));
    const before = readFileSync(badImage);
    writeFileSync(join(dir.path, 'bad.xml'), xml.replaceAll(guestName, badName));
    t.is((await admin('guest', 'define', badName, '--xml', join(dir.path, 'bad.xml'), '--host', 'hv-e2e')).code, 0);
    const failed = await until('bad guest reported', async () => {
      const g = JSON.parse((await admin('guest', 'show', badName, '--json')).stdout) as { phase: string; phase_reason: string; volume_reports: { phase: string }[] };
      return g.phase === 'failed' ? g : undefined;
    });
    t.regex(failed.phase_reason, /wrong key/);
    t.is(failed.volume_reports[0]?.phase, 'wrong_key');
    t.true(readFileSync(badImage).equals(before), 'the image is left as it was');
    t.not(virsh(['domstate', badName]).code, 0, 'no domain is defined over a disk that does not open');
    t.is((await admin('guest', 'delete', badName)).code, 0);

    // Host reboot with the server down: agent killed, guest stopped, libvirtd restarted (its
    // ephemeral secrets are gone); the agent starts the autostart guest from its cache.
    agent.proc.kill('SIGKILL');
    await server.stop();
    server = undefined;
    virsh(['destroy', guestName]);
    await restartLibvirtd();
    t.false(virsh(['secret-list']).stdout.includes('virtkm:'), 'libvirtd forgot the ephemeral secret');
    agent = startAgent(state, images.path, `127.0.0.1:${port}`);
    await until('guest running again from the cache', () => (domState(guestName) === 'running' ? true : undefined));
    const started = agent;
    await until('the agent log says so', () => (/started guests from the cache/.test(started.logs()) ? true : undefined), 20_000);
    t.regex(started.logs(), /"msg":"started guests from the cache","running":1/);

    // The server comes back; deleting the guest wipes it from the host.
    server = await startServer(data, ['--listen', `127.0.0.1:${port}`]);
    await until('agent reconnected', async () => (JSON.parse((await admin('host', 'show', 'hv-e2e', '--json')).stdout) as { connected: boolean }).connected);
    const vol = JSON.parse((await admin('volume', 'show', `${guestName}-disk`, '--json')).stdout) as { id: string };
    t.true(existsSync(join(images.path, `${vol.id}.qcow2`)));
    t.is((await admin('guest', 'delete', guestName, '--delete-volumes')).code, 0);
    await until('guest wiped', () => (virsh(['domstate', guestName]).code !== 0 ? true : undefined));
    await until('image deleted as asked', () => !existsSync(join(images.path, `${vol.id}.qcow2`)));
    t.true(existsSync(badImage), 'an image is deleted only when asked');
    t.false(virsh(['secret-list']).stdout.includes('virtkm:'), 'no virtkm secret is left in libvirt');
    const host = JSON.parse(readFileSync(join(state, 'host.json'), 'utf8')) as { host_id: string };
    const raw = readFileSync(join(state, 'cache.key'));
    const cache = openKeyCache(join(state, 'key-cache'), { id: raw.subarray(0, KEY_ID_LENGTH), bytes: raw.subarray(KEY_ID_LENGTH) }, host.host_id);
    t.deepEqual(cache.entries(), [], 'no key is left in the cache');
    cache.close();

    // A revoked host is told so clearly, and keeps being refused.
    t.is((await admin('host', 'revoke', 'hv-e2e')).code, 0);
    const running = agent;
    await until('the agent reports the refusal', () => /"msg":"the server refuses this host","reason":"host has been revoked"/.test(running.logs()), 30_000);
    const host2 = JSON.parse((await admin('host', 'show', 'hv-e2e', '--json')).stdout) as { state: string; connected: boolean };
    t.deepEqual([host2.state, host2.connected], ['revoked', false]);
  } finally {
    agent?.proc.kill('SIGTERM');
    await server?.stop();
    for (const n of [guestName, badName]) {
      virsh(['destroy', n]);
      virsh(['undefine', n]);
    }
    images.remove();
    dir.remove();
  }
}, { serial: true });
