/**
 * Test harness for libvirt: a libvirtd started by hand (no systemd on these machines, see
 * ../shared/notes/host-environment.md), tiny guests and QEMU LUKS images.
 *
 * ensureLibvirtd() is idempotent: it reuses a libvirtd that answers on qemu:///system and
 * otherwise prepares what a Debian install with systemd and udev would have prepared
 * (the libvirt-qemu user, runtime directories, /dev/kvm owned by group kvm with mode 0660),
 * starts virtlogd and libvirtd as daemons with pid files, and waits until libvirtd answers.
 * It never stops them: later test files reuse them. When something cannot be provided it
 * returns a skipReason instead, and tests register themselves as skipped with that reason:
 *
 *   const env = await ensureLibvirtd();
 *   libvirtTest(env, 'title', async (t) => { ... });   // "title (skipped: <reason>)" if needed
 *
 * Secrets reach qemu-img through a pipe on file descriptor 3 (`file=/dev/fd/3`, through the
 * project's runTool), never argv, environment or files.
 */
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ExecutionContext, TestFn } from 'ava';
import { runTool, type ToolResult } from '../../shared/src/run-tool.js';
import { escapeXml, formatVirtkmMarker } from '../../host-agent/src/libvirt/xml.js';
import type { VirtkmMarker } from '../../host-agent/src/libvirt/ports.js';

/** The system URI the harness provides. */
export const LIBVIRT_URI = 'qemu:///system';
/** Pid files of the daemons the harness starts. */
export const LIBVIRTD_PID_FILE = '/run/libvirtd.pid';
export const VIRTLOGD_PID_FILE = '/run/virtlogd.pid';

/** What ensureLibvirtd provides, or why it cannot. */
export interface LibvirtEnv {
  /** Set when libvirt tests must be skipped; the other fields are then meaningless. */
  skipReason: string | undefined;
  uri: string;
  /** 'kvm' when QEMU can use /dev/kvm, else 'qemu' (TCG). VIRTKM_TEST_DOMAIN_TYPE overrides. */
  domainType: 'kvm' | 'qemu';
  /** What the harness changed or noticed on the machine, for the test log. */
  notes: string[];
}

/** Result of a finished command. */
export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

function run(file: string, args: string[], timeoutMs = 30_000): CommandResult {
  const r = spawnSync(file, args, { encoding: 'utf8', timeout: timeoutMs, stdio: ['ignore', 'pipe', 'pipe'] });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.error ? String(r.error) : (r.stderr ?? '') };
}

/** Runs `virsh -c qemu:///system ARGS`. */
export function virsh(args: string[], timeoutMs = 60_000): CommandResult {
  return run('virsh', ['-c', LIBVIRT_URI, ...args], timeoutMs);
}

