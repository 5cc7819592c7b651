/**
 * Crash safety of encrypting and decrypting a volume with qemu-img convert
 * (host-agent/src/rotate/qemu-convert.ts, guest stopped): raw <-> luks and
 * qcow2 <-> qcow2-luks. The mechanism runs in a process of its own
 * (test/fixtures/rotate/run-mechanism.ts) and is killed with SIGKILL at random moments
 * (test/fixtures/rotate/crash-runner.ts): the runner with its tool, the runner with its
 * tool left to finish, or the tool alone. Half of the delays are uniform over a whole
 * uninterrupted run (measured first), half count from the start of the copy.
 *
 * After each kill, before anything runs again, the invariant: QEMU (qemu-img info, format
 * probing) takes the canonical image either for the source format, and then it opens as
 * before (no key when it is plaintext, the old key when encrypted), or for the target
 * format, and then it opens with the target key (none when decrypting); in both cases the
 * data pattern reads back intact. A plaintext image needs no key, so the data is checked
 * at every point, not only at the end.
 *
 * Then the same job runs again to completion (the agent restarting) and: the image is of
 * the target format, the pattern is intact, no rotation file is left next to it; after
 * an encryption no plaintext of the pattern is left in the file, after a decryption the
 * old key opens nothing (no LUKS header any more).
 *
 * One image serves all points of a pair of formats: the points alternate between the two
 * directions (encrypt with a fresh key, decrypt with that key, encrypt with the next...),
 * so each direction gets VIRTKM_CRASH_POINTS kill points (default 20) on 16 MiB images.
 */
import anyTest, { type TestFn } from 'ava';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import type { ImageKind, ImageSpec } from '../../host-agent/src/images/types.js';
import type { RotationJob, UnencryptedTarget } from '../../host-agent/src/rotate/types.js';
import { runTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, qemuIo, removeDir, tempDir } from '../fixtures/images/image-helpers.js';
import { killAfter, startRunner, stopAll, withTimeout, type KillMode, type RunnerMechanism, type Started } from '../fixtures/rotate/crash-runner.js';
import { job, PATTERN_16M, patternIntact, qemuFormatOf, rotationFiles, testSpec, writePattern } from '../fixtures/rotate/qemu-rotate-helpers.js';

const test = anyTest as TestFn;
const store = createHostImageStore();
const POINTS = Math.max(1, Number(process.env['VIRTKM_CRASH_POINTS'] ?? 20));
const SIZE = 16n << 20n;
const CONVERT: RunnerMechanism = { module: fileURLToPath(new URL('../../host-agent/src/rotate/qemu-convert.js', import.meta.url)), factory: 'createQemuConvert' };
/** The step from which anchored kill points count their delay. */
const LATE_STEP = 'copying';
const KIND: Record<Plain | Encrypted, ImageKind> = { raw: 'raw', qcow2: 'qcow2', luks: 'luks1', 'qcow2-luks': 'qcow2-luks' };

type Plain = 'raw' | 'qcow2';
type Encrypted = 'luks' | 'qcow2-luks';

/** Why the QEMU tools cannot run here (undefined when they can); decided before tests are declared. */
async function qemuToolsUnavailable(): Promise<string | undefined> {
  for (const tool of ['qemu-img', 'qemu-io']) {
    try {
      const r = await runTool(tool, ['--version'], { timeoutMs: 10_000 });
      if (r.code !== 0) return `${tool} does not run`;
    } catch {
      return `${tool} is not installed (Debian package qemu-utils)`;
    }
  }
  return undefined;
}
const noQemu = await qemuToolsUnavailable();

/** One direction of a pair: what a job converts from and to. */
interface Direction {
  name: string;
  from: Plain | Encrypted;
  to: Plain | Encrypted;
  encrypting: boolean;
}

function spec16(path: string, format: Encrypted): ImageSpec {
  return { ...testSpec(path, format), sizeBytes: SIZE };
}

/** True when the file holds 32 KiB of the byte `b` somewhere (the pattern in clear). */
async function fileContains32(path: string, b: number): Promise<boolean> {
  return (await readFile(path)).indexOf(Buffer.alloc(32 << 10, b)) >= 0;
}

