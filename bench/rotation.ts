/**
 * Benchmark of key rotation on a host (issue 4): re-encryption throughput of each mechanism
 * next to this machine's own copy ceiling measured in the same run, and the time of a rekey
 * (metadata only) of many volumes next to the cost of reading their metadata.
 *
 *   node dist/bench/rotation.js [--size 1G] [--repeat 3] [--only PARTS] [--luks2-hotzone SIZE[,SIZE]]
 *       [--rekey-count 100] [--rekey-concurrency 1] [--dir DIR] [--skip-live] [--json FILE]
 *       [--markdown FILE] [--timeout-min 90]
 *
 * --only runs a subset: groups `luks2` (the two cryptsetup reencrypt rows), `qemu` (the two
 * qemu-img convert rows), `live`, `rekey`, `reencrypt` (all of part 1), or single rows by
 * name, comma-separated; e.g. `--only luks2` takes a few minutes instead of an hour.
 * --luks2-hotzone adds LUKS2 rows with `--hotzone-size` set (for each size, checksum and
 * journal), measured in the same rounds as the defaults; only the default rows are judged.
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
 *   mechanism and after every timed run. The runs come in --repeat rounds (default 3),
 *   every mechanism once per round, so each mechanism's runs are spread over the part and
 *   alternate with ceiling copies: ceiling, A, ceiling, B, ceiling, ..., A, ceiling, B,
 *   ceiling. A run's ratio is its rate over the mean of the ceilings right before and right
 *   after it; a mechanism's figures are the medians over its runs (rates, ceilings, and the
 *   per-run ratios), with their spread (min-max). The shared machine's disk was seen to
 *   vary 4x between two dd copies minutes apart: one sample per position was not enough.
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
import { createLuks2Reencrypt, type Luks2Resilience } from '../host-agent/src/rotate/luks2-reencrypt.js';
import { createLuks2Rekey } from '../host-agent/src/rotate/luks2-rekey.js';
import { createQemuConvert } from '../host-agent/src/rotate/qemu-convert.js';
import { createQemuRekey } from '../host-agent/src/rotate/qemu-rekey.js';
import { qemuNode, secretObject } from '../host-agent/src/rotate/qemu-tools.js';
import type { RotationJob, RotationMechanism, RotationProgress } from '../host-agent/src/rotate/types.js';
import { bootSector, ensureLibvirtd, guestDomainXml, LIBVIRTD_PID_FILE, sweep, waitForFileText } from '../test/helpers/libvirt-harness.js';
import { emitResults, latencyStats, machineBusySeconds, machineInfo, mapLimit, processCpuSeconds, type LatencyStats, type MachineInfo } from './load.js';

// --- Options -------------------------------------------------------------------------------

const USAGE = `usage: node dist/bench/rotation.js [--size 1G] [--repeat 3] [--only PARTS] [--luks2-hotzone SIZE[,SIZE]]
       [--rekey-count 100] [--rekey-concurrency 1] [--dir DIR] [--skip-live] [--json FILE] [--markdown FILE]
       [--timeout-min 90]
  PARTS: comma-separated; groups luks2, qemu, live, rekey, or single rows ${'${'}ALL_PARTS.join(', ')}`;

interface BenchOptions {
  sizeBytes: bigint;
  /** Timed runs of each re-encryption mechanism, each followed by a ceiling copy. */
  repeat: number;
  /** The rows to run (all when --only is not given). */
  only: ReadonlySet<string>;
  /** Extra LUKS2 rows with `--hotzone-size` set to each of these. */
  luks2Hotzones: bigint[];
  rekeyCount: number;
  rekeyConcurrency: number;
  dir: string;
  skipLive: boolean;
  timeoutMin: number;
  json: string | undefined;
  markdown: string | undefined;
}

const MIB = 1n << 20n;

/** Rows of the benchmark, and the groups --only accepts. */
const REENCRYPT_PARTS = ['convert-luks', 'convert-qcow2', 'luks2-checksum', 'luks2-journal', 'live-luks'] as const;
const REKEY_PARTS = ['rekey-luks2', 'rekey-luks'] as const;
const ALL_PARTS: readonly string[] = [...REENCRYPT_PARTS, ...REKEY_PARTS];
const PART_GROUPS: Record<string, readonly string[]> = {
  luks2: ['luks2-checksum', 'luks2-journal'],
  qemu: ['convert-luks', 'convert-qcow2'],
  live: ['live-luks'],
  rekey: REKEY_PARTS,
  reencrypt: REENCRYPT_PARTS,
};

