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
 * VIRTKM_CRASH_POINTS sets the number of kill points per mechanism (default 20). The runner
 * and the kill code are test/fixtures/rotate/crash-runner.ts.
 */
import anyTest, { type TestFn } from 'ava';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import type { RotationJob, RotationKind } from '../../host-agent/src/rotate/types.js';
import { awkwardSecret, removeDir, tempDir } from '../fixtures/images/image-helpers.js';
import { killAfter, startRunner as startMechanism, withTimeout, type KillMode } from '../fixtures/rotate/crash-runner.js';
import { job, patternIntact, rotationFiles, testSpec, writePattern } from '../fixtures/rotate/qemu-rotate-helpers.js';

const test = anyTest as TestFn;
const store = createHostImageStore();
const POINTS = Math.max(1, Number(process.env['VIRTKM_CRASH_POINTS'] ?? 20));
const MECHANISMS = {
  rekey: { module: fileURLToPath(new URL('../../host-agent/src/rotate/qemu-rekey.js', import.meta.url)), factory: 'createQemuRekey', kind: 'rekey' as RotationKind },
  convert: { module: fileURLToPath(new URL('../../host-agent/src/rotate/qemu-convert.js', import.meta.url)), factory: 'createQemuConvert', kind: 'reencrypt' as RotationKind },
};
/** The step from which anchored kill points count their delay. */
const LATE_STEP: Record<keyof typeof MECHANISMS, string> = { rekey: 'removing old keyslot', convert: 'copying' };

/** Starts the runner of one of this file's mechanisms with the job on stdin. */
const startRunner = (mechanism: keyof typeof MECHANISMS, j: RotationJob) => startMechanism(MECHANISMS[mechanism], j);

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
