/**
 * The one helper that runs host tools (qemu-img, qemu-io, cryptsetup, virsh, ...).
 *
 * Rules it enforces:
 * - An argument array and execve, never a shell: nothing in an argument is ever parsed as
 *   shell syntax.
 * - Secrets travel only on stdin or on extra pipes (fd 3, 4, ...), never in argv, in the
 *   environment or in a temporary file: argv and environ are readable by other processes
 *   of the same user through /proc/PID/cmdline and /proc/PID/environ, files outlive crashes.
 * - A fixed, minimal environment (PATH, LANG=C, LC_ALL=C) so that output and tool lookup do
 *   not depend on the caller's environment, and nothing of ours (tokens, config) leaks in.
 * - Cancellation (AbortSignal) and a timeout kill the child: SIGTERM, then SIGKILL after a
 *   grace period. The promise settles only once the child is gone, so a caller that cleans
 *   up after a failure never races the tool.
 * - Captured stdout/stderr are bounded; the rest is read and dropped so the child never
 *   blocks on a full pipe.
 * - A missing binary is a DomainError 'unavailable' with a hint naming the Debian package.
 * - The child dies with us (dieWithParent, on by default): a tool outliving a kill -9 of the
 *   agent would keep its image locks and go on writing while the restarted agent resumes
 *   the same work. See "Parent death" below.
 *
 * Ownership of secret buffers: runTool writes `stdin` and `fds` as they are and does NOT
 * wipe them. The caller owns them and wipes them, but only after the returned promise has
 * settled (until then the bytes may still be in flight to the child).
 *
 * Why extra fds are real pipes made with pipe2(2) (through koffi) instead of Node's 'pipe'
 * stdio: Node/libuv creates socketpairs for 'pipe' stdio, and open("/dev/fd/3") of a socket
 * fails with ENXIO, while tools such as QEMU read secrets with `file=/dev/fd/3`, which
 * opens the path. stdin stays a Node pipe: tools read fd 0 with read(2), which sockets allow.
 *
 * Parent death: Linux delivers a chosen signal to a process when the thread that forked it
 * exits (prctl PR_SET_PDEATHSIG), however that happens, SIGKILL included. It must be set in
 * the child between fork and exec, where Node runs no code of ours, so the tool is started
 * through util-linux's `setpriv --pdeathsig KILL -- TOOL ARGS` (util-linux is Essential in
 * Debian): setpriv sets it and execs the tool in place, same pid (kill() reaches the tool),
 * fds 0-2 and the extra pipes kept, argv the tool's own. libuv forks on the thread running
 * the event loop, the main thread of a process (ava runs test files in processes here):
 * it exits only with the process. The setting is not inherited across fork, so a tool that
 * daemonizes on purpose (swtpm --daemon) still outlives us, and it is dropped on exec of a
 * set-user-ID binary (none of ours). Left open: a parent that dies between the fork and
 * setpriv's prctl (microseconds) leaves that one child running, as before. Where setpriv is
 * missing or lacks --pdeathsig the tool runs directly (parentDeathSupported says which).
 * Because setpriv, not libuv, then runs execvp, the binary is looked up in TOOL_ENV's PATH
 * here first, so that a missing tool is still reported as such.
 */
import { spawn } from 'node:child_process';
import { close as closeFd, constants as fsConstants, write as writeFd } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { basename, join } from 'node:path';
import { DomainError } from './errors.js';
import type { ErrorKind } from './errors.js';

