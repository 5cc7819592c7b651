/**
 * Benchmark of volume creation and key release against the real server process (issue 2).
 *
 *   node dist/bench/key-release.js [--volumes 100000] [--seconds 10] [--concurrency 32] [--fixed-rate 1500]
 *       [--create-concurrency 64] [--batch 16] [--warmup 1] [--rounds 1] [--json out.json]
 *       [--markdown out.md] [--profile-server DIR] [--keep-dir]
 *
 * Phases, all in one run against one temporary data directory:
 *   1. N volumes (luks, 1 GiB) through VolumeService.CreateVolume over mutual TLS with the
 *      admin credential, `--create-concurrency` calls in flight.
 *   2. One host enrolled with a one-time token; guests of 64 volumes each placed on it.
 *   3. Key release from one host channel: `--concurrency` ReleaseKeys calls in flight for
 *      `--seconds`, one random volume per call, then `--batch` random volumes per call.
 *      A sample of the returned packets is opened with the host's box key and checked.
 *   3b. Latency at a fixed offered load (after each, `--seconds` of back-to-back 4 KiB
 *      fdatasyncs in the same directory, whose time-weighted p99 is the storage's floor for
 *      a durable reply's p99): `--fixed-rate` single-volume releases per second
 *      started on schedule whatever the server's pace (an open loop), latency counted from
 *      when each call was due. The closed loop of 3 measures the rate at saturation, where
 *      the latency is mostly queueing (32 in flight / rate); this one measures the latency
 *      a host sees when the server is not saturated.
 *   4. Ceilings: a bare grpc-js echo server (child process, the real server's mutual-TLS 1.3
 *      credentials and listener options), driven by the same client loop with messages of
 *      the real responses' sizes. Each ceiling run is adjacent in time to its real run;
 *      `--rounds R` repeats the release/ceiling pairs R times, alternating, and pools them.
 *
 * A benchmark, not a test: it prints figures and PASS/MISS against the issue's targets and
 * exits 0 whatever the figures are. It exits 1 only when something is wrong (a call
 * failed, or a released packet does not open or names the wrong volume).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, fdatasyncSync, mkdirSync, openSync, readdirSync, writeSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Metadata } from '@grpc/grpc-js';
import {
  CreateVolumeResponse,
  KeyPacket,
  KeyServiceClient,
  ReleaseKeysResponse,
  VolumeFormat,
  type CreateEnrollmentTokenResponse,
  type DefineGuestResponse,
  type ReleaseKeysRequest,
} from '../shared/src/api.js';
import { generateBoxKeyPair, openSealed, type BoxKeyPair } from '../shared/src/box.js';
import { enrollHost } from '../shared/src/enroll-client.js';
import { CLIENT_CHANNEL_OPTIONS, callOptions, channelCredentials, unaryCall } from '../shared/src/grpc-client.js';
import { createCa, formatCredentialBundle, generateTlsKeyPair, issueCertificate, parseCredentialBundle } from '../shared/src/pki.js';
import { loadSodium } from '../shared/src/sodium.js';
import { wipe } from '../shared/src/secret-bytes.js';
import type { ApiClients } from '../server/src/cli/clients.js';
import { clientsFor, initDataDir, startServer, tempDir } from '../test/helpers/server-harness.js';
import { formatProfileSummary, summarizeCpuProfile, type ProfileSummary, type TimeWindow } from './cpuprofile.js';
import { EchoClient, type EchoReady, type EchoServerConfig } from './echo-service.js';
import { emitResults, latencyStats, lengthWeightedPercentile, machineInfo, mergeLoadResults, runClosedLoop, runOpenLoop, type LoadResult, type MachineInfo } from './load.js';

// --- Options -----------------------------------------------------------------------------

const USAGE = `usage: node dist/bench/key-release.js [--volumes N] [--seconds S] [--concurrency C]
       [--fixed-rate R] [--create-concurrency C] [--batch B] [--warmup S] [--rounds R] [--max-calls N] [--json FILE]
       [--markdown FILE] [--profile-server DIR] [--keep-dir]`;

interface BenchOptions {
  volumes: number;
  seconds: number;
  concurrency: number;
  /** Calls/s of the open-loop latency runs (0: none). */
  fixedRate: number;
  createConcurrency: number;
  batch: number;
  warmup: number;
  rounds: number;
  maxCalls: number;
  json: string | undefined;
  markdown: string | undefined;
  profileServer: string | undefined;
  keepDir: boolean;
}

