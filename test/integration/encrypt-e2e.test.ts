/**
 * Encrypting an unencrypted volume and decrypting it again, end to end: the real server
 * (`--rotation-interval 1s`), the real agent process, a real libvirtd with QEMU, and the
 * `virtkm` CLI (`volume create --format raw|qcow2`, `volume encrypt`, `volume decrypt --yes`).
 *
 * What is checked from outside, after each step:
 *   - the server: the volume's format and key versions (`volume show --json`): none while
 *     unencrypted, v1 active after encrypting, v1 retired (and no active one) after
 *     decrypting;
 *   - the image: its format as `qemu-img info` probes it (raw / luks, qcow2 with or without
 *     encryption), and a pattern written with qemu-io before the conversion read back
 *     through the key (encrypted) or directly (unencrypted);
 *   - libvirt: the domain's <disk> has an <encryption> naming the volume's secret while the
 *     volume is encrypted and none otherwise; the libvirt secret exists only while it is
 *     encrypted; the guest boots from the converted image (a boot sector that prints a
 *     message on the serial port);
 *   - the agent's key cache: the key while encrypted, nothing after the decryption.
 * Keys come from the agent's sealed key cache (a root user of the host can read it; the
 * server never gives an admin a volume key), into Buffers that reach qemu-io on fd 3 only.
 *
 * Stopped guests are made as in rotation-e2e.test.ts: the agent is stopped, the domain
 * destroyed, the image prepared, the conversion requested and the agent started again (the
 * guest has no autostart, so the agent's first online pass sees the order with the guest
 * stopped and uses qemu-img convert). The live test converts a running guest's qcow2 disk
 * with blockcopy, both ways, without stopping it.
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openKeyCache } from '../../host-agent/src/cache/key-cache.js';
import { loadHostKey } from '../../host-agent/src/enroll/host-key.js';
import { agentStatePaths } from '../../host-agent/src/enroll/state-dir.js';
import { luksPassphrase } from '../../host-agent/src/images/passphrase.js';
import { runTool, type ToolResult } from '../../shared/src/run-tool.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { enrollAgent, freePort, startAgent, until, type AgentProcess } from '../helpers/agent-harness.js';
import { bootSector, ensureLibvirtd, forceCleanup, guestDir, libvirtTest, virsh, waitForFileText, type LibvirtEnv } from '../helpers/libvirt-harness.js';
import { cli, initDataDir, startServer, tempDir, type RunResult, type ServerProcess } from '../helpers/server-harness.js';

const test = anyTest as TestFn<unknown>;
const env: LibvirtEnv = await ensureLibvirtd();

const MiB = 1024 * 1024;
const PATTERN = '0xa7';
const PATTERN_OFF = 4 * MiB;
const PATTERN_LEN = 16 * MiB;
const HOST = 'hv-enc';

type Plain = 'raw' | 'qcow2';
type Encrypted = 'luks' | 'qcow2-luks';
const ENCRYPTED: Record<Plain, Encrypted> = { raw: 'luks', qcow2: 'qcow2-luks' };

interface RotationJson {
  id: string;
  kind: string;
  state: string;
  mechanism: string;
  from_version: number;
  to_version: number;
  error: string;
}
interface VolumeJson {
  id: string;
  format: string;
  active_key_version: number;
  key_versions: { version: number; state: string }[];
}

/** A server, an enrolled agent and their directories. */
class Rig {
  server: ServerProcess | undefined;
  agent: AgentProcess | undefined;
  readonly guests: string[] = [];
  readonly volumeIds: string[] = [];
  private constructor(
    readonly dir: { path: string; remove: () => void },
    readonly images: { path: string; remove: () => void },
    readonly data: string,
    readonly port: number,
    public state = '',
  ) {}

  static async start(): Promise<Rig> {
    await loadSodium();
    const dir = tempDir('virtkm-enc-e2e-');
    const images = guestDir('virtkm-enc-e2e-images-');
    const data = join(dir.path, 'data');
    initDataDir(data);
    const rig = new Rig(dir, images, data, await freePort());
    rig.server = await startServer(data, ['--listen', `127.0.0.1:${rig.port}`, '--rotation-interval', '1s', '--key-grace', '1h']);
    rig.state = await enrollAgent((...a) => rig.admin(...a), rig.server.enrollAddress, dir.path, HOST);
    rig.startAgent();
    await until('agent connected', async () => (JSON.parse((await rig.admin('host', 'show', HOST, '--json')).stdout) as { connected: boolean }).connected);
    return rig;
  }

