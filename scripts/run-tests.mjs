#!/usr/bin/env node
// Runs the compiled ava test suite with TAP output, streams that output through, and
// ends with one machine-readable line: `N passed, N failed` (plus `, N skipped` when
// any test was skipped or is a todo). Exit code 1 when anything failed or no test ran.
//
// Usage: node scripts/run-tests.mjs [ava arguments...]
//   e.g. node scripts/run-tests.mjs dist/test/unit/errors.test.js --match '*wire*'
//   A TypeScript test path (test/unit/x.test.ts) is mapped to its compiled file.
// Environment: VIRTKM_TEST_SUMMARY=<file> also writes the counts there as JSON.
//
// TAP as written by ava 7 (through supertap):
//   ok 3 - file › title               a passed test (or a passing test.failing)
//   ok 4 - file › title # SKIP        a skipped test
//   not ok 5 - file › title # TODO    a todo test (not a failure)
//   not ok 6 - file › title           a failed test, hook, crash or timeout
//     ---  (YAML error block)  ...
//   1..N / # tests T / # pass P / # skip S / # fail F
//     the final report; N = T + todo, F = failed + crashed + todo + tests that never ran.
// Worker stdout/stderr go to ava's stderr, so stdout carries only TAP.
//
// ava 7.0.0's TAP reporter crashes (TypeError in dumpError, avajs/ava#3461) when it reports
// a global timeout or a process.exit() in a test, losing every later result. This script
// therefore runs ava's CLI in a child process of its own (child mode, below) that first
// wraps the reporter so such errors are reported as ordinary `not ok` lines. A run that
// still ends without a final report counts as a failure.

import { spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CHILD_MODE_ENV = 'VIRTKM_RUN_TESTS_AVA_CHILD';

/** Path of ava's command-line entry point, from its package.json. */
function avaCli() {
  const pkgPath = path.join(root, 'node_modules', 'ava', 'package.json');
  if (!existsSync(pkgPath)) {
    throw new Error('ava is not installed (node_modules/ava missing); run `bash scripts/setup.sh` or `npm ci` first');
  }
  const pkg = JSON.parse(readFileSync(pkgPath, 'utf8'));
  const bin = typeof pkg.bin === 'string' ? pkg.bin : pkg.bin?.ava;
  if (!bin) throw new Error('cannot find the ava executable in node_modules/ava/package.json');
  return path.join(root, 'node_modules', 'ava', bin);
}

// ---------------------------------------------------------------------------------------
// Child mode: patch ava's TAP reporter, then run ava's CLI in this process.

/** Turns a raw Error into the serialized-error record ava's TAP reporter expects. */
function serializedError(err) {
  // Keep only frames outside ava and its event emitter: for a timeout there are none, for
  // process.exit() they show where the test called it.
  const frames = (err.stack ?? '')
    .split('\n')
    .filter((l) => /^\s+at /.test(l) && !/[/\\]node_modules[/\\](ava|emittery)[/\\]/.test(l) && !l.includes('(<anonymous>)'));
  const record = { type: 'native', name: err.name, stack: frames.join('\n'), originalError: { message: err.message } };
  return record;
}

async function runAvaChild() {
  delete process.env[CHILD_MODE_ENV];
  const tapPath = path.join(root, 'node_modules', 'ava', 'lib', 'reporters', 'tap.js');
  if (existsSync(tapPath)) {
    try {
      const { default: TapReporter } = await import(pathToFileURL(tapPath).href);
      const original = TapReporter?.prototype?.writeTest;
      if (typeof original === 'function') {
        TapReporter.prototype.writeTest = function writeTest(evt, flags) {
          // Reported errors normally arrive serialized (plain objects); only ava's own
          // timeout / process.exit reporting passes a raw Error, which it cannot format.
          const fixed = evt?.err instanceof Error ? { ...evt, err: serializedError(evt.err) } : evt;
          return original.call(this, fixed, flags);
        };
      }
    } catch (err) {
      console.error(`run-tests: could not patch ava's TAP reporter (${err instanceof Error ? err.message : String(err)}); continuing`);
    }
  }
  await import(pathToFileURL(avaCli()).href);
}

// ---------------------------------------------------------------------------------------
// Parent mode: spawn the child, stream and count its TAP output.

/** Maps `test/**\/x.test.ts` arguments to `dist/test/**\/x.test.js`; other arguments pass unchanged. */
function mapArg(arg) {
  if (arg.startsWith('-')) return arg;
  const rel = path.relative(root, path.resolve(arg)).split(path.sep).join('/');
  if (/^test\/.*\.ts$/.test(rel)) return `dist/${rel.replace(/\.ts$/, '.js')}`;
  return arg;
}

// supertap writes `${ok} ${index} - ${title} ${directive}`, trimmed; the directive is exactly
// `# SKIP` or `# TODO` at the very end (ava gives no reason text).
const TEST_LINE = /^(not ok|ok) (\d+)(?:\s+-(?:\s(.*))?)?$/;
const DIRECTIVE = / # (SKIP|TODO)$/;
const PLAN = /^1\.\.(\d+)\s*$/;
const FOOTER = /^#\s+(tests|pass|skip|fail)\s+(\d+)\s*$/;

/** Accumulates counts from TAP lines. */
class TapCounter {
  passed = 0;
  failed = 0;
  skipped = 0;
  todo = 0;
  failures = [];
  plan = undefined;
  footer = {};
  lastIndex = 0;
  /** True inside a YAML diagnostic block (`  ---` ... `  ...`). */
  inYaml = false;

  line(raw) {
    const line = raw.replace(/\r$/, '');
    if (this.inYaml) {
      if (/^\s+\.\.\.\s*$/.test(line)) this.inYaml = false;
      return;
    }
    if (/^\s+---\s*$/.test(line)) {
      this.inYaml = true;
      return;
    }
    const plan = PLAN.exec(line);
    if (plan) {
      this.plan = Number(plan[1]);
      return;
    }
    const footer = FOOTER.exec(line);
    if (footer) {
      this.footer[footer[1]] = Number(footer[2]);
      return;
    }
    const m = TEST_LINE.exec(line);
    if (!m) return;
    // ava numbers test lines 1, 2, 3...; a line out of sequence is not one of ava's.
    const index = Number(m[2]);
    if (index !== this.lastIndex + 1) return;
    this.lastIndex = index;
    const ok = m[1] === 'ok';
    let title = m[3] ?? '';
    let directive;
    const d = DIRECTIVE.exec(title);
    if (d) {
      directive = d[1];
      title = title.slice(0, d.index);
    } else if (title === '# SKIP' || title === '# TODO') {
      directive = title.slice(2);
      title = '';
    }
    if (directive === 'TODO' && !ok) this.todo++;
    else if (directive === 'SKIP' && ok) this.skipped++;
    else if (ok) this.passed++;
    else {
      this.failed++;
      this.failures.push(title || '(untitled)');
    }
  }

  /**
   * Reconciles the per-line counts with ava's final report, which is authoritative for
   * totals: it also counts tests that never ran (their worker crashed), and it tells a
   * skipped test from a passed one whose title happens to end in `# SKIP`.
   */
  reconcile() {
    const { tests, pass, skip, fail } = this.footer;
    if (this.plan === undefined || tests === undefined || pass === undefined || fail === undefined) return;
    const todo = Math.max(0, this.plan - tests);
    const failed = Math.max(0, fail - todo);
    this.passed = pass;
    this.skipped = skip ?? 0;
    this.todo = todo;
    if (failed > this.failed) {
      const missing = failed - this.failed;
      this.failed = failed;
      this.failures.push(`${missing} more test(s) failed or never ran (see the output above)`);
    }
  }
}

async function runParent() {
  const extra = process.argv.slice(2).map(mapArg);
  const counter = new TapCounter();
  const notes = [];

  try {
    avaCli();
  } catch (err) {
    console.error(`run-tests: ${err instanceof Error ? err.message : String(err)}`);
    return finish(counter, ['cannot start ava'], null);
  }

  // ava runs in a process group of its own, holding its workers and whatever the tests
  // spawn, so that the whole run can be stopped, and its leftovers cleaned, as one.
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--tap', ...extra], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, [CHILD_MODE_ENV]: '1' },
    detached: true,
  });
  const signalGroup = (signal) => {
    if (child.pid === undefined) return false;
    try {
      process.kill(-child.pid, signal);
      return true;
    } catch {
      return false; // ESRCH: the group is empty.
    }
  };
  // Ctrl-C: let ava stop its workers and report the interrupted tests. Termination: the group.
  let interrupted = false;
  process.on('SIGINT', () => {
    interrupted = true;
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
  });
  for (const signal of ['SIGTERM', 'SIGHUP']) process.on(signal, () => signalGroup(signal));

  const rl = createInterface({ input: child.stdout, crlfDelay: Infinity });
  rl.on('line', (line) => {
    process.stdout.write(line + '\n');
    counter.line(line);
  });
  const closed = new Promise((resolve) => rl.once('close', resolve));
  const exited = new Promise((resolve) => {
    child.once('error', (err) => resolve({ code: null, signal: null, error: err }));
    child.once('exit', (code, signal) => resolve({ code, signal, error: null }));
  });
  const [status] = await Promise.all([exited, closed]);

  // Processes still in the group outlived ava: workers or servers a test failed to stop.
  if (signalGroup(0)) {
    console.error('run-tests: processes started by the tests were still running after ava ended; terminating them');
    signalGroup('SIGTERM');
    for (let i = 0; i < 30 && signalGroup(0); i++) await new Promise((resolve) => setTimeout(resolve, 100));
    signalGroup('SIGKILL');
  }

  counter.reconcile();
  if (interrupted) notes.push('interrupted (SIGINT)');
  if (status.error) notes.push(`cannot run ava: ${status.error.message}`);
  else if (status.signal) notes.push(`ava was killed by ${status.signal}`);
  else if (counter.plan === undefined) notes.push(`ava ended without its final report (exit code ${status.code}); results are incomplete`);
  else if (status.code !== 0 && counter.failed === 0) notes.push(`ava exited with code ${status.code}`);
  return finish(counter, notes, status);
}