function parseOptions(argv: string[]): BenchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      volumes: { type: 'string', default: '100000' },
      seconds: { type: 'string', default: '10' },
      concurrency: { type: 'string', default: '32' },
      'fixed-rate': { type: 'string', default: '1500' },
      'create-concurrency': { type: 'string', default: '64' },
      batch: { type: 'string', default: '16' },
      warmup: { type: 'string', default: '1' },
      rounds: { type: 'string', default: '1' },
      'max-calls': { type: 'string', default: '5000000' },
      json: { type: 'string' },
      markdown: { type: 'string' },
      'profile-server': { type: 'string' },
      'keep-dir': { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const int = (name: string, v: string | undefined, min: number): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}\n${USAGE}`);
    return n;
  };
  const seconds = Number(values.seconds);
  const warmup = Number(values.warmup);
  if (!(seconds > 0)) throw new Error(`--seconds must be positive\n${USAGE}`);
  if (!(warmup >= 0)) throw new Error(`--warmup must be >= 0\n${USAGE}`);
  const volumes = int('volumes', values.volumes, 1);
  const batch = int('batch', values.batch, 1);
  if (batch > volumes) throw new Error('--batch must not exceed --volumes');
  if (batch > 1000) throw new Error('--batch must be at most 1000 (the server limit)');
  return {
    volumes,
    seconds,
    concurrency: int('concurrency', values.concurrency, 1),
    fixedRate: int('fixed-rate', values['fixed-rate'], 0),
    createConcurrency: int('create-concurrency', values['create-concurrency'], 1),
    batch,
    warmup,
    rounds: int('rounds', values.rounds, 1),
    maxCalls: int('max-calls', values['max-calls'], 1),
    json: values.json,
    markdown: values.markdown,
    profileServer: values['profile-server'] ? resolve(values['profile-server']) : undefined,
    keepDir: values['keep-dir'] ?? false,
  };
}

// --- Constants -----------------------------------------------------------------------------

const GIB = 1n << 30n;
const DISKS_PER_GUEST = 64;
const HOST_NAME = 'bench-host-1';
const KEY_PACKET_TYPE = 'virtkm.keypacket.v1';
/** Every how many-th release call's response is kept for verification, and how many at most. */
const SAMPLE_EVERY = 25;
const SAMPLE_MAX = 400;
const TARGETS = {
  releasesPerSecond: 5000,
  releaseP99Ms: 10,
  releaseEchoRatio: 0.6,
  creationsPerSecond: 2000,
};

const here = fileURLToPath(new URL('.', import.meta.url));
const ECHO_SERVER_BIN = join(here, 'echo-server.js');

// --- Child processes and clean-up ----------------------------------------------------------

const cleanups: (() => Promise<void> | void)[] = [];
/** The running server's log so far, for the failure report. */
let serverLogs: (() => string) | undefined;

async function runCleanups(): Promise<void> {
  while (cleanups.length > 0) {
    const fn = cleanups.pop()!;
    try {
      await fn();
    } catch (err) {
      console.error(`bench: clean-up step failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}

/** Sends SIGTERM, waits up to graceMs for the exit, then SIGKILL. */
async function stopChild(proc: ChildProcess, graceMs = 15_000): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  proc.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([exited.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), graceMs)))]);
  clearTimeout(timer);
  if (timedOut) {
    console.error(`bench: child ${proc.pid} did not stop within ${graceMs} ms; killing it`);
    proc.kill('SIGKILL');
    await exited;
  }
}


/** TLS material of the echo ceiling: its own CA, a server and a client certificate. */
async function echoTlsMaterial(): Promise<{ server: EchoServerConfig; client: { caCertPem: string; certPem: string; keyPem: string } }> {
  const ca = await createCa({ commonName: 'virtkm bench echo CA', validDays: 2 });
  const serverKeys = await generateTlsKeyPair();
  const serverCert = await issueCertificate({ ca, publicKeyDer: serverKeys.publicKeyDer, commonName: 'echo-server', role: 'server', validDays: 2 });
  const clientKeys = await generateTlsKeyPair();
  const clientCert = await issueCertificate({ ca, publicKeyDer: clientKeys.publicKeyDer, commonName: 'echo-client', role: 'host', validDays: 2 });
  return {
    server: { caCertPem: ca.certPem, certChainPem: serverCert.certPem + ca.certPem, keyPem: serverKeys.privateKeyPem },
    client: { caCertPem: ca.certPem, certPem: clientCert.certPem, keyPem: clientKeys.privateKeyPem },
  };
}

/** Starts the echo server child and waits for its ready line. */
async function startEchoServer(config: EchoServerConfig): Promise<{ proc: ChildProcess; address: string; pid: number }> {
  const proc = spawn(process.execPath, [ECHO_SERVER_BIN], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  proc.stdin!.end(JSON.stringify(config));
  const ready = await new Promise<EchoReady>((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`echo server not ready after 30 s: ${stderr}`)), 30_000);
    proc.stdout!.on('data', (d: Buffer) => {
      stdout += d.toString();
      const line = stdout.split('\n').find((l) => l.includes('"event":"ready"'));
      if (line) {
        clearTimeout(timer);
        resolvePromise(JSON.parse(line) as EchoReady);
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`echo server exited with ${code}: ${stderr}`));
    });
  });
  return { proc, address: `127.0.0.1:${ready.port}`, pid: ready.pid };
}

// --- Small helpers ------------------------------------------------------------------------

function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

function nowUs(): number {
  return Number(process.hrtime.bigint() / 1000n);
}

function volumeName(i: number): string {
  return `bv-${String(i).padStart(7, '0')}`;
}

/** libvirt-style virtio disk names: vda..vdz, vdaa, vdab, ... */
function diskName(i: number): string {
  let s = '';
  let n = i;
  do {
    s = String.fromCharCode(97 + (n % 26)) + s;
    n = Math.floor(n / 26) - 1;
  } while (n >= 0);
  return `vd${s}`;
}