/** Options of runTool. */
export interface RunToolOptions {
  /** Bytes written to the child's stdin, which is then closed. Without it stdin is /dev/null. */
  stdin?: Uint8Array;
  /**
   * Extra pipes: fds[0] is readable by the child as fd 3 (/dev/fd/3), fds[1] as fd 4, and
   * so on. Each is written in full, then closed (the child sees EOF).
   */
  fds?: Uint8Array[];
  /** Aborting kills the child; the call then rejects with DomainError 'unavailable'. */
  signal?: AbortSignal;
  /** Kills the child after this many milliseconds (default: no limit). */
  timeoutMs?: number;
  /** Bytes of stdout and of stderr kept, each (default 1 MiB); the rest is dropped. */
  maxOutputBytes?: number;
  /** Time between SIGTERM and SIGKILL when the child is killed (default 3000 ms). */
  killGraceMs?: number;
  /** Debian package named in the hint when the binary is missing (default from TOOL_PACKAGES). */
  debianPackage?: string;
  /**
   * Captures stdout as bytes (ToolResult.stdoutBytes) instead of text, for tools that print
   * a secret (tpm2_unseal): no string copy is made, the chunks read are zeroed once copied,
   * and the caller owns and wipes stdoutBytes. `stdout` is then ''.
   */
  binaryStdout?: boolean;
  /**
   * Called with every chunk of stdout as it arrives (progress lines of long runs, e.g.
   * `cryptsetup reencrypt --progress-json`); the chunk is captured as usual as well.
   */
  onStdout?: (chunk: Buffer) => void;
  /**
   * Kill the child with SIGKILL when this process dies, even of kill -9 (default true; see
   * "Parent death" in the module comment). false only for a tool that must outlive us.
   */
  dieWithParent?: boolean;
}

/** What a finished tool run produced. */
export interface ToolResult {
  /** Exit status; 128 + signal number when the child died of a signal (shell convention). */
  code: number;
  /** Captured stdout (UTF-8), at most maxOutputBytes bytes of it. */
  stdout: string;
  /** Captured stderr (UTF-8), at most maxOutputBytes bytes of it. */
  stderr: string;
  /** True when stdout or stderr was longer than maxOutputBytes and was cut. */
  truncated: boolean;
  /** With binaryStdout: the captured stdout bytes, in a buffer of their own (the caller wipes it). */
  stdoutBytes?: Buffer;
}

/** The signature of runTool, for dependency injection (fakes in tests). */
export type RunTool = (file: string, args: readonly string[], options?: RunToolOptions) => Promise<ToolResult>;

/** The environment every tool runs with, and nothing else. */
export const TOOL_ENV: Readonly<Record<string, string>> = Object.freeze({
  PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  LANG: 'C',
  LC_ALL: 'C',
});

/** Debian packages that provide the tools virtkm runs, for the "missing binary" hint. */
export const TOOL_PACKAGES: Readonly<Record<string, string>> = Object.freeze({
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  cryptsetup: 'cryptsetup-bin',
  dmsetup: 'dmsetup',
  losetup: 'mount',
  virsh: 'libvirt-clients',
  keyctl: 'keyutils',
  swtpm: 'swtpm',
  'softhsm2-util': 'softhsm2',
});

const DEFAULT_MAX_OUTPUT = 1 << 20;
const DEFAULT_KILL_GRACE_MS = 3000;
/** O_CLOEXEC on Linux (x86_64 and arm64): our copies of the pipe ends never reach children. */
const O_CLOEXEC = 0o2000000;

/** util-linux's setpriv, the wrapper that sets the parent-death signal (module comment). */
const SETPRIV = '/usr/bin/setpriv';
/** Time allowed to the one-off check of setpriv. */
const SETPRIV_PROBE_MS = 10_000;

let setprivProbe: Promise<boolean> | undefined;

/**
 * Whether tools started with dieWithParent (the default) really die with this process:
 * setpriv exists here and accepts --pdeathsig. Checked once, by running
 * `setpriv --pdeathsig KILL -- true`; the agent may log a warning when it is false.
 */
export function parentDeathSupported(): Promise<boolean> {
  setprivProbe ??= new Promise<boolean>((resolve) => {
    if (process.platform !== 'linux') {
      resolve(false);
      return;
    }
    let child;
    try {
      child = spawn(SETPRIV, ['--pdeathsig', 'KILL', '--', 'true'], { stdio: 'ignore', env: { ...TOOL_ENV }, shell: false });
    } catch {
      resolve(false);
      return;
    }
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      resolve(false);
    }, SETPRIV_PROBE_MS);
    timer.unref();
    child.once('error', () => {
      clearTimeout(timer);
      resolve(false);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve(code === 0);
    });
  });
  return setprivProbe;
}

/**
 * The path execvp would run for `file` in TOOL_ENV's PATH (or `file` itself when it holds a
 * slash). Rejects with an ENOENT or EACCES error, as spawn would report it.
 */