function which(cmd: string): boolean {
  return run('sh', ['-c', `command -v ${cmd}`]).code === 0;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Debian packages the libvirt tests need (the lead's scripts/setup.sh installs them). */
export const LIBVIRT_TEST_PACKAGES = ['libvirt-daemon', 'libvirt-daemon-driver-qemu', 'libvirt-clients', 'libvirt0', 'qemu-system-x86', 'qemu-utils'];

let ensured: Promise<LibvirtEnv> | undefined;

/** Makes sure a libvirtd answers on qemu:///system (once per process). Never throws. */
export function ensureLibvirtd(): Promise<LibvirtEnv> {
  ensured ??= prepare().catch(
    (err: unknown): LibvirtEnv => ({ skipReason: `libvirt harness failed: ${err instanceof Error ? err.message : String(err)}`, uri: LIBVIRT_URI, domainType: 'qemu', notes: [] }),
  );
  return ensured;
}

async function prepare(): Promise<LibvirtEnv> {
  const notes: string[] = [];
  const env = (skipReason: string | undefined, domainType: 'kvm' | 'qemu' = 'qemu'): LibvirtEnv => ({ skipReason, uri: LIBVIRT_URI, domainType, notes });
  if (process.platform !== 'linux') return env('libvirt tests run on Linux only');
  const missing = ['virsh', 'libvirtd', 'virtlogd', 'qemu-system-x86_64', 'qemu-img'].filter((c) => !which(c));
  if (missing.length > 0) return env(`missing ${missing.join(', ')}: apt-get install ${LIBVIRT_TEST_PACKAGES.join(' ')}`);
  if (!run('ldconfig', ['-p']).stdout.includes('libvirt.so.0')) return env('libvirt.so.0 not found: apt-get install libvirt0');

  const isRoot = process.getuid?.() === 0;
  const alreadyUp = virsh(['version'], 10_000).code === 0;
  if (!alreadyUp && !isRoot) return env('libvirtd is not running and starting it needs root');

  if (isRoot) {
    // What the libvirt-daemon-system package and udev would do. Without the libvirt-qemu
    // user libvirtd's QEMU driver does not load; without group kvm on /dev/kvm QEMU (which
    // runs as libvirt-qemu) cannot use KVM.
    ensureGroup('kvm', notes);
    ensureGroup('libvirt-qemu', notes);
    if (run('getent', ['passwd', 'libvirt-qemu']).code !== 0) {
      const r = run('useradd', ['-r', '-g', 'libvirt-qemu', '-G', 'kvm', '-d', '/var/lib/libvirt', '-s', '/usr/sbin/nologin', 'libvirt-qemu']);
      if (r.code !== 0) return env(`cannot create user libvirt-qemu: ${r.stderr.trim()}`);
      notes.push('created system user libvirt-qemu (groups libvirt-qemu, kvm)');
    }
    fixKvmDevice(notes);
    for (const dir of ['/var/log/libvirt', '/var/lib/libvirt', '/var/cache/libvirt', '/run/libvirt']) run('mkdir', ['-p', dir]);
  }

  // Both daemons hold a lock on their pid file: a second start (another test process racing
  // this one) exits at once and the running daemon stays. Without virtlogd guests fail to
  // start, so it is checked even when libvirtd already answers.
  if (isRoot && !daemonAlive(VIRTLOGD_PID_FILE)) {
    run('virtlogd', ['--daemon', `--pid-file=${VIRTLOGD_PID_FILE}`]);
    notes.push('started virtlogd');
  }
  if (!alreadyUp) {
    run('libvirtd', ['--daemon', `--pid-file=${LIBVIRTD_PID_FILE}`]);
    notes.push('started libvirtd');
    const deadline = Date.now() + 30_000;
    while (virsh(['version'], 10_000).code !== 0) {
      if (Date.now() > deadline) {
        return env(`libvirtd did not answer on ${LIBVIRT_URI} within 30 s (see /var/log/libvirt; does user libvirt-qemu exist?)`);
      }
      await sleep(200);
    }
  }
  return env(undefined, chooseDomainType(notes));
}

function ensureGroup(name: string, notes: string[]): void {
  if (run('getent', ['group', name]).code === 0) return;
  if (run('groupadd', ['-r', name]).code === 0) notes.push(`created system group ${name}`);
}

function gidOf(group: string): number | undefined {
  const line = run('getent', ['group', group]).stdout.trim();
  const gid = Number(line.split(':')[2]);
  return line && Number.isInteger(gid) ? gid : undefined;
}

/** Gives /dev/kvm to group kvm, mode 0660, as Debian's udev rule does, when it is not. */
function fixKvmDevice(notes: string[]): void {
  if (!existsSync('/dev/kvm')) return;
  const kvmGid = gidOf('kvm');
  if (kvmGid === undefined) return;
  const st = statSync('/dev/kvm');
  const groupRw = (st.mode & 0o060) === 0o060;
  if (st.gid === kvmGid && groupRw) return;
  try {
    chownSync('/dev/kvm', st.uid, kvmGid);
    chmodSync('/dev/kvm', (st.mode & 0o7777) | 0o660);
    notes.push('set /dev/kvm to group kvm, mode 0660 (as udev would)');
  } catch (err) {
    notes.push(`could not give /dev/kvm to group kvm: ${String(err)}`);
  }
}

/** kvm when QEMU's user can open /dev/kvm, else qemu (TCG). */
function chooseDomainType(notes: string[]): 'kvm' | 'qemu' {
  const forced = process.env['VIRTKM_TEST_DOMAIN_TYPE'];
  if (forced === 'kvm' || forced === 'qemu') return forced;
  if (!existsSync('/dev/kvm')) {
    notes.push('no /dev/kvm: guests run with TCG');
    return 'qemu';
  }
  // Ask as the user QEMU runs as; runuser needs root, otherwise trust the permissions.
  const probe = process.getuid?.() === 0 ? run('runuser', ['-u', 'libvirt-qemu', '--', 'sh', '-c', 'test -r /dev/kvm && test -w /dev/kvm']) : { code: 0 };
  if (probe.code !== 0) {
    notes.push('libvirt-qemu cannot open /dev/kvm: guests run with TCG');
    return 'qemu';
  }
  return 'kvm';
}

function daemonAlive(pidFile: string): boolean {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    if (!Number.isInteger(pid) || pid <= 1) return false;
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Stops the libvirtd this harness started (by the pid in its pid file) and starts it again;
 * resolves when it answers. For tests of agent behaviour across a libvirtd restart.
 * Guests keep running (libvirtd reconnects to them); ephemeral secrets are gone.
 */
export async function restartLibvirtd(): Promise<void> {
  const pid = Number(readFileSync(LIBVIRTD_PID_FILE, 'utf8').trim());
  if (!Number.isInteger(pid) || pid <= 1) throw new Error(`no libvirtd pid in ${LIBVIRTD_PID_FILE}`);
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 150 && daemonAlive(LIBVIRTD_PID_FILE); i++) await sleep(100);
  if (daemonAlive(LIBVIRTD_PID_FILE)) throw new Error('libvirtd did not stop within 15 s');
  run('libvirtd', ['--daemon', `--pid-file=${LIBVIRTD_PID_FILE}`]);
  const deadline = Date.now() + 30_000;
  while (virsh(['version'], 10_000).code !== 0) {
    if (Date.now() > deadline) throw new Error('libvirtd did not answer within 30 s after restart');
    await sleep(200);
  }
}

/**
 * Registers an ava test, or a visibly skipped one (title + "(skipped: reason)") when the
 * libvirt environment is not available. `serial` tests run alone, before the others of the
 * file (ava's rule).
 */
export function libvirtTest<C>(test: TestFn<C>, env: LibvirtEnv, title: string, fn: (t: ExecutionContext<C>) => Promise<void>, options: { serial?: boolean } = {}): void {
  const register = options.serial ? test.serial : test;
  if (env.skipReason) register.skip(`${title} (skipped: ${env.skipReason})`, fn);
  else register(title, fn);
}

// ----- images and guests -----------------------------------------------------------------

/**
 * A temporary directory QEMU (user libvirt-qemu) can reach: mode 0755. libvirt gives each
 * image to that user while the guest runs and gives it back afterwards.
 */
export function guestDir(prefix = 'virtkm-libvirt-'): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(path, 0o755);
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/**
 * A 512-byte x86 boot sector (real mode) that writes `message` and CR LF to COM1 and halts.
 * Booted from an encrypted disk, the message on the serial port shows that QEMU decrypted
 * the disk. The code:
 *   cli; cld; xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,msg
 *   next: lodsb; test al,al; jz done; out dx,al; jmp next
 *   done: hlt; jmp done
 */
export function bootSector(message: string): Buffer {
  const code = [0xfa, 0xfc, 0x31, 0xc0, 0x8e, 0xd8, 0xba, 0xf8, 0x03, 0xbe, 0x17, 0x7c, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xf4, 0xeb, 0xfd];
  const text = Buffer.from(`${message}\r\n\0`, 'latin1');
  if (code.length + text.length > 510) throw new Error('boot message too long');
  const sector = Buffer.alloc(512);
  Buffer.from(code).copy(sector, 0);
  text.copy(sector, code.length); // msg at 0x7c00 + 23 = 0x7c17, as the mov si above says
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

/** Options of createLuksImage. */
export interface LuksImageOptions {
  /** Size of a blank image in MiB (ignored with `content`). Default 16. */
  sizeMiB?: number;
  /** Raw bytes for the start of the disk (the rest is zero); the image is 1 MiB or more. */
  content?: Buffer;
  /** PBKDF2 time in ms qemu-img aims for; 50 or more (smaller fails now and then). */
  iterTimeMs?: number;
}

/**
 * Creates a raw QEMU LUKS image (format 'luks') at `path` whose passphrase is `key`, passed
 * on fd 3. qemu-img benchmarks PBKDF2 before formatting and now and then fails with "Unable
 * to get accurate CPU usage" on these VMs (about 1 run in 4, whatever the iter-time): each
 * attempt is retried a few times, starting from a removed file.
 */
export async function createLuksImage(path: string, key: Uint8Array, options: LuksImageOptions = {}): Promise<void> {
  const iter = Math.max(50, options.iterTimeMs ?? 50);
  const secretObject = 'secret,id=s0,format=raw,file=/dev/fd/3';
  let raw: string | undefined;
  let args: string[];
  if (options.content) {
    raw = `${path}.plain`;
    const plain = Buffer.alloc(Math.max(1024 * 1024, Math.ceil(options.content.length / 512) * 512));
    options.content.copy(plain);
    writeFileSync(raw, plain);
    args = ['convert', '-q', '-f', 'raw', '-O', 'luks', '--object', secretObject, '-o', `key-secret=s0,iter-time=${iter}`, raw, path];
  } else {
    args = ['create', '-q', '-f', 'luks', '--object', secretObject, '-o', `key-secret=s0,iter-time=${iter}`, path, `${options.sizeMiB ?? 16}M`];
  }
  try {
    let last: ToolResult | undefined;
    for (let attempt = 0; attempt < 8; attempt++) {
      rmSync(path, { force: true });
      last = await runTool('qemu-img', args, { fds: [key], timeoutMs: 120_000 });
      if (last.code === 0) return;
    }
    throw new Error(`qemu-img ${args[0]} failed 8 times: ${last?.stderr.trim()}`);
  } finally {
    if (raw) rmSync(raw, { force: true });
  }
}

/** Options of guestDomainXml. */
export interface GuestXmlOptions {
  name: string;
  domainType: 'kvm' | 'qemu';
  marker?: VirtkmMarker;
  memoryMiB?: number;
  /** A raw LUKS image and the UUID of the libvirt secret holding its passphrase. */
  disk?: { path: string; secretUuid: string };
  /** A file that receives the guest's first serial port. */
  serialLog?: string;
}

/** Domain XML of a tiny guest: 64 MiB, one vCPU, no display, optional encrypted disk. */
export function guestDomainXml(o: GuestXmlOptions): string {
  const disk = o.disk
    ? `    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${escapeXml(o.disk.path)}'>
        <encryption format='luks'>
          <secret type='passphrase' uuid='${o.disk.secretUuid}'/>
        </encryption>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
`
    : '';
  const serial = o.serialLog
    ? `    <serial type='file'>
      <source path='${escapeXml(o.serialLog)}'/>
      <target port='0'/>
    </serial>
`
    : '';
  return `<domain type='${o.domainType}'>
  <name>${escapeXml(o.name)}</name>
${o.marker ? `  <metadata>\n    ${formatVirtkmMarker(o.marker)}\n  </metadata>\n` : ''}  <memory unit='MiB'>${o.memoryMiB ?? 64}</memory>
  <vcpu>1</vcpu>
  <os>
    <type>hvm</type>
    <boot dev='hd'/>
  </os>
  <on_crash>destroy</on_crash>
  <devices>
${disk}${serial}    <memballoon model='none'/>
  </devices>
</domain>
`;
}

/** Waits until `file` contains `text` (or the timeout passes); returns whether it did. */
export async function waitForFileText(file: string, text: string, timeoutMs = 30_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (readFileSync(file, 'latin1').includes(text)) return true;
    } catch {
      // not created yet
    }
    if (Date.now() > deadline) return false;
    await sleep(100);
  }
}

/**
 * Best-effort removal of test domains and secrets through virsh (independent of the
 * adapter under test), for teardown after failures. Only what still exists is touched;
 * errors are ignored.
 */
export function forceCleanup(domains: string[], secretUuids: string[]): void {
  if (domains.length > 0) {
    const present = new Set(virsh(['list', '--all', '--name']).stdout.split('\n').map((l) => l.trim()));
    for (const name of domains.filter((d) => present.has(d))) {
      virsh(['destroy', name]);
      virsh(['undefine', name, '--nvram']);
    }
  }
  if (secretUuids.length > 0) {
    const listed = virsh(['secret-list']).stdout;
    for (const uuid of secretUuids.filter((u) => listed.includes(u))) virsh(['secret-undefine', uuid]);
  }
}

/**
 * Removes every domain whose name starts with `domainPrefix` and every secret whose usage
 * starts with `usagePrefix` (for an after.always sweep of one test run).
 */
export function sweep(domainPrefix: string, usagePrefix: string): void {
  const domains = virsh(['list', '--all', '--name'])
    .stdout.split('\n')
    .map((l) => l.trim())
    .filter((n) => n.startsWith(domainPrefix));
  const secrets = virsh(['secret-list'])
    .stdout.split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((cols) => cols.length >= 2 && (cols[1] ?? '').startsWith('volume') && (cols[2] ?? '').startsWith(usagePrefix))
    .map((cols) => cols[0] as string);
  forceCleanup(domains, secrets);
}

// ----- a second host on the same machine -------------------------------------------------

/** A second libvirt "host": its own libvirtd and virtlogd in a private mount namespace. */
export interface NamespacedHost {
  /** Pid of the process holding the namespace. */
  nsPid: number;
  /** argv prefix that runs a command inside the namespace. */
  prefix: string[];
  /** `virsh -c qemu:///system ARGS` against this host's libvirtd. */
  virsh(args: string[]): CommandResult;
  stop(): Promise<void>;
}

/**
 * Starts a second libvirtd whose /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
 * /var/log/libvirt and /etc/libvirt are private to a mount namespace (everything else,
 * including image directories under /tmp, is shared: "shared storage"). A process started
 * with `prefix` talks to this daemon at qemu:///system. Needs root and util-linux.
 */
export async function startNamespacedHost(): Promise<NamespacedHost> {
  const base = mkdtempSync(join(tmpdir(), 'virtkm-host2-'));
  for (const d of ['lib', 'cache', 'log', 'etc']) mkdirSync(join(base, d));
  cpSync('/etc/libvirt', join(base, 'etc'), { recursive: true });
  // A private copy without the first host's persistent definitions.
  rmSync(join(base, 'etc', 'qemu'), { recursive: true, force: true });
  rmSync(join(base, 'etc', 'secrets'), { recursive: true, force: true });
  const holder = spawn('unshare', ['--mount', '--propagation', 'private', 'sleep', 'infinity'], { stdio: 'ignore' });
  await sleep(300);
  if (!holder.pid || holder.exitCode !== null) throw new Error('unshare failed');
  const prefix = ['nsenter', `--mount=/proc/${holder.pid}/ns/mnt`];
  const setup = [
    'mount -t tmpfs tmpfs /run/libvirt',
    `mount --bind ${base}/lib /var/lib/libvirt`,
    `mount --bind ${base}/cache /var/cache/libvirt`,
    `mount --bind ${base}/log /var/log/libvirt`,
    `mount --bind ${base}/etc /etc/libvirt`,
    'mkdir -p /var/lib/libvirt/qemu',
    `virtlogd --daemon --pid-file=${base}/virtlogd.pid`,
    `libvirtd --daemon --pid-file=${base}/libvirtd.pid`,
  ].join(' && ');
  const r = run(prefix[0]!, [...prefix.slice(1), 'sh', '-c', setup]);
  if (r.code !== 0) throw new Error(`second host setup failed: ${r.stderr}`);
  const virshNs = (args: string[]) => run(prefix[0]!, [...prefix.slice(1), 'virsh', '-c', LIBVIRT_URI, ...args], 60_000);
  const deadline = Date.now() + 30_000;
  while (virshNs(['version']).code !== 0) {
    if (Date.now() > deadline) throw new Error('second libvirtd did not answer');
    await sleep(200);
  }
  return {
    nsPid: holder.pid,
    prefix,
    virsh: virshNs,
    async stop() {
      for (const line of virshNs(['list', '--name']).stdout.split('\n').filter(Boolean)) virshNs(['destroy', line]);
      for (const f of ['libvirtd.pid', 'virtlogd.pid']) {
        try {
          process.kill(Number(readFileSync(join(base, f), 'utf8').trim()), 'SIGTERM');
        } catch {
          /* already gone */
        }
      }
      await sleep(500);
      holder.kill('SIGKILL');
      rmSync(base, { recursive: true, force: true });
    },
  };
}