function domainXml(guest: string, volumes: readonly string[]): string {
  const disks = volumes
    .map((v, i) => `    <disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='virtkm' volume='${v}'/><target dev='${diskName(i)}' bus='virtio'/></disk>`)
    .join('\n');
  return `<domain type='kvm'>
  <name>${guest}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
${disks}
  </devices>
</domain>
`;
}

/** `count` distinct random indices below n. */
function randomDistinct(n: number, count: number): number[] {
  if (count === 1) return [Math.floor(Math.random() * n)];
  const picked = new Set<number>();
  while (picked.size < count) picked.add(Math.floor(Math.random() * n));
  return [...picked];
}

/** Sequential 4 KiB write + fdatasync per second in dir: the storage's durable-write rate. */
/** Back-to-back 4 KiB appends, each followed by fdatasync: their rate and each one's latency (ms). */
function measureFsync(dir: string, seconds: number): { rate: number; latencies: number[] } {
  const path = join(dir, 'fsync-probe');
  const fd = openSync(path, 'w');
  const block = Buffer.alloc(4096, 0x5a);
  const latencies: number[] = [];
  const start = performance.now();
  const end = start + seconds * 1000;
  try {
    while (performance.now() < end) {
      const t0 = performance.now();
      writeSync(fd, block);
      fdatasyncSync(fd);
      latencies.push(performance.now() - t0);
    }
  } finally {
    closeSync(fd);
  }
  return { rate: latencies.length / ((performance.now() - start) / 1000), latencies };
}

// --- Verification ------------------------------------------------------------------------

interface VerifyState {
  packetsChecked: number;
  /** SHA-256 of each volume's secret seen so far, to check a secret never changes. */
  secrets: Map<string, string>;
}

/**
 * Checks that a response has one packet per requested volume, that every packet opens with
 * the host's box key, decodes as a KeyPacket for the right volume, host and version, and
 * that a volume's secret is the same every time it is released. Throws on any mismatch.
 */
function verifyRelease(requested: readonly string[], res: ReleaseKeysResponse, box: BoxKeyPair, hostId: string, state: VerifyState): void {
  const fail = (why: string): never => {
    throw new Error(`VERIFICATION FAILED: ${why} (request ${requested.join(',')})`);
  };
  if (res.packets.length !== requested.length) fail(`${res.packets.length} packets for ${requested.length} volumes`);
  const want = new Set(requested);
  for (const packet of res.packets) {
    if (!want.delete(packet.volumeId)) fail(`unexpected or duplicate packet for volume ${packet.volumeId}`);
    let plain: Uint8Array;
    try {
      plain = openSealed(packet.sealed, box);
    } catch {
      return fail(`packet for ${packet.volumeId} does not open with the host's box key`);
    }
    let kp: KeyPacket;
    try {
      kp = KeyPacket.decode(plain);
    } catch {
      wipe(plain);
      return fail(`packet for ${packet.volumeId} does not decode as a KeyPacket`);
    }
    wipe(plain);
    if (kp.type !== KEY_PACKET_TYPE) fail(`packet type "${kp.type}"`);
    if (kp.volumeId !== packet.volumeId) fail(`sealed packet names volume ${kp.volumeId}, envelope says ${packet.volumeId}`);
    if (kp.hostId !== hostId) fail(`packet sealed for host ${kp.hostId}, expected ${hostId}`);
    if (kp.keyVersion !== packet.keyVersion || kp.keyVersion !== 1) fail(`key version ${kp.keyVersion} (envelope ${packet.keyVersion})`);
    if (kp.mechanism !== VolumeFormat.VOLUME_FORMAT_LUKS) fail(`mechanism ${kp.mechanism}`);
    if (kp.sizeBytes !== GIB) fail(`size ${kp.sizeBytes}`);
    if (kp.secret.length !== 32) fail(`secret of ${kp.secret.length} bytes`);
    if (kp.secret.every((b) => b === 0)) fail('secret is all zeros');
    const fp = createHash('sha256').update(kp.secret).digest('hex');
    wipe(kp.secret);
    const seen = state.secrets.get(kp.volumeId);
    if (seen !== undefined && seen !== fp) fail(`volume ${kp.volumeId} released with two different secrets`);
    state.secrets.set(kp.volumeId, fp);
    state.packetsChecked++;
  }
  if (want.size > 0) fail(`no packet for ${[...want].join(',')}`);
}

// --- Phases ---------------------------------------------------------------------------------

interface PhaseRecord {
  name: string;
  label: string;
  /** What one call carries. */
  volumesPerCall: number;
  concurrency: number;
  /** Message size the echo ceiling used, bytes. */
  messageBytes?: number;
  result: LoadResult;
  /** When the measured runs took place (one per round). */
  windows: TimeWindow[];
  /** Per-round calls/s, in order. */
  roundRates: number[];
}

interface Results {
  machine: MachineInfo;
  /** 1, 5 and 15 minute load averages when the run started (others share the machine). */
  loadAverage: number[];
  date: string;
  command: string;
  options: BenchOptions;
  setup: { volumes: number; guests: number; guestSeconds: number; enrollSeconds: number };
  sizes: { createResponseBytes: number; release1ResponseBytes: number; releaseBatchResponseBytes: number };
  fsyncPerSecond: number;
  /** Slow WAL fdatasyncs the server logged (50 ms or more). */
  slowSyncs: { count: number; maxMs: number };
  /** The server's event-loop delay over the whole run, from its log. */
  loopDelay: { p99Ms: number; maxMs: number } | undefined;
  phases: Record<string, PhaseRecord>;
  verification: { responsesChecked: number; packetsChecked: number; distinctVolumes: number };
  targets: { name: string; value: number; ceiling: string; target: string; pass: boolean }[];
  /** The server's CPU profile, summarised per release phase (one volume per call, a batch per call). */
  profile?: { file: string; release1: ProfileSummary; releaseBatch: ProfileSummary } | undefined;
}

