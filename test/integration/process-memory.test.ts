/**
 * The real virtkm-server and virtkm-agent processes, checked from outside: locked memory
 * (VmLck in /proc/<pid>/status) and non-dumpability.
 *
 * Locked memory: with CAP_IPC_LOCK (root here) the services relaunch themselves with the
 * madvise library and lock all of their memory (shared/src/memory-lock.ts): "Locked"
 * equals "Pss" in /proc/<pid>/smaps_rollup, VmLck covers every mapping (more than VmRSS),
 * and the pid stays the one that was started. Without it they lock only the arena their
 * keys live in (shared/src/locked-memory.ts): VmLck is one 1 MiB chunk, below VmRSS.
 *
 * Dumpability is not in /proc/<pid>/status, and ownership of /proc/<pid> files says nothing
 * when everything runs as root. The faithful check is what non-dumpability is for: a
 * process of the same user with the same capabilities and no CAP_SYS_PTRACE cannot open
 * /proc/<pid>/mem of a non-dumpable process, and can open that of a dumpable one. As root,
 * both the service and the probe run under `setpriv --bounding-set -sys_ptrace` (the kernel
 * also refuses a probe whose capabilities are not a superset of the target's), and a
 * dumpable process started the same way is the control that proves the probe can succeed.
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { AGENT_BIN, enrollAgent, startAgent, until, type AgentProcess } from '../helpers/agent-harness.js';
import { ensureLibvirtd } from '../helpers/libvirt-harness.js';
import { SERVER_BIN, cli, initDataDir, tempDir } from '../helpers/server-harness.js';
import { madviseShimPath, mayLockUnlimited } from '../../shared/src/memory-lock.js';

const test = anyTest.serial as TestFn;

const isRoot = process.getuid?.() === 0;
const hasSetpriv = spawnSync('sh', ['-c', 'command -v setpriv'], { stdio: 'ignore' }).status === 0;
/** Runs a command with CAP_SYS_PTRACE out of its bounding set (root), or as it is (not root). */
const NO_PTRACE = isRoot ? ['setpriv', '--bounding-set', '-sys_ptrace', '--'] : [];
const skipReason = process.platform !== 'linux' ? 'Linux only' : isRoot && !hasSetpriv ? 'setpriv (util-linux) is missing' : undefined;
const probeTest = skipReason ? anyTest.skip : test;
const note = skipReason ? ` [skipped: ${skipReason}]` : '';

interface ProcStatus {
  vmLckKb: number;
  vmRssKb: number;
  capPrm: string;
  /** From smaps_rollup: the proportional set size and how much of it is locked. */
  pssKb: number;
  lockedKb: number;
}

function procStatus(pid: number): ProcStatus {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (text: string, field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(text)?.[1] ?? -1);
  return { vmLckKb: kb(s, 'VmLck'), vmRssKb: kb(s, 'VmRSS'), capPrm: /^CapPrm:\s+(\w+)$/m.exec(s)?.[1] ?? '', pssKb: kb(rollup, 'Pss'), lockedKb: kb(rollup, 'Locked') };
}

/** Whether the services can lock all memory here (see shared/src/memory-lock.ts). */
const wholeLock = existsSync(madviseShimPath()) && mayLockUnlimited();

/** Whether a process of this user without CAP_SYS_PTRACE can open /proc/<pid>/mem. */
function probeCanOpenMem(pid: number): { opened: boolean; stderr: string } {
  const argv = [...NO_PTRACE, 'sh', '-c', 'exec 3< "/proc/$1/mem" && echo opened', 'sh', String(pid)];
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', timeout: 10_000 });
  return { opened: r.status === 0 && r.stdout.includes('opened'), stderr: r.stderr ?? '' };
}

/** A dumpable process started like the services (the control of the probe). */
function startControl(): ChildProcess {
  const argv = [...NO_PTRACE, 'sleep', '60'];
  return spawn(argv[0]!, argv.slice(1), { stdio: 'ignore' });
}

/** Waits for a JSON line with event "ready" on stdout; rejects when the process exits first. */
function waitReady(proc: ChildProcess, logs: () => string, timeoutMs: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`not ready after ${timeoutMs} ms: ${logs()}`)), timeoutMs);
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.includes('"event":"ready"'));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line) as Record<string, unknown>);
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`exited with ${String(code)}: ${logs()}`));
    });
  });
}

async function stop(proc: ChildProcess | undefined): Promise<void> {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000);
  await exited;
  clearTimeout(timer);
}