/** Prints failures and the summary line, writes the summary file, returns the exit code. */
function finish(counter, notes, status) {
  // Anything wrong with the run itself counts as one more failed test.
  if (notes.length > 0) {
    counter.failed += 1;
    counter.failures.push(...notes);
  }
  if (counter.passed + counter.failed + counter.skipped + counter.todo === 0) {
    counter.failed = 1;
    counter.failures.push('no tests ran');
  }
  const skipped = counter.skipped + counter.todo;

  if (counter.failures.length > 0) {
    process.stdout.write('\nFailed:\n');
    for (const title of counter.failures) process.stdout.write(`  - ${title}\n`);
  }
  let summary = `${counter.passed} passed, ${counter.failed} failed`;
  if (skipped > 0) summary += `, ${skipped} skipped`;

  const file = process.env.VIRTKM_TEST_SUMMARY;
  if (file) {
    const data = {
      passed: counter.passed,
      failed: counter.failed,
      skipped,
      todo: counter.todo,
      failures: counter.failures,
      avaExitCode: status?.code ?? null,
      avaSignal: status?.signal ?? null,
    };
    try {
      writeFileSync(file, JSON.stringify(data, null, 2) + '\n');
    } catch (err) {
      console.error(`run-tests: cannot write ${file}: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  process.stdout.write(`\n${summary}\n`);
  return counter.failed > 0 ? 1 : 0;
}

if (process.env[CHILD_MODE_ENV] === '1') {
  await runAvaChild();
} else {
  try {
    process.exitCode = await runParent();
  } catch (err) {
    console.error('run-tests: unexpected error:', err);
    process.stdout.write('\n0 passed, 1 failed\n');
    process.exitCode = 1;
  }
}