async function run(opts: BenchOptions): Promise<Results> {
  const machine = machineInfo();
  const loadAverage = loadavg();
  await loadSodium();
  const tmp = tempDir('virtkm-bench-');
  cleanups.push(() => {
    if (opts.keepDir) log(`kept ${tmp.path}`);
    else tmp.remove();
  });
  const dataDir = join(tmp.path, 'data');
  log(`data dir ${dataDir}`);
  initDataDir(dataDir);

  const fsyncPerSecond = measureFsync(tmp.path, 1).rate;
  // The storage's own latency tail, sampled next to each open-loop run: a durable release
  // waits for one fdatasync, so its p99 cannot be below this one's.
  const fsyncLatencies: number[] = [];
  log(`storage: ${fsyncPerSecond.toFixed(0)} fdatasync/s (4 KiB sequential, one writer)`);

  if (opts.profileServer) mkdirSync(opts.profileServer, { recursive: true });
  const server = await startServer(dataDir, [], opts.profileServer ? ['--cpu-prof', `--cpu-prof-dir=${opts.profileServer}`] : []);
  const serverPid = server.proc.pid;
  serverLogs = server.logs;
  let stopping = false;
  server.proc.once('exit', (code, signal) => {
    if (!stopping) log(`SERVER EXITED UNEXPECTEDLY (code ${code}, signal ${signal}); last log lines:\n${server.logs().split('\n').slice(-15).join('\n')}`);
  });
  cleanups.push(async () => {
    stopping = true;
    await stopChild(server.proc);
  });
  log(`server pid ${serverPid} at ${server.address} (enroll ${server.enrollAddress})`);

  const admin: ApiClients = clientsFor(server.address, join(dataDir, 'admin.pem'));
  cleanups.push(() => admin.close());
  const phases: Record<string, PhaseRecord> = {};
  const phase = async (name: string, label: string, p: Omit<PhaseRecord, 'name' | 'label' | 'result' | 'windows' | 'roundRates'>, body: () => Promise<LoadResult>) => {
    const startUs = nowUs();
    const result = await body();
    const window = { startUs, endUs: nowUs() };
    log(`${label}: ${result.rate.toFixed(0)}/s, p50 ${result.latency.p50.toFixed(2)} ms, p99 ${result.latency.p99.toFixed(2)} ms, ${result.calls} calls, ${result.errors} errors`);
    if (result.errors > 0) throw new Error(`${label}: ${result.errors} calls failed; first: ${result.firstError ?? '?'}`);
    const previous = phases[name];
    phases[name] = previous
      ? { ...previous, result: mergeLoadResults([previous.result, result]), windows: [...previous.windows, window], roundRates: [...previous.roundRates, result.rate] }
      : { name, label, ...p, result, windows: [window], roundRates: [result.rate] };
  };

  // 1. Volumes.
  const ids: string[] = new Array<string>(opts.volumes);
  let createResponseBytes = 0;
  let created = 0;
  log(`creating ${opts.volumes} volumes, ${opts.createConcurrency} in flight`);
  const progress = setInterval(() => log(`  ${created} volumes created`), 10_000);
  try {
    await phase('create', `volume creation (${opts.createConcurrency} in flight)`, { volumesPerCall: 1, concurrency: opts.createConcurrency }, () =>
      runClosedLoop({ concurrency: opts.createConcurrency, seconds: Number.POSITIVE_INFINITY, maxCalls: opts.volumes, serverPid }, async (i) => {
        const res = await unaryCall<CreateVolumeResponse>((cb) =>
          admin.volumes.createVolume({ name: volumeName(i), sizeBytes: GIB, format: VolumeFormat.VOLUME_FORMAT_LUKS, cipher: undefined }, new Metadata(), callOptions(), cb),
        );
        if (!res.volume?.id) throw new Error('CreateVolume returned no volume id');
        ids[i] = res.volume.id;
        if (i === 0) createResponseBytes = CreateVolumeResponse.encode(res).finish().length;
        created++;
      }),
    );
  } finally {
    clearInterval(progress);
  }
  // A plain loop: some() would skip the holes of a sparse array.
  for (let i = 0; i < ids.length; i++) if (typeof ids[i] !== 'string') throw new Error(`volume ${volumeName(i)} has no id`);

  // 2. Host enrollment and guests.
  const t0 = performance.now();
  const tokenRes = await unaryCall<CreateEnrollmentTokenResponse>((cb) => admin.hosts.createEnrollmentToken({ host: HOST_NAME, ttlSeconds: 600 }, new Metadata(), callOptions(), cb));
  const tlsKeys = await generateTlsKeyPair();
  const box = generateBoxKeyPair();
  cleanups.push(() => wipe(box.secretKey));
  const enrolled = await enrollHost(server.enrollAddress, tokenRes.token, { tlsPublicKey: tlsKeys.publicKeyDer, boxPublicKey: box.publicKey });
  if (enrolled.host !== HOST_NAME) throw new Error(`enrolled as host "${enrolled.host}", expected "${HOST_NAME}"`);
  // The bundle an agent would keep; parsing it checks the chain and that the key matches.
  const hostCreds = parseCredentialBundle(formatCredentialBundle({ caCertPem: enrolled.caCertificatePem, certPem: enrolled.certificatePem, keyPem: tlsKeys.privateKeyPem }));
  const enrollSeconds = (performance.now() - t0) / 1000;
  log(`host ${enrolled.host} enrolled (id ${enrolled.hostId}) in ${enrollSeconds.toFixed(2)} s`);

  const guestCount = Math.ceil(opts.volumes / DISKS_PER_GUEST);
  const t1 = performance.now();
  const guestLoad = await runClosedLoop({ concurrency: 8, seconds: Number.POSITIVE_INFINITY, maxCalls: guestCount }, async (g) => {
    const name = `bg-${String(g).padStart(5, '0')}`;
    const vols: string[] = [];
    for (let i = g * DISKS_PER_GUEST; i < Math.min(opts.volumes, (g + 1) * DISKS_PER_GUEST); i++) vols.push(volumeName(i));
    const res = await unaryCall<DefineGuestResponse>((cb) =>
      admin.guests.defineGuest({ name, domainXml: domainXml(name, vols), volumes: vols, host: HOST_NAME, autostart: false }, new Metadata(), callOptions(), cb),
    );
    if (res.guest?.host !== HOST_NAME || res.guest.volumeIds.length !== vols.length) throw new Error(`guest ${name} defined wrongly: ${JSON.stringify(res.guest)}`);
  });
  if (guestLoad.errors > 0) throw new Error(`DefineGuest: ${guestLoad.errors} calls failed; first: ${guestLoad.firstError ?? '?'}`);
  const guestSeconds = (performance.now() - t1) / 1000;
  log(`${guestCount} guests defined on ${HOST_NAME} in ${guestSeconds.toFixed(1)} s (${guestLoad.latency.p50.toFixed(1)} ms p50)`);

  // 3. The host's channel: one KeyServiceClient, one connection.
  const keys = new KeyServiceClient(server.address, channelCredentials(hostCreds), CLIENT_CHANNEL_OPTIONS);
  cleanups.push(() => keys.close());
  const release = (volumeIds: string[]): Promise<ReleaseKeysResponse> =>
    unaryCall<ReleaseKeysResponse>((cb) => keys.releaseKeys({ volumeIds } satisfies ReleaseKeysRequest, new Metadata(), callOptions(), cb));

  const verify: VerifyState = { packetsChecked: 0, secrets: new Map() };
  let responsesChecked = 0;
  const probe1 = randomDistinct(opts.volumes, 1).map((i) => ids[i]!);
  const probeB = randomDistinct(opts.volumes, opts.batch).map((i) => ids[i]!);
  const res1 = await release(probe1);
  const resB = await release(probeB);
  verifyRelease(probe1, res1, box, enrolled.hostId, verify);
  verifyRelease(probeB, resB, box, enrolled.hostId, verify);
  responsesChecked += 2;
  const release1ResponseBytes = ReleaseKeysResponse.encode(res1).finish().length;
  const releaseBatchResponseBytes = ReleaseKeysResponse.encode(resB).finish().length;
  log(`response sizes: create ${createResponseBytes} B, release x1 ${release1ResponseBytes} B, release x${opts.batch} ${releaseBatchResponseBytes} B`);

  // 4. Echo ceiling process.
  const echoTls = await echoTlsMaterial();
  const echoServer = await startEchoServer(echoTls.server);
  cleanups.push(() => stopChild(echoServer.proc));
  const echo = new EchoClient(echoServer.address, channelCredentials(echoTls.client), CLIENT_CHANNEL_OPTIONS);
  cleanups.push(() => echo.close());
  log(`echo server pid ${echoServer.pid} at ${echoServer.address}`);

  const closedLoop = (concurrency: number, pid: number | undefined, call: (i: number) => Promise<void>, seconds = opts.seconds) =>
    runClosedLoop({ concurrency, seconds, maxCalls: opts.maxCalls, serverPid: pid }, call);
  const echoRun = async (name: string, bytes: number, concurrency: number) => {
    const payload = Buffer.alloc(bytes, 0xa5);
    const call = async () => {
      const r = await echo.echo(payload);
      if (r.length !== bytes) throw new Error(`echo returned ${r.length} bytes, sent ${bytes}`);
    };
    if (opts.warmup > 0 && !phases[name]) await closedLoop(concurrency, undefined, call, opts.warmup);
    await phase(name, `echo ceiling ${bytes} B (${concurrency} in flight)`, { volumesPerCall: 1, concurrency, messageBytes: bytes }, () => closedLoop(concurrency, echoServer.pid, call));
  };
  const releaseRun = async (name: string, perCall: number) => {
    const samples: { ids: string[]; res: ReleaseKeysResponse }[] = [];
    const call = async (i: number) => {
      const want = randomDistinct(opts.volumes, perCall).map((k) => ids[k]!);
      const res = await release(want);
      // Cheap checks on every call; the sealed contents are opened later, off the clock.
      if (res.packets.length !== want.length) throw new Error(`${res.packets.length} packets for ${want.length} volumes`);
      if (i % SAMPLE_EVERY === 0 && samples.length < SAMPLE_MAX) samples.push({ ids: want, res });
    };
    if (opts.warmup > 0 && !phases[name]) await closedLoop(opts.concurrency, undefined, call, opts.warmup);
    samples.length = 0;
    const label = perCall === 1 ? `key release, 1 volume/call (${opts.concurrency} in flight)` : `key release, ${perCall} volumes/call (${opts.concurrency} in flight)`;
    await phase(name, label, { volumesPerCall: perCall, concurrency: opts.concurrency }, () => closedLoop(opts.concurrency, serverPid, call));
    for (const s of samples) verifyRelease(s.ids, s.res, box, enrolled.hostId, verify);
    responsesChecked += samples.length;
    log(`  verified ${samples.length} sampled responses`);
  };

  const fixedLabel = `${fmt(opts.fixedRate)}/s offered, open loop`;
  const openLoop = (pid: number | undefined, call: (i: number) => Promise<void>) =>
    runOpenLoop({ rate: opts.fixedRate, seconds: opts.seconds, maxOutstanding: 4096, serverPid: pid }, call);
  const echoFixed = async () => {
    const payload = Buffer.alloc(release1ResponseBytes, 0xa5);
    await phase('echoFixed', `echo ceiling ${release1ResponseBytes} B (${fixedLabel})`, { volumesPerCall: 1, concurrency: 0, messageBytes: release1ResponseBytes }, () =>
      openLoop(echoServer.pid, async () => {
        const r = await echo.echo(payload);
        if (r.length !== release1ResponseBytes) throw new Error(`echo returned ${r.length} bytes, sent ${release1ResponseBytes}`);
      }),
    );
  };
  const releaseFixed = () =>
    phase('releaseFixed', `key release, 1 volume/call (${fixedLabel})`, { volumesPerCall: 1, concurrency: 0 }, () =>
      openLoop(serverPid, async () => {
        const res = await release(randomDistinct(opts.volumes, 1).map((k) => ids[k]!));
        if (res.packets.length !== 1) throw new Error(`${res.packets.length} packets for 1 volume`);
      }),
    );

  // Each ceiling run right before the run it is the ceiling of; with several rounds the
  // pairs alternate, so both see the same share of whatever else the machine is doing.
  for (let round = 1; round <= opts.rounds; round++) {
    if (opts.rounds > 1) log(`round ${round} of ${opts.rounds}`);
    await echoRun('echo1', release1ResponseBytes, opts.concurrency);
    await releaseRun('release1', 1);
    await echoRun('echoBatch', releaseBatchResponseBytes, opts.concurrency);
    await releaseRun('releaseBatch', opts.batch);
    if (opts.fixedRate > 0) {
      await echoFixed();
      await releaseFixed();
      const f = measureFsync(tmp.path, opts.seconds);
      fsyncLatencies.push(...f.latencies);
      const st = latencyStats(f.latencies);
      log(`storage now: ${f.rate.toFixed(0)} fdatasync/s, p50 ${st.p50.toFixed(2)} ms, p99 ${st.p99.toFixed(2)} ms, max ${st.max.toFixed(2)} ms, time-weighted p99 ${lengthWeightedPercentile(f.latencies, 99).toFixed(2)} ms`);
    }
  }
  await echoRun('echoCreate', createResponseBytes, opts.createConcurrency);

  // 5. Targets.
  const c = phases['create']!.result;
  const r1 = phases['release1']!.result;
  const e1 = phases['echo1']!.result;
  const ec = phases['echoCreate']!.result;
  const ratio = r1.rate / e1.rate;
  const targets: Results['targets'] = [
    { name: 'releases/s (1 volume/call)', value: r1.rate, ceiling: `${e1.rate.toFixed(0)} echo/s`, target: `>= ${TARGETS.releasesPerSecond}`, pass: r1.rate >= TARGETS.releasesPerSecond },
    { name: `release p99 latency (ms), ${opts.concurrency} in flight`, value: r1.latency.p99, ceiling: `${e1.latency.p99.toFixed(2)} ms echo p99`, target: `<= ${TARGETS.releaseP99Ms}`, pass: r1.latency.p99 <= TARGETS.releaseP99Ms },
    { name: 'releases / echo ceiling', value: ratio, ceiling: '1.0', target: `>= ${TARGETS.releaseEchoRatio}`, pass: ratio >= TARGETS.releaseEchoRatio },
    ...(phases['releaseFixed'] && phases['echoFixed']
      ? [
          {
            name: `release p99 (ms) at ${fmt(opts.fixedRate)}/s offered`,
            value: phases['releaseFixed'].result.latency.p99,
            ceiling: `${phases['echoFixed'].result.latency.p99.toFixed(2)} ms echo p99, ${lengthWeightedPercentile(fsyncLatencies, 99).toFixed(2)} ms fdatasync p99 (time-weighted)`,
            target: `<= ${TARGETS.releaseP99Ms}`,
            pass: phases['releaseFixed'].result.latency.p99 <= TARGETS.releaseP99Ms,
          },
        ]
      : []),
    { name: 'volume creations/s', value: c.rate, ceiling: `${ec.rate.toFixed(0)} echo/s, ${fsyncPerSecond.toFixed(0)} fdatasync/s`, target: `>= ${TARGETS.creationsPerSecond}`, pass: c.rate >= TARGETS.creationsPerSecond },
  ];

  // 6. Stop everything now so the server writes its profile.
  await runCleanups();
  // The server's own account, from its log: slow WAL fdatasyncs (logged at most once per
  // 10 s each) and its event loop's delay over the whole run (logged when it stops).
  const slowSyncs = { count: 0, maxMs: 0 };
  let loopDelay: { p99Ms: number; maxMs: number } | undefined;
  for (const line of server.logs().split('\n')) {
    if (!line.includes('slow WAL fdatasync') && !line.includes('event loop delay over the run')) continue;
    try {
      const l = JSON.parse(line) as { msg?: string; slow_syncs?: number; max_ms?: number; p99_ms?: number };
      if (l.msg === 'slow WAL fdatasync') {
        slowSyncs.count += l.slow_syncs ?? 0;
        slowSyncs.maxMs = Math.max(slowSyncs.maxMs, l.max_ms ?? 0);
      } else loopDelay = { p99Ms: l.p99_ms ?? Number.NaN, maxMs: l.max_ms ?? Number.NaN };
    } catch {
      // not a log line
    }
  }
  log(`server: ${slowSyncs.count} WAL fdatasyncs of 50 ms or more logged during the run${slowSyncs.count > 0 ? `, the longest ${slowSyncs.maxMs} ms` : ''}; event loop delay p99 ${loopDelay?.p99Ms ?? '?'} ms, max ${loopDelay?.maxMs ?? '?'} ms`);
  let profile: Results['profile'];
  if (opts.profileServer) {
    const files = readdirSync(opts.profileServer).filter((f) => f.endsWith('.cpuprofile') && f.includes(`.${serverPid}.`));
    const file = files[0];
    if (file) {
      const path = join(opts.profileServer, file);
      profile = { file: path, release1: summarizeCpuProfile(path, phases['release1']!.windows), releaseBatch: summarizeCpuProfile(path, phases['releaseBatch']!.windows) };
    } else log(`no CPU profile of pid ${serverPid} found in ${opts.profileServer}`);
  }

  return {
    machine,
    loadAverage,
    date: new Date().toISOString(),
    command: `node ${process.argv.slice(1).map((a) => a.replace(/^.*\/dist\//, 'dist/')).join(' ')}`,
    options: opts,
    setup: { volumes: opts.volumes, guests: guestCount, guestSeconds, enrollSeconds },
    sizes: { createResponseBytes, release1ResponseBytes, releaseBatchResponseBytes },
    fsyncPerSecond,
    slowSyncs,
    loopDelay,
    phases,
    verification: { responsesChecked, packetsChecked: verify.packetsChecked, distinctVolumes: verify.secrets.size },
    targets,
    profile,
  };
}