async function resolveExecutable(file: string): Promise<string> {
  const candidates = file.includes('/') ? [file] : (TOOL_ENV['PATH'] ?? '').split(':').filter((d) => d !== '').map((d) => join(d, file));
  let denied: NodeJS.ErrnoException | undefined;
  for (const candidate of candidates) {
    try {
      if (!(await stat(candidate)).isFile()) {
        denied ??= Object.assign(new Error(`${candidate} is not a file`), { code: 'EACCES' });
        continue;
      }
      await access(candidate, fsConstants.X_OK);
      return candidate;
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code === 'EACCES') denied ??= e;
    }
  }
  throw denied ?? Object.assign(new Error(`${file} not found`), { code: 'ENOENT' });
}

/** pipe2(2) through koffi, loaded on first use only (no import-time side effects). */
let pipe2Loader: Promise<((fds: Int32Array, flags: number) => number) | undefined> | undefined;

function loadPipe2(): Promise<((fds: Int32Array, flags: number) => number) | undefined> {
  pipe2Loader ??= (async () => {
    try {
      const koffi = (await import('koffi')).default;
      const fn = koffi.load('libc.so.6').func('int pipe2(int *fds, int flags)');
      return (fds: Int32Array, flags: number) => fn(fds, flags) as number;
    } catch {
      return undefined;
    }
  })();
  return pipe2Loader;
}

/** Creates `count` close-on-exec pipes: [readEnd, writeEnd] each. */
async function makePipes(tool: string, count: number): Promise<[number, number][]> {
  if (count === 0) return [];
  const pipe2 = await loadPipe2();
  if (!pipe2) {
    throw new DomainError('unavailable', `cannot create a pipe for ${tool}`, { hint: 'the koffi module or libc.so.6 cannot be loaded' });
  }
  const pipes: [number, number][] = [];
  for (let i = 0; i < count; i++) {
    const ends = new Int32Array(2);
    if (pipe2(ends, O_CLOEXEC) !== 0) {
      closeAll(pipes.flat());
      throw new DomainError('resource_exhausted', `cannot create a pipe for ${tool}`);
    }
    pipes.push([ends[0] ?? -1, ends[1] ?? -1]);
  }
  return pipes;
}

function closeAll(fds: number[]): void {
  for (const fd of fds) closeFd(fd, () => undefined);
}

/** Writes all bytes to a blocking pipe fd (in libuv's thread pool), then closes it. EPIPE is not an error: the child chose not to read. */
function writeAllAndClose(fd: number, bytes: Uint8Array): Promise<void> {
  return new Promise((resolve) => {
    const step = (offset: number): void => {
      if (offset >= bytes.length) {
        closeFd(fd, () => resolve());
        return;
      }
      writeFd(fd, bytes, offset, bytes.length - offset, null, (err, written) => {
        if (err) closeFd(fd, () => resolve());
        else step(offset + written);
      });
    };
    step(0);
  });
}

/** Collects up to `max` bytes of a stream, reading and dropping the rest. */
class BoundedSink {
  private readonly chunks: Buffer[] = [];
  private kept = 0;
  truncated = false;

  constructor(private readonly max: number) {}

  push(chunk: Buffer): void {
    const room = this.max - this.kept;
    if (chunk.length > room) this.truncated = true;
    if (room <= 0) return;
    const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
    this.chunks.push(part);
    this.kept += part.length;
  }

  text(): string {
    return Buffer.concat(this.chunks).toString('utf8');
  }

  /** The kept bytes in one unpooled buffer; every chunk read is zeroed (secret output). */
  bytes(): Buffer {
    const out = Buffer.allocUnsafeSlow(this.kept);
    let offset = 0;
    for (const c of this.chunks) {
      out.set(c, offset);
      offset += c.length;
    }
    this.wipeChunks();
    return out;
  }

  /** Zeroes the chunks kept so far. */
  wipeChunks(): void {
    for (const c of this.chunks) c.fill(0);
    this.chunks.length = 0;
    this.kept = 0;
  }
}

/** A copy of a chunk in memory of its own (not a view of Node's buffer pool). */
function ownedChunk(c: Buffer): Buffer {
  const copy = Buffer.allocUnsafeSlow(c.length);
  copy.set(c);
  return copy;
}

function signalNumber(signal: NodeJS.Signals): number {
  return (osConstants.signals as Record<string, number | undefined>)[signal] ?? 0;
}

