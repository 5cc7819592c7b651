/**
 * Crash safety of the LUKS2 rotations with the real cryptsetup: each mechanism runs in a
 * process of its own (test/fixtures/rotate/run-mechanism.ts) and is killed with SIGKILL at
 * 20 random points per mechanism, then run again to completion.
 *
 * Three ways of dying, in turn:
 *   - group: the runner and its cryptsetup child together (the agent's service being
 *     killed as a whole, as systemd does with its control group);
 *   - agent: the runner only; a cryptsetup child it had started lives on and finishes on
 *     its own (waited for before the checks);
 *   - tool: the cryptsetup child only (found with pgrep -P), the runner lives on and sees
 *     the tool die.
 * Kill times are uniform over a whole run (calibrated by an uninterrupted run first); for
 * the re-encryptions half of them are drawn over the data phase only (counted from the
 * "reencrypting" progress report), where a kill interrupts cryptsetup mid-hotzone.
 *
 * After each kill: at least one of the two keys opens the image (the invariant). After the
 * second run: only the new key opens, the plaintext checksum is the one written before
 * (read without device-mapper, see test/fixtures/rotate/luks2-helpers.ts), a rekey kept the
 * volume key and a re-encryption changed it, one keyslot and no pending re-encryption are
 * left, and no file besides the image is in its directory.
 *
 * The seed of the kill points is logged; VIRTKM_CRASH_SEED=N replays a run.
 */