// --- Report ---------------------------------------------------------------------------------

function fmt(n: number | undefined, digits = 0): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => (r[col] ?? '').length)));
  return rows.map((r) => r.map((cell, col) => (col === 0 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))).join('  ')).join('\n');
}

function markdownTable(rows: string[][]): string {
  const [head, ...body] = rows;
  const line = (r: string[]) => `| ${r.join(' | ')} |`;
  return [line(head!), line(head!.map((_, i) => (i === 0 ? '---' : '---:'))), ...body.map(line)].join('\n');
}

/** CPU used by processes other than the bench and the server under test (noise). */
function others(r: LoadResult): number | undefined {
  if (r.machineCpuPercent === undefined) return undefined;
  return Math.max(0, r.machineCpuPercent - r.clientCpuPercent - (r.serverCpuPercent ?? 0));
}

/** Rows of the phase table: each real run followed by its ceiling. */
function phaseRows(r: Results): string[][] {
  const rows: string[][] = [['phase', 'calls/s', 'volumes/s', 'p50 ms', 'p99 ms', 'max ms', 'calls', 'errors', 'server CPU %', 'server CPU us/call', 'client CPU %', 'other procs CPU %', 'vs ceiling']];
  const add = (name: string, ceilingName?: string) => {
    const p = r.phases[name];
    if (!p) return;
    const ceiling = ceilingName ? r.phases[ceilingName] : undefined;
    const cpuPerCall = p.result.serverCpuPercent === undefined || p.result.rate === 0 ? undefined : (p.result.serverCpuPercent / 100 / p.result.rate) * 1e6;
    rows.push([
      p.label,
      fmt(p.result.rate),
      p.messageBytes === undefined ? fmt(p.result.rate * p.volumesPerCall) : '',
      fmt(p.result.latency.p50, 2),
      fmt(p.result.latency.p99, 2),
      fmt(p.result.latency.max, 2),
      fmt(p.result.calls),
      fmt(p.result.errors),
      fmt(p.result.serverCpuPercent),
      fmt(cpuPerCall),
      fmt(p.result.clientCpuPercent),
      fmt(others(p.result)),
      ceiling ? `${fmt(p.result.rate / ceiling.result.rate, 2)}x` : '(ceiling)',
    ]);
  };
  add('create', 'echoCreate');
  add('echoCreate');
  add('release1', 'echo1');
  add('echo1');
  add('releaseBatch', 'echoBatch');
  add('echoBatch');
  add('releaseFixed', 'echoFixed');
  add('echoFixed');
  return rows;
}

