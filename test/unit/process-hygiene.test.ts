/**
 * Tests of shared/src/process-hygiene.ts. Hardening changes the process it runs in, so it
 * runs in child processes (test/fixtures/hygiene-child.ts), never in the test worker.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { readHygieneStatus } from '../../shared/src/process-hygiene.js';

const CHILD = fileURLToPath(new URL('../fixtures/hygiene-child.js', import.meta.url));

interface ChildRun {
  status: number | null;
  signal: NodeJS.Signals | null;
  lines: Record<string, unknown>[];
  stderr: string;
}

async function runChild(mode: string, nodeArgs: string[] = []): Promise<ChildRun> {
  return new Promise((resolve) => {
    execFile(process.execPath, [...nodeArgs, CHILD, mode], { encoding: 'utf8', timeout: 90_000, maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
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

test('hardenProcess makes a child non-dumpable and locks its key arena; the child then runs 200 MB of allocation and crypto', async (t) => {
  const run = await runChild('harden', ['--expose-gc']);
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
  // The process as a whole is not locked (see the mlockall probe below); the key arena is.
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

test('probe: mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT) makes V8 abort once the GC frees pages', async (t) => {
  const run = await runChild('mlockall', ['--expose-gc']);
  const locked = run.lines.find((l) => l['stage'] === 'locked') as { rc: number; errno: number; status: StatusRecord } | undefined;
  t.truthy(locked, run.stderr);
  if (!locked) return;
  if (locked.rc !== 0) {
    t.log(`SKIPPED: mlockall itself failed here (errno ${locked.errno}; RLIMIT_MEMLOCK or no CAP_IPC_LOCK), so the probe proves nothing`);
    t.pass();
    return;
  }
  t.log(`mlockall succeeded, VmLck ${locked.status.vmLckKb} kB; child ended with status ${String(run.status)}, signal ${String(run.signal)}`);
  t.true(locked.status.vmLckKb > 0);
  const survived = run.lines.some((l) => l['stage'] === 'survived');
  // If this fails, this Node's V8 tolerates locked memory: hardenProcess could lock again.
  t.false(survived, 'mlockall no longer breaks Node: reconsider memory locking in process-hygiene.ts');
  t.true(run.signal === 'SIGTRAP' || run.signal === 'SIGABRT' || run.signal === 'SIGILL' || (run.status !== null && run.status !== 0));
  const fatal = /Check failed|Fatal error|Trace\/breakpoint|V8_Fatal/.exec(run.stderr);
  t.log(fatal ? `V8 said: ${fatal[0]}` : `stderr: ${run.stderr.slice(0, 300)}`);
});