/** --only: groups and row names, comma-separated. */
function parseOnly(v: string | undefined): Set<string> {
  if (v === undefined) return new Set(ALL_PARTS);
  const out = new Set<string>();
  for (const item of v.split(',').map((x) => x.trim()).filter(Boolean)) {
    const group = PART_GROUPS[item];
    if (group) group.forEach((g) => out.add(g));
    else if (ALL_PARTS.includes(item)) out.add(item);
    else throw new Error(`--only: unknown part "${'${'}item}"\n${'${'}USAGE}`);
  }
  if (out.size === 0) throw new Error(`--only: nothing selected\n${'${'}USAGE}`);
  return out;
}

/** "1G", "1GiB", "512M", "64MiB" or a byte count; a multiple of 1 MiB, at least 16 MiB. */
function parseSize(v: string, option = '--size'): bigint {
  const m = /^(\d+)\s*(k|m|g|t)?(i?b)?$/i.exec(v.trim());
  if (!m) throw new Error(`${option}: cannot read "${v}"\n${USAGE}`);
  const shift = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n }[(m[2] ?? '').toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const bytes = BigInt(m[1]!) << shift;
  if (bytes < 16n * MIB || bytes % MIB !== 0n || bytes > 1n << 40n) throw new Error(`${option} must be a multiple of 1 MiB from 16 MiB to 1 TiB\n${USAGE}`);
  return bytes;
}

function parseOptions(argv: string[]): BenchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1G' },
      repeat: { type: 'string', default: '3' },
      only: { type: 'string' },
      'luks2-hotzone': { type: 'string' },
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
    repeat: int('repeat', values.repeat, 1, 20),
    only: parseOnly(values.only),
    luks2Hotzones: (values['luks2-hotzone'] ?? '')
      .split(',')
      .map((x) => x.trim())
      .filter(Boolean)
      .map((x) => {
        const b = parseSize(x, '--luks2-hotzone');
        if (b > 1n << 30n) throw new Error(`--luks2-hotzone: at most 1 GiB (cryptsetup's limit)\n${'${'}USAGE}`);
        return b;
      }),
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
  /** Position in the run: 0 before the first mechanism, then one after each timed run. */
  index: number;
  /** What ran right before it ("start" for the first). */
  after: string;
  usage: Usage;
  mibPerSecond: number;
  /** 1-minute load average when it started. */
  load1: number;
}

async function ceilingCopy(src: string, dst: string, size: bigint, index: number, after: string): Promise<CeilingRecord> {
  await unlinkQuiet(dst);
  await dropCache(src);
  const load1 = loadavg()[0] ?? 0;
  const stop = meter();
  check(await runTool('dd', [`if=${src}`, `of=${dst}`, 'bs=4M', 'conv=fsync', 'status=none'], { timeoutMs: TOOL_TIMEOUT_MS }), 'dd (ceiling copy)');
  const usage = stop();
  await unlinkQuiet(dst);
  const rec = { index, after, usage, mibPerSecond: mib(size) / usage.seconds, load1 };
  log(`ceiling ${index}: dd copy ${rec.mibPerSecond.toFixed(0)} MiB/s (${usage.seconds.toFixed(1)} s)`);
  return rec;
}

// --- Part 1: re-encryption -----------------------------------------------------------------------

interface StepTime {
  step: string;
  seconds: number;
}

/** One timed run of a mechanism. */
interface RunRecord {
  /** 1, 2, ... (--repeat). */
  round: number;
  usage: Usage;
  steps: StepTime[];
  dataSeconds?: number;
  bytesRewritten?: bigint;
  tools: ToolTally[];
  /** Seconds to create and fill the image (not timed as part of the rotation). */
  prepareSeconds?: number;
  verification?: string;
  /** 1-minute load average when the run started. */
  load1: number;
  /** Indexes of the ceiling copies right before and right after this run. */
  ceilingBefore: number;
  ceilingAfter?: number;
}