function targetRows(r: Results): string[][] {
  const rows: string[][] = [['target (issue 2)', 'measured', 'ceiling (same run)', 'target', 'verdict']];
  for (const t of r.targets) rows.push([t.name, fmt(t.value, t.value < 100 ? 2 : 0), t.ceiling, t.target, t.pass ? 'PASS' : 'MISS']);
  return rows;
}

function setupLine(r: Results): string {
  return (
    `${fmt(r.setup.volumes)} volumes (luks, 1 GiB), ${fmt(r.setup.guests)} guests of <= ${DISKS_PER_GUEST} disks on one host (defined in ${r.setup.guestSeconds.toFixed(1)} s); ` +
    `${r.options.rounds > 1 ? `${r.options.rounds} alternating rounds of ` : ''}${r.options.seconds} s per run after ${r.options.warmup} s warm-up; storage ${fmt(r.fsyncPerSecond)} fdatasync/s (4 KiB, one writer)`
  );
}

const CEILING_NOTE =
  '"vs ceiling" = calls/s of the real server / calls/s of a bare grpc-js echo server (child process, same mutual-TLS 1.3 credentials and listener options), same client loop and concurrency, message of the real response size. ' +
  'CPU % is in percent of one core: "server" is the process under test (virtkm-server or the echo server), "client" this bench, "other procs" everything else on the machine during the run.';

