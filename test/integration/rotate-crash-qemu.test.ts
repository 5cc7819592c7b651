/**
 * Crash safety of the QEMU rotation mechanisms (rekey with qemu-img amend, offline
 * re-encryption with qemu-img convert, on luks and qcow2-luks): each mechanism runs in a
 * process of its own (test/fixtures/rotate/run-mechanism.ts) and is killed with SIGKILL at
 * random moments spread over a whole run; at some points the tool (qemu-img or qemu-io) is
 * killed instead of the runner. Killing the runner is done in two ways: with its tool
 * killed too (what systemd does to the cgroup of a dead agent) or with the orphaned tool
 * left to finish on its own.
 *
 * Most delays are uniform over a whole uninterrupted run (measured first); every fourth
 * counts from a late step (the copy, the removal of the old keyslot), since the slow PBKDF2
 * calibrations of QEMU at the start would otherwise take most of the points.
 *
 * After each kill: one of the two keys opens the image (the invariant). Then the mechanism
 * runs again to completion and: the data pattern reads back intact with the new key, the
 * old key does not open, no backup or copy is left. The keys of one mechanism form a chain
 * (point i rotates key i to key i+1) on one image, so the data survives every point.
 *
 * VIRTKM_CRASH_POINTS sets the number of kill points per mechanism (default 20).
 */
import anyTest, { type TestFn } from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import type { RotationJob, RotationKind } from '../../host-agent/src/rotate/types.js';
import { awkwardSecret, removeDir, tempDir } from '../fixtures/images/image-helpers.js';
import { serialiseJob } from '../fixtures/rotate/run-mechanism.js';
import { job, patternIntact, rotationFiles, testSpec, writePattern } from '../fixtures/rotate/qemu-rotate-helpers.js';

const test = anyTest as TestFn;
const store = createHostImageStore();
const POINTS = Math.max(1, Number(process.env['VIRTKM_CRASH_POINTS'] ?? 20));
const RUNNER = fileURLToPath(new URL('../fixtures/rotate/run-mechanism.js', import.meta.url));
const MECHANISMS = {
  rekey: { module: fileURLToPath(new URL('../../host-agent/src/rotate/qemu-rekey.js', import.meta.url)), factory: 'createQemuRekey', kind: 'rekey' as RotationKind },
  convert: { module: fileURLToPath(new URL('../../host-agent/src/rotate/qemu-convert.js', import.meta.url)), factory: 'createQemuConvert', kind: 'reencrypt' as RotationKind },
};
const TOOLS = new Set(['qemu-img', 'qemu-io']);
/** The step from which anchored kill points count their delay. */
const LATE_STEP: Record<keyof typeof MECHANISMS, string> = { rekey: 'removing old keyslot', convert: 'copying' };

type KillMode = 'tool' | 'runner+tool' | 'runner';

interface Started {
  child: ChildProcess;
  /** Resolves with the exit and the JSON lines printed. */
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; lines: Record<string, unknown>[] }>;
  /** The last progress step printed so far. */
  lastStep: () => string;
  /** When (Date.now()) a step was first printed. */
  stepSeenAt: Map<string, number>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Starts the runner with the job on stdin. */
function startRunner(mechanism: keyof typeof MECHANISMS, j: RotationJob): Started {
  const m = MECHANISMS[mechanism];
  const child = spawn(process.execPath, [RUNNER, m.module, m.factory], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let step = 'starting';
  const stepSeenAt = new Map<string, number>();
  child.stdout?.on('data', (c: Buffer) => {
    out += c.toString('utf8');
    const steps = [...out.matchAll(/"step":"([^"]+)"/g)].map((m) => m[1] ?? '');
    for (const s of steps) if (!stepSeenAt.has(s)) stepSeenAt.set(s, Date.now());
    step = steps.at(-1) ?? step;
  });
  child.stderr?.on('data', () => undefined);
  child.stdin?.on('error', () => undefined);
  child.stdin?.end(serialiseJob(j));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; lines: Record<string, unknown>[] }>((resolve) => {
    child.once('close', (code, signal) => {
      const lines = out
        .split('\n')
        .filter((l) => l.trim() !== '')
        .map((l) => {
          try {
            return JSON.parse(l) as Record<string, unknown>;
          } catch {
            return { unparsed: l };
          }
        });
      resolve({ code, signal, lines });
    });
  });
  return { child, done, lastStep: () => step, stepSeenAt };
}

