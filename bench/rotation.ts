/**
 * Benchmark of key rotation on a host (issue 4): re-encryption throughput of each mechanism
 * next to this machine's own copy ceiling measured in the same run, and the time of a rekey
 * (metadata only) of many volumes next to the cost of reading their metadata.
 *
 *   node dist/bench/rotation.js [--size 1G] [--rekey-count 100] [--rekey-concurrency 1]
 *       [--dir DIR] [--skip-live] [--json FILE] [--markdown FILE] [--timeout-min 90]
 *
 * Part 1, re-encryption of one volume of --size (default 1 GiB) per mechanism, through the
 * real mechanisms of host-agent/src/rotate with the real tools:
 *   - qemu-img convert (createQemuConvert) of a `luks` and of a `qcow2-luks` image: copy
 *     under the new key, fsync, `qemu-img compare` of both, rename;
 *   - cryptsetup reencrypt (createLuks2Reencrypt) of a `luks2` image in place, resilience
 *     `checksum` (the default) and `journal`;
 *   - live blockcopy (createLiveCopy) of the `luks` disk of a running guest (a tiny guest
 *     of test/helpers/libvirt-harness.ts that boots a boot sector from that disk), unless
 *     --skip-live or libvirt is not available (then the row says why).
 *   Every image holds non-zero data before the timed run: the QEMU images are filled with a
 *   byte pattern through qemu-io with the old key (a sparse or zero image would flatter
 *   qemu-img convert, which skips zero clusters); the LUKS2 payload is overwritten with
 *   random bytes (without device-mapper no plaintext can be written here, and random
 *   ciphertext is a volume full of data as far as cryptsetup is concerned). Each image's
 *   page cache is dropped right before its timed run (`dd iflag=nocache count=0`, which
 *   only touches that file), so sources are read from the disk.
 *   Ceiling: `dd if=SRC of=DST bs=4M conv=fsync` of a --size file of random bytes in the
 *   same directory (cache of SRC dropped first, DST new each time), run before the first
 *   mechanism and after each one: a mechanism's ratio is its rate over the mean of the
 *   ceilings right before and right after it.
 *   Per run: wall time and MiB/s from the call of `run` to its return (end to end, with
 *   the key checks, creating the new header, verifying and the rename), the time of the
 *   data phase alone (from the mechanism's progress steps: "copying" or "reencrypting"),
 *   the CPU of the tools (children of this process, from /proc/self/stat; for the live copy
 *   the guest's QEMU process and libvirtd, which do the copying), of this process, and of
 *   everything else on the machine (the machine is shared: other work skews the figures).
 *
 * Part 2, rekey of --rekey-count volumes (default 100) of --size each, one after the other
 * by default (--rekey-concurrency), with the real mechanisms: qemu-img amend
 * (createQemuRekey, format `luks`) and cryptsetup (createLuks2Rekey, format `luks2`). The
 * volumes are sparse copies (`cp --sparse=always`) of one image made by the image store, so
 * they share the template's LUKS UUID and old key (making 100 QEMU images would cost about
 * 2 s of CPU each for QEMU's PBKDF2 calibration, and a rekey reads nothing of the data).
 * Ceilings, same volumes, same run: one metadata read per volume (`qemu-img info`,
 * `cryptsetup luksDump --dump-json-metadata`: a tool start and a header read) and one
 * unlock per volume with the old key (qemu-io open, `cryptsetup open --test-passphrase`):
 * a verified rekey cannot do less than a few of these per volume.
 *
 * A benchmark, not a test: it prints figures and PASS/MISS against the issue's target
 * (LUKS2 reencrypt at least 0.5 of the copy ceiling) and exits 0 whatever the figures are;
 * 1 when something went wrong (a mechanism failed, data read back differently). Needs root
 * for the live part (libvirtd), qemu-img, qemu-io, cryptsetup and dd. Peak disk use is
 * about three times --size (checked before starting); everything it made (files, the
 * guest, its secrets) is removed at the end, also after an error or a signal.
 */
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { open, unlink } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { runTool, type RunTool, type RunToolOptions, type ToolResult } from '../shared/src/run-tool.js';
import { wipe } from '../shared/src/secret-bytes.js';
import { createHostImageStore, LUKS2_DATA_OFFSET_BYTES } from '../host-agent/src/images/image-store.js';
import { luksPassphrase } from '../host-agent/src/images/passphrase.js';
import type { ImageFormat, ImageSpec, ImageStore } from '../host-agent/src/images/types.js';
import { createLibvirtFfi } from '../host-agent/src/libvirt/libvirt-ffi.js';
import type { Libvirt } from '../host-agent/src/libvirt/ports.js';
import { secretOwnerTag } from '../host-agent/src/reconcile/reconciler.js';
import { secretUuidFor } from '../host-agent/src/reconcile/render-domain.js';
import { createLiveCopy } from '../host-agent/src/rotate/live-copy.js';
import { createLuks2Reencrypt } from '../host-agent/src/rotate/luks2-reencrypt.js';
import { createLuks2Rekey } from '../host-agent/src/rotate/luks2-rekey.js';
import { createQemuConvert } from '../host-agent/src/rotate/qemu-convert.js';
import { createQemuRekey } from '../host-agent/src/rotate/qemu-rekey.js';
import { qemuNode, secretObject } from '../host-agent/src/rotate/qemu-tools.js';
import type { RotationJob, RotationMechanism, RotationProgress } from '../host-agent/src/rotate/types.js';
import { bootSector, ensureLibvirtd, guestDomainXml, LIBVIRTD_PID_FILE, sweep, waitForFileText } from '../test/helpers/libvirt-harness.js';
import { emitResults, latencyStats, machineBusySeconds, machineInfo, mapLimit, processCpuSeconds, type LatencyStats, type MachineInfo } from './load.js';

// --- Options -------------------------------------------------------------------------------

const USAGE = `usage: node dist/bench/rotation.js [--size 1G] [--rekey-count 100] [--rekey-concurrency 1]
       [--dir DIR] [--skip-live] [--json FILE] [--markdown FILE] [--timeout-min 90]`;