function report(r: Results): string {
  const lines: string[] = [];
  const m = r.machine;
  lines.push(`virtkm key-release benchmark, ${r.date}`);
  lines.push(`machine: ${m.nproc} CPUs (${m.cpuModel}), node ${m.node}, ${m.platform} ${m.kernel}, load average at start ${r.loadAverage.map((x) => x.toFixed(2)).join(' ')}`);
  lines.push(`command: ${r.command}`);
  lines.push(`setup: ${setupLine(r)}`);
  lines.push('');
  lines.push(table(phaseRows(r)));
  lines.push('');
  lines.push(CEILING_NOTE);
  for (const p of Object.values(r.phases)) {
    if (p.roundRates.length > 1) lines.push(`  per round, ${p.label}: ${p.roundRates.map((x) => fmt(x)).join(', ')} calls/s`);
  }
  lines.push(
    `server log: ${r.slowSyncs.count} WAL fdatasyncs of 50 ms or more${r.slowSyncs.count > 0 ? ` (longest ${r.slowSyncs.maxMs} ms)` : ''}; ` +
      `event loop delay over the whole run p99 ${r.loopDelay?.p99Ms ?? '?'} ms, max ${r.loopDelay?.maxMs ?? '?'} ms`,
  );
  lines.push(`verification: ${r.verification.responsesChecked} sampled responses, ${r.verification.packetsChecked} packets opened with the host's box key and decoded to the requested volume (${r.verification.distinctVolumes} distinct volumes): OK`);
  lines.push('');
  lines.push(table(targetRows(r)));
  if (r.profile) {
    lines.push('');
    lines.push(formatProfileSummary(`server CPU profile during the release runs of 1 volume per call (${r.profile.file})`, r.profile.release1));
    lines.push(formatProfileSummary(`server CPU profile during the release runs of ${r.options.batch} volumes per call`, r.profile.releaseBatch));
  }
  return lines.join('\n');
}

