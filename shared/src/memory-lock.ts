/**
 * Locking all of a Node process's memory: mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
 * for virtkm-server and virtkm-agent, so that no page of theirs (keys, and the transient
 * copies of secrets in the V8 heap, OpenSSL, libsodium's memory) is ever written to swap.
 *
 * The obstacle: V8 (Node 20) gives freed heap pages back with madvise(MADV_DONTNEED) or
 * MADV_FREE and aborts when that fails; Linux refuses both on locked pages (EINVAL). So a
 * plain mlockall() kills the process at the first garbage collection that frees pages
 * (test/unit/process-hygiene.test.ts keeps a probe of that).
 *
 * The way around it: a tiny preloaded library, shared/native/madvise-locked.c, built into
 * dist/native/libvirtkm-madvise-locked.so by `npm run build` (scripts/build-native.mjs).
 * It retries a madvise that the kernel refused with EINVAL as MADV_DONTNEED_LOCKED (Linux
 * 5.18+), which discards locked pages; with MCL_ONFAULT they are locked again when V8
 * touches them next. A preload must be in place when the process starts, so the `run`
 * commands call relaunchWithMadviseShim() first: when the library is not loaded yet, it
 * replaces the process image with execve(2) - same pid, same file descriptors, same
 * command line - adding the library to LD_PRELOAD. Nothing has been read or opened at that
 * point (no secret, no database, no socket), and the environment gains only the library's
 * path and a marker that stops a second relaunch.
 *
 * Then lockAllMemory() (called by hardenProcess) locks everything, present and future.
 * MCL_ONFAULT keeps the kernel from populating V8's large reservations up front: a page is
 * locked when it is first touched, i.e. whenever it holds anything. VmLck in
 * /proc/<pid>/status then counts the locked mappings' whole size (GBs of V8 reservations),
 * and "Locked" in /proc/<pid>/smaps_rollup equals "Rss": every resident page is locked.
 *
 * Modes (`--memory-lock`): `auto` (default) locks when it can and warns when it cannot
 * (no CAP_IPC_LOCK with a finite RLIMIT_MEMLOCK, the library not built, a kernel without
 * MADV_DONTNEED_LOCKED, probed on a locked scratch page before relaunching and locking); `require` refuses to start unless memory is locked; `off` leaves
 * memory as it is (the key arena of locked-memory.ts is still used).
 *
 * Why a finite RLIMIT_MEMLOCK is not tried: mlockall counts the whole size of every
 * mapping against the limit, and with MCL_FUTURE a later mmap beyond it fails, which V8
 * answers with an out-of-memory abort. So memory is locked only with CAP_IPC_LOCK (root,
 * or a systemd unit with AmbientCapabilities=CAP_IPC_LOCK) or LimitMEMLOCK=infinity.
 */
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { errors } from './errors.js';

/** How the run commands treat memory locking. */
export type MemoryLockMode = 'auto' | 'require' | 'off';
/** The accepted values of --memory-lock, for option parsing. */
export const MEMORY_LOCK_MODES: readonly MemoryLockMode[] = ['auto', 'require', 'off'];

/** Parses --memory-lock (default auto). */
export function parseMemoryLockMode(value: string | undefined): MemoryLockMode {
  const mode = (value ?? 'auto') as MemoryLockMode;
  if (!MEMORY_LOCK_MODES.includes(mode)) throw errors.invalid(`--memory-lock must be one of ${MEMORY_LOCK_MODES.join(', ')}`);
  return mode;
}

/** mlockall flags (Linux). */
export const MCL_CURRENT = 1;
/** See MCL_CURRENT. */
export const MCL_FUTURE = 2;
/** See MCL_CURRENT. */
export const MCL_ONFAULT = 4;

const KERNEL_REASON = 'this kernel has no MADV_DONTNEED_LOCKED (Linux 5.18 or later is needed for V8 to run with locked memory)';

/** Environment marker of a relaunched process (its value is the library's path). */
export const RELAUNCH_MARKER = 'VIRTKM_MADVISE_SHIM';