/**
 * qemu-img / qemu-io processes working on files in `dir` (their argv names the image).
 * Found through /proc rather than the runner's children: once the runner is killed its
 * tools are orphans that belong to init.
 */
async function toolsUsing(dir: string): Promise<number[]> {
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    if (!TOOLS.has(await comm(pid))) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(dir) && (await alive(pid))) out.push(pid);
  }
  return out;
}

async function comm(pid: number): Promise<string> {
  return (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim();
}

/** True while the process exists and is not a zombie. */
async function alive(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  if (stat === '') return false;
  const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  return state !== 'Z' && state !== 'X';
}

function kill9(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Already gone.
  }
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_r, reject) => (timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms)))]);
  } finally {
    if (timer) clearTimeout(timer);
  }
}

/**
 * Waits `delayMs`, then kills as `mode` says. Returns what was hit: 'finished' when the
 * run ended first, else the mode actually used and the step the run was in.
 */
async function killAfter(run: Started, dir: string, delayMs: number, mode: KillMode, anchor?: string): Promise<{ hit: string; step: string }> {
  const pid = run.child.pid ?? -1;
  // An anchored point counts its delay from the moment the run reaches that step.
  const deadline0 = Date.now() + 300_000;
  let ended = false;
  void run.done.then(() => (ended = true));
  while (anchor !== undefined && !run.stepSeenAt.has(anchor) && !ended && Date.now() < deadline0) await sleep(5);
  const exited = await Promise.race([run.done.then(() => true), sleep(delayMs).then(() => false)]);
  if (exited) return { hit: 'finished', step: run.lastStep() };
  const step = run.lastStep();
  if (mode === 'tool') {
    const tool = (await toolsUsing(dir))[0];
    if (tool !== undefined) {
      const name = (await comm(tool)) || '(ended)';
      kill9(tool);
      // The runner sees its tool die and goes on or fails on its own.
      await withTimeout(run.done, 180_000, 'the runner after its tool was killed');
      return { hit: `tool ${name}`, step };
    }
  }
  kill9(pid);
  await withTimeout(run.done, 30_000, 'the killed runner');
  // Its tools: killed too (what a service manager does to the cgroup of a dead agent), or
  // left to finish on their own; either way the restarted agent finds them gone.
  const orphans = await toolsUsing(dir);
  if (mode !== 'runner') for (const t of orphans) kill9(t);
  const deadline = Date.now() + 120_000;
  while ((await toolsUsing(dir)).length > 0) {
    if (Date.now() > deadline) throw new Error('an orphaned tool did not end');
    await sleep(50);
  }
  return { hit: orphans.length > 0 && mode === 'runner' ? 'runner (tool left to finish)' : 'runner', step };
}

/**
 * Whether a key opens the image; an unreadable header counts as "no". Asked only once no
 * tool runs any more (testKey would take a lock conflict for a wrong key).
 */
async function opens(spec: ReturnType<typeof testSpec>, key: Uint8Array): Promise<boolean> {
  return store.testKey(spec.path, spec, key).catch(() => false);
}