/** The figures as a Markdown fragment (for docs/benchmarks.md). */
function markdown(r: Results): string {
  const m = r.machine;
  return [
    `- Date: ${r.date}`,
    `- Machine: ${m.nproc} CPUs, ${m.cpuModel}, ${m.platform} ${m.kernel}; node ${m.node}; load average at start ${r.loadAverage.map((x) => x.toFixed(2)).join(' ')}`,
    `- Command: \`${r.command}\``,
    `- Setup: ${setupLine(r)}`,
    '',
    markdownTable(phaseRows(r)),
    '',
    CEILING_NOTE,
    '',
    markdownTable(targetRows(r)),
    '',
  ].join('\n');
}

// --- Main ----------------------------------------------------------------------------------

async function main(): Promise<number> {
  let opts: BenchOptions;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (err) {
    console.error(err instanceof Error ? err.message : String(err));
    return 2;
  }
  const onSignal = (signal: NodeJS.Signals) => {
    log(`${signal}: stopping`);
    void runCleanups().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const results = await run(opts);
    // Raw latencies are left out of the JSON: the summaries are in `latency`.
    emitResults(results, opts, { report, markdown }, log, ['latencies']);
    return 0;
  } catch (err) {
    console.error(`\nBENCH FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    const logLines = (serverLogs?.() ?? '').split('\n').filter((l) => l.trim() !== '');
    const errorLines = logLines.filter((l) => /"level":"(error|warn)"/.test(l));
    if (errorLines.length > 0) console.error(`server errors and warnings (last 10 of ${errorLines.length}):\n${errorLines.slice(-10).join('\n')}`);
    console.error(`server log (last 10 of ${logLines.length} lines):\n${logLines.slice(-10).join('\n')}`);
    return 1;
  } finally {
    await runCleanups();
  }
}

// Exit explicitly: a stray handle must not keep a finished benchmark alive.
process.exit(await main());