const CAP_IPC_LOCK = 14;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_PRIVATE = 2;
const MAP_ANONYMOUS = 0x20;
const MAP_FAILED = 2n ** 64n - 1n;
/** Linux 5.18+: discard pages even when they are locked. */
const MADV_DONTNEED_LOCKED = 24;
const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/** Where `npm run build` puts the library (dist/native/, next to dist/shared/). */
export function madviseShimPath(): string {
  return fileURLToPath(new URL('../../native/libvirtkm-madvise-locked.so', import.meta.url));
}

interface Libc {
  mlockall: (flags: number) => number;
  /** Whether this kernel knows MADV_DONTNEED_LOCKED (probed on a locked scratch page). */
  discardsLockedPages: () => boolean;
  execve: (path: string, argv: (string | null)[], envp: (string | null)[]) => number;
  fcntl: (fd: number, cmd: number, arg: number) => number;
  errno: () => number;
}

/**
 * libc through koffi, loaded once (undefined where it cannot be: memory then stays
 * unlocked, with the reason logged).
 */
const koffiLib = await (async () => {
  try {
    return (await import('koffi')).default;
  } catch {
    return undefined;
  }
})();
const libc: Libc | undefined = (() => {
  if (!koffiLib) return undefined;
  try {
    const lib = koffiLib.load('libc.so.6');
    const fcntl = lib.func('int fcntl(int fd, int cmd, ...)');
    const mmap = lib.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)');
    const munmap = lib.func('int munmap(void *addr, size_t length)');
    const mlock = lib.func('int mlock(void *addr, size_t length)');
    // libc's own madvise, not the preloaded one: the probe must see the kernel's answer.
    const madvise = lib.func('int madvise(void *addr, size_t length, int advice)');
    return {
      mlockall: lib.func('int mlockall(int flags)') as (flags: number) => number,
      discardsLockedPages: () => {
        const page = 4096;
        const addr: unknown = mmap(null, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (addr === null || koffiLib.address(addr) === MAP_FAILED) return false;
        try {
          if ((mlock(addr, page) as number) !== 0) return false;
          return (madvise(addr, page, MADV_DONTNEED_LOCKED) as number) === 0;
        } finally {
          munmap(addr, page);
        }
      },
      execve: lib.func('int execve(const char *path, const char **argv, const char **envp)') as Libc['execve'],
      fcntl: (fd, cmd, arg) => fcntl(fd, cmd, 'int', arg) as number,
      errno: () => koffiLib.errno(),
    };
  } catch {
    return undefined;
  }
})();