/** The checks shared by both services. */
function checkHardened(t: ExecutionContext, what: string, pid: number, controlPid: number): void {
  const st = procStatus(pid);
  t.log(`${what}: VmLck ${st.vmLckKb} kB, VmRSS ${st.vmRssKb} kB, Locked ${st.lockedKb} kB of Pss ${st.pssKb} kB`);
  if (wholeLock) {
    t.true(st.lockedKb >= st.pssKb - 64, `${what}: every resident page is locked (mlockall): Locked ${st.lockedKb} kB, Pss ${st.pssKb} kB`);
    t.true(st.vmLckKb > st.vmRssKb, `${what}: VmLck covers all mappings`);
    t.true(readFileSync(`/proc/${pid}/maps`, 'utf8').includes('libvirtkm-madvise-locked.so'), `${what} runs with the madvise library`);
  } else {
    t.log('memory cannot be locked as a whole here (no CAP_IPC_LOCK or the library is not built): checking the key arena only');
    t.true(st.vmLckKb >= 1024, `${what} has locked memory (its key arena): VmLck ${st.vmLckKb} kB`);
    t.true(st.vmLckKb < st.vmRssKb, `${what} is not locked as a whole`);
  }
  if (isRoot) t.is(st.capPrm, procStatus(controlPid).capPrm, 'service and control have the same capabilities');
  const control = probeCanOpenMem(controlPid);
  t.true(control.opened, `the probe opens /proc/<pid>/mem of a dumpable process: ${control.stderr}`);
  const probe = probeCanOpenMem(pid);
  t.false(probe.opened, `${what}'s /proc/<pid>/mem must not open: it is not dumpable`);
  t.regex(probe.stderr, /Permission denied/);
}

probeTest(`virtkm-server: memory locked (all of it with CAP_IPC_LOCK, else its key arena), not dumpable (its /proc/<pid>/mem refused to a same-user process)${note}`, async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  initDataDir(data);
  let server: ChildProcess | undefined;
  const control = startControl();
  let logs = '';
  try {
    const argv = [...NO_PTRACE, process.execPath, SERVER_BIN, 'run', '--data-dir', data, '--listen', '127.0.0.1:0', '--enroll-listen', '127.0.0.1:0'];
    server = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    server.stderr!.on('data', (d: Buffer) => (logs += d.toString()));
    const ready = await waitReady(server, () => logs, 60_000);
    t.is(ready['pid'], server.pid, 'setpriv exec()s the server: the pid is the server');
    checkHardened(t, 'virtkm-server', server.pid!, control.pid!);
    t.regex(logs, wholeLock ? /"msg":"starting".*"dumpable":false,"memory_locked":true/ : /"msg":"starting".*"dumpable":false/);
  } finally {
    await stop(server);
    control.kill();
    dir.remove();
  }
});

const libvirt = skipReason ? undefined : await ensureLibvirtd();
const agentSkip = skipReason ?? libvirt?.skipReason;
const agentTest = agentSkip ? anyTest.skip : test;

agentTest(`virtkm-agent: memory locked (all of it with CAP_IPC_LOCK, else its key arena), not dumpable, its own keyring in a private session${agentSkip ? ` [skipped: ${agentSkip}]` : ''}`, async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  initDataDir(data);
  let server: ChildProcess | undefined;
  let agent: AgentProcess | undefined;
  const control = startControl();
  let logs = '';
  try {
    server = spawn(process.execPath, [SERVER_BIN, 'run', '--data-dir', data, '--listen', '127.0.0.1:0', '--enroll-listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'] });
    server.stderr!.on('data', (d: Buffer) => (logs += d.toString()));
    const ready = await waitReady(server, () => logs, 60_000);
    const address = String(ready['listen']);
    const admin = (...args: string[]) => cli(['--server', address, '--credentials', join(data, 'admin.pem'), ...args]);
    const state = await enrollAgent(admin, String(ready['enroll']), dir.path, 'hv-memory');
    agent = startAgent(state, join(dir.path, 'images'), address, NO_PTRACE);
    const a = agent;
    await until(
      'agent ready',
      () => {
        if (a.proc.exitCode !== null) throw new Error(`agent exited: ${a.logs()}`);
        return a.logs().includes('"event":"ready"');
      },
      90_000,
    );
    t.true(a.proc.pid !== undefined && readFileSync(`/proc/${a.proc.pid}/cmdline`, 'utf8').includes(AGENT_BIN.split('/').pop()!), 'setpriv exec()s the agent');
    checkHardened(t, 'virtkm-agent', a.proc.pid!, control.pid!);
    t.regex(a.logs(), wholeLock ? /"msg":"starting".*"dumpable":false,"memory_locked":true,"secrets_locked":true/ : /"msg":"starting".*"dumpable":false.*"secrets_locked":true/);

    // Its keyring: created (the log names it), listed in /proc/keys, and out of reach of
    // this process, which is in another session.
    const id = Number(/"msg":"kernel keyring ready"[^\n]*"keyring":(\d+)/.exec(a.logs())?.[1]);
    t.true(id > 0, a.logs());
    const hex = id.toString(16).padStart(8, '0');
    t.regex(readFileSync('/proc/keys', 'utf8'), new RegExp(`^${hex} .* keyring +virtkm-agent: `, 'm'));
    const search = spawnSync('keyctl', ['search', '@s', 'keyring', 'virtkm-agent'], { encoding: 'utf8' });
    if (search.error) t.log('keyctl is not installed: the session check is left out');
    else t.not(Number(search.stdout.trim()), id, 'the agent keyring is not in this session');
  } finally {
    if (agent) await stop(agent.proc);
    await stop(server);
    control.kill();
    dir.remove();
  }
});
