/**
 * Key rotation end to end: the real server (started with `--rotation-interval 1s`), the real
 * agent process, a real libvirtd with QEMU, and the `virtkm` CLI. Each test places a guest
 * whose disk is a virtkm volume, lets the agent create the image, rotates the volume's key
 * through the CLI and checks the outcome from outside:
 *   - the server's key versions: v2 active, v1 retired (`volume show --json`);
 *   - the image: read back with the new key (the pattern written before is intact), and the
 *     old key no longer opens it; a re-encryption gives it a new LUKS UUID (new header and
 *     data key), a rekey keeps it (metadata only);
 *   - the guest: its disk starts with a boot sector that prints a message on the serial
 *     port, so a guest that boots after the rotation shows that libvirt's secret holds the
 *     new key and that QEMU reads the data back through it.
 * Where the keys come from: the server never gives an admin a volume key, so the test reads
 * them where a root user of the host can, from the agent's sealed key cache (opened with the
 * host key of the state directory, as test/integration/agent-e2e.test.ts does), into Buffers
 * that reach qemu-io on fd 3 only and are wiped afterwards. That is also how the pattern and
 * the boot sector get written under the old key before a rotation.
 *
 * Stopped guests: a guest placed on a host always runs in this codebase (desired state
 * `run`), so "stopped" is made by hand: the agent is stopped (SIGTERM), the domain
 * destroyed, the image prepared, the rotation requested, and the agent started again. The
 * guest is defined without autostart, so the agent's offline start from its cache leaves it
 * stopped, and its first online pass sees the order and a stopped domain: the offline
 * mechanism runs and the guest stays down until the rotation is done.
 *
 * Crash safety across processes: kill -9 of the agent (twice in one rotation, at different
 * points) and of the server while a rotation runs. Kill points are chosen by watching the
 * image directory for the rotation's own files (the copy of qemu-convert, the destination
 * of a live blockcopy), which exist only between the start and the end of the work on the
 * image: a kill then is mid-rotation by construction, whatever the server has heard yet.
 * (Progress on the server, `rotation show`'s bytes_done, is no usable trigger here: the
 * agent sends progress at most once a second, and a 32 MiB image is copied in less.) After
 * each kill of the agent, exactly one key the server still holds (v1 active, v2 pending)
 * must open the image and read the pattern. The per-mechanism tests with 20 kill points
 * each are test/integration/rotate-crash-*.
 *
 * The live test rotates the same running guest twice (a re-encryption, then a rekey, which
 * for a running guest is a live copy too): libvirt's live XML of the guest still names the
 * first copy's destination when the second one starts.
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
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
/** The test pattern: this byte over PATTERN_LEN bytes from PATTERN_OFF on the guest disk. */
const PATTERN = '0x5a';
const PATTERN_OFF = 4 * MiB;
const PATTERN_LEN = 24 * MiB;
const HOST = 'hv-rot';

type Format = 'luks' | 'qcow2-luks';

interface RotationJson {
  id: string;
  state: string;
  step: string;
  mechanism: string;
  from_version: number;
  to_version: number;
  bytes_done: string;
  error: string;
}
interface VolumeJson {
  id: string;
  active_key_version: number;
  key_versions: { version: number; state: string }[];
  rotation: RotationJson | null;
}

/** A server, an enrolled agent and their directories; the server keeps its port across restarts. */
class Rig {
  server: ServerProcess | undefined;
  agent: AgentProcess | undefined;
  readonly guests: string[] = [];
  /** Volumes of the guests placed here: their libvirt secrets are removed at the end. */
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
    const dir = tempDir('virtkm-rot-e2e-');
    const images = guestDir('virtkm-rot-e2e-images-');
    const data = join(dir.path, 'data');
    initDataDir(data);
    const rig = new Rig(dir, images, data, await freePort());
    await rig.startServer();
    rig.state = await enrollAgent((...a) => rig.admin(...a), rig.server!.enrollAddress, dir.path, HOST);
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

  async startServer(): Promise<void> {
    this.server = await startServer(this.data, ['--listen', `127.0.0.1:${this.port}`, '--rotation-interval', '1s', '--key-grace', '1h']);
  }

  startAgent(): AgentProcess {
    this.agent = startAgent(this.state, this.images.path, `127.0.0.1:${this.port}`);
    return this.agent;
  }