  admin(...args: string[]): Promise<RunResult> {
    return cli(['--server', `127.0.0.1:${this.port}`, '--credentials', join(this.data, 'admin.pem'), ...args]);
  }

  async json<T>(...args: string[]): Promise<T> {
    const r = await this.admin(...args, '--json');
    if (r.code !== 0) throw new Error(`virtkm ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  }

  startAgent(): AgentProcess {
    this.agent = startAgent(this.state, this.images.path, `127.0.0.1:${this.port}`);
    return this.agent;
  }

  async stopAgent(): Promise<void> {
    const a = this.agent;
    this.agent = undefined;
    if (a) await killAndWait(a.proc);
  }

  async close(): Promise<void> {
    await this.stopAgent().catch(() => undefined);
    await this.server?.stop();
    const secrets = virsh(['secret-list'])
      .stdout.split('\n')
      .map((l) => l.trim().split(/\s+/))
      .filter((c) => this.volumeIds.some((id) => c[2] === `virtkm:${id}`))
      .map((c) => c[0] as string);
    forceCleanup(this.guests, secrets);
    this.images.remove();
    this.dir.remove();
  }
}

async function killAndWait(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The agent's key cache: the versions it holds for a volume, and a copy of one key (the caller wipes it). */
async function withCache<T>(state: string, fn: (cache: ReturnType<typeof openKeyCache>) => T): Promise<T> {
  const paths = agentStatePaths(state);
  const host = JSON.parse(readFileSync(paths.hostJson, 'utf8')) as { host_id: string };
  const cache = openKeyCache(paths.cache, await loadHostKey(paths), host.host_id);
  try {
    return fn(cache);
  } finally {
    cache.close();
  }
}
const cachedVersions = (state: string, volumeId: string) =>
  withCache(state, (c) =>
    c
      .entries()
      .filter((e) => e.volumeId === volumeId)
      .map((e) => e.keyVersion)
      .sort(),
  );
const cachedKey = (state: string, volumeId: string, version: number) =>
  withCache(state, (c) => {
    const k = c.get(volumeId, version);
    return k ? Buffer.from(k) : undefined;
  });

/** qemu-io on the image, unencrypted (no key) or with `key` on fd 3. */
async function qemuIo(path: string, format: Plain | Encrypted, key: Uint8Array | undefined, commands: string[], readOnly: boolean): Promise<ToolResult> {
  const file = { driver: 'file', filename: path };
  const node =
    format === 'raw'
      ? { driver: 'raw', file }
      : format === 'qcow2'
        ? { driver: 'qcow2', file }
        : format === 'luks'
          ? { driver: 'luks', 'key-secret': 'sec0', file }
          : { driver: 'qcow2', encrypt: { format: 'luks', 'key-secret': 'sec0' }, file };
  const pass = key ? luksPassphrase(key) : undefined;
  try {
    const args = [...(readOnly ? ['-r', '-U'] : []), ...(pass ? ['--object', 'secret,id=sec0,format=raw,file=/dev/fd/3'] : []), `json:${JSON.stringify(node)}`];
    for (const c of commands) args.push('-c', c);
    return await runTool('qemu-io', args, { fds: pass ? [pass] : [], timeoutMs: 120_000 });
  } finally {
    pass?.fill(0);
  }
}

/** What qemu-img probes the image as: raw, luks, qcow2 or qcow2-luks. */
async function probedFormat(path: string): Promise<string> {
  const r = await runTool('qemu-img', ['info', '-U', '--output=json', path], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`qemu-img info failed: ${r.stderr}`);
  const info = JSON.parse(r.stdout) as { format: string; encrypted?: boolean };
  return info.format === 'qcow2' && info.encrypted ? 'qcow2-luks' : info.format;
}

const domState = (name: string) => virsh(['domstate', name]).stdout.trim();
/** The <disk> of vda in the domain's persistent (inactive) definition. */
const diskXml = (name: string) => /<disk\b[\s\S]*?<target dev='vda'[\s\S]*?<\/disk>/.exec(virsh(['dumpxml', '--inactive', name]).stdout)?.[0] ?? '';
const secretOf = (volumeId: string) =>
  virsh(['secret-list'])
    .stdout.split('\n')
    .map((l) => l.trim().split(/\s+/))
    .find((c) => c[2] === `virtkm:${volumeId}`)?.[0];

interface Guest {
  name: string;
  volume: string;
  volumeId: string;
  plain: Plain;
  image: string;
  serial: string;
  message: string;
}

/** An unencrypted volume and a guest using it; waits until it runs (image created). */
async function placeGuest(t: ExecutionContext, rig: Rig, plain: Plain): Promise<Guest> {
  const name = `vkm-enc-${randomBytes(3).toString('hex')}`;
  const volume = `${name}-disk`;
  const v = await rig.json<VolumeJson>('volume', 'create', volume, '--size', '32M', '--format', plain);
  t.deepEqual([v.format, v.active_key_version, v.key_versions], [plain, 0, []], 'an unencrypted volume has no key version');
  const serial = join(rig.images.path, `${name}.serial`);
  const xml = `<domain type='${env.domainType}'><name>${name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type><boot dev='hd'/></os><devices><disk type='volume' device='disk'><source pool='virtkm' volume='${volume}'/><target dev='vda' bus='virtio'/></disk><serial type='file'><source path='${serial}'/><target port='0'/></serial><memballoon model='none'/></devices></domain>`;
  writeFileSync(join(rig.dir.path, `${name}.xml`), xml);
  rig.guests.push(name);
  rig.volumeIds.push(v.id);
  const def = await rig.admin('guest', 'define', name, '--xml', join(rig.dir.path, `${name}.xml`), '--host', HOST);
  if (def.code !== 0) throw new Error(`guest define failed: ${def.stderr}`);
  await until(`${name} running`, async () => (await rig.json<{ phase: string }>('guest', 'show', name)).phase === 'running');
  const image = join(rig.images.path, `${v.id}.${plain === 'qcow2' ? 'qcow2' : 'img'}`);
  if (!existsSync(image)) throw new Error(`the agent did not create ${image}`);
  return { name, volume, volumeId: v.id, plain, image, serial, message: `virtkm encrypt e2e ${randomBytes(4).toString('hex')}` };
}

/** Stops the agent and the guest and writes the boot sector and the pattern (unencrypted). The agent stays stopped. */
async function prepareImage(rig: Rig, g: Guest): Promise<void> {
  await rig.stopAgent();
  virsh(['destroy', g.name]);
  const sectorFile = join(rig.dir.path, `${g.name}.boot`);
  writeFileSync(sectorFile, bootSector(g.message));
  const w = await qemuIo(g.image, g.plain, undefined, [`write -q -s ${sectorFile} 0 512`, `write -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`, 'flush'], false);
  if (w.code !== 0) throw new Error(`qemu-io write failed: ${w.stderr}`);
  rmSync(g.serial, { force: true });
}

/** The pattern and the boot sector read back, through `key` when the image is encrypted. */
async function checkData(t: ExecutionContext, g: Guest, format: Plain | Encrypted, key: Uint8Array | undefined, what: string): Promise<void> {
  const read = await qemuIo(g.image, format, key, [`read -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`, 'read -q -P 0x55 510 1', 'read -q -P 0xaa 511 1'], true);
  t.is(read.code, 0, read.stderr);
  t.notRegex(read.stdout + read.stderr, /Pattern verification failed/, `the pattern and the boot sector are intact (${what})`);
}

async function checkBoots(t: ExecutionContext, g: Guest, what: string): Promise<void> {
  await until(`${g.name} running (${what})`, () => domState(g.name) === 'running', 120_000);
  t.true(await waitForFileText(g.serial, g.message, 60_000), `the guest booted from the image and printed its message (${what})`);
}

/** Runs a conversion command with the agent down until the rotation was sent to the host, then starts the agent; returns the CLI's JSON. */
async function convertStopped(t: ExecutionContext, rig: Rig, g: Guest, args: string[]): Promise<RotationJson> {
  const cmd = rig.admin('volume', ...args, g.volume, '--wait', '--json');
  await until('conversion sent to the host', async () => (await rig.json<RotationJson[]>('rotation', 'list', '--volume', g.volume, '--state', 'running')).length === 1, 30_000);
  rig.startAgent();
  const res = await withTimeout(cmd, 180_000, `volume ${args.join(' ')} --wait`);
  t.is(res.code, 0, res.stderr);
  const out = JSON.parse(res.stdout) as { rotations: RotationJson[] };
  t.is(out.rotations.length, 1);
  return out.rotations[0]!;
}

/** The encrypted state: v1 active, the image encrypted and opened by v1, the domain naming its secret. */
async function checkEncrypted(t: ExecutionContext, rig: Rig, g: Guest): Promise<Buffer> {
  const enc = ENCRYPTED[g.plain];
  const vol = await rig.json<VolumeJson>('volume', 'show', g.volume);
  t.deepEqual([vol.format, vol.active_key_version, vol.key_versions.map((k) => [k.version, k.state])], [enc, 1, [[1, 'active']]]);
  t.is(await probedFormat(g.image), enc, 'qemu-img probes the image as encrypted');
  const key = await until('the agent cache holds v1', () => cachedKey(rig.state, g.volumeId, 1));
  await checkData(t, g, enc, key, 'through v1');
  const plainRead = await qemuIo(g.image, g.plain, undefined, [`read -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`], true);
  t.regex(plainRead.stdout + plainRead.stderr, /Pattern verification failed|encrypt/i, 'the data is no longer readable without the key');
  const uuid = await until('the libvirt secret of the volume', () => secretOf(g.volumeId));
  await until('the domain names the secret', () => diskXml(g.name).includes(uuid));
  t.regex(diskXml(g.name), new RegExp(`<encryption format='luks'[^>]*>\\s*<secret type='passphrase' uuid='${uuid}'/>`));
  return key;
}

/** The decrypted state: no active key, v1 retired, the image unencrypted, no secret, no cached key. */
async function checkDecrypted(t: ExecutionContext, rig: Rig, g: Guest): Promise<void> {
  const vol = await rig.json<VolumeJson>('volume', 'show', g.volume);
  t.deepEqual([vol.format, vol.active_key_version, vol.key_versions.map((k) => [k.version, k.state])], [g.plain, 0, [[1, 'retired']]]);
  t.is(await probedFormat(g.image), g.plain, 'qemu-img probes the image as unencrypted');
  await checkData(t, g, g.plain, undefined, 'without a key');
  await until('the agent cache holds no key of the volume', async () => (await cachedVersions(rig.state, g.volumeId)).length === 0);
  await until('the libvirt secret is gone', () => secretOf(g.volumeId) === undefined);
  await until('the domain names no secret', () => !diskXml(g.name).includes('<encryption'));
  t.regex(diskXml(g.name), new RegExp(`<driver name='qemu' type='${g.plain}'/>`));
}

libvirtTest(test, env, 'raw -> luks -> raw with the guest stopped: qemu-img convert both ways, data intact, the guest boots each time', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(t, rig, 'raw');
    t.notRegex(diskXml(g.name), /<encryption/, 'an unencrypted disk has no <encryption>');
    t.is(secretOf(g.volumeId), undefined, 'and no libvirt secret');
    t.deepEqual(await cachedVersions(rig.state, g.volumeId), [], 'and nothing in the key cache');
    await prepareImage(rig, g);

    const enc = await convertStopped(t, rig, g, ['encrypt']);
    t.deepEqual([enc.kind, enc.state, enc.from_version, enc.to_version, enc.mechanism], ['encrypt', 'done', 0, 1, 'qemu-convert']);
    await checkBoots(t, g, 'after encrypting');
    v1 = await checkEncrypted(t, rig, g);

    // Decrypting lowers protection: refused without --yes (stdin is not a terminal), nothing changed.
    const before = await rig.json<VolumeJson>('volume', 'show', g.volume);
    const noYes = await rig.admin('volume', 'decrypt', g.volume);
    t.not(noYes.code, 0);
    t.regex(noYes.stderr, /--yes/);
    t.deepEqual(await rig.json<VolumeJson>('volume', 'show', g.volume), before, 'nothing changed');
    t.is((await rig.json<RotationJson[]>('rotation', 'list', '--volume', g.volume)).length, 1, 'no rotation was queued');

    await prepareImageKeepData(rig, g);
    const dec = await convertStopped(t, rig, g, ['decrypt', '--yes']);
    t.deepEqual([dec.kind, dec.state, dec.from_version, dec.to_version, dec.mechanism], ['decrypt', 'done', 1, 0, 'qemu-convert']);
    await checkBoots(t, g, 'after decrypting');
    await checkDecrypted(t, rig, g);
    // The key that encrypted it no longer has anything to open.
    const byOldKey = await qemuIo(g.image, 'luks', v1, ['read -q 0 512'], true);
    t.not(byOldKey.code, 0, 'the image is no LUKS image any more');
    // Both conversions are audited under their own actions.
    const audit = await rig.json<{ action: string }[]>('audit', 'list', '--target', g.volumeId);
    const acts = audit.map((e) => e.action);
    for (const a of ['volume.create', 'volume.encrypt.request', 'volume.encrypt.done', 'volume.decrypt.request', 'volume.decrypt.done']) t.true(acts.includes(a), a);
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

/** Stops the agent and the guest again (the image keeps its data). */
async function prepareImageKeepData(rig: Rig, g: Guest): Promise<void> {
  await rig.stopAgent();
  virsh(['destroy', g.name]);
  rmSync(g.serial, { force: true });
}

libvirtTest(test, env, 'qcow2 -> qcow2-luks -> qcow2 with the guest running: live blockcopy both ways, the guest keeps running', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(t, rig, 'qcow2');
    await prepareImage(rig, g);
    rig.startAgent();
    await checkBoots(t, g, 'before encrypting');
    const domId = virsh(['domid', g.name]).stdout.trim();
    const live = async (args: string[]): Promise<RotationJson> => {
      const cmd = rig.admin('volume', ...args, g.volume, '--wait', '--json');
      let settled = false;
      void cmd.finally(() => (settled = true));
      const states = new Set<string>();
      while (!settled) {
        states.add(domState(g.name));
        await new Promise((r) => setTimeout(r, 100));
      }
      const res = await withTimeout(cmd, 180_000, `volume ${args.join(' ')}`);
      t.is(res.code, 0, res.stderr + res.stdout);
      t.deepEqual([...states], ['running'], 'the guest ran all through the conversion');
      t.is(virsh(['domid', g.name]).stdout.trim(), domId, 'the same QEMU process');
      return (JSON.parse(res.stdout) as { rotations: RotationJson[] }).rotations[0]!;
    };
    const enc = await live(['encrypt']);
    t.deepEqual([enc.state, enc.from_version, enc.to_version, enc.mechanism, enc.error], ['done', 0, 1, 'live-blockcopy', '']);
    v1 = await checkEncrypted(t, rig, g);
    const dec = await live(['decrypt', '--yes']);
    t.deepEqual([dec.state, dec.from_version, dec.to_version, dec.mechanism, dec.error], ['done', 1, 0, 'live-blockcopy', '']);
    await checkDecrypted(t, rig, g);
    // The persistent definition starts the converted image.
    t.is(virsh(['destroy', g.name]).code, 0);
    rmSync(g.serial, { force: true });
    t.is(virsh(['start', g.name]).code, 0);
    await checkBoots(t, g, 'after a stop and start');
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'bad input: encrypting an encrypted volume, decrypting an unencrypted or a luks2 one, an unknown volume: clear errors, nothing changed', async (t) => {
  const rig = await Rig.start();
  try {
    const sfx = randomBytes(3).toString('hex');
    await rig.json('volume', 'create', `enc-${sfx}`, '--size', '16M', '--format', 'luks');
    await rig.json('volume', 'create', `l2-${sfx}`, '--size', '16M', '--format', 'luks2');
    await rig.json('volume', 'create', `raw-${sfx}`, '--size', '16M', '--format', 'raw');
    const snapshot = async () => ({
      vols: await Promise.all([`enc-${sfx}`, `l2-${sfx}`, `raw-${sfx}`].map((n) => rig.json<VolumeJson>('volume', 'show', n))),
      rotations: await rig.json<RotationJson[]>('rotation', 'list'),
    });
    const before = await snapshot();
    const cases: [string[], RegExp][] = [
      [['volume', 'encrypt', `enc-${sfx}`], /already encrypted/],
      [['volume', 'decrypt', `raw-${sfx}`, '--yes'], /not encrypted/],
      [['volume', 'decrypt', `l2-${sfx}`, '--yes'], /luks2 volume cannot be decrypted/],
      [['volume', 'rotate', `raw-${sfx}`, '--rekey'], /not encrypted/],
      [['volume', 'encrypt', `no-such-${sfx}`], /not found/],
      [['volume', 'decrypt', `enc-${sfx}`], /--yes/],
    ];
    for (const [args, re] of cases) {
      const r = await rig.admin(...args);
      t.not(r.code, 0, args.join(' '));
      t.regex(r.stderr, re, args.join(' '));
    }
    t.deepEqual(await snapshot(), before, 'nothing changed');
  } finally {
    await rig.close();
  }
}, { serial: true });