function readProc(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** Whether the kernel can discard locked pages (MADV_DONTNEED_LOCKED, Linux 5.18+). */
export function kernelDiscardsLockedPages(): boolean {
  return libc?.discardsLockedPages() ?? false;
}

/** Whether the library is mapped into this process (it was preloaded). */
export function madviseShimLoaded(path = madviseShimPath()): boolean {
  let real: string;
  try {
    real = realpathSync(path);
  } catch {
    return false;
  }
  return readProc('/proc/self/maps')
    .split('\n')
    .some((line) => line.endsWith(` ${real}`));
}

/**
 * Whether this process may lock all of its memory without a limit: CAP_IPC_LOCK in its
 * effective set, or an unlimited RLIMIT_MEMLOCK.
 */
export function mayLockUnlimited(): boolean {
  const capEff = /^CapEff:\s+([0-9a-f]+)$/m.exec(readProc('/proc/self/status'))?.[1];
  if (capEff !== undefined && ((BigInt(`0x${capEff}`) >> BigInt(CAP_IPC_LOCK)) & 1n) === 1n) return true;
  return /^Max locked memory\s+unlimited\s/m.test(readProc('/proc/self/limits'));
}

/** Why no relaunch happened (undefined: the library is already loaded). */
export interface RelaunchOutcome {
  reason?: string;
}

/**
 * Makes sure the madvise library is preloaded: when it is not, re-executes this process
 * with it (never returns then). Returns when no relaunch is needed or possible, with the
 * reason in the latter case. Call it first thing in a `run` command, before anything is
 * read, opened or written.
 */
export function relaunchWithMadviseShim(mode: MemoryLockMode): RelaunchOutcome {
  if (mode === 'off') return { reason: 'memory locking is off (--memory-lock off)' };
  if (process.platform !== 'linux') return { reason: 'memory locking needs Linux' };
  const shim = madviseShimPath();
  if (madviseShimLoaded(shim)) return {};
  if (process.env[RELAUNCH_MARKER] !== undefined) return { reason: `the process was relaunched with ${shim} in LD_PRELOAD, but the library is not loaded (is it built for this machine?)` };
  if (!existsSync(shim)) return { reason: `${shim} is missing (built by \`npm run build\` with a C compiler)` };
  if (!mayLockUnlimited()) return { reason: 'no CAP_IPC_LOCK and RLIMIT_MEMLOCK is finite' };
  const c = libc;
  if (!c) return { reason: 'libc cannot be loaded through koffi' };
  if (!c.discardsLockedPages()) return { reason: KERNEL_REASON };

  // Node marks its standard streams close-on-exec; the new image must keep them.
  for (const fd of [0, 1, 2]) {
    const flags = c.fcntl(fd, F_GETFD, 0);
    if (flags >= 0 && (flags & FD_CLOEXEC) !== 0) c.fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
  }
  const preload = [shim, ...(process.env['LD_PRELOAD'] ?? '').split(/[:\s]+/).filter((p) => p !== '' && p !== shim)].join(':');
  const env = { ...process.env, LD_PRELOAD: preload, [RELAUNCH_MARKER]: shim };
  const envp = Object.entries(env)
    .filter((e): e is [string, string] => e[1] !== undefined)
    .map(([k, v]) => `${k}=${v}`);
  const argv = [process.execPath, ...process.execArgv, ...process.argv.slice(1)];
  c.execve(process.execPath, [...argv, null], [...envp, null]);
  // Only reached when execve failed; the process goes on unlocked.
  return { reason: `execve failed (errno ${c.errno()})` };
}

/** The outcome of lockAllMemory. */
export interface MemoryLockResult {
  locked: boolean;
  /** Why memory is not locked (when locked is false). */
  reason?: string;
}

/**
 * mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), but only where it is safe: the lock is
 * not limited (else a later mmap would fail), the kernel can discard locked pages and the
 * madvise library is loaded (else V8 would abort). Never throws.
 */
export function lockAllMemory(mode: MemoryLockMode): MemoryLockResult {
  if (mode === 'off') return { locked: false, reason: 'memory locking is off (--memory-lock off)' };
  if (process.platform !== 'linux') return { locked: false, reason: 'memory locking needs Linux' };
  // The privilege first: it is the most common reason, and the one an operator can fix.
  if (!mayLockUnlimited()) return { locked: false, reason: 'no CAP_IPC_LOCK and RLIMIT_MEMLOCK is finite' };
  const c = libc;
  if (!c) return { locked: false, reason: 'libc cannot be loaded through koffi' };
  if (!c.discardsLockedPages()) return { locked: false, reason: KERNEL_REASON };
  if (!madviseShimLoaded()) {
    return { locked: false, reason: `${madviseShimPath()} is not preloaded (V8 cannot run with locked memory without it)` };
  }
  if (c.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) !== 0) return { locked: false, reason: `mlockall failed (errno ${c.errno()})` };
  return { locked: true };
}

/**
 * How often the library turned a refused madvise into MADV_DONTNEED_LOCKED in this process
 * (-1 when it is not loaded): a diagnostic, and the tests' proof that V8's discards went
 * through it.
 */
export function madviseShimRetries(): number {
  if (!koffiLib || !madviseShimLoaded()) return -1;
  try {
    // The library is already mapped: dlopen returns the same instance and counter.
    const fn = koffiLib.load(madviseShimPath()).func('unsigned long virtkm_madvise_locked_retries(void)');
    return Number(fn());
  } catch {
    return -1;
  }
}