import anyTest, { type TestFn } from 'ava';
import { spawn } from 'node:child_process';
import { copyFile, mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import { finaliseReencryption, finishedDataPhase, readLuks2Metadata } from '../../host-agent/src/rotate/luks2-finalize.js';
import type { RotationJob } from '../../host-agent/src/rotate/types.js';
import { runTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';
import { luks2Json, opens, plaintextDigest, volumeKey, writePattern } from '../fixtures/rotate/luks2-helpers.js';
import { serialiseJob } from '../fixtures/rotate/run-mechanism.js';

interface Ctx {
  dir: string;
  scratch: string;
}
const test = anyTest as TestFn<Ctx>;
const store = createHostImageStore();

const KILL_POINTS = 20;
const PAYLOAD = 32n << 20n;
const RUN_TIMEOUT_MS = 120_000;
const RUNNER = fileURLToPath(new URL('../fixtures/rotate/run-mechanism.js', import.meta.url));
const REKEY = fileURLToPath(new URL('../../host-agent/src/rotate/luks2-rekey.js', import.meta.url));
const REENCRYPT = fileURLToPath(new URL('../../host-agent/src/rotate/luks2-reencrypt.js', import.meta.url));
const JOURNAL = fileURLToPath(new URL('../fixtures/rotate/luks2-journal.js', import.meta.url));

const seed = Number(process.env['VIRTKM_CRASH_SEED'] ?? Date.now() % 1_000_000);
/** mulberry32: a small seeded generator, so a failing run can be replayed. */
function rng(s: number): () => number {
  let a = s >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

test.before(async (t) => {
  t.context.dir = await tempDir();
  t.context.scratch = await tempDir();
  t.log(`kill point seed ${seed} (VIRTKM_CRASH_SEED=${seed} replays it)`);
});

test.after.always(async (t) => {
  await removeDir(t.context.dir);
  await removeDir(t.context.scratch);
});

interface Line {
  progress?: { step: string };
  result?: { opensWith: string; bytesRewritten: string };
  error?: { kind: string; message: string };
}

/** One runner process. */
class Runner {
  readonly pid: number;
  readonly lines: Line[] = [];
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  private readonly stepWaiters: { step: string; resolve: () => void }[] = [];
  private readonly timer: NodeJS.Timeout;

  constructor(modulePath: string, factory: string, job: RotationJob) {
    // Its own process group, so that "group" kills take the runner and its tools together.
    const child = spawn(process.execPath, [RUNNER, modulePath, factory], { detached: true, stdio: ['pipe', 'pipe', 'pipe'] });
    if (child.pid === undefined) throw new Error('runner did not start');
    this.pid = child.pid;
    let buffered = '';
    child.stdout.on('data', (c: Buffer) => {
      buffered += c.toString('utf8');
      let nl;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = JSON.parse(buffered.slice(0, nl)) as Line;
        buffered = buffered.slice(nl + 1);
        this.lines.push(line);
        const step = line.progress?.step;
        for (const w of this.stepWaiters.filter((x) => x.step === step)) w.resolve();
      }
    });
    child.stderr.resume();
    child.stdin.end(serialiseJob(job));
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    this.timer = setTimeout(() => this.killGroup(), RUN_TIMEOUT_MS);
    void this.exited.then(() => clearTimeout(this.timer));
  }

  /** Resolves when the runner reports `step`, or when it exits. */
  waitStep(step: string): Promise<void> {
    if (this.lines.some((l) => l.progress?.step === step)) return Promise.resolve();
    return Promise.race([new Promise<void>((resolve) => this.stepWaiters.push({ step, resolve })), this.exited.then(() => undefined)]);
  }

  killGroup(): void {
    try {
      process.kill(-this.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }

  result(): Line | undefined {
    return this.lines.find((l) => l.result !== undefined || l.error !== undefined);
  }
}

/** PIDs of the cryptsetup processes the runner started. */
async function cryptsetupChildren(pid: number): Promise<number[]> {
  const r = await runTool('pgrep', ['-P', String(pid)], { timeoutMs: 10_000 });
  const out: number[] = [];
  for (const p of r.stdout.split(/\s+/).filter(Boolean).map(Number)) {
    const comm = await readFile(`/proc/${p}/comm`, 'utf8').catch(() => '');
    if (comm.trim() === 'cryptsetup') out.push(p);
  }
  return out;
}

async function waitGone(pids: number[], timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (const p of pids) {
    for (;;) {
      try {
        process.kill(p, 0);
      } catch {
        break;
      }
      if (Date.now() > end) throw new Error(`process ${p} did not exit`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `opens`, with cryptsetup refusing to answer (exit 1) counted as "does not open". */
async function opensOrNot(path: string, key: Buffer): Promise<boolean> {
  return opens(path, key).catch(() => false);
}

/**
 * What the image looks like: which keys open, a re-encryption pending. A header whose
 * re-encryption finished its data phase but not its metadata (luks2-finalize.ts) may be
 * opened by no key through cryptsetup until virtkm finishes it; then the check is that the
 * new key opens the finished header, tried on a copy of the image.
 */
async function stateOf(path: string, oldKey: Buffer, newKey: Buffer, scratchDir: string): Promise<string> {
  const json = await luks2Json(path);
  const pending = (json.config.requirements?.mandatory ?? []).some((r) => r.startsWith('online-reencrypt'));
  const o = await opensOrNot(path, oldKey);
  const n = await opensOrNot(path, newKey);
  if (!o && !n && finishedDataPhase(await readLuks2Metadata(path))) {
    const copy = join(scratchDir, `finish-${process.pid}-${Date.now()}.img`);
    try {
      await copyFile(path, copy);
      await finaliseReencryption(copy, `${copy}.scratch`, (file) => opens(file, newKey));
      return (await opens(copy, newKey)) ? 'finalising:new' : 'NONE (the finished header does not open)';
    } finally {
      await rm(copy, { force: true });
    }
  }
  return `${pending ? 'reencrypting:' : ''}${o && n ? 'both' : o ? 'old' : n ? 'new' : 'NONE'}`;
}

interface Scenario {
  title: string;
  kind: 'rekey' | 'reencrypt';
  module: string;
  factory: string;
  /** Sector size of the image. */
  sectorSize: 512 | 4096;
}

const scenarios: Scenario[] = [
  { title: 'rekey (luksAddKey + luksKillSlot)', kind: 'rekey', module: REKEY, factory: 'createLuks2Rekey', sectorSize: 512 },
  { title: 'reencrypt, checksum resilience', kind: 'reencrypt', module: REENCRYPT, factory: 'createLuks2Reencrypt', sectorSize: 512 },
  { title: 'reencrypt, journal resilience', kind: 'reencrypt', module: JOURNAL, factory: 'createLuks2ReencryptJournal', sectorSize: 4096 },
];

for (const sc of scenarios) {
  test.serial(`kill -9 at ${KILL_POINTS} random points: ${sc.title}; the image always opens with a key, a second run finishes, data intact`, async (t) => {
    t.timeout(15 * 60_000);
    const random = rng(seed + sc.title.length);
    const base = join(t.context.dir, sc.factory);
    await mkdir(base);
    // One template image with the pattern; every kill point works on a copy of it.
    const template: ImageSpec = { ...specFor(base, 'luks2'), path: join(base, 'template.img'), sizeBytes: PAYLOAD, sectorSize: sc.sectorSize };
    const oldKey = awkwardSecret();
    await store.create(template, oldKey);
    const oldVk = await volumeKey(template.path, oldKey, t.context.scratch);
    const digest = await writePattern(template, oldVk, 'crash');

    let n = 0;
    const fresh = async (): Promise<{ spec: ImageSpec; job: RotationJob; newKey: Buffer }> => {
      const dir = join(base, `p${n++}`);
      await mkdir(dir);
      const spec = { ...template, path: join(dir, 'vol.img') };
      await copyFile(template.path, spec.path);
      const newKey = awkwardSecret();
      const job: RotationJob = { rotationId: `crash-${n}`, volumeId: 'vol', kind: sc.kind, target: spec, fromFormat: 'luks2', oldKey, newKey };
      return { spec, job, newKey };
    };

    /** The checks after a finished rotation. */
    const checkFinished = async (spec: ImageSpec, newKey: Buffer, label: string): Promise<void> => {
      t.true(await opens(spec.path, newKey), `${label}: the new key opens`);
      t.false(await opens(spec.path, oldKey), `${label}: the old key is refused`);
      const json = await luks2Json(spec.path);
      t.is(Object.keys(json.keyslots).length, 1, `${label}: one keyslot`);
      t.is(json.config.requirements, undefined, `${label}: no re-encryption pending`);
      const vk = await volumeKey(spec.path, newKey, t.context.scratch);
      t.is(vk.equals(oldVk), sc.kind === 'rekey', `${label}: volume key ${sc.kind === 'rekey' ? 'kept' : 'replaced'}`);
      t.is(await plaintextDigest(spec, vk), digest, `${label}: plaintext intact`);
      t.deepEqual(await readdir(dirname(spec.path)), ['vol.img'], `${label}: nothing left next to the image`);
    };

    // Calibration: an uninterrupted run, timed as a whole and from the data phase on.
    const cal = await fresh();
    const started = performance.now();
    const runner = new Runner(sc.module, sc.factory, cal.job);
    // The data phase: from the "reencrypting" report to the "verifying" one.
    let dataStart = started;
    let dataEnd = started;
    void runner.waitStep('reencrypting').then(() => (dataStart = performance.now()));
    void runner.waitStep('verifying').then(() => (dataEnd = performance.now()));
    const exit = await runner.exited;
    const total = performance.now() - started;
    const dataPhase = Math.max(50, dataEnd - dataStart);
    t.is(exit.code, 0, JSON.stringify(runner.result()));
    await checkFinished(cal.spec, cal.newKey, 'calibration');
    t.log(`${sc.title}: a whole run takes ${total.toFixed(0)} ms${sc.kind === 'reencrypt' ? `, its data phase ${dataPhase.toFixed(0)} ms` : ''}`);

    const modes = ['group', 'agent', 'tool'] as const;
    const states = new Map<string, number>();
    for (let i = 0; i < KILL_POINTS; i++) {
      const mode = modes[i % 3] ?? 'group';
      const inData = sc.kind === 'reencrypt' && i % 2 === 1;
      const delay = random() * (inData ? dataPhase : total) * 1.05;
      const { spec, job, newKey } = await fresh();
      const label = `point ${i} (${mode}, ${inData ? 'data phase +' : ''}${delay.toFixed(0)} ms)`;

      const r = new Runner(sc.module, sc.factory, job);
      if (inData) await r.waitStep('reencrypting');
      await sleep(delay);
      let what: string = mode;
      if (mode === 'group') {
        r.killGroup();
      } else if (mode === 'agent') {
        const tools = await cryptsetupChildren(r.pid);
        try {
          process.kill(r.pid, 'SIGKILL');
        } catch {
          // finished already
        }
        await waitGone(tools);
        what = `agent (${tools.length} tool(s) left running)`;
      } else {
        const tools = await cryptsetupChildren(r.pid);
        for (const p of tools) {
          try {
            process.kill(p, 'SIGKILL');
          } catch {
            // finished already
          }
        }
        what = tools.length > 0 ? 'tool' : 'tool (none running: nothing killed)';
      }
      const ended = await r.exited;
      const state = await stateOf(spec.path, oldKey, newKey, t.context.scratch);
      states.set(state, (states.get(state) ?? 0) + 1);
      t.log(`${label}: killed ${what}; runner ${ended.signal ?? `exit ${ended.code}`}${r.result()?.error ? ` (${r.result()?.error?.kind})` : ''}; image: ${state}`);
      t.false(state.includes('NONE'), `${label}: one of the two keys opens the image`);

      const again = new Runner(sc.module, sc.factory, job);
      const second = await again.exited;
      t.is(second.code, 0, `${label}: the second run finishes: ${JSON.stringify(again.result())}`);
      await checkFinished(spec, newKey, label);
      await removeDir(dirname(spec.path));
    }
    t.log(`${sc.title}: states after the kills: ${[...states].map(([s, c]) => `${s} x${c}`).join(', ')}`);
  });
}