  /** Stops the agent (SIGTERM: graceful, jobs aborted; SIGKILL: a crash) and waits for its exit. */
  async stopAgent(signal: 'SIGTERM' | 'SIGKILL' = 'SIGTERM'): Promise<void> {
    const a = this.agent;
    this.agent = undefined;
    if (a) await killAndWait(a.proc, signal);
  }

  async close(): Promise<void> {
    await this.stopAgent('SIGTERM').catch(() => undefined);
    await this.server?.stop();
    // The agent is stopped, not told to wipe: remove its domains and secrets here.
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

async function killAndWait(proc: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  proc.kill(signal);
  const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

/** `promise`, or a rejection after `ms` (a CLI --wait must not hang the suite). */
async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A copy of a volume key from the agent's sealed cache, or undefined. The caller wipes it. */
async function cachedKey(state: string, volumeId: string, version: number): Promise<Buffer | undefined> {
  const paths = agentStatePaths(state);
  const host = JSON.parse(readFileSync(paths.hostJson, 'utf8')) as { host_id: string };
  const cache = openKeyCache(paths.cache, await loadHostKey(paths), host.host_id);
  try {
    const k = cache.get(volumeId, version);
    return k ? Buffer.from(k) : undefined;
  } finally {
    cache.close();
  }
}

/** Key versions the agent's cache holds for a volume. */
async function cachedVersions(state: string, volumeId: string): Promise<number[]> {
  const paths = agentStatePaths(state);
  const host = JSON.parse(readFileSync(paths.hostJson, 'utf8')) as { host_id: string };
  const cache = openKeyCache(paths.cache, await loadHostKey(paths), host.host_id);
  try {
    return cache
      .entries()
      .filter((e) => e.volumeId === volumeId)
      .map((e) => e.keyVersion)
      .sort();
  } finally {
    cache.close();
  }
}

/**
 * qemu-io on an image with `key` on fd 3. Read-only runs share the image (-U): a running
 * guest holds QEMU's write lock, and the tests only read what nobody writes any more.
 */
async function qemuIo(path: string, format: Format, key: Uint8Array, commands: string[], readOnly: boolean): Promise<ToolResult> {
  const file = { driver: 'file', filename: path };
  const node = format === 'luks' ? { driver: 'luks', 'key-secret': 'sec0', file } : { driver: 'qcow2', encrypt: { format: 'luks', 'key-secret': 'sec0' }, file };
  const pass = luksPassphrase(key);
  try {
    const args = [...(readOnly ? ['-r', '-U'] : []), '--object', 'secret,id=sec0,format=raw,file=/dev/fd/3', `json:${JSON.stringify(node)}`];
    for (const c of commands) args.push('-c', c);
    return await runTool('qemu-io', args, { fds: [pass], timeoutMs: 120_000 });
  } finally {
    pass.fill(0);
  }
}

/** The LUKS UUID of an image (qemu-img info, no key needed). */
async function luksUuid(path: string, format: Format): Promise<string> {
  const r = await runTool('qemu-img', ['info', '-U', '--output=json', '-f', format === 'luks' ? 'luks' : 'qcow2', path], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`qemu-img info failed: ${r.stderr}`);
  const info = JSON.parse(r.stdout) as { 'format-specific'?: { data?: { uuid?: string; encrypt?: { uuid?: string } } } };
  const d = info['format-specific']?.data;
  const uuid = format === 'luks' ? d?.uuid : d?.encrypt?.uuid;
  if (!uuid) throw new Error(`no LUKS UUID in qemu-img info: ${r.stdout}`);
  return uuid;
}

const domState = (name: string) => virsh(['domstate', name]).stdout.trim();

interface PlacedGuest {
  name: string;
  volume: string;
  volumeId: string;
  format: Format;
  image: string;
  serial: string;
  message: string;
}

/** A volume and a guest using it, placed on the rig's host; waits until it runs (image created). */
async function placeGuest(rig: Rig, format: Format): Promise<PlacedGuest> {
  const name = `vkm-rot-${randomBytes(3).toString('hex')}`;
  const volume = `${name}-disk`;
  const v = await rig.json<{ id: string }>('volume', 'create', volume, '--size', '32M', '--format', format);
  const serial = join(rig.images.path, `${name}.serial`);
  const xml = `<domain type='${env.domainType}'><name>${name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type><boot dev='hd'/></os><devices><disk type='volume' device='disk'><source pool='virtkm' volume='${volume}'/><target dev='vda' bus='virtio'/></disk><serial type='file'><source path='${serial}'/><target port='0'/></serial><memballoon model='none'/></devices></domain>`;
  writeFileSync(join(rig.dir.path, `${name}.xml`), xml);
  rig.guests.push(name);
  rig.volumeIds.push(v.id);
  // No autostart: the agent's offline start from its cache leaves the guest stopped.
  const def = await rig.admin('guest', 'define', name, '--xml', join(rig.dir.path, `${name}.xml`), '--host', HOST);
  if (def.code !== 0) throw new Error(`guest define failed: ${def.stderr}`);
  await until(`${name} running`, async () => (await rig.json<{ phase: string }>('guest', 'show', name)).phase === 'running');
  const image = join(rig.images.path, `${v.id}.${format === 'qcow2-luks' ? 'qcow2' : 'img'}`);
  if (!existsSync(image)) throw new Error(`the agent did not create ${image}`);
  return { name, volume, volumeId: v.id, format, image, serial, message: `virtkm rotation e2e ${randomBytes(4).toString('hex')}` };
}

/**
 * Stops the agent and the guest, and writes the boot sector and the pattern with the
 * volume's v1 key. The agent stays stopped.
 */
async function prepareImage(rig: Rig, g: PlacedGuest): Promise<void> {
  await rig.stopAgent('SIGTERM');
  virsh(['destroy', g.name]);
  const key = await cachedKey(rig.state, g.volumeId, 1);
  if (!key) throw new Error('the agent cache has no v1 key');
  const sectorFile = join(rig.dir.path, `${g.name}.boot`);
  writeFileSync(sectorFile, bootSector(g.message));
  try {
    const w = await qemuIo(g.image, g.format, key, [`write -q -s ${sectorFile} 0 512`, `write -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`, 'flush'], false);
    if (w.code !== 0) throw new Error(`qemu-io write failed: ${w.stderr}`);
  } finally {
    key.fill(0);
  }
  rmSync(g.serial, { force: true });
}

/** Starts a rotation through the CLI without waiting; returns its id. */
async function requestRotation(rig: Rig, g: PlacedGuest, kind: '--reencrypt' | '--rekey'): Promise<string> {
  const res = await rig.json<{ rotations: RotationJson[]; skipped: string[] }>('volume', 'rotate', g.volume, kind);
  if (res.rotations.length !== 1) throw new Error(`expected one rotation, got ${JSON.stringify(res)}`);
  return res.rotations[0]!.id;
}

/** Files the rotation keeps next to the image (copy, live destination, journal, backups). */
function rotationFiles(g: PlacedGuest, rotationId: string): string[] {
  const base = basename(g.image);
  return readdirSync(join(g.image, '..')).filter((n) => n.includes(base) && n.includes(rotationId));
}

/**
 * Polls fast (5 ms) until `ready(files)` holds for the rotation's own files next to the
 * image; returns the files then. The kill points of the crash tests.
 */
async function killPoint(g: PlacedGuest, rotationId: string, what: string, ready: (files: string[]) => boolean, timeoutMs = 60_000): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const files = rotationFiles(g, rotationId);
    if (ready(files)) return files;
    if (Date.now() > deadline) throw new Error(`kill point never reached: ${what} (files: ${files.join(', ') || 'none'})`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** qemu-convert's copy under its own name: its header is made and qemu-img convert writes it (or it is verified). */
const copyInProgress = (files: string[]) => files.some((f) => f.endsWith('.copy'));

/**
 * What must hold after a rotation to version `to` is confirmed: the versions on the server
 * (`to` active, every older one retired), the agent's cache holding only `to`, the pattern
 * and boot sector readable with it, the previous key (`oldKey`) refused by the image, the
 * LUKS UUID changed (reencrypt) or kept (rekey).
 */
async function checkRotated(t: ExecutionContext, rig: Rig, g: PlacedGuest, uuidBefore: string, kind: 'reencrypt' | 'rekey', oldKey: Buffer, to = 2): Promise<void> {
  const vol = await rig.json<VolumeJson>('volume', 'show', g.volume);
  t.is(vol.active_key_version, to);
  t.deepEqual(
    vol.key_versions.map((k) => [k.version, k.state]).sort(),
    Array.from({ length: to }, (_, i) => [i + 1, i + 1 === to ? 'active' : 'retired']),
  );
  // Once the server confirmed, the agent keeps only the active version.
  await until(`the agent cache holds only v${to}`, async () => JSON.stringify(await cachedVersions(rig.state, g.volumeId)) === `[${to}]`);
  const key = await cachedKey(rig.state, g.volumeId, to);
  t.truthy(key, `v${to} in the agent cache`);
  if (!key) return;
  try {
    t.false(oldKey.equals(key), 'a new key');
    const read = await qemuIo(g.image, g.format, key, [`read -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`, 'read -q -P 0x55 510 1', 'read -q -P 0xaa 511 1'], true);
    t.is(read.code, 0, read.stderr);
    t.notRegex(read.stdout + read.stderr, /Pattern verification failed/, 'the pattern and the boot sector are intact');
    const old = await qemuIo(g.image, g.format, oldKey, ['read -q 0 512'], true);
    t.not(old.code, 0, 'the old key no longer opens the image');
    t.regex(old.stderr, /Invalid password|cannot unlock/i);
  } finally {
    key.fill(0);
  }
  const uuidAfter = await luksUuid(g.image, g.format);
  if (kind === 'reencrypt') t.not(uuidAfter, uuidBefore, 're-encryption wrote a new LUKS header');
  else t.is(uuidAfter, uuidBefore, 'a rekey changes keyslots only');
}

/**
 * After a crash: the canonical image must open with a key the server still holds (v1, or
 * v2 which is pending until confirmed; v2 is read from the agent's cache, which keeps both
 * versions while an order runs). Returns the versions that open it, for the log.
 */
async function checkOpensWithStoredKey(t: ExecutionContext, rig: Rig, g: PlacedGuest, v1: Buffer, when: string): Promise<number[]> {
  const opens: number[] = [];
  const probe = async (key: Buffer) => (await qemuIo(g.image, g.format, key, [`read -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`], true)).code === 0;
  if (await probe(v1)) opens.push(1);
  const v2 = await cachedKey(rig.state, g.volumeId, 2);
  try {
    if (v2 && (await probe(v2))) opens.push(2);
  } finally {
    v2?.fill(0);
  }
  t.is(opens.length, 1, `${when}: exactly one stored key opens the image and reads the pattern (opens with ${JSON.stringify(opens)})`);
  return opens;
}

/** Waits until the guest runs and printed its boot message (a fresh serial log). */
async function checkBoots(t: ExecutionContext, g: PlacedGuest, what: string): Promise<void> {
  await until(`${g.name} running (${what})`, () => domState(g.name) === 'running', 120_000);
  t.true(await waitForFileText(g.serial, g.message, 60_000), `the guest booted from the rotated image and printed its message (${what})`);
}

/** Stops the guest, clears its serial log and starts it again from its persistent definition. */
async function restartGuest(t: ExecutionContext, g: PlacedGuest): Promise<void> {
  t.is(virsh(['destroy', g.name]).code, 0);
  rmSync(g.serial, { force: true });
  const s = virsh(['start', g.name]);
  t.is(s.code, 0, s.stderr);
}

/** The v1 key, read before the rotation (the cache drops it once v2 is confirmed). */
async function v1Key(rig: Rig, g: PlacedGuest): Promise<Buffer> {
  const k = await cachedKey(rig.state, g.volumeId, 1);
  if (!k) throw new Error('no v1 key in the cache');
  return k;
}

libvirtTest(test, env, 'reencrypt a stopped guest qcow2-luks volume: qemu-convert, v2 active, data intact, the guest boots with the new key', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(rig, 'qcow2-luks');
    await prepareImage(rig, g);
    v1 = await v1Key(rig, g);
    const uuidBefore = await luksUuid(g.image, g.format);
    t.is(domState(g.name), 'shut off');
    // The admin's command, following the rotation; the agent comes back meanwhile.
    const rotate = rig.admin('volume', 'rotate', g.volume, '--reencrypt', '--wait', '--json');
    // Sent to the host before the agent connects: its first online pass sees the order
    // (without one it would start the guest, and the rotation would be a live one).
    await until('rotation sent to the host', async () => (await rig.json<RotationJson[]>('rotation', 'list', '--volume', g.volume, '--state', 'running')).length === 1, 30_000);
    rig.startAgent();
    const res = await withTimeout(rotate, 180_000, 'volume rotate --wait');
    t.is(res.code, 0, res.stderr);
    const out = JSON.parse(res.stdout) as { rotations: RotationJson[]; skipped: string[] };
    t.deepEqual(
      out.rotations.map((r) => [r.state, r.from_version, r.to_version, r.mechanism]),
      [['done', 1, 2, 'qemu-convert']],
    );
    t.deepEqual(out.skipped, []);
    await checkBoots(t, g, 'right after the rotation');
    await checkRotated(t, rig, g, uuidBefore, 'reencrypt', v1);
    t.deepEqual(rotationFiles(g, out.rotations[0]!.id), [], 'no leftovers of the rotation');
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'reencrypt, then rekey, a running guest luks volume: live blockcopy twice, the guest keeps running, and boots from the new image after a restart', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  let v2: Buffer | undefined;
  try {
    const g = await placeGuest(rig, 'luks');
    await prepareImage(rig, g);
    v1 = await v1Key(rig, g);
    const uuidBefore = await luksUuid(g.image, g.format);
    rig.startAgent();
    await checkBoots(t, g, 'before the rotation, with v1');
    const domId = virsh(['domid', g.name]).stdout.trim();
    const rotate = rig.admin('volume', 'rotate', g.volume, '--reencrypt', '--wait', '--json');
    let settled = false;
    void rotate.finally(() => (settled = true));
    const states = new Set<string>();
    const ids = new Set<string>();
    while (!settled) {
      states.add(domState(g.name));
      ids.add(virsh(['domid', g.name]).stdout.trim());
      await new Promise((r) => setTimeout(r, 100));
    }
    const res = await withTimeout(rotate, 180_000, 'volume rotate --wait');
    t.is(res.code, 0, res.stderr);
    const out = JSON.parse(res.stdout) as { rotations: RotationJson[] };
    t.deepEqual(
      out.rotations.map((r) => [r.state, r.from_version, r.to_version, r.mechanism]),
      [['done', 1, 2, 'live-blockcopy']],
    );
    t.deepEqual([...states], ['running'], 'the guest ran all through the rotation');
    t.deepEqual([...ids], [domId], 'the same QEMU process (domain id) all through');
    t.is(domState(g.name), 'running');
    await checkRotated(t, rig, g, uuidBefore, 'reencrypt', v1);

    // A second live rotation of the same running guest (a rekey of a running guest is a
    // live copy too): libvirt's live XML still names the first copy's destination.
    v2 = await cachedKey(rig.state, g.volumeId, 2);
    if (!v2) throw new Error('no v2 key in the cache');
    const uuid2 = await luksUuid(g.image, g.format);
    const second = await withTimeout(rig.admin('volume', 'rotate', g.volume, '--rekey', '--wait', '--json'), 180_000, 'second volume rotate --wait');
    t.is(second.code, 0, second.stderr + second.stdout);
    const out2 = JSON.parse(second.stdout) as { rotations: RotationJson[] };
    t.deepEqual(
      out2.rotations.map((r) => [r.state, r.from_version, r.to_version, r.mechanism, r.error]),
      [['done', 2, 3, 'live-blockcopy', '']],
    );
    t.is(virsh(['domid', g.name]).stdout.trim(), domId, 'still the same QEMU process');
    await checkRotated(t, rig, g, uuid2, 'reencrypt', v2, 3);
    await restartGuest(t, g);
    await checkBoots(t, g, 'after a stop and start');
  } finally {
    v1?.fill(0);
    v2?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'rekey a stopped guest luks volume: qemu-rekey keeps the header, the old passphrase is gone; a second request while it runs is skipped', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(rig, 'luks');
    await prepareImage(rig, g);
    v1 = await v1Key(rig, g);
    const uuidBefore = await luksUuid(g.image, g.format);
    // The agent is down: the rotation is sent to the host and stays running.
    const id = await requestRotation(rig, g, '--rekey');
    const running = await rig.json<RotationJson>('rotation', 'show', id);
    t.deepEqual([running.state, running.to_version], ['running', 2]);
    // Bad input: the volume is already rotating. Reported skipped, nothing changed.
    const before = await rig.json<VolumeJson>('volume', 'show', g.volume);
    const again = await rig.admin('volume', 'rotate', g.volume, '--rekey');
    t.is(again.code, 0, again.stderr);
    t.regex(again.stdout, new RegExp(`skipped \\(a rotation of theirs is already queued or running\\): ${g.volume}`));
    const againJson = await rig.json<{ rotations: RotationJson[]; skipped: string[] }>('volume', 'rotate', g.volume, '--reencrypt');
    t.deepEqual(againJson, { rotations: [], skipped: [g.volume] });
    const after = await rig.json<VolumeJson>('volume', 'show', g.volume);
    t.deepEqual(after, before, 'nothing changed');
    t.is((await rig.json<RotationJson[]>('rotation', 'list', '--volume', g.volume)).length, 1);

    rig.startAgent();
    const watch = await withTimeout(rig.admin('rotation', 'watch', id, '--json'), 180_000, 'rotation watch');
    t.is(watch.code, 0, watch.stderr);
    const last = JSON.parse(watch.stdout.trim().split('\n').at(-1)!) as RotationJson;
    t.deepEqual([last.state, last.mechanism], ['done', 'qemu-rekey']);
    await checkBoots(t, g, 'after the rekey');
    await checkRotated(t, rig, g, uuidBefore, 'rekey', v1);
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'bad input through the CLI: a deleted volume is not found and nothing is queued', async (t) => {
  const rig = await Rig.start();
  try {
    const name = `vkm-rot-gone-${randomBytes(3).toString('hex')}`;
    await rig.json('volume', 'create', name, '--size', '16M', '--format', 'luks');
    t.is((await rig.admin('volume', 'delete', name)).code, 0);
    const before = await rig.json<RotationJson[]>('rotation', 'list');
    const r = await rig.admin('volume', 'rotate', name, '--reencrypt');
    t.not(r.code, 0);
    t.regex(r.stderr, /not found/i);
    t.regex(r.stderr, /volume/);
    t.deepEqual(await rig.json<RotationJson[]>('rotation', 'list'), before, 'no rotation was queued');
  } finally {
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'crash safety: kill -9 of the agent twice during an offline re-encryption; restarted, it resumes and completes', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(rig, 'qcow2-luks');
    await prepareImage(rig, g);
    v1 = await v1Key(rig, g);
    const uuidBefore = await luksUuid(g.image, g.format);
    const id = await requestRotation(rig, g, '--reencrypt');
    // Kill point 1: the first file of the rotation appears (the copy's header is being made).
    rig.startAgent();
    t.log('kill 1 with files', await killPoint(g, id, 'first file', (f) => f.length > 0));
    await rig.stopAgent('SIGKILL');
    t.log('after kill 1 the image opens with', await checkOpensWithStoredKey(t, rig, g, v1, 'kill 1'));
    t.not((await rig.json<RotationJson>('rotation', 'show', id)).state, 'done');
    // Kill point 2, in the second attempt: the copy is being written or verified (the
    // leftover of kill 1 is a header temporary, never the copy's own name).
    rig.startAgent();
    t.log('kill 2 with files', await killPoint(g, id, 'copy in progress', copyInProgress));
    await rig.stopAgent('SIGKILL');
    t.log('after kill 2 the image opens with', await checkOpensWithStoredKey(t, rig, g, v1, 'kill 2'));
    t.log('server says', await rig.json<RotationJson>('rotation', 'show', id));
    t.is(domState(g.name), 'shut off', 'the guest never started from a half-rotated image');
    rig.startAgent();
    const done = await until('rotation done', async () => {
      const r = await rig.json<RotationJson>('rotation', 'show', id);
      return r.state === 'done' || r.state === 'failed' ? r : undefined;
    }, 180_000);
    t.deepEqual([done.state, done.error, done.mechanism], ['done', '', 'qemu-convert']);
    await checkBoots(t, g, 'after the agent crashes');
    await checkRotated(t, rig, g, uuidBefore, 'reencrypt', v1);
    await until('no leftovers of the rotation', () => rotationFiles(g, id).length === 0, 30_000);
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'crash safety: kill -9 of the server after the dispatch and during an offline re-encryption; restarted, the rotation completes', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(rig, 'qcow2-luks');
    await prepareImage(rig, g);
    v1 = await v1Key(rig, g);
    const uuidBefore = await luksUuid(g.image, g.format);
    const id = await requestRotation(rig, g, '--reencrypt');
    // Kill point 1: the rotation is dispatched (a pending v2 exists), no host has seen it.
    await killAndWait(rig.server!.proc, 'SIGKILL');
    await rig.startServer();
    const after1 = await rig.json<VolumeJson>('volume', 'show', g.volume);
    t.deepEqual([after1.active_key_version, after1.rotation?.state, after1.rotation?.to_version], [1, 'running', 2], 'the running rotation survived the crash');
    t.deepEqual(after1.key_versions.map((k) => [k.version, k.state]).sort(), [[1, 'active'], [2, 'pending']]);
    // Kill point 2: the agent is writing the copy.
    rig.startAgent();
    t.log('server killed with files', await killPoint(g, id, 'copy in progress', copyInProgress));
    await killAndWait(rig.server!.proc, 'SIGKILL');
    rig.server = undefined;
    // The agent finishes on its own meanwhile; the server hears of it after its restart.
    const agent = rig.agent!;
    await until('the agent finished the job', () => /"msg":"rotation done"/.test(agent.logs()), 120_000);
    await rig.startServer();
    const done = await until('rotation done', async () => {
      const r = await rig.json<RotationJson>('rotation', 'show', id);
      return r.state === 'done' || r.state === 'failed' ? r : undefined;
    }, 180_000);
    t.deepEqual([done.state, done.error, done.mechanism], ['done', '', 'qemu-convert']);
    await checkBoots(t, g, 'after the server crash');
    await checkRotated(t, rig, g, uuidBefore, 'reencrypt', v1);
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'crash safety: kill -9 of the agent twice during a live blockcopy (copying, pivoting); the guest keeps running, the restarted agent completes the rotation', async (t) => {
  const rig = await Rig.start();
  let v1: Buffer | undefined;
  try {
    const g = await placeGuest(rig, 'qcow2-luks');
    await prepareImage(rig, g);
    v1 = await v1Key(rig, g);
    const uuidBefore = await luksUuid(g.image, g.format);
    rig.startAgent();
    await checkBoots(t, g, 'before the rotation, with v1');
    const domId = virsh(['domid', g.name]).stdout.trim();
    const id = await requestRotation(rig, g, '--reencrypt');
    // Kill point 1: the destination image exists (the block copy is being set up or runs).
    t.log('kill 1 with files', await killPoint(g, id, 'destination created', (f) => f.some((n) => n.endsWith('.live-new'))));
    await rig.stopAgent('SIGKILL');
    t.log('after kill 1 the image opens with', await checkOpensWithStoredKey(t, rig, g, v1, 'kill 1'));
    t.is(domState(g.name), 'running');
    // Kill point 2, in the next attempt: the journal says "pivoting" (the copy is in sync).
    rig.startAgent();
    const journal = (f: string[]) => f.find((n) => n.endsWith('.live-journal'));
    const pivoting = (f: string[]) => {
      const j = journal(f);
      if (!j) return false;
      try {
        return (JSON.parse(readFileSync(join(rig.images.path, j), 'utf8')) as { phase?: string }).phase === 'pivoting';
      } catch {
        return false; // replaced under us
      }
    };
    t.log('kill 2 with files', await killPoint(g, id, 'journal at pivoting', pivoting));
    await rig.stopAgent('SIGKILL');
    t.log('after kill 2 the image opens with', await checkOpensWithStoredKey(t, rig, g, v1, 'kill 2'));
    t.is(domState(g.name), 'running');
    rig.startAgent();
    const done = await until('rotation done', async () => {
      const r = await rig.json<RotationJson>('rotation', 'show', id);
      return r.state === 'done' || r.state === 'failed' ? r : undefined;
    }, 180_000);
    t.deepEqual([done.state, done.error, done.mechanism], ['done', '', 'live-blockcopy']);
    t.is(virsh(['domid', g.name]).stdout.trim(), domId, 'the guest kept running (same domain id)');
    await checkRotated(t, rig, g, uuidBefore, 'reencrypt', v1);
    await restartGuest(t, g);
    await checkBoots(t, g, 'after a stop and start');
  } finally {
    v1?.fill(0);
    await rig.close();
  }
}, { serial: true });

libvirtTest(test, env, 'a rotation policy rotates a running guest on schedule; a compromise rotation destroys the old key at once; the guest keeps running and boots afterwards', async (t) => {
  const rig = await Rig.start();
  try {
    const g = await placeGuest(rig, 'qcow2-luks');
    await prepareImage(rig, g);
    rig.startAgent();
    await checkBoots(t, g, 'before the rotations, with v1');
    const domId = virsh(['domid', g.name]).stdout.trim();

    // The scheduler (every second here) finds the key older than the volume's policy allows.
    const set = await rig.admin('policy', 'set', '--volume', g.volume, '--max-age', '3s', '--kind', 'rekey');
    t.is(set.code, 0, set.stderr);
    const scheduled = await until(
      'a scheduled rotation ended',
      async () => {
        const list = await rig.json<(RotationJson & { reason: string; kind: string })[]>('rotation', 'list', '--volume', g.volume);
        return list.find((r) => r.reason === 'scheduled' && (r.state === 'done' || r.state === 'failed'));
      },
      120_000,
    );
    t.is((await rig.admin('policy', 'delete', '--volume', g.volume)).code, 0);
    t.deepEqual([scheduled.state, scheduled.kind, scheduled.mechanism, scheduled.error], ['done', 'rekey', 'live-blockcopy', '']);
    // A scheduled rotation queued before the policy was deleted may still run: let it end.
    await until('no rotation open', async () => (await rig.json<RotationJson[]>('rotation', 'list', '--volume', g.volume, '--state', 'queued', '--state', 'running')).length === 0, 120_000);

    const before = await rig.json<VolumeJson>('volume', 'show', g.volume);
    const prev = before.active_key_version;
    const res = await withTimeout(rig.admin('volume', 'rotate', g.volume, '--reason', 'compromise', '--wait', '--json'), 180_000, 'compromise rotate --wait');
    t.is(res.code, 0, res.stderr);
    const out = JSON.parse(res.stdout) as { rotations: (RotationJson & { kind: string; reason: string })[] };
    t.deepEqual(
      out.rotations.map((r) => [r.state, r.kind, r.reason, r.from_version, r.to_version, r.mechanism]),
      [['done', 'reencrypt', 'compromise', prev, prev + 1, 'live-blockcopy']],
    );
    const after = await rig.json<VolumeJson>('volume', 'show', g.volume);
    t.is(after.active_key_version, prev + 1);
    t.is(after.key_versions.find((k) => k.version === prev)?.state, 'destroyed', 'the compromised key is destroyed once the new one is confirmed');
    t.true(
      after.key_versions.filter((k) => k.version < prev).every((k) => k.state === 'retired'),
      'older keys keep their grace period',
    );
    const destroyed = await rig.json<{ target: string; detail: { key_version: number } }[]>('audit', 'list', '--action', 'key.destroy');
    t.true(destroyed.some((e) => e.target === g.volumeId && e.detail.key_version === prev), 'the destruction is audited');
    t.is(virsh(['domid', g.name]).stdout.trim(), domId, 'the guest ran all through (same domain id)');

    const key = await until('the agent caches only the new version', async () => (JSON.stringify(await cachedVersions(rig.state, g.volumeId)) === `[${prev + 1}]` ? cachedKey(rig.state, g.volumeId, prev + 1) : undefined));
    try {
      const read = await qemuIo(g.image, g.format, key, [`read -q -P ${PATTERN} ${PATTERN_OFF} ${PATTERN_LEN}`], true);
      t.is(read.code, 0, read.stderr);
      t.notRegex(read.stdout + read.stderr, /Pattern verification failed/);
    } finally {
      key.fill(0);
    }
    await restartGuest(t, g);
    await checkBoots(t, g, 'after a stop and start');
  } finally {
    await rig.close();
  }
}, { serial: true });