for (const mechanism of ['rekey', 'convert'] as const) {
  for (const format of ['luks', 'qcow2-luks'] as const) {
    test.serial(`${mechanism} ${format}: ${POINTS} random kill -9 points (runner or tool), then a run to completion; data intact, old key refused, nothing left`, async (t) => {
      t.timeout(60 * 60_000);
      const dir = await tempDir();
      try {
        const spec = testSpec(join(dir, `vol-${format}.img`), format);
        const keys = Array.from({ length: POINTS + 2 }, () => awkwardSecret());
        await store.create(spec, keys[0] ?? Buffer.alloc(0));
        await writePattern(spec.path, format, keys[0]);
        const kind = MECHANISMS[mechanism].kind;
        const jobFor = (i: number) => job(`crash-${mechanism}-${i}`, kind, spec, format, keys[i], keys[i + 1]);

        // One uninterrupted run first: its duration is the range of the kill delays.
        const started = Date.now();
        const calibration = startRunner(mechanism, jobFor(0));
        const first = await withTimeout(calibration.done, 300_000, 'the uninterrupted run');
        let duration = Date.now() - started;
        t.is(first.code, 0, JSON.stringify(first.lines.at(-1)));
        // Every fourth point is anchored at a late step (the copy, the keyslot removal) so
        // that the short tail of a run after the slow key derivations gets its share.
        const anchor = LATE_STEP[mechanism];
        const lateSpan = Math.max(200, Date.now() - (calibration.stepSeenAt.get(anchor) ?? started));
        t.log(`uninterrupted run: ${duration} ms, of which ${lateSpan} ms from "${anchor}" on`);

        const modes: KillMode[] = ['runner', 'tool', 'runner+tool'];
        const delays: number[] = [];
        const hits = new Map<string, number>();
        const steps = new Map<string, number>();
        for (let i = 1; i <= POINTS; i++) {
          const j = jobFor(i);
          const [oldKey, newKey] = [keys[i] ?? Buffer.alloc(0), keys[i + 1] ?? Buffer.alloc(0)];
          const late = i % 4 === 0;
          const delay = Math.floor(Math.random() * (late ? lateSpan : duration) * 1.05);
          delays.push(delay);
          const mode = modes[i % modes.length] ?? 'runner';
          const run = startRunner(mechanism, j);
          const runStarted = Date.now();
          const { hit, step } = await killAfter(run, dir, delay, mode, late ? anchor : undefined);
          // A run that ended before its kill says how long a run takes now (the machine is
          // shared): later delays follow it, so that they keep covering whole runs.
          if (hit === 'finished' && !late) duration = Math.max(500, Date.now() - runStarted);
          hits.set(hit, (hits.get(hit) ?? 0) + 1);
          steps.set(step, (steps.get(step) ?? 0) + 1);

          // The invariant, before anything runs again.
          const invariant = (await opens(spec, oldKey)) || (await opens(spec, newKey));
          t.true(invariant, `point ${i} (${delay} ms, ${hit}, step ${step}): neither key opens the image`);
          if (!invariant) break;

          // The agent restarts: the same job again, to completion.
          const resumed = await withTimeout(startRunner(mechanism, j).done, 300_000, `the resumed run of point ${i}`);
          const last = resumed.lines.at(-1) ?? {};
          if (!t.is(resumed.code, 0, `point ${i} (${delay} ms, ${hit}, step ${step}): the resumed run failed: ${JSON.stringify(last)}`)) break;
          t.like(last, { result: { opensWith: 'new', verified: true } });
          const intact = await patternIntact(spec.path, format, newKey);
          const oldStillOpens = await opens(spec, oldKey);
          const left = await rotationFiles(spec.path);
          t.true(intact, `point ${i}: pattern intact with the new key`);
          t.false(oldStillOpens, `point ${i}: the old key no longer opens`);
          t.deepEqual(left, [], `point ${i}: nothing left`);
          if (!intact || oldStillOpens || left.length > 0) break;
        }
        t.log(`delays (ms, every fourth from "${anchor}"): ${delays.join(' ')}`);
        t.log(`kills: ${[...hits].map(([k, v]) => `${k} ${v}`).join(', ')}`);
        t.log(`steps hit: ${[...steps].map(([k, v]) => `${k} ${v}`).join(', ')}`);
        // The delays cover the run: most points must really interrupt something.
        t.true(POINTS < 10 || (hits.get('finished') ?? 0) <= POINTS / 3, 'too many points came after the end of the run');
      } finally {
        await removeDir(dir);
      }
    });
  }
}