interface BenchOptions {
  sizeBytes: bigint;
  rekeyCount: number;
  rekeyConcurrency: number;
  dir: string;
  skipLive: boolean;
  timeoutMin: number;
  json: string | undefined;
  markdown: string | undefined;
}

const MIB = 1n << 20n;

/** "1G", "1GiB", "512M", "64MiB" or a byte count; a multiple of 1 MiB, at least 16 MiB. */
function parseSize(v: string): bigint {
  const m = /^(\d+)\s*(k|m|g|t)?(i?b)?$/i.exec(v.trim());
  if (!m) throw new Error(`--size: cannot read "${v}"\n${USAGE}`);
  const shift = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n }[(m[2] ?? '').toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const bytes = BigInt(m[1]!) << shift;
  if (bytes < 16n * MIB || bytes % MIB !== 0n || bytes > 1n << 40n) throw new Error(`--size must be a multiple of 1 MiB from 16 MiB to 1 TiB\n${USAGE}`);
  return bytes;
}

function parseOptions(argv: string[]): BenchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1G' },
      'rekey-count': { type: 'string', default: '100' },
      'rekey-concurrency': { type: 'string', default: '1' },
      dir: { type: 'string', default: tmpdir() },
      'skip-live': { type: 'boolean', default: false },
      'timeout-min': { type: 'string', default: '90' },
      json: { type: 'string' },
      markdown: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const int = (name: string, v: string | undefined, min: number, max: number): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new Error(`--${name} must be an integer from ${min} to ${max}\n${USAGE}`);
    return n;
  };
  return {
    sizeBytes: parseSize(values.size ?? '1G'),
    rekeyCount: int('rekey-count', values['rekey-count'], 0, 10_000),
    rekeyConcurrency: int('rekey-concurrency', values['rekey-concurrency'], 1, 16),
    dir: resolve(values.dir ?? tmpdir()),
    skipLive: values['skip-live'] ?? false,
    timeoutMin: int('timeout-min', values['timeout-min'], 1, 24 * 60),
    json: values.json,
    markdown: values.markdown,
  };
}

// --- Clean-up and small helpers ---------------------------------------------------------------

const cleanups: { name: string; fn: () => Promise<void> | void }[] = [];

async function runCleanups(): Promise<void> {
  while (cleanups.length > 0) {
    const { name, fn } = cleanups.pop()!;
    try {
      await fn();
    } catch (err) {
      console.error(`bench: clean-up "${name}" failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}

function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

const sha256 = (s: string): Buffer => createHash('sha256').update(s).digest();
const mib = (bytes: bigint | number): number => Number(bytes) / 2 ** 20;
const RUN = randomBytes(3).toString('hex');
const HOST = `rotbench-${RUN}`;
const CIPHER = 'aes-xts-plain64';
const TOOL_TIMEOUT_MS = 20 * 60_000;
const BOOT_MESSAGE = 'VIRTKM-ROTBENCH-OK';

function spec(path: string, format: ImageFormat, sizeBytes: bigint): ImageSpec {
  return { path, format, sizeBytes, cipher: CIPHER, keySizeBits: 512, sectorSize: 512 };
}

async function unlinkQuiet(path: string): Promise<void> {
  await unlink(path).catch(() => undefined);
}

function check(r: ToolResult, what: string): ToolResult {
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.stderr.trim().slice(-400)}`);
  return r;
}

// --- CPU accounting ------------------------------------------------------------------------------

let clockTicks: number | undefined;
function ticksPerSecond(): number {
  if (clockTicks === undefined) {
    const n = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout?.trim());
    clockTicks = Number.isFinite(n) && n > 0 ? n : 100;
  }
  return clockTicks;
}

/**
 * CPU seconds of this process's waited-for children (cutime + cstime of /proc/self/stat):
 * every tool runTool starts is a child that is reaped when it exits, so this counts the
 * tools (and their own waited-for children) but nothing else.
 */
function childrenCpuSeconds(): number {
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[13]) + Number(fields[14])) / ticksPerSecond();
}

/** CPU use over an interval, in CPU seconds. */
interface Usage {
  seconds: number;
  /** This process (node: the mechanism's own code). */
  benchCpu: number;
  /** Tools: children of this process, plus `extraPids` (the live copy's QEMU and libvirtd). */
  toolCpu: number;
  /** Everything else on the machine (other users of the shared machine), when /proc/stat is readable. */
  otherCpu: number | undefined;
}

/** Starts measuring; the returned function ends the interval. */
function meter(extraPids: readonly number[] = []): () => Usage {
  const t0 = performance.now();
  const self0 = process.cpuUsage();
  const child0 = childrenCpuSeconds();
  const extra0 = extraPids.map((p) => processCpuSeconds(p) ?? 0);
  const machine0 = machineBusySeconds();
  return () => {
    const seconds = (performance.now() - t0) / 1000;
    const self = process.cpuUsage(self0);
    const benchCpu = (self.user + self.system) / 1e6;
    const extra = extraPids.reduce((s, p, i) => s + Math.max(0, (processCpuSeconds(p) ?? 0) - (extra0[i] ?? 0)), 0);
    const toolCpu = childrenCpuSeconds() - child0 + extra;
    const machine1 = machineBusySeconds();
    const otherCpu = machine0 === undefined || machine1 === undefined ? undefined : Math.max(0, machine1 - machine0 - benchCpu - toolCpu);
    return { seconds, benchCpu, toolCpu, otherCpu };
  };
}

/** Calls and CPU of one tool subcommand (e.g. "qemu-img amend") during a measured run. */
interface ToolTally {
  tool: string;
  calls: number;
  seconds: number;
  cpu: number;
}

/**
 * runTool, counting each call by tool and subcommand with its wall time and CPU. The CPU
 * is the growth of the children's total over the call, exact while one tool runs at a
 * time (the mechanisms run their tools one after the other; with --rekey-concurrency > 1
 * it is shared out approximately).
 */