/**
 * Runs `file` with `args` (no shell) in the fixed environment TOOL_ENV and returns its exit
 * code and output. A non-zero exit is not an error here: the caller maps it with toolError.
 * Rejects with DomainError 'unavailable' when the binary is missing, on timeout and on abort
 * (after the child is gone). Never puts stdin or fds bytes anywhere but into the pipes, and
 * never wipes them (see the module comment).
 */
export async function runTool(file: string, args: readonly string[], options: RunToolOptions = {}): Promise<ToolResult> {
  const tool = basename(file);
  const { signal, timeoutMs } = options;
  const maxOutput = options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT;
  const killGraceMs = options.killGraceMs ?? DEFAULT_KILL_GRACE_MS;
  if (signal?.aborted) throw new DomainError('unavailable', `${tool} was cancelled`, { cause: signal.reason });

  // With the wrapper, setpriv (not libuv) looks the tool up: do it here first, so that a
  // missing binary is reported as such instead of as setpriv's exit 127.
  let command = file;
  let argv = [...args];
  if ((options.dieWithParent ?? true) && (await parentDeathSupported())) {
    try {
      argv = ['--pdeathsig', 'KILL', '--', await resolveExecutable(file), ...args];
    } catch (e) {
      throw spawnFailure(tool, e as NodeJS.ErrnoException, options.debianPackage);
    }
    command = SETPRIV;
  }
  if (signal?.aborted) throw new DomainError('unavailable', `${tool} was cancelled`, { cause: signal.reason });

  const extra = options.fds ?? [];
  const pipes = await makePipes(tool, extra.length);
  const readEnds = pipes.map(([r]) => r);

  let child;
  try {
    child = spawn(command, argv, {
      stdio: [options.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe', ...readEnds],
      env: { ...TOOL_ENV },
      shell: false,
      windowsHide: true,
    });
  } catch (err) {
    closeAll(pipes.flat());
    throw new DomainError('invalid_argument', `cannot start ${tool}`, { cause: err });
  }
  // The child has its own copies of the read ends now (or failed to start): drop ours so
  // that the child's exit is what ends our writes (EPIPE instead of blocking forever).
  closeAll(readEnds);
  const writes = pipes.map(([, w], i) => writeAllAndClose(w, extra[i] ?? new Uint8Array(0)));

  const out = new BoundedSink(maxOutput);
  const err = new BoundedSink(maxOutput);
  child.stdout?.on('data', (c: Buffer) => {
    // Binary (secret) output: kept in a copy of our own, and the chunk read is zeroed.
    out.push(options.binaryStdout ? ownedChunk(c) : c);
    try {
      options.onStdout?.(c);
    } catch {
      // A failing progress consumer must not stop the tool or leak an exception.
    }
    if (options.binaryStdout) c.fill(0);
  });
  child.stderr?.on('data', (c: Buffer) => err.push(c));
  if (child.stdin && options.stdin) {
    // A child that exits without reading its stdin makes the write fail with EPIPE: fine.
    child.stdin.on('error', () => undefined);
    child.stdin.end(options.stdin);
  }

  let stopReason: DomainError | undefined;
  let killTimer: NodeJS.Timeout | undefined;
  const stop = (reason: DomainError): void => {
    // Once the child has exited on its own, its result stands.
    if (stopReason || child.exitCode !== null || child.signalCode !== null) return;
    stopReason = reason;
    child.kill('SIGTERM');
    killTimer = setTimeout(() => child.kill('SIGKILL'), killGraceMs);
    killTimer.unref();
  };
  const onAbort = (): void => stop(new DomainError('unavailable', `${tool} was cancelled`, { cause: signal?.reason }));
  signal?.addEventListener('abort', onAbort, { once: true });
  // Aborted while the pipes were being made: no 'abort' event will come any more.
  if (signal?.aborted) onAbort();
  const timeoutTimer =
    timeoutMs === undefined ? undefined : setTimeout(() => stop(new DomainError('unavailable', `${tool} timed out after ${timeoutMs} ms`)), timeoutMs);

  try {
    const ended = await new Promise<{ code: number } | { spawnError: NodeJS.ErrnoException }>((resolve) => {
      let exit: { code: number } | undefined;
      let lingerTimer: NodeJS.Timeout | undefined;
      child.once('error', (e: NodeJS.ErrnoException) => {
        // 'error' without a started process (ENOENT, EACCES); a kill() failure after the
        // start also lands here and is followed by 'exit', which settles normally.
        if (child.pid === undefined) resolve({ spawnError: e });
      });
      child.once('exit', (code, sig) => {
        exit = { code: code ?? 128 + (sig ? signalNumber(sig) : 0) };
        // A grandchild may keep stdout/stderr open: do not wait for 'close' forever.
        lingerTimer = setTimeout(() => {
          child.stdout?.destroy();
          child.stderr?.destroy();
          resolve(exit ?? { code: 0 });
        }, 1000);
        lingerTimer.unref();
      });
      child.once('close', () => {
        if (lingerTimer) clearTimeout(lingerTimer);
        if (exit) resolve(exit);
      });
    });
    await Promise.all(writes);
    if ('spawnError' in ended) {
      if (options.binaryStdout) out.wipeChunks();
      throw spawnFailure(tool, ended.spawnError, options.debianPackage);
    }
    if (stopReason) {
      if (options.binaryStdout) out.wipeChunks();
      throw stopReason;
    }
    if (options.binaryStdout) {
      const truncated = out.truncated || err.truncated;
      return { code: ended.code, stdout: '', stderr: err.text(), truncated, stdoutBytes: out.bytes() };
    }
    return { code: ended.code, stdout: out.text(), stderr: err.text(), truncated: out.truncated || err.truncated };
  } finally {
    if (timeoutTimer) clearTimeout(timeoutTimer);
    if (killTimer) clearTimeout(killTimer);
    signal?.removeEventListener('abort', onAbort);
  }
}

function spawnFailure(tool: string, e: NodeJS.ErrnoException, debianPackage: string | undefined): DomainError {
  const pkg = debianPackage ?? TOOL_PACKAGES[tool];
  if (e.code === 'ENOENT') {
    return new DomainError('unavailable', `${tool} is not installed`, {
      hint: pkg ? `install the Debian package ${pkg} (apt-get install ${pkg})` : `install ${tool}`,
      cause: e,
    });
  }
  if (e.code === 'EACCES') return new DomainError('permission_denied', `${tool} cannot be executed`, { cause: e });
  return new DomainError('internal', `cannot start ${tool}`, { cause: e });
}

/** Exit code to error kind, one table per tool (codes not listed map to 'internal'). */
export type ExitCodeTable = Readonly<Partial<Record<number, ErrorKind>>>;

/**
 * cryptsetup's documented exit codes (cryptsetup(8), RETURN CODES): 1 wrong parameters
 * (also "not a LUKS device"), 2 no permission or bad passphrase, 3 out of memory, 4 wrong
 * device specified (missing), 5 device already exists or is busy.
 */
export const CRYPTSETUP_EXIT_KINDS: ExitCodeTable = Object.freeze({
  1: 'invalid_argument',
  2: 'permission_denied',
  3: 'resource_exhausted',
  4: 'not_found',
  5: 'failed_precondition',
});

/** qemu-img and qemu-io exit with 1 on any error: the reason is known only to the caller. */
export const QEMU_EXIT_KINDS: ExitCodeTable = Object.freeze({
  1: 'internal',
});

/** `qemu-img check`: 2 the image is corrupted, 3 leaked clusters, 63 check not supported. */
export const QEMU_IMG_CHECK_EXIT_KINDS: ExitCodeTable = Object.freeze({
  1: 'internal',
  2: 'failed_precondition',
  3: 'failed_precondition',
  63: 'failed_precondition',
});

/** Most of stderr kept in the error's cause (for the log only, never sent to clients). */
const STDERR_IN_CAUSE = 4096;

/**
 * Turns a failed run into a DomainError whose kind comes from the tool's exit-code table.
 * The message names only the tool and the exit code (safe for clients); stderr goes into
 * the cause, which only the log sees.
 */
export function toolError(tool: string, result: ToolResult, table: ExitCodeTable = {}): DomainError {
  const kind: ErrorKind = table[result.code] ?? 'internal';
  const detail = result.stderr.trim().slice(-STDERR_IN_CAUSE);
  return new DomainError(kind, `${tool} failed (exit ${result.code})`, { cause: new Error(detail === '' ? '(no stderr)' : detail) });
}
