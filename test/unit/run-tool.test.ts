/**
 * Tests of shared/src/run-tool.ts. The children are tiny `sh -c` scripts: that is fine
 * here (the script is a constant of the test), never in production code.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { createHash, randomBytes, randomInt, randomUUID } from 'node:crypto';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { isDomainError, type DomainError } from '../../shared/src/errors.js';
import { CRYPTSETUP_EXIT_KINDS, TOOL_ENV, parentDeathSupported, runTool, toolError } from '../../shared/src/run-tool.js';

/** Whether setpriv can make tools die with their parent here (decides a skip below). */
const pdeathSupported = await parentDeathSupported();

/** Hex dump of what `od` printed, spaces and newlines removed. */
function odHex(text: string): string {
  return text.replace(/\s+/g, '');
}

/** PIDs of running processes whose argv contains `marker`. */
function pidsWithArg(marker: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const argv = readFileSync(`/proc/${name}/cmdline`).toString('latin1').split('\0');
      if (argv.includes(marker)) pids.push(Number(name));
    } catch {
      // The process ended meanwhile.
    }
  }
  return pids;
}

async function waitForPid(marker: string, timeoutMs = 5000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const [pid] = pidsWithArg(marker);
    if (pid !== undefined) return pid;
    await sleep(20);
  }
  throw new Error(`no process with argument ${marker}`);
}