/** One mechanism (a row of the table) and its timed runs. */
interface ReencryptRecord {
  key: string;
  label: string;
  format: ImageFormat;
  /** The step that moves the data ("copying", "reencrypting"). */
  dataStep: string;
  runs: RunRecord[];
  /** Whether this row's median ratio is judged against the issue's target. */
  target: boolean;
  error?: string;
  skipped?: string;
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

/** One offline mechanism on a freshly made, filled image in its own subdirectory; fills `out`. */
async function offlineRun(ctx: Ctx, rec: ReencryptRecord, out: RunRecord, make: (run: RunTool, store: ImageStore) => RotationMechanism): Promise<void> {
  const dir = join(ctx.work, `${rec.key}-${out.round}`);
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
    out.prepareSeconds = (performance.now() - t0) / 1000;
    log(`${rec.label} (run ${out.round}): image made and filled in ${out.prepareSeconds.toFixed(1)} s; rotating`);
    await dropCache(path);

    const tallies = new Map<string, ToolTally>();
    const run = recordingRun(tallies);
    const mechanism = make(run, createHostImageStore({ run }));
    const job: RotationJob = { rotationId: `bench-${rec.key}`, volumeId: `vol-${rec.key}`, kind: 'reencrypt', target: spec(path, rec.format, ctx.size), fromFormat: rec.format, oldKey, newKey };
    const clock = stepClock();
    out.load1 = loadavg()[0] ?? 0;
    const stop = meter();
    const result = await mechanism.run(job, { onProgress: clock.onProgress });
    out.usage = stop();
    out.steps = clock.finish();
    out.tools = [...tallies.values()];
    out.bytesRewritten = result.bytesRewritten;
    const dataSeconds = out.steps.find((s) => s.step === rec.dataStep)?.seconds;
    if (dataSeconds !== undefined) out.dataSeconds = dataSeconds;
    log(`${rec.label} (run ${out.round}): ${out.usage.seconds.toFixed(1)} s end to end (${(mib(ctx.size) / out.usage.seconds).toFixed(0)} MiB/s)`);

    if (rec.format === 'luks2') {
      // No device-mapper here: the plaintext cannot be read; the keys are what can be checked.
      const images = createHostImageStore();
      const s = spec(path, 'luks2', ctx.size);
      if (!(await images.testKey(path, s, newKey)) || (await images.testKey(path, s, oldKey))) throw new Error('after the re-encryption the new key must open the image and the old one must not');
      out.verification = `new key opens, old key refused (cryptsetup open --test-passphrase); mechanism's own check: ${result.verified ? 'data compared' : 'header only'}`;
    } else {
      out.verification = `${await verifyQemuImage(rec.format as 'luks' | 'qcow2-luks', path, newKey, ctx.size)}; mechanism's own check: ${result.verified ? 'qemu-img compare of all data' : 'keys only'}`;
    }
  } finally {
    wipe(oldKey, newKey);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The live blockcopy of a running guest's luks disk; fills `out`. */
async function liveRun(ctx: Ctx, rec: ReencryptRecord, out: RunRecord): Promise<void> {
  const env = await ensureLibvirtd();
  if (env.skipReason) {
    rec.skipped = env.skipReason;
    return;
  }
  const dir = join(ctx.work, `${rec.key}-${out.round}`);
  mkdirSync(dir);
  chmodSync(dir, 0o755); // QEMU runs as libvirt-qemu and must reach the image
  const name = `vkrb-${RUN}-${out.round}`;
  const volumeId = `vrb-${RUN}-${out.round}`;
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
    out.prepareSeconds = (performance.now() - t0) / 1000;
    log(`${rec.label} (run ${out.round}): guest ${name} (${env.domainType}) running from its ${mib(ctx.size)} MiB disk, made in ${out.prepareSeconds.toFixed(1)} s; rotating`);
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
    out.load1 = loadavg()[0] ?? 0;
    const stop = meter(pids);
    const result = await mechanism.run(job, { onProgress: clock.onProgress });
    out.usage = stop();
    out.steps = clock.finish();
    out.tools = [...tallies.values()];
    if (pids.length > 0) out.tools.push({ tool: `guest QEMU + libvirtd (pids ${pids.join(', ')})`, calls: 0, seconds: out.usage.seconds, cpu: out.usage.toolCpu - [...tallies.values()].reduce((s, t) => s + t.cpu, 0) });
    out.bytesRewritten = result.bytesRewritten;
    const dataSeconds = out.steps.find((s) => s.step === rec.dataStep)?.seconds;
    if (dataSeconds !== undefined) out.dataSeconds = dataSeconds;
    log(`${rec.label} (run ${out.round}): ${out.usage.seconds.toFixed(1)} s end to end (${(mib(ctx.size) / out.usage.seconds).toFixed(0)} MiB/s)`);
    if ((await lv.domains.state(name)) !== 'running') throw new Error('the guest is not running after the live re-encryption');
    out.verification = `${await verifyQemuImage('luks', path, newKey, ctx.size)} while the guest runs; guest still running`;
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
  targets: { name: string; value: number | undefined; min: number | undefined; max: number | undefined; target: string; pass: boolean }[];
  repeat: number;
  totalSeconds: number;
}

type Go = (ctx: Ctx, rec: ReencryptRecord, out: RunRecord) => Promise<void>;

function reencryptPlan(opts: BenchOptions): { rec: ReencryptRecord; go: Go }[] {
  const row = (key: string, label: string, format: ImageFormat, dataStep: string, target = false): ReencryptRecord => ({ key, label, format, dataStep, runs: [], target });
  const convert: Go = (c, r, o) => offlineRun(c, r, o, (run, store) => createQemuConvert({ run, store, copyTimeoutMs: TOOL_TIMEOUT_MS }));
  const luks2 =
    (resilience: Luks2Resilience, hotzone?: bigint): Go =>
    (c, r, o) =>
      offlineRun(c, r, o, (run, images) => createLuks2Reencrypt({ run, images, resilience, reencryptTimeoutMs: TOOL_TIMEOUT_MS, ...(hotzone === undefined ? {} : { hotzoneSizeBytes: hotzone }) }));
  const plan: { rec: ReencryptRecord; go: Go }[] = [
    { rec: row('convert-luks', 'qemu-img convert, luks', 'luks', 'copying'), go: convert },
    { rec: row('convert-qcow2', 'qemu-img convert, qcow2-luks', 'qcow2-luks', 'copying'), go: convert },
    { rec: row('luks2-checksum', 'cryptsetup reencrypt, luks2, checksum', 'luks2', 'reencrypting', true), go: luks2('checksum') },
    { rec: row('luks2-journal', 'cryptsetup reencrypt, luks2, journal', 'luks2', 'reencrypting', true), go: luks2('journal') },
  ];
  // Variants (--luks2-hotzone): next to the defaults, in the same rounds; not judged.
  for (const hz of opts.luks2Hotzones) {
    for (const resilience of ['checksum', 'journal'] as const) {
      const rec = row(`luks2-${resilience}`, `cryptsetup reencrypt, luks2, ${resilience}, --hotzone-size ${mib(hz)}M`, 'luks2', 'reencrypting');
      plan.push({ rec: { ...rec, key: `luks2-${resilience}-hz${mib(hz)}m` }, go: luks2(resilience, hz) });
    }
  }
  const live = row('live-luks', 'live blockcopy, luks (guest running)', 'luks', 'copying');
  if (opts.skipLive) live.skipped = '--skip-live';
  plan.push({ rec: live, go: liveRun });
  // --only selects rows by their base name (hotzone variants go with their resilience).
  return plan.filter((p) => opts.only.has(p.rec.key.replace(/-hz\d+m$/, '')));
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
  log(`work directory ${work} (${mib(free).toFixed(0)} MiB free), volume size ${mib(opts.sizeBytes)} MiB, ${opts.repeat} run(s) per mechanism`);
  const ctx: Ctx = { opts, work, size: opts.sizeBytes };

  // Part 1: rounds of (mechanism, ceiling) pairs after a first ceiling, every mechanism
  // once per round, so that each mechanism's runs are spread over the whole part and each
  // run has a ceiling copy right before and right after it.
  const plan = reencryptPlan(opts);
  const ceilings: CeilingRecord[] = [];
  let failed = false;
  if (plan.some((p) => !p.rec.skipped)) {
    const src = join(work, 'ceiling-src.bin');
    const dst = join(work, 'ceiling-dst.bin');
    await fillRandom(src, 0n, opts.sizeBytes, true);
    ceilings.push(await ceilingCopy(src, dst, opts.sizeBytes, 0, 'start'));
    for (let round = 1; round <= opts.repeat; round++) {
      for (const { rec, go } of plan) {
        if (rec.skipped || rec.error) continue;
        const out: RunRecord = { round, usage: { seconds: 0, benchCpu: 0, toolCpu: 0, otherCpu: undefined }, steps: [], tools: [], load1: 0, ceilingBefore: ceilings.length - 1 };
        try {
          await go(ctx, rec, out);
          rec.runs.push(out);
        } catch (err) {
          failed = true;
          rec.error = err instanceof Error ? err.message : String(err);
          log(`${rec.label} FAILED: ${rec.error}`);
        }
        if (rec.skipped) {
          log(`${rec.label}: skipped (${rec.skipped})`);
          continue;
        }
        ceilings.push(await ceilingCopy(src, dst, opts.sizeBytes, ceilings.length, `${rec.label}, run ${round}`));
        out.ceilingAfter = ceilings.length - 1;
      }
    }
    await unlinkQuiet(src);
  }

  // Part 2: rekey of many volumes.
  const rekey: RekeyRecord[] = [];
  if (opts.rekeyCount > 0) {
    for (const format of ['luks2', 'luks'] as const) {
      if (!opts.only.has(`rekey-${format}`)) continue;
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
    .filter((r) => r.target && !r.skipped)
    .map((r) => {
      const s = statsOf(r, ceilings, opts.sizeBytes);
      const value = s?.ratio.median;
      return { name: `${r.label}: end-to-end MiB/s / copy ceiling MiB/s, median of ${r.runs.length} run(s)`, value, min: s?.ratio.min, max: s?.ratio.max, target: '>= 0.5', pass: value !== undefined && value >= 0.5 };
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
    repeat: opts.repeat,
    totalSeconds: (performance.now() - started) / 1000,
  };
}

// --- Report ---------------------------------------------------------------------------------

/** The ceiling of one run: mean of the dd copies right before and right after it. */
function ceilingOf(run: RunRecord, ceilings: readonly CeilingRecord[]): number | undefined {
  const before = ceilings[run.ceilingBefore];
  const after = run.ceilingAfter === undefined ? undefined : ceilings[run.ceilingAfter];
  if (!before) return undefined;
  return after ? (before.mibPerSecond + after.mibPerSecond) / 2 : before.mibPerSecond;
}

/** Median, min and max of the defined values (undefined when there are none). */
interface Spread {
  median: number;
  min: number;
  max: number;
}

function spread(values: readonly (number | undefined)[]): Spread | undefined {
  const v = values.filter((x): x is number => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return undefined;
  const mid = Math.floor(v.length / 2);
  const median = v.length % 2 === 1 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
  return { median, min: v[0]!, max: v[v.length - 1]! };
}

/** Per-run figures of a mechanism, and their spreads over its runs. */
interface RowStats {
  runs: number;
  seconds: Spread | undefined;
  rate: Spread | undefined;
  dataSeconds: Spread | undefined;
  dataRate: Spread | undefined;
  toolCpu: Spread | undefined;
  toolPct: Spread | undefined;
  benchPct: Spread | undefined;
  otherPct: Spread | undefined;
  ceiling: Spread | undefined;
  /** Each run's MiB/s over its own ceiling (the copies right before and after it). */
  ratio: Spread;
  dataRatio: Spread | undefined;
}

function statsOf(r: ReencryptRecord, ceilings: readonly CeilingRecord[], size: bigint): RowStats | undefined {
  const runs = r.runs;
  const per = runs.map((run) => {
    const c = ceilingOf(run, ceilings);
    const rate = run.usage.seconds > 0 ? mib(size) / run.usage.seconds : undefined;
    const dataRate = run.dataSeconds ? mib(size) / run.dataSeconds : undefined;
    const u = run.usage;
    return {
      c,
      rate,
      dataRate,
      ratio: c && rate !== undefined ? rate / c : undefined,
      dataRatio: c && dataRate !== undefined ? dataRate / c : undefined,
      toolPct: u.seconds > 0 ? (100 * u.toolCpu) / u.seconds : undefined,
      benchPct: u.seconds > 0 ? (100 * u.benchCpu) / u.seconds : undefined,
      otherPct: u.seconds > 0 && u.otherCpu !== undefined ? (100 * u.otherCpu) / u.seconds : undefined,
    };
  });
  const ratio = spread(per.map((p) => p.ratio));
  if (!ratio) return undefined;
  return {
    runs: runs.length,
    seconds: spread(runs.map((x) => x.usage.seconds)),
    rate: spread(per.map((p) => p.rate)),
    dataSeconds: spread(runs.map((x) => x.dataSeconds)),
    dataRate: spread(per.map((p) => p.dataRate)),
    toolCpu: spread(runs.map((x) => x.usage.toolCpu)),
    toolPct: spread(per.map((p) => p.toolPct)),
    benchPct: spread(per.map((p) => p.benchPct)),
    otherPct: spread(per.map((p) => p.otherPct)),
    ceiling: spread(per.map((p) => p.c)),
    ratio,
    dataRatio: spread(per.map((p) => p.dataRatio)),
  };
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

/** "min-max" of a spread (one value when they are equal). */
function range(sp: Spread | undefined, digits = 0): string {
  if (!sp) return '-';
  const lo = fmt(sp.min, digits);
  const hi = fmt(sp.max, digits);
  return lo === hi ? lo : `${lo}-${hi}`;
}

function reencryptRows(r: Results): string[][] {
  const rows: string[][] = [
    ['re-encryption of one volume', 'runs', 'wall s', 'MiB/s', 'MiB/s min-max', 'data phase s', 'data phase MiB/s', 'tool CPU s', 'tool CPU %', 'bench CPU %', 'other procs CPU %', 'copy ceiling MiB/s', 'ceiling min-max', 'ratio', 'ratio min-max', 'ratio (data phase)'],
  ];
  for (const rec of r.reencrypt) {
    const st = rec.skipped ? undefined : statsOf(rec, r.ceilings, r.sizeBytes);
    if (rec.skipped || rec.error || !st) {
      const why = rec.skipped ? `skipped: ${rec.skipped}` : `FAILED${rec.runs.length ? ` after ${rec.runs.length} run(s)` : ''}: ${rec.error ?? 'no run'}`.slice(0, 160);
      rows.push([rec.label, String(rec.runs.length), why, '', '', '', '', '', '', '', '', '', '', '', '', '']);
      continue;
    }
    const m = (sp: Spread | undefined, d = 0) => fmt(sp?.median, d);
    rows.push([
      rec.label,
      String(st.runs),
      m(st.seconds, 1),
      m(st.rate),
      range(st.rate),
      m(st.dataSeconds, 1),
      m(st.dataRate),
      m(st.toolCpu, 1),
      m(st.toolPct),
      m(st.benchPct),
      m(st.otherPct),
      m(st.ceiling),
      range(st.ceiling),
      m(st.ratio, 2),
      range(st.ratio, 2),
      m(st.dataRatio, 2),
    ]);
  }
  return rows;
}

function ceilingRows(r: Results): string[][] {
  const rows: string[][] = [['copy ceiling (dd bs=4M conv=fsync)', 'wall s', 'MiB/s', 'load avg 1 min', 'tool CPU %', 'other procs CPU %']];
  for (const c of r.ceilings) {
    rows.push([c.index === 0 ? 'before the first mechanism' : `after ${c.after}`, fmt(c.usage.seconds, 1), fmt(c.mibPerSecond), fmt(c.load1, 2), pct(c.usage.toolCpu, c.usage.seconds), pct(c.usage.otherCpu, c.usage.seconds)]);
  }
  const all = spread(r.ceilings.map((c) => c.mibPerSecond));
  if (all && r.ceilings.length > 1) rows.push([`all ${r.ceilings.length} copies: median (min-max)`, '', `${fmt(all.median)} (${range(all)})`, '', '', '']);
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
  const rows: string[][] = [['target (issue 4)', 'measured (median)', 'min-max', 'target', 'verdict']];
  // Three digits: a median of 0.4996 must not print as a passing 0.50.
  for (const t of r.targets) rows.push([t.name, fmt(t.value, 3), t.min === undefined || t.max === undefined ? '-' : `${fmt(t.min, 3)}-${fmt(t.max, 3)}`, t.target, t.pass ? 'PASS' : 'MISS']);
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
    if (rec.runs.length === 0) continue;
    const n = rec.runs.length;
    // Steps: median per step over the runs; tools: mean per run.
    const stepNames = [...new Set(rec.runs.flatMap((x) => x.steps.map((st) => st.step)))];
    const steps = stepNames.map((name) => `${name} ${fmt(spread(rec.runs.map((x) => x.steps.find((st) => st.step === name)?.seconds))?.median, 1)} s`);
    const perRun = new Map<string, ToolTally>();
    for (const t of rec.runs.flatMap((x) => x.tools)) {
      const a = perRun.get(t.tool) ?? { tool: t.tool, calls: 0, seconds: 0, cpu: 0 };
      a.calls += t.calls / n;
      a.seconds += t.seconds / n;
      a.cpu += t.cpu / n;
      perRun.set(t.tool, a);
    }
    const rounded = [...perRun.values()].map((t) => ({ ...t, calls: Math.round(t.calls * 10) / 10 }));
    const verified = rec.runs.map((x) => x.verification).filter(Boolean);
    lines.push(
      `- ${rec.label} (${n} run${n > 1 ? 's' : ''}): steps (median) ${steps.join(', ')}. Tools (mean per run): ${tools(rounded)}. ` +
        `Image made and filled in ${fmt(spread(rec.runs.map((x) => x.prepareSeconds))?.median, 1)} s (median, not timed). ` +
        `Load average (1 min) at the start of each run: ${rec.runs.map((x) => fmt(x.load1, 2)).join(', ')}. Check (${verified.length}/${n} runs): ${verified[0] ?? '-'}.`,
    );
  }
  for (const rec of r.rekey) {
    if (!rec.usage) continue;
    lines.push(`- ${rec.label}: ${rec.count} volumes cloned in ${fmt(rec.cloneSeconds, 1)} s (not timed). Tools: ${tools(rec.tools)}. Check: ${rec.verification ?? '-'}.`);
  }
  return lines;
}

function setupLine(r: Results): string {
  return (
    `volume ${mib(r.sizeBytes)} MiB, ${CIPHER} 512-bit key, 512-byte sectors, filled with non-zero data; ${r.repeat} run(s) per mechanism in rounds; images and ceiling files in ${r.dir} ` +
    `(${fmt(mib(r.freeBytesAtStart) / 1024, 0)} GiB free at start); page cache of each source dropped before its timed run; whole run ${fmt(r.totalSeconds / 60, 1)} min`
  );
}

const NOTES =
  'Each mechanism ran "runs" times, in rounds (every mechanism once per round), with a dd copy ceiling before the first run and after every run. Figures are medians over the runs, with the spread (min-max) where shown. ' +
  '"MiB/s" = volume size / wall time of the mechanism\'s run() (key checks, new header, copy or rewrite, verification, rename, all included); "data phase" = the step that moves the data (copying, reencrypting) alone. ' +
  '"ratio" = median over the runs of each run\'s MiB/s / the mean of the two dd copies right before and right after that run (not median MiB/s / median ceiling); "copy ceiling" = median of those per-run means. CPU % is of one core: "tool" = the tools the mechanism ran (for the live copy also the guest\'s QEMU and libvirtd), "bench" = this node process, "other procs" = the rest of the machine (shared with other work).';

function report(r: Results): string {
  const m = r.machine;
  return [
    `virtkm key rotation benchmark, ${r.date}`,
    `machine: ${m.nproc} CPUs (${m.cpuModel}), node ${m.node}, ${m.platform} ${m.kernel}, load average at start ${r.loadAverage.start.map((x) => x.toFixed(2)).join(' ')}, at end ${r.loadAverage.end.map((x) => x.toFixed(2)).join(' ')}`,
    `command: ${r.command}`,
    `setup: ${setupLine(r)}`,
    '',
    ...(r.reencrypt.length > 0 ? [table(reencryptRows(r)), '', table(ceilingRows(r)), '', NOTES, ''] : []),
    ...(r.rekey.length > 0 ? [table(rekeyRows(r)), ''] : []),
    ...detailLines(r),
    '',
    ...(r.targets.length > 0 ? [table(targetRows(r))] : []),
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
    ...(r.reencrypt.length > 0 ? [markdownTable(reencryptRows(r)), '', markdownTable(ceilingRows(r)), '', NOTES, ''] : []),
    ...(r.rekey.length > 0 ? [markdownTable(rekeyRows(r)), ''] : []),
    ...detailLines(r),
    '',
    ...(r.targets.length > 0 ? [markdownTable(targetRows(r)), ''] : []),
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
