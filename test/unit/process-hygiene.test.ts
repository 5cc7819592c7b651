/**
 * Tests of shared/src/process-hygiene.ts. Hardening changes the process it runs in, so it
 * runs in child processes (test/fixtures/hygiene-child.ts), never in the test worker.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { release } from 'node:os';
import { RELAUNCH_MARKER, kernelDiscardsLockedPages, madviseShimPath, mayLockUnlimited } from '../../shared/src/memory-lock.js';
import { readHygieneStatus } from '../../shared/src/process-hygiene.js';

const CHILD = fileURLToPath(new URL('../fixtures/hygiene-child.js', import.meta.url));

interface ChildRun {
  status: number | null;
  signal: NodeJS.Signals | null;
  lines: Record<string, unknown>[];
  stderr: string;
}

async function runChild(args: string[], nodeArgs: string[] = [], env: NodeJS.ProcessEnv = process.env): Promise<ChildRun> {
  return new Promise((resolve) => {
    execFile(process.execPath, [...nodeArgs, CHILD, ...args], { encoding: 'utf8', timeout: 90_000, maxBuffer: 1 << 20, env }, (error, stdout, stderr) => {
      const lines = stdout
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Record<string, unknown>);
      const status = error ? (typeof error.code === 'number' ? error.code : null) : 0;
      const signal = error?.signal ?? null;
      resolve({ status, signal, lines, stderr });
    });
  });
}

interface StatusRecord {
  dumpable: number;
  vmLckKb: number;
}

test('readHygieneStatus reads the dumpable flag and VmLck of this (unhardened) process', (t) => {
  const status = readHygieneStatus();
  t.is(status.dumpable, 1);
  t.true(status.vmLckKb >= 0);
});

test('hardenProcess with --memory-lock off makes a child non-dumpable and locks only its key arena; the child then runs 200 MB of allocation and crypto', async (t) => {
  const run = await runChild(['harden', 'off'], ['--expose-gc']);
  t.is(run.status, 0, `child failed: signal ${String(run.signal)}\n${run.stderr}`);
  const out = run.lines[0] as
    | {
        before: StatusRecord;
        result: { dumpable: boolean; memoryLocked: boolean; secretsLocked: boolean; lockedBytes: number; swapPossible: boolean };
        after: StatusRecord;
        end: StatusRecord;
        key: { locked: boolean; intact: boolean; sameAddress: boolean };
        arena: { enabled: boolean; lockedBytes: number; fallbacks: number };
        rssMb: number;
        log: string[];
      }
    | undefined;
  t.truthy(out);
  if (!out) return;
  t.is(out.before.dumpable, 1);
  t.is(out.after.dumpable, 0, 'PR_GET_DUMPABLE is 0 after hardening');
  t.is(out.end.dumpable, 0);
  t.false(out.result.dumpable);
  t.true(out.rssMb > 150, `the workload really allocated (rss ${out.rssMb} MB)`);
  // The process as a whole is not locked (memory locking is off); the key arena is.
  t.false(out.result.memoryLocked);
  t.true(out.result.secretsLocked, out.log.join('\n'));
  t.true(out.result.lockedBytes >= 1 << 20);
  t.is(out.before.vmLckKb, 0);
  t.true(out.after.vmLckKb >= 1024, `VmLck after hardening: ${out.after.vmLckKb} kB`);
  t.true(out.end.vmLckKb >= 1024, 'the arena stays locked through GC churn');
  t.true(out.end.vmLckKb < out.rssMb * 1024, 'only the arena is locked, not the whole process');
  t.deepEqual(out.key, { locked: true, intact: true, sameAddress: true }, 'ownedCopy() put the key in locked memory and it survived the GC churn');
  t.log(`VmLck ${out.end.vmLckKb} kB of ${out.rssMb} MB resident; swap can reach the process: ${out.result.swapPossible}`);
  if (out.result.swapPossible) t.true(out.log.some((l) => l.includes('"level":"warn"') && l.includes('swap')));
  for (const line of out.log) t.false(line.includes('"level":"error"'));
});

// Without the privilege mlockall fails at once and the probe would prove nothing.
const probeSkip = process.platform !== 'linux' ? 'Linux only' : !mayLockUnlimited() ? 'no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK: mlockall cannot run here' : undefined;
(probeSkip ? test.skip : test)(`probe: without the madvise library, mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT) makes V8 abort once it frees pages${probeSkip ? ` [skipped: ${probeSkip}]` : ''}`, async (t) => {
  const run = await runChild(['mlockall'], ['--expose-gc']);
  const locked = run.lines.find((l) => l['stage'] === 'locked') as { rc: number; errno: number; status: StatusRecord } | undefined;
  t.truthy(locked, run.stderr);
  if (!locked) return;
  t.is(locked.rc, 0, `mlockall failed (errno ${locked.errno})`);
  if (locked.rc !== 0) return;
  const survived = run.lines.some((l) => l['stage'] === 'survived');
  t.log(`mlockall succeeded, VmLck ${locked.status.vmLckKb} kB; the workload ${survived ? 'completed' : 'did not complete'}; child ended with status ${String(run.status)}, signal ${String(run.signal)}`);
  t.true(locked.status.vmLckKb > 0);
  // V8 gives pages back during garbage collection or, at the latest, when it tears the heap
  // down at exit: either way the process dies. If this fails, this Node's V8 tolerates
  // locked memory and the madvise library (shared/native) is no longer needed.
  t.true(run.signal === 'SIGTRAP' || run.signal === 'SIGABRT' || run.signal === 'SIGILL' || (run.status !== null && run.status !== 0), 'mlockall no longer breaks Node: reconsider the madvise library');
  const fatal = /Check failed|Fatal error|Trace\/breakpoint|V8_Fatal/.exec(run.stderr);
  t.truthy(fatal, run.stderr.slice(0, 300));
  t.log(`V8 said: ${fatal?.[0] ?? '?'}`);
});

test('the kernel probe for MADV_DONTNEED_LOCKED agrees with the kernel version (5.18+)', (t) => {
  const [major = 0, minor = 0] = release().split('.').map(Number);
  const expected = process.platform === 'linux' && (major > 5 || (major === 5 && minor >= 18));
  t.is(kernelDiscardsLockedPages(), expected, `kernel ${release()}`);
});

const shimBuilt = existsSync(madviseShimPath());
const lockSkip = process.platform !== 'linux' ? 'Linux only' : !shimBuilt ? `${madviseShimPath()} is not built (npm run build needs a C compiler)` : !mayLockUnlimited() ? 'no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK: memory cannot be locked as a whole' : undefined;
const lockTest = lockSkip ? test.skip : test;

interface RelaunchRecord {
  stage: string;
  pid: number;
  argv: string[];
  relaunch: { reason?: string };
  result: { dumpable: boolean; memoryLocked: boolean; secretsLocked: boolean; swapPossible: boolean; memoryLockReason?: string };
  shimLoaded: boolean;
  retries: number;
  status: StatusRecord;
  start: { rssKb: number; pssKb: number; lockedKb: number };
  end: { rssKb: number; pssKb: number; lockedKb: number };
  keyIntact: boolean;
  log: string[];
}

lockTest(`--memory-lock auto: the process relaunches itself (same pid) with the madvise library, locks all of its memory, and survives 200 MB of allocation, GC and its own exit${lockSkip ? ` [skipped: ${lockSkip}]` : ''}`, async (t) => {
  const run = await runChild(['relaunch', 'auto'], ['--expose-gc']);
  t.is(run.status, 0, `child failed: signal ${String(run.signal)}\n${run.stderr.slice(0, 2000)}`);
  const before = run.lines.filter((l) => l['stage'] === 'before-relaunch');
  t.is(before.length, 2, 'the fixture ran twice: before and after execve');
  t.false(before[0]?.['shimLoaded'], 'not loaded at first');
  t.true(before[1]?.['shimLoaded'], 'loaded after the relaunch');
  const out = run.lines.find((l) => l['stage'] === 'after-workload') as RelaunchRecord | undefined;
  t.truthy(out, run.stderr);
  if (!out) return;
  t.is(out.pid, before[0]?.['pid'] as number, 'execve keeps the pid (supervisors and pid files stay right)');
  t.deepEqual(out.argv, ['relaunch', 'auto'], 'same command line');
  t.deepEqual(out.relaunch, {}, 'no reason: the library was loaded');
  t.true(out.result.memoryLocked, out.log.join('\n'));
  t.false(out.result.dumpable);
  t.is(out.status.dumpable, 0);
  t.true(out.result.secretsLocked);
  t.false(out.result.swapPossible, 'locked memory cannot be swapped');
  // smaps_rollup counts Locked as proportional set size: all of it is locked.
  for (const r of [out.start, out.end]) t.true(r.lockedKb >= r.pssKb - 64, `Locked ${r.lockedKb} kB of Pss ${r.pssKb} kB`);
  t.true(out.end.rssKb > out.start.rssKb + 100 * 1024, 'the workload grew the heap by more than 100 MB, all of it locked');
  t.true(out.status.vmLckKb > out.end.rssKb, `VmLck ${out.status.vmLckKb} kB covers every mapping (VmRSS ${out.end.rssKb} kB)`);
  t.true(out.keyIntact);
  t.true(out.log.some((l) => l.includes('all memory of the process is locked')));
  t.log(`Locked ${out.end.lockedKb} kB = Pss ${out.end.pssKb} kB (Rss ${out.end.rssKb} kB), VmLck ${out.status.vmLckKb} kB; madvise retries so far: ${out.retries} (V8 also discards at exit)`);
});

lockTest(`--memory-lock require refuses to start when the library cannot be preloaded; auto then runs unlocked and says why${lockSkip ? ` [skipped: ${lockSkip}]` : ''}`, async (t) => {
  // The relaunch marker makes the process believe it was relaunched already without the
  // library loading: the situation of a library built for another machine.
  const env = { ...process.env, [RELAUNCH_MARKER]: madviseShimPath() };
  const refused = await runChild(['relaunch', 'require'], [], env);
  t.is(refused.status, 3, refused.stderr);
  const line = refused.lines.find((l) => l['stage'] === 'refused');
  t.regex(String(line?.['error']), /cannot lock the process memory: .*not preloaded/);
  t.regex(String((line?.['relaunch'] as { reason?: string } | undefined)?.reason), /relaunched .* but the library is not loaded/);
  t.false(refused.lines.some((l) => l['stage'] === 'after-workload'), 'nothing ran after the refusal');

  const auto = await runChild(['relaunch', 'auto'], [], env);
  t.is(auto.status, 0, auto.stderr);
  const out = auto.lines.find((l) => l['stage'] === 'after-workload') as RelaunchRecord | undefined;
  t.truthy(out);
  t.false(out?.result.memoryLocked);
  t.regex(out?.result.memoryLockReason ?? '', /not preloaded/);
  t.true(out?.log.some((l) => /not locked as a whole/.test(l) && /not preloaded/.test(l)), out?.log.join('\n'));
  t.is(out?.status.vmLckKb, 1024, 'only the key arena is locked');
});