async function rejection(promise: Promise<unknown>): Promise<DomainError> {
  try {
    await promise;
  } catch (err) {
    if (isDomainError(err)) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

test('captures exit code, stdout and stderr', async (t) => {
  const r = await runTool('sh', ['-c', 'echo out; echo err >&2; exit 7']);
  t.is(r.code, 7);
  t.is(r.stdout, 'out\n');
  t.is(r.stderr, 'err\n');
  t.false(r.truncated);
});

test('arguments are never parsed by a shell', async (t) => {
  const r = await runTool('printf', ['%s|', '$(id)', '; rm -rf /', '`x`', "'q'"]);
  t.is(r.stdout, "$(id)|; rm -rf /|`x`|'q'|");
});

test('the child gets the fixed environment and nothing else', async (t) => {
  process.env['VIRTKM_RUN_TOOL_LEAK_CHECK'] = 'should-not-reach-children';
  try {
    const r = await runTool('env', []);
    const lines = r.stdout.trim().split('\n').sort();
    t.deepEqual(lines, Object.entries(TOOL_ENV).map(([k, v]) => `${k}=${v}`).sort());
  } finally {
    delete process.env['VIRTKM_RUN_TOOL_LEAK_CHECK'];
  }
});

test('stdin delivers raw bytes, NUL and newline included, and is not wiped by runTool', async (t) => {
  const secret = Buffer.from([0x00, 0x0a, 0xff, 0x41, 0x00, 0x0d, 0x0a, 0x80]);
  const r = await runTool('od', ['-An', '-tx1', '-v'], { stdin: secret });
  t.is(r.code, 0);
  t.is(odHex(r.stdout), secret.toString('hex'));
  t.deepEqual([...secret], [0x00, 0x0a, 0xff, 0x41, 0x00, 0x0d, 0x0a, 0x80], 'the caller owns and wipes the buffer');
});

test('fds[0] and fds[1] arrive on /dev/fd/3 and /dev/fd/4 (opened by path, as QEMU does)', async (t) => {
  const a = Buffer.from([0x00, 0x01, 0x0a, 0xfe]);
  const b = Buffer.from([0x0a, 0x0a, 0x00]);
  const r = await runTool('sh', ['-c', 'od -An -tx1 -v /dev/fd/3; echo -; od -An -tx1 -v /dev/fd/4'], { fds: [a, b] });
  t.is(r.code, 0, r.stderr);
  const [first, second] = r.stdout.split('-\n');
  t.is(odHex(first ?? ''), a.toString('hex'));
  t.is(odHex(second ?? ''), b.toString('hex'));
});

test('a payload larger than a pipe buffer arrives intact on fd 3', async (t) => {
  const big = randomBytes(1 << 20);
  const r = await runTool('sha256sum', ['/dev/fd/3'], { fds: [big] });
  t.is(r.stdout.split(' ')[0], createHash('sha256').update(big).digest('hex'));
});

test('a child that never reads its fd or stdin does not hang the call', async (t) => {
  const r = await runTool('true', [], { fds: [randomBytes(1 << 20)], stdin: randomBytes(1 << 20) });
  t.is(r.code, 0);
});

test('the secret never shows in the running child\'s /proc/PID/cmdline or environ', async (t) => {
  const marker = `virtkm-test-${randomUUID()}`;
  const secret = randomBytes(32);
  const controller = new AbortController();
  const run = runTool('sh', ['-c', 'cat /dev/fd/3 >/dev/null; cat >/dev/null; while :; do sleep 0.05; done', marker], {
    fds: [secret],
    stdin: secret,
    signal: controller.signal,
  });
  const pid = await waitForPid(marker);
  const cmdline = readFileSync(`/proc/${pid}/cmdline`);
  const environ = readFileSync(`/proc/${pid}/environ`);
  controller.abort();
  const err = await rejection(run);
  t.is(err.kind, 'unavailable');
  for (const [name, bytes] of [['cmdline', cmdline], ['environ', environ]] as const) {
    t.is(bytes.indexOf(secret), -1, `${name} holds the raw secret`);
    t.false(bytes.toString('latin1').toLowerCase().includes(secret.toString('hex')), `${name} holds the secret in hex`);
    t.false(bytes.toString('latin1').includes(secret.toString('base64')), `${name} holds the secret in base64`);
  }
  t.deepEqual(environ.toString('latin1').split('\0').filter(Boolean).sort(), Object.entries(TOOL_ENV).map(([k, v]) => `${k}=${v}`).sort());
});

test('the timeout kills the child, with SIGKILL when it ignores SIGTERM', async (t) => {
  const marker = `virtkm-test-${randomUUID()}`;
  const started = Date.now();
  const err = await rejection(runTool('sh', ['-c', 'trap "" TERM; while :; do sleep 0.05; done', marker], { timeoutMs: 200, killGraceMs: 300 }));
  const elapsed = Date.now() - started;
  t.is(err.kind, 'unavailable');
  t.regex(err.message, /timed out/);
  t.true(elapsed >= 450 && elapsed < 4000, `settled after ${elapsed} ms`);
  t.deepEqual(pidsWithArg(marker), [], 'the child is gone when the call settles');
});

test('aborting kills the child and rejects; an already aborted signal starts nothing', async (t) => {
  const marker = `virtkm-test-${randomUUID()}`;
  const controller = new AbortController();
  const run = runTool('sh', ['-c', 'while :; do sleep 0.05; done', marker], { signal: controller.signal });
  await waitForPid(marker);
  controller.abort();
  const err = await rejection(run);
  t.is(err.kind, 'unavailable');
  t.regex(err.message, /cancelled/);
  t.deepEqual(pidsWithArg(marker), []);

  const marker2 = `virtkm-test-${randomUUID()}`;
  const err2 = await rejection(runTool('sh', ['-c', 'sleep 5', marker2], { signal: AbortSignal.abort() }));
  t.is(err2.kind, 'unavailable');
  t.deepEqual(pidsWithArg(marker2), []);
});

test('captured output is bounded, the child still runs to the end', async (t) => {
  const r = await runTool('sh', ['-c', 'head -c 3000000 /dev/zero; head -c 5000 /dev/zero >&2; echo done >&2'], { maxOutputBytes: 1000 });
  t.is(r.code, 0);
  t.is(r.stdout.length, 1000);
  t.is(r.stderr.length, 1000);
  t.true(r.truncated);
});

test('a missing binary is unavailable with a hint naming the Debian package', async (t) => {
  const known = await rejection(runTool('/nonexistent/dir/cryptsetup', ['--version']));
  t.is(known.kind, 'unavailable');
  t.regex(known.hint ?? '', /cryptsetup-bin/);
  t.false(known.message.includes('/nonexistent'), 'no path in the message');

  const unknown = await rejection(runTool('virtkm-no-such-tool', []));
  t.is(unknown.kind, 'unavailable');
  t.truthy(unknown.hint);

  const custom = await rejection(runTool('virtkm-no-such-tool', [], { debianPackage: 'some-package' }));
  t.regex(custom.hint ?? '', /some-package/);
});

test('a child killed by a signal reports 128 + the signal number', async (t) => {
  const r = await runTool('sh', ['-c', 'kill -KILL $$']);
  t.is(r.code, 128 + 9);
});

test('toolError maps exit codes through the table, keeps stderr out of the message', (t) => {
  const result = { code: 2, stdout: '', stderr: 'No key available with this passphrase. /secret/path', truncated: false };
  const err = toolError('cryptsetup', result, CRYPTSETUP_EXIT_KINDS);
  t.is(err.kind, 'permission_denied');
  t.is(err.message, 'cryptsetup failed (exit 2)');
  t.regex(String((err.cause as Error).message), /No key available/);
  t.is(toolError('cryptsetup', { ...result, code: 4 }, CRYPTSETUP_EXIT_KINDS).kind, 'not_found');
  t.is(toolError('cryptsetup', { ...result, code: 5 }, CRYPTSETUP_EXIT_KINDS).kind, 'failed_precondition');
  t.is(toolError('cryptsetup', { ...result, code: 99 }, CRYPTSETUP_EXIT_KINDS).kind, 'internal');
  t.is(toolError('qemu-img', { ...result, code: 1 }).kind, 'internal');
});

// ---------------------------------------------------------------------------------------
// Parent death: tools die with the process that started them (setpriv --pdeathsig KILL).

/** True while `pid` exists and is not a zombie (an orphan nobody reaped yet is dead too). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function waitUntilGone(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!alive(pid)) return true;
    await sleep(50);
  }
  return !alive(pid);
}

/** A `sleep` duration that is unique in the process table and ends by itself after 2 minutes at most. */
function sleepMarker(): string {
  return `${100 + randomInt(20)}.${String(randomInt(1_000_000)).padStart(6, '0')}1`;
}

/**
 * Starts a node process that runs `sleep MARKER` through runTool (with a secret on fd 3,
 * as the agent's tools get theirs), kills that node process with SIGKILL once the sleep
 * runs, and says whether the sleep went with it within 5 s. Whatever is left is killed.
 */
async function killParentOfSleep(dieWithParent: boolean): Promise<{ goneWithParent: boolean; parentWasNode: boolean; exe: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'virtkm-run-tool-'));
  const marker = sleepMarker();
  let sleeper: number | undefined;
  const node = spawn(process.execPath, [join(dir, 'parent.mjs')], { stdio: ['ignore', 'ignore', 'inherit'] });
  try {
    const runToolUrl = new URL('../../shared/src/run-tool.js', import.meta.url).href;
    await writeFile(
      join(dir, 'parent.mjs'),
      `import { runTool } from ${JSON.stringify(runToolUrl)};\n` +
        `await runTool('sleep', [${JSON.stringify(marker)}], { fds: [Buffer.from('secret')], dieWithParent: ${dieWithParent} });\n`,
    );
    sleeper = await waitForPid(marker, 10_000);
    const ppid = Number(/^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${sleeper}/status`, 'latin1'))?.[1]);
    // Running a while first: nothing but the parent's death may end it (no thread of
    // libuv's that exits early, no timer of runTool).
    await sleep(1000);
    if (!alive(sleeper)) throw new Error('the tool died while its parent was alive');
    // Read only now: the process is found by its arguments, which setpriv carries too
    // for the instant before it execs the tool.
    const exe = readlinkSync(`/proc/${sleeper}/exe`);
    node.kill('SIGKILL');
    const goneWithParent = await waitUntilGone(sleeper, 5000);
    return { goneWithParent, parentWasNode: ppid === node.pid, exe };
  } finally {
    node.kill('SIGKILL');
    for (const pid of sleeper === undefined ? pidsWithArg(marker) : [sleeper, ...pidsWithArg(marker)]) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Gone already.
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
}

(pdeathSupported ? test : test.skip)(`a tool dies with its parent process, even one killed with SIGKILL; without dieWithParent it would not${pdeathSupported ? '' : ' [skipped: /usr/bin/setpriv with --pdeathsig is not available here (util-linux)]'}`, async (t) => {
  const wrapped = await killParentOfSleep(true);
  t.true(wrapped.parentWasNode, 'setpriv exec()s the tool in place: the tool is the direct child');
  t.regex(wrapped.exe, /\/sleep$/, 'the running process is the tool itself, not the wrapper');
  t.true(wrapped.goneWithParent, 'the tool was killed within 5 s of its parent');

  // The control: the same run without the wrapper leaves an orphan (so the test above can fail).
  const bare = await killParentOfSleep(false);
  t.false(bare.goneWithParent, 'without dieWithParent the tool outlives its parent');
});

test('through the wrapper, a timeout and an abort still kill the tool itself, and fds still arrive', async (t) => {
  const marker = sleepMarker();
  const err = await rejection(runTool('sleep', [marker], { timeoutMs: 300, killGraceMs: 300 }));
  t.regex(err.message, /timed out/);
  t.deepEqual(pidsWithArg(marker), [], 'the sleep is gone when the call settles');

  const marker2 = sleepMarker();
  const controller = new AbortController();
  const run = runTool('sleep', [marker2], { signal: controller.signal, fds: [Buffer.from('x')] });
  const pid = await waitForPid(marker2);
  t.regex(readlinkSync(`/proc/${pid}/exe`), /\/sleep$/);
  controller.abort();
  t.is((await rejection(run)).kind, 'unavailable');
  t.false(alive(pid), 'the aborted sleep is gone when the call settles');

  const secret = Buffer.from([0x00, 0x0a, 0xff]);
  const r = await runTool('od', ['-An', '-tx1', '-v', '/dev/fd/3'], { fds: [secret], dieWithParent: true });
  t.is(odHex(r.stdout), '000aff');
});

test('a file that is not executable is permission_denied, before and through the wrapper', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'virtkm-run-tool-'));
  try {
    const file = join(dir, 'not-executable');
    await writeFile(file, '#!/bin/sh\nexit 0\n');
    await chmod(file, 0o644);
    for (const dieWithParent of [true, false]) {
      const err = await rejection(runTool(file, [], { dieWithParent }));
      // root may execute any file with an x bit only: 0644 has none.
      t.is(err.kind, 'permission_denied', `dieWithParent ${dieWithParent}`);
    }
    const missing = await rejection(runTool('virtkm-no-such-tool', [], { dieWithParent: false }));
    t.is(missing.kind, 'unavailable');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