for (const [plain, encrypted] of [
  ['raw', 'luks'],
  ['qcow2', 'qcow2-luks'],
] as const) {
  const title = `convert ${plain} <-> ${encrypted}: ${POINTS} random kill -9 points per direction (runner or tool); invariant after each kill, then a run to completion: target format, data intact, nothing left`;
  if (noQemu) {
    test.skip(`${title} (skipped: ${noQemu})`, () => undefined);
    continue;
  }
  test.serial(title, async (t) => {
    t.timeout(60 * 60_000);
    const testStarted = Date.now();
    const dir = await tempDir();
    const runs: Started[] = [];
    const start = (j: RotationJob): Started => {
      const r = startRunner(CONVERT, j);
      runs.push(r);
      return r;
    };
    try {
      const path = join(dir, `vol-${plain}.img`);
      const c = await runTool('qemu-img', ['create', '-q', '-f', plain, path, SIZE.toString()], { timeoutMs: 60_000 });
      if (!t.is(c.code, 0, c.stderr)) return;
      await writePattern(path, plain, undefined, PATTERN_16M);

      const encrypt: Direction = { name: `encrypt ${plain} -> ${encrypted}`, from: plain, to: encrypted, encrypting: true };
      const decrypt: Direction = { name: `decrypt ${encrypted} -> ${plain}`, from: encrypted, to: plain, encrypting: false };
      const plainTarget: UnencryptedTarget = { path, format: plain, sizeBytes: SIZE };
      const encSpec = spec16(path, encrypted);
      // The key the image is encrypted with now (undefined while it is plaintext).
      let current: Buffer | undefined;
      let n = 0;
      /** The next job of a direction: encrypt with a fresh key, decrypt with the current one. */
      const nextJob = (d: Direction): { j: RotationJob; oldKey: Buffer | undefined; newKey: Buffer | undefined } => {
        n += 1;
        const oldKey = d.encrypting ? undefined : current;
        const newKey = d.encrypting ? awkwardSecret() : undefined;
        return { j: job(`crash-conv-${n}`, 'reencrypt', d.encrypting ? encSpec : plainTarget, d.from, oldKey, newKey), oldKey, newKey };
      };

      // One uninterrupted run of each direction first: their durations are the ranges of
      // the kill delays.
      const duration = new Map<Direction, number>();
      const lateSpan = new Map<Direction, number>();
      for (const d of [encrypt, decrypt]) {
        const { j, newKey } = nextJob(d);
        const began = Date.now();
        const calibration = start(j);
        const first = await withTimeout(calibration.done, 300_000, `the uninterrupted ${d.name}`);
        duration.set(d, Date.now() - began);
        lateSpan.set(d, Math.max(100, Date.now() - (calibration.stepSeenAt.get(LATE_STEP) ?? began)));
        if (!t.is(first.code, 0, `${d.name}: ${JSON.stringify(first.lines.at(-1))}`)) return;
        if (!t.true(await patternIntact(path, d.to, newKey, PATTERN_16M), `${d.name}: pattern intact after the uninterrupted run`)) return;
        current = newKey;
        t.log(`uninterrupted ${d.name}: ${duration.get(d)} ms, of which ${lateSpan.get(d)} ms from "${LATE_STEP}" on`);
      }

      const modes: KillMode[] = ['runner', 'tool', 'runner+tool'];
      const stats = new Map<Direction, { delays: number[]; hits: Map<string, number>; steps: Map<string, number> }>([
        [encrypt, { delays: [], hits: new Map(), steps: new Map() }],
        [decrypt, { delays: [], hits: new Map(), steps: new Map() }],
      ]);
      let failed = false;
      for (let i = 1; i <= 2 * POINTS && !failed; i++) {
        const d = i % 2 === 1 ? encrypt : decrypt;
        const k = Math.ceil(i / 2);
        const s = stats.get(d);
        if (!s) throw new Error('no stats');
        const { j, oldKey, newKey } = nextJob(d);
        // Every second point of a direction counts its delay from the copy: creating the
        // LUKS header of an encrypted copy (key derivation) takes most of an encryption,
        // and uniform delays alone would seldom hit the copy, the comparison or the rename.
        const late = k % 2 === 0;
        const delay = Math.floor(Math.random() * (late ? (lateSpan.get(d) ?? 100) : (duration.get(d) ?? 500)) * 1.05);
        s.delays.push(delay);
        const mode = modes[k % modes.length] ?? 'runner';
        const run = start(j);
        const runStarted = Date.now();
        const { hit, step } = await killAfter(run, dir, delay, mode, late ? LATE_STEP : undefined);
        // A run that ended before its kill says how long a run takes now (the machine is
        // shared): later delays follow it.
        if (hit === 'finished' && !late) duration.set(d, Math.max(300, Date.now() - runStarted));
        s.hits.set(hit, (s.hits.get(hit) ?? 0) + 1);
        s.steps.set(step, (s.steps.get(step) ?? 0) + 1);
        const where = `${d.name} point ${k} (${delay} ms${late ? ` from "${LATE_STEP}"` : ''}, ${hit}, step ${step})`;

        // The invariant, before anything runs again: source format opening as before, or
        // target format opening with the target key; the data reads back either way.
        const format = await qemuFormatOf(path);
        const inSource = format === d.from;
        const inTarget = format === d.to;
        const intactNow = inSource ? await patternIntact(path, d.from, oldKey, PATTERN_16M) : inTarget ? await patternIntact(path, d.to, newKey, PATTERN_16M) : false;
        t.true(inSource || inTarget, `${where}: the image is ${format}, neither ${d.from} nor ${d.to}`);
        t.true(intactNow, `${where}: the image (${format}) does not open as ${inSource ? 'before' : 'the target'} with the pattern intact`);
        if (!(inSource || inTarget) || !intactNow) {
          failed = true;
          break;
        }

        // The agent restarts: the same job again, to completion.
        const resumed = await withTimeout(start(j).done, 300_000, `the resumed run of ${where}`);
        const last = resumed.lines.at(-1) ?? {};
        if (!t.is(resumed.code, 0, `${where}: the resumed run failed: ${JSON.stringify(last)}`)) {
          failed = true;
          break;
        }
        t.like(last, { result: { opensWith: 'new', verified: true } });
        const after = await qemuFormatOf(path);
        const intact = await patternIntact(path, d.to, newKey, PATTERN_16M);
        const left = await rotationFiles(path);
        t.is(after, d.to, `${where}: the image is of the target format after the resumed run`);
        t.true(intact, `${where}: pattern intact after the resumed run`);
        t.deepEqual(left, [], `${where}: nothing left next to the image`);
        let leftover = false;
        if (d.encrypting) {
          leftover = await fileContains32(path, 0x5a);
          t.false(leftover, `${where}: no plaintext of the pattern left in the file`);
        } else {
          // No LUKS header any more: the old key opens nothing, and the image store sees a
          // plaintext image.
          const kind = (await store.inspect(path)).kind;
          const oldOpens = oldKey ? (await qemuIo(path, encrypted, oldKey, ['quit'], true)).code === 0 : true;
          t.is(kind, KIND[plain], `${where}: the image store sees ${plain}`);
          t.false(oldOpens, `${where}: the old key opens nothing`);
          leftover = kind !== KIND[plain] || oldOpens;
        }
        if (after !== d.to || !intact || left.length > 0 || leftover) {
          failed = true;
          break;
        }
        current = newKey;
      }

      for (const d of [encrypt, decrypt]) {
        const s = stats.get(d);
        if (!s) continue;
        t.log(`${d.name}: delays (ms, every second from "${LATE_STEP}"): ${s.delays.join(' ')}`);
        t.log(`${d.name}: kills: ${[...s.hits].map(([h, v]) => `${h} ${v}`).join(', ')}`);
        t.log(`${d.name}: steps hit: ${[...s.steps].map(([h, v]) => `${h} ${v}`).join(', ')}`);
        // The delays cover the run: most points must really interrupt something.
        if (!failed) t.true(POINTS < 10 || (s.hits.get('finished') ?? 0) <= POINTS / 3, `${d.name}: too many points came after the end of the run`);
      }
      t.log(`total: ${Math.round((Date.now() - testStarted) / 1000)} s for ${2 * POINTS} kill points`);
    } finally {
      await stopAll(runs, dir);
      await removeDir(dir);
    }
  });
}