function recordingRun(tallies: Map<string, ToolTally>): RunTool {
  return async (file: string, args: readonly string[], options?: RunToolOptions) => {
    const sub = args[0] !== undefined && /^[A-Za-z][A-Za-z-]*$/.test(args[0]) ? ` ${args[0]}` : '';
    const key = basename(file) + sub;
    const t0 = performance.now();
    const c0 = childrenCpuSeconds();
    try {
      return await runTool(file, args, options);
    } finally {
      const t = tallies.get(key) ?? { tool: key, calls: 0, seconds: 0, cpu: 0 };
      t.calls++;
      t.seconds += (performance.now() - t0) / 1000;
      t.cpu += childrenCpuSeconds() - c0;
      tallies.set(key, t);
    }
  };
}

// --- Data ------------------------------------------------------------------------------------------

/** Drops the page cache of one file (GNU dd: iflag=nocache with count=0 advises DONTNEED for all of it). */
async function dropCache(path: string): Promise<void> {
  check(await runTool('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutMs: 60_000 }), 'dd (drop cache)');
}

/** Writes random bytes (a 4 MiB block repeated) over [from, to) of a file and fsyncs it. */
async function fillRandom(path: string, from: bigint, to: bigint, create: boolean): Promise<void> {
  const block = randomBytes(4 << 20);
  const fh = await open(path, create ? 'w' : 'r+', 0o600);
  try {
    for (let at = from; at < to; at += BigInt(block.length)) {
      const n = Number(to - at < BigInt(block.length) ? to - at : BigInt(block.length));
      await fh.write(block, 0, n, Number(at));
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Fill chunk of the QEMU images and the pattern byte of chunk `i` (never zero). */
const CHUNK = 64n * MIB;
const patternOf = (i: number): number => 0x41 + (i % 0x80);

function chunkCount(size: bigint): number {
  return Number((size + CHUNK - 1n) / CHUNK);
}

/** qemu-io on an encrypted QEMU image, the key's passphrase on fd 3. */
async function qemuIo(format: 'luks' | 'qcow2-luks', path: string, key: Uint8Array, commands: string[], readOnly: boolean): Promise<ToolResult> {
  const pass = luksPassphrase(key);
  try {
    const args = [...(readOnly ? ['-r', '-U'] : []), '--object', secretObject('s0', 3), qemuNode(format, path, 's0')];
    for (const c of commands) args.push('-c', c);
    return await runTool('qemu-io', args, { fds: [pass], timeoutMs: TOOL_TIMEOUT_MS });
  } finally {
    wipe(pass);
  }
}

/** Fills a QEMU image through its key: chunk i of 64 MiB with byte patternOf(i). */
async function fillQemuImage(format: 'luks' | 'qcow2-luks', path: string, key: Uint8Array, size: bigint): Promise<void> {
  const commands: string[] = [];
  for (let i = 0; i < chunkCount(size); i++) {
    const at = BigInt(i) * CHUNK;
    const len = size - at < CHUNK ? size - at : CHUNK;
    commands.push(`write -q -P 0x${patternOf(i).toString(16)} ${at} ${len}`);
  }
  const r = await qemuIo(format, path, key, commands, false);
  if (r.code !== 0 || /fail|error/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io fill failed: ${(r.stdout + r.stderr).trim().slice(-400)}`);
}

/**
 * Reads back 1 MiB from the middle of the first, the middle and the last chunk with `key`
 * (the middle: the live guest's boot sector is at offset 0); an error says what differs.
 */
async function verifyQemuImage(format: 'luks' | 'qcow2-luks', path: string, key: Uint8Array, size: bigint): Promise<string> {
  const n = chunkCount(size);
  const chunks = [...new Set([0, Math.floor(n / 2), n - 1])];
  const middle = (i: number): bigint => {
    const at = BigInt(i) * CHUNK;
    const len = size - at < CHUNK ? size - at : CHUNK;
    return at + ((len / 2n) & ~(MIB - 1n));
  };
  const commands = chunks.map((i) => `read -q -P 0x${patternOf(i).toString(16)} ${middle(i)} 1M`);
  const r = await qemuIo(format, path, key, commands, true);
  if (r.code !== 0 || /fail|error|can't open/i.test(r.stdout + r.stderr)) throw new Error(`data check with the new key failed: ${(r.stdout + r.stderr).trim().slice(-400)}`);
  return `pattern of chunks ${chunks.join(', ')} of ${n} (1 MiB from the middle of each) read back with the new key`;
}

// --- Ceilings ------------------------------------------------------------------------------------

interface CeilingRecord {
  /** Position: before mechanism 0, after mechanism 0 (= before 1), ... */
  index: number;
  usage: Usage;
  mibPerSecond: number;
}

async function ceilingCopy(src: string, dst: string, size: bigint, index: number): Promise<CeilingRecord> {
  await unlinkQuiet(dst);
  await dropCache(src);
  const stop = meter();
  check(await runTool('dd', [`if=${src}`, `of=${dst}`, 'bs=4M', 'conv=fsync', 'status=none'], { timeoutMs: TOOL_TIMEOUT_MS }), 'dd (ceiling copy)');
  const usage = stop();
  await unlinkQuiet(dst);
  const rec = { index, usage, mibPerSecond: mib(size) / usage.seconds };
  log(`ceiling ${index}: dd copy ${rec.mibPerSecond.toFixed(0)} MiB/s (${usage.seconds.toFixed(1)} s)`);
  return rec;
}

// --- Part 1: re-encryption -----------------------------------------------------------------------

interface StepTime {
  step: string;
  seconds: number;
}

interface ReencryptRecord {
  key: string;
  label: string;
  format: ImageFormat;
  /** The step that moves the data ("copying", "reencrypting"). */
  dataStep: string;
  usage?: Usage;
  steps: StepTime[];
  dataSeconds?: number;
  bytesRewritten?: bigint;
  tools: ToolTally[];
  /** Seconds to create and fill the image (not timed as part of the rotation). */
  prepareSeconds?: number;
  verification?: string;
  error?: string;
  skipped?: string;
  /** Index of the ceiling run right after this one (the one before is index - 1). */
  ceilingIndex?: number;
}

/** Records when each progress step starts; durations summed per step name. */
function stepClock(): { onProgress: (p: RotationProgress) => void; finish: () => StepTime[] } {
  const marks: { step: string; at: number }[] = [];
  return {
    onProgress(p) {
      if (marks[marks.length - 1]?.step !== p.step) marks.push({ step: p.step, at: performance.now() });
    },
    finish() {
      const end = performance.now();
      const sums = new Map<string, number>();
      marks.forEach((m, i) => sums.set(m.step, (sums.get(m.step) ?? 0) + ((marks[i + 1]?.at ?? end) - m.at) / 1000));
      return [...sums].map(([step, seconds]) => ({ step, seconds }));
    },
  };
}

interface Ctx {
  opts: BenchOptions;
  work: string;
  size: bigint;
}

/** One offline mechanism on a freshly made, filled image in its own subdirectory. */
async function offlineRun(ctx: Ctx, rec: ReencryptRecord, make: (run: RunTool, store: ImageStore) => RotationMechanism): Promise<void> {
  const dir = join(ctx.work, rec.key);
  mkdirSync(dir, { mode: 0o700 });
  const path = join(dir, 'volume.img');
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  try {
    const store = createHostImageStore();
    const t0 = performance.now();
    await store.create(spec(path, rec.format, ctx.size), oldKey);
    if (rec.format === 'luks2') await fillRandom(path, LUKS2_DATA_OFFSET_BYTES, LUKS2_DATA_OFFSET_BYTES + ctx.size, false);
    else await fillQemuImage(rec.format as 'luks' | 'qcow2-luks', path, oldKey, ctx.size);
    rec.prepareSeconds = (performance.now() - t0) / 1000;
    log(`${rec.label}: image made and filled in ${rec.prepareSeconds.toFixed(1)} s; rotating`);
    await dropCache(path);

    const tallies = new Map<string, ToolTally>();
    const run = recordingRun(tallies);
    const mechanism = make(run, createHostImageStore({ run }));
    const job: RotationJob = { rotationId: `bench-${rec.key}`, volumeId: `vol-${rec.key}`, kind: 'reencrypt', target: spec(path, rec.format, ctx.size), fromFormat: rec.format, oldKey, newKey };
    const clock = stepClock();
    const stop = meter();
    const result = await mechanism.run(job, { onProgress: clock.onProgress });
    rec.usage = stop();
    rec.steps = clock.finish();
    rec.tools = [...tallies.values()];
    rec.bytesRewritten = result.bytesRewritten;
    rec.dataSeconds = rec.steps.find((s) => s.step === rec.dataStep)?.seconds;
    log(`${rec.label}: ${rec.usage.seconds.toFixed(1)} s end to end (${(mib(ctx.size) / rec.usage.seconds).toFixed(0)} MiB/s)`);

    if (rec.format === 'luks2') {
      // No device-mapper here: the plaintext cannot be read; the keys are what can be checked.
      const images = createHostImageStore();
      const s = spec(path, 'luks2', ctx.size);
      if (!(await images.testKey(path, s, newKey)) || (await images.testKey(path, s, oldKey))) throw new Error('after the re-encryption the new key must open the image and the old one must not');
      rec.verification = `new key opens, old key refused (cryptsetup open --test-passphrase); mechanism's own check: ${result.verified ? 'data compared' : 'header only'}`;
    } else {
      rec.verification = `${await verifyQemuImage(rec.format as 'luks' | 'qcow2-luks', path, newKey, ctx.size)}; mechanism's own check: ${result.verified ? 'qemu-img compare of all data' : 'keys only'}`;
    }
  } finally {
    wipe(oldKey, newKey);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The live blockcopy of a running guest's luks disk. */
async function liveRun(ctx: Ctx, rec: ReencryptRecord): Promise<void> {
  const env = await ensureLibvirtd();
  if (env.skipReason) {
    rec.skipped = env.skipReason;
    return;
  }
  const dir = join(ctx.work, rec.key);
  mkdirSync(dir);
  chmodSync(dir, 0o755); // QEMU runs as libvirt-qemu and must reach the image
  const name = `vkrb-${RUN}`;
  const volumeId = `vrb-${RUN}`;
  const path = join(dir, `${volumeId}.img`);
  const serial = join(dir, 'serial.log');
  const oldKey = randomBytes(32);
  const newKey = randomBytes(32);
  const lv: Libvirt = createLibvirtFfi();
  let cleaned = false;
  const cleanup = async (): Promise<void> => {
    if (cleaned) return;
    cleaned = true;
    sweep(name, `virtkm:${volumeId}`);
    await lv.close();
    rmSync(dir, { recursive: true, force: true });
  };
  // Also on a signal or the time limit while the guest runs.
  cleanups.push({ name: 'live guest', fn: cleanup });
  try {
    const t0 = performance.now();
    await createHostImageStore().create(spec(path, 'luks', ctx.size), oldKey);
    await fillQemuImage('luks', path, oldKey, ctx.size);
    const bootFile = join(dir, 'boot.bin');
    writeFileSync(bootFile, bootSector(BOOT_MESSAGE));
    const boot = await qemuIo('luks', path, oldKey, [`write -q -s ${bootFile} 0 512`], false);
    if (boot.code !== 0 || /fail|error/i.test(boot.stdout + boot.stderr)) throw new Error(`qemu-io boot sector write failed: ${boot.stderr.trim()}`);
    // The v1 secret, as the reconciler would have defined it.
    const secretUuid = secretUuidFor(volumeId, 1, sha256);
    await lv.secrets.define({ uuid: secretUuid, volumeId, description: `virtkm volume ${volumeId} key v1${secretOwnerTag(HOST)}` });
    const pass = luksPassphrase(oldKey);
    try {
      await lv.secrets.setValue(secretUuid, pass);
    } finally {
      wipe(pass);
    }
    await lv.domains.define(guestDomainXml({ name, domainType: env.domainType, marker: { guestId: `g-${RUN}`, generation: 1, hostId: HOST }, disk: { path, secretUuid }, serialLog: serial }));
    await lv.domains.start(name);
    if (!(await waitForFileText(serial, BOOT_MESSAGE, 60_000))) throw new Error('the guest did not boot from its encrypted disk within 60 s');
    rec.prepareSeconds = (performance.now() - t0) / 1000;
    log(`${rec.label}: guest ${name} (${env.domainType}) running from its ${mib(ctx.size)} MiB disk, made in ${rec.prepareSeconds.toFixed(1)} s; rotating`);
    await dropCache(path);

    const readPid = (file: string): number | undefined => {
      try {
        const pid = Number(readFileSync(file, 'utf8').trim());
        return Number.isInteger(pid) && pid > 1 ? pid : undefined;
      } catch {
        return undefined;
      }
    };
    const pids = [readPid(`/run/libvirt/qemu/${name}.pid`), readPid(LIBVIRTD_PID_FILE)].filter((p): p is number => p !== undefined);
    const tallies = new Map<string, ToolTally>();
    const mechanism = createLiveCopy({
      libvirt: lv,
      images: createHostImageStore({ run: recordingRun(tallies) }),
      hostId: HOST,
      locate: () => ({ domain: name, disk: 'vda', oldKeyVersion: 1, newKeyVersion: 2 }),
      pollIntervalMs: 100,
    });
    const job: RotationJob = { rotationId: `bench-${rec.key}`, volumeId, kind: 'reencrypt', target: spec(path, 'luks', ctx.size), fromFormat: 'luks', oldKey, newKey };
    const clock = stepClock();
    const stop = meter(pids);
    const result = await mechanism.run(job, { onProgress: clock.onProgress });
    rec.usage = stop();
    rec.steps = clock.finish();
    rec.tools = [...tallies.values()];
    if (pids.length > 0) rec.tools.push({ tool: `guest QEMU + libvirtd (pids ${pids.join(', ')})`, calls: 0, seconds: rec.usage.seconds, cpu: rec.usage.toolCpu - [...tallies.values()].reduce((s, t) => s + t.cpu, 0) });
    rec.bytesRewritten = result.bytesRewritten;
    rec.dataSeconds = rec.steps.find((s) => s.step === rec.dataStep)?.seconds;
    log(`${rec.label}: ${rec.usage.seconds.toFixed(1)} s end to end (${(mib(ctx.size) / rec.usage.seconds).toFixed(0)} MiB/s)`);
    if ((await lv.domains.state(name)) !== 'running') throw new Error('the guest is not running after the live re-encryption');
    rec.verification = `${await verifyQemuImage('luks', path, newKey, ctx.size)} while the guest runs; guest still running`;
  } finally {
    wipe(oldKey, newKey);
    await cleanup();
  }
}

// --- Part 2: rekey of many volumes ------------------------------------------------------------

interface CostRecord {
  label: string;
  count: number;
  usage: Usage;
}

interface RekeyRecord {
  key: string;
  label: string;
  format: 'luks' | 'luks2';
  count: number;
  concurrency: number;
  cloneSeconds?: number;
  usage?: Usage;
  latency?: LatencyStats;
  tools: ToolTally[];
  ceilings: CostRecord[];
  verification?: string;
  error?: string;
}

/** Runs `body` once per item one after the other, measured as a whole. */
async function timedLoop(label: string, items: readonly string[], body: (path: string) => Promise<void>): Promise<CostRecord> {
  const stop = meter();
  for (const p of items) await body(p);
  const usage = stop();
  log(`  ${label}: ${usage.seconds.toFixed(2)} s for ${items.length} (${((1000 * usage.seconds) / items.length).toFixed(1)} ms each)`);
  return { label, count: items.length, usage };
}

async function rekeyRun(ctx: Ctx, rec: RekeyRecord): Promise<void> {
  const dir = join(ctx.work, rec.key);
  mkdirSync(dir, { mode: 0o700 });
  const oldKey = randomBytes(32);
  const newKeys: Buffer[] = [];
  try {
    const template = join(dir, 'template.img');
    await createHostImageStore().create(spec(template, rec.format, ctx.size), oldKey);
    const paths = Array.from({ length: rec.count }, (_, i) => join(dir, `vol-${String(i).padStart(4, '0')}.img`));
    const t0 = performance.now();
    for (const p of paths) check(await runTool('cp', ['--sparse=always', template, p], { timeoutMs: 120_000 }), 'cp');
    rec.cloneSeconds = (performance.now() - t0) / 1000;
    log(`${rec.label}: ${rec.count} volumes cloned from one image in ${rec.cloneSeconds.toFixed(1)} s; ceilings`);

    // Ceilings: what touching each volume's header costs at the least.
    const pass = luksPassphrase(oldKey);
    try {
      if (rec.format === 'luks') {
        rec.ceilings.push(await timedLoop('qemu-img info (metadata read)', paths, async (p) => void check(await runTool('qemu-img', ['info', '-U', '--output=json', qemuNode('luks', p)], { timeoutMs: 60_000 }), 'qemu-img info')));
        rec.ceilings.push(
          await timedLoop('qemu-io open with the key (one unlock)', paths, async (p) => void check(await runTool('qemu-io', ['-r', '-U', '--object', secretObject('s0', 3), qemuNode('luks', p, 's0'), '-c', 'quit'], { fds: [pass], timeoutMs: 60_000 }), 'qemu-io')),
        );
      } else {
        rec.ceilings.push(await timedLoop('cryptsetup luksDump (metadata read)', paths, async (p) => void check(await runTool('cryptsetup', ['luksDump', '--dump-json-metadata', p], { timeoutMs: 60_000 }), 'cryptsetup luksDump')));
        rec.ceilings.push(
          await timedLoop('cryptsetup open --test-passphrase (one unlock)', paths, async (p) => void check(await runTool('cryptsetup', ['open', '--test-passphrase', '--key-file', '-', p], { stdin: pass, timeoutMs: 60_000 }), 'cryptsetup open --test-passphrase')),
        );
      }
    } finally {
      wipe(pass);
    }

    const tallies = new Map<string, ToolTally>();
    const run = recordingRun(tallies);
    const mechanism = rec.format === 'luks' ? createQemuRekey({ run, store: createHostImageStore({ run }) }) : createLuks2Rekey({ run, images: createHostImageStore({ run }) });
    const latencies: number[] = [];
    log(`${rec.label}: rekeying ${rec.count} volumes, ${rec.concurrency} at a time`);
    const stop = meter();
    let done = 0;
    await mapLimit(paths, rec.concurrency, async (p, i) => {
      const newKey = randomBytes(32);
      newKeys[i] = newKey;
      const job: RotationJob = { rotationId: `bench-${rec.key}-${i}`, volumeId: `vol-${i}`, kind: 'rekey', target: spec(p, rec.format, ctx.size), fromFormat: rec.format, oldKey, newKey };
      const t = performance.now();
      await mechanism.run(job);
      latencies.push(performance.now() - t);
      if (++done % 20 === 0) log(`  ${done}/${rec.count}`);
    });
    rec.usage = stop();
    rec.latency = latencyStats(latencies);
    rec.tools = [...tallies.values()];
    log(`${rec.label}: ${rec.usage.seconds.toFixed(1)} s for ${rec.count} (${rec.latency.mean.toFixed(0)} ms mean)`);

    // Spot check outside the timing: first, middle and last volume.
    const store = createHostImageStore();
    const sample = [...new Set([0, Math.floor(rec.count / 2), rec.count - 1])];
    for (const i of sample) {
      const s = spec(paths[i]!, rec.format, ctx.size);
      if (!(await store.testKey(paths[i]!, s, newKeys[i]!)) || (await store.testKey(paths[i]!, s, oldKey))) throw new Error(`volume ${i}: the new key must open it and the old one must not`);
    }
    rec.verification = `volumes ${sample.join(', ')}: new key opens, old key refused (image store testKey)`;
  } finally {
    wipe(oldKey, ...newKeys.filter(Boolean));
    rmSync(dir, { recursive: true, force: true });
  }
}

// --- The run -------------------------------------------------------------------------------------

interface Results {
  machine: MachineInfo;
  loadAverage: { start: number[]; end: number[] };
  date: string;
  command: string;
  dir: string;
  freeBytesAtStart: bigint;
  sizeBytes: bigint;
  ceilings: CeilingRecord[];
  reencrypt: ReencryptRecord[];
  rekey: RekeyRecord[];
  targets: { name: string; value: number | undefined; target: string; pass: boolean }[];
  totalSeconds: number;
}

function reencryptPlan(opts: BenchOptions): { rec: ReencryptRecord; go: (ctx: Ctx, rec: ReencryptRecord) => Promise<void> }[] {
  const base = { steps: [], tools: [] };
  return [
    { rec: { ...base, key: 'convert-luks', label: 'qemu-img convert, luks', format: 'luks', dataStep: 'copying' }, go: (c, r) => offlineRun(c, r, (run, store) => createQemuConvert({ run, store, copyTimeoutMs: TOOL_TIMEOUT_MS })) },
    { rec: { ...base, key: 'convert-qcow2', label: 'qemu-img convert, qcow2-luks', format: 'qcow2-luks', dataStep: 'copying' }, go: (c, r) => offlineRun(c, r, (run, store) => createQemuConvert({ run, store, copyTimeoutMs: TOOL_TIMEOUT_MS })) },
    {
      rec: { ...base, key: 'luks2-checksum', label: 'cryptsetup reencrypt, luks2, checksum', format: 'luks2', dataStep: 'reencrypting' },
      go: (c, r) => offlineRun(c, r, (run, images) => createLuks2Reencrypt({ run, images, resilience: 'checksum', reencryptTimeoutMs: TOOL_TIMEOUT_MS })),
    },
    {
      rec: { ...base, key: 'luks2-journal', label: 'cryptsetup reencrypt, luks2, journal', format: 'luks2', dataStep: 'reencrypting' },
      go: (c, r) => offlineRun(c, r, (run, images) => createLuks2Reencrypt({ run, images, resilience: 'journal', reencryptTimeoutMs: TOOL_TIMEOUT_MS })),
    },
    {
      rec: { ...base, key: 'live-luks', label: 'live blockcopy, luks (guest running)', format: 'luks', dataStep: 'copying', ...(opts.skipLive ? { skipped: '--skip-live' } : {}) },
      go: liveRun,
    },
  ];
}

async function run(opts: BenchOptions): Promise<Results> {
  const started = performance.now();
  const loadStart = loadavg();
  const machine = machineInfo();
  for (const tool of ['qemu-img', 'qemu-io', 'cryptsetup', 'dd', 'cp']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is missing (scripts/setup.sh --host-tools installs the host tools)`);
  }
  mkdirSync(opts.dir, { recursive: true });
  const fs = statfsSync(opts.dir, { bigint: true });
  const free = fs.bavail * fs.bsize;
  // Peak: the ceiling source and its copy, or an image and its re-encrypted copy, plus
  // the ceiling source left in place: 3 sizes, and a margin.
  const needed = 3n * opts.sizeBytes + 512n * MIB;
  if (free < needed) throw new Error(`${opts.dir} has ${mib(free).toFixed(0)} MiB free, the bench needs about ${mib(needed).toFixed(0)} MiB: choose another --dir`);
  const work = mkdtempSync(join(opts.dir, 'virtkm-rotbench-'));
  chmodSync(work, 0o755);
  cleanups.push({ name: 'work directory', fn: () => rmSync(work, { recursive: true, force: true }) });
  log(`work directory ${work} (${mib(free).toFixed(0)} MiB free), volume size ${mib(opts.sizeBytes)} MiB`);
  const ctx: Ctx = { opts, work, size: opts.sizeBytes };

  // Part 1: ceilings around each re-encryption.
  const src = join(work, 'ceiling-src.bin');
  const dst = join(work, 'ceiling-dst.bin');
  await fillRandom(src, 0n, opts.sizeBytes, true);
  const ceilings: CeilingRecord[] = [await ceilingCopy(src, dst, opts.sizeBytes, 0)];
  const plan = reencryptPlan(opts);
  let failed = false;
  for (const { rec, go } of plan) {
    if (rec.skipped) continue;
    try {
      await go(ctx, rec);
    } catch (err) {
      failed = true;
      rec.error = err instanceof Error ? err.message : String(err);
      log(`${rec.label} FAILED: ${rec.error}`);
    }
    if (rec.skipped) {
      log(`${rec.label}: skipped (${rec.skipped})`);
      continue;
    }
    ceilings.push(await ceilingCopy(src, dst, opts.sizeBytes, ceilings.length));
    rec.ceilingIndex = ceilings.length - 1;
  }
  await unlinkQuiet(src);

  // Part 2: rekey of many volumes.
  const rekey: RekeyRecord[] = [];
  if (opts.rekeyCount > 0) {
    for (const format of ['luks2', 'luks'] as const) {
      const rec: RekeyRecord = {
        key: `rekey-${format}`,
        label: format === 'luks' ? 'qemu-img amend, luks' : 'cryptsetup luksAddKey/luksKillSlot, luks2',
        format,
        count: opts.rekeyCount,
        concurrency: opts.rekeyConcurrency,
        tools: [],
        ceilings: [],
      };
      rekey.push(rec);
      try {
        await rekeyRun(ctx, rec);
      } catch (err) {
        failed = true;
        rec.error = err instanceof Error ? err.message : String(err);
        log(`${rec.label} FAILED: ${rec.error}`);
      }
    }
  }

  const reencrypt = plan.map((p) => p.rec);
  const targets = reencrypt
    .filter((r) => r.format === 'luks2')
    .map((r) => {
      const ratio = ratioOf(r, ceilings, 'total', opts.sizeBytes);
      return { name: `${r.label}: end-to-end MiB/s / copy ceiling MiB/s`, value: ratio, target: '>= 0.5', pass: ratio !== undefined && ratio >= 0.5 };
    });
  if (failed) process.exitCode = 1;
  return {
    machine,
    loadAverage: { start: loadStart, end: loadavg() },
    date: new Date().toISOString(),
    command: `node ${process.argv.slice(1).map((a) => a.replace(/^.*\/dist\//, 'dist/')).join(' ')}`,
    dir: opts.dir,
    freeBytesAtStart: free,
    sizeBytes: opts.sizeBytes,
    ceilings,
    reencrypt,
    rekey,
    targets,
    totalSeconds: (performance.now() - started) / 1000,
  };
}

// --- Report ---------------------------------------------------------------------------------

/** The ceiling of a mechanism: mean of the dd copies right before and right after it. */
function ceilingOf(r: ReencryptRecord, ceilings: readonly CeilingRecord[]): number | undefined {
  const i = r.ceilingIndex;
  if (i === undefined) return undefined;
  const before = ceilings[i - 1];
  const after = ceilings[i];
  if (!before || !after) return undefined;
  return (before.mibPerSecond + after.mibPerSecond) / 2;
}

function rateOf(r: ReencryptRecord, size: bigint, which: 'total' | 'data'): number | undefined {
  const seconds = which === 'total' ? r.usage?.seconds : r.dataSeconds;
  return seconds && !r.error ? mib(size) / seconds : undefined;
}

function ratioOf(r: ReencryptRecord, ceilings: readonly CeilingRecord[], which: 'total' | 'data', size: bigint): number | undefined {
  const c = ceilingOf(r, ceilings);
  const rate = rateOf(r, size, which);
  return c === undefined || rate === undefined ? undefined : rate / c;
}

function fmt(n: number | undefined, digits = 0): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

const pct = (cpu: number | undefined, seconds: number | undefined): string => (cpu === undefined || !seconds ? '-' : fmt((100 * cpu) / seconds));

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => (r[col] ?? '').length)));
  return rows.map((r) => r.map((cell, col) => (col === 0 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))).join('  ')).join('\n');
}

function markdownTable(rows: string[][]): string {
  const [head, ...body] = rows;
  const line = (r: string[]) => `| ${r.join(' | ')} |`;
  return [line(head!), line(head!.map((_, i) => (i === 0 ? '---' : '---:'))), ...body.map(line)].join('\n');
}

function reencryptRows(r: Results): string[][] {
  const rows: string[][] = [['re-encryption of one volume', 'wall s', 'MiB/s', 'data phase s', 'data phase MiB/s', 'tool CPU s', 'tool CPU %', 'bench CPU %', 'other procs CPU %', 'copy ceiling MiB/s', 'ratio', 'ratio (data phase)']];
  for (const rec of r.reencrypt) {
    if (rec.skipped || rec.error) {
      rows.push([rec.label, rec.skipped ? `skipped: ${rec.skipped}` : `FAILED: ${rec.error ?? ''}`.slice(0, 120), '', '', '', '', '', '', '', '', '', '']);
      continue;
    }
    const u = rec.usage;
    const c = ceilingOf(rec, r.ceilings);
    rows.push([
      rec.label,
      fmt(u?.seconds, 1),
      fmt(rateOf(rec, r.sizeBytes, 'total')),
      fmt(rec.dataSeconds, 1),
      fmt(rateOf(rec, r.sizeBytes, 'data')),
      fmt(u?.toolCpu, 1),
      pct(u?.toolCpu, u?.seconds),
      pct(u?.benchCpu, u?.seconds),
      pct(u?.otherCpu, u?.seconds),
      fmt(c),
      fmt(ratioOf(rec, r.ceilings, 'total', r.sizeBytes), 2),
      fmt(ratioOf(rec, r.ceilings, 'data', r.sizeBytes), 2),
    ]);
  }
  return rows;
}

function ceilingRows(r: Results): string[][] {
  const rows: string[][] = [['copy ceiling (dd bs=4M conv=fsync)', 'wall s', 'MiB/s', 'tool CPU %', 'other procs CPU %']];
  for (const c of r.ceilings) {
    const after = r.reencrypt.find((x) => x.ceilingIndex === c.index);
    rows.push([c.index === 0 ? 'before the first mechanism' : `after ${after?.label ?? '?'}`, fmt(c.usage.seconds, 1), fmt(c.mibPerSecond), pct(c.usage.toolCpu, c.usage.seconds), pct(c.usage.otherCpu, c.usage.seconds)]);
  }
  return rows;
}

function rekeyRows(r: Results): string[][] {
  const rows: string[][] = [['rekey (metadata only)', 'volumes', 'total s', 'per volume ms (mean)', 'p50 ms', 'max ms', 'tool runs / volume', 'tool CPU s / volume', 'other procs CPU %', 'vs one unlock per volume']];
  for (const rec of r.rekey) {
    if (rec.error) {
      rows.push([rec.label, String(rec.count), `FAILED: ${rec.error}`.slice(0, 120), '', '', '', '', '', '', '']);
      continue;
    }
    const u = rec.usage;
    const runs = rec.tools.reduce((s, t) => s + t.calls, 0);
    const unlock = rec.ceilings.find((c) => c.label.includes('unlock'));
    rows.push([
      `${rec.label}${rec.concurrency > 1 ? `, ${rec.concurrency} at a time` : ''}`,
      String(rec.count),
      fmt(u?.seconds, 1),
      fmt(rec.latency?.mean),
      fmt(rec.latency?.p50),
      fmt(rec.latency?.max),
      fmt(runs / rec.count, 1),
      fmt(u ? u.toolCpu / rec.count : undefined, 2),
      pct(u?.otherCpu, u?.seconds),
      unlock && u ? `${fmt(u.seconds / unlock.usage.seconds, 1)}x` : '-',
    ]);
    for (const c of rec.ceilings) {
      rows.push([`  ceiling: ${c.label}`, String(c.count), fmt(c.usage.seconds, 2), fmt((1000 * c.usage.seconds) / c.count, 1), '', '', '1.0', fmt(c.usage.toolCpu / c.count, 3), pct(c.usage.otherCpu, c.usage.seconds), '']);
    }
  }
  return rows;
}

function targetRows(r: Results): string[][] {
  const rows: string[][] = [['target (issue 4)', 'measured', 'target', 'verdict']];
  for (const t of r.targets) rows.push([t.name, fmt(t.value, 2), t.target, t.pass ? 'PASS' : 'MISS']);
  return rows;
}

/** Per run: where the time went (steps) and which tools used the CPU. */
function detailLines(r: Results): string[] {
  const lines: string[] = [];
  const tools = (ts: ToolTally[]) =>
    [...ts]
      .sort((a, b) => b.cpu - a.cpu)
      .map((t) => `${t.tool}${t.calls ? ` x${t.calls}` : ''} ${t.seconds.toFixed(1)} s, ${t.cpu.toFixed(1)} s CPU`)
      .join('; ');
  for (const rec of r.reencrypt) {
    if (!rec.usage) continue;
    lines.push(`- ${rec.label}: steps ${rec.steps.map((s) => `${s.step} ${s.seconds.toFixed(1)} s`).join(', ')}. Tools: ${tools(rec.tools)}. Image made and filled in ${fmt(rec.prepareSeconds, 1)} s (not timed). Check: ${rec.verification ?? '-'}.`);
  }
  for (const rec of r.rekey) {
    if (!rec.usage) continue;
    lines.push(`- ${rec.label}: ${rec.count} volumes cloned in ${fmt(rec.cloneSeconds, 1)} s (not timed). Tools: ${tools(rec.tools)}. Check: ${rec.verification ?? '-'}.`);
  }
  return lines;
}

function setupLine(r: Results): string {
  return (
    `volume ${mib(r.sizeBytes)} MiB, ${CIPHER} 512-bit key, 512-byte sectors, filled with non-zero data; images and ceiling files in ${r.dir} ` +
    `(${fmt(mib(r.freeBytesAtStart) / 1024, 0)} GiB free at start); page cache of each source dropped before its timed run; whole run ${fmt(r.totalSeconds / 60, 1)} min`
  );
}

const NOTES =
  '"MiB/s" = volume size / wall time of the mechanism\'s run() (key checks, new header, copy or rewrite, verification, rename, all included); "data phase" = the step that moves the data (copying, reencrypting) alone. ' +
  '"ratio" = MiB/s / mean of the dd copy ceilings right before and right after that run. CPU % is of one core: "tool" = the tools the mechanism ran (for the live copy also the guest\'s QEMU and libvirtd), "bench" = this node process, "other procs" = the rest of the machine (shared with other work).';

function report(r: Results): string {
  const m = r.machine;
  return [
    `virtkm key rotation benchmark, ${r.date}`,
    `machine: ${m.nproc} CPUs (${m.cpuModel}), node ${m.node}, ${m.platform} ${m.kernel}, load average at start ${r.loadAverage.start.map((x) => x.toFixed(2)).join(' ')}, at end ${r.loadAverage.end.map((x) => x.toFixed(2)).join(' ')}`,
    `command: ${r.command}`,
    `setup: ${setupLine(r)}`,
    '',
    table(reencryptRows(r)),
    '',
    table(ceilingRows(r)),
    '',
    NOTES,
    '',
    table(rekeyRows(r)),
    '',
    ...detailLines(r),
    '',
    table(targetRows(r)),
  ].join('\n');
}

/** The figures as a Markdown fragment (for docs/benchmarks.md). */
function markdown(r: Results): string {
  const m = r.machine;
  return [
    `- Date: ${r.date}`,
    `- Machine: ${m.nproc} CPUs, ${m.cpuModel}, ${m.platform} ${m.kernel}; node ${m.node}; load average at start ${r.loadAverage.start.map((x) => x.toFixed(2)).join(' ')}, at end ${r.loadAverage.end.map((x) => x.toFixed(2)).join(' ')}`,
    `- Command: \`${r.command}\``,
    `- Setup: ${setupLine(r)}`,
    '',
    markdownTable(reencryptRows(r)),
    '',
    markdownTable(ceilingRows(r)),
    '',
    NOTES,
    '',
    markdownTable(rekeyRows(r)),
    '',
    ...detailLines(r),
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
  // Never run forever: the tools have their own limits, this bounds the whole.
  const guard = setTimeout(() => {
    log(`still running after ${opts.timeoutMin} min: giving up`);
    void runCleanups().finally(() => process.exit(1));
  }, opts.timeoutMin * 60_000);
  try {
    const results = await run(opts);
    emitResults(results, opts, { report, markdown }, log);
    return process.exitCode === 1 ? 1 : 0;
  } catch (err) {
    console.error(`\nBENCH FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    return 1;
  } finally {
    clearTimeout(guard);
    await runCleanups();
  }
}

// Exit explicitly: a stray handle (the libvirt connection's threads) must not keep a finished benchmark alive.
process.exit(await main());
