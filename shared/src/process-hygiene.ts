/**
 * Process hygiene for processes that hold keys (the server and the host agent).
 *
 * What it does:
 * - prctl(PR_SET_DUMPABLE, 0) through libc (koffi FFI). A non-dumpable process writes no
 *   core dump on a crash (unless fs.suid_dumpable=2, where the dump is root-only), and other
 *   processes of the same user without CAP_SYS_PTRACE can neither ptrace it nor read its
 *   /proc/<pid>/mem or environ.
 * - Locks the memory that holds keys: enableLockedMemory() (shared/src/locked-memory.ts)
 *   maps an mlock'ed, MADV_DONTDUMP arena outside the V8 heap, and secret-bytes'
 *   ownedCopy()/randomSecret() allocate from it from then on. VmLck is then > 0 (1 MiB per
 *   arena chunk).
 *
 * - Locks all of the process's memory (mlockall) when it can: shared/src/memory-lock.ts
 *   explains how (V8 needs a preloaded madvise library for that, which the `run` commands
 *   relaunch themselves with) and when it cannot (no CAP_IPC_LOCK with a finite
 *   RLIMIT_MEMLOCK, the library not built). Where it cannot, copies of secrets that pass
 *   through the V8 heap or other native buffers may reach swap if the machine swaps: run
 *   the service without swap, with encrypted swap, or with systemd's MemorySwapMax=0
 *   (cgroup v2 memory.swap.max); hardenProcess() warns when swap can reach this process.
 */
import { readFileSync } from 'node:fs';
import { errors } from './errors.js';
import { enableLockedMemory } from './locked-memory.js';
import { lockAllMemory, type MemoryLockMode } from './memory-lock.js';
import type { Logger } from './log.js';

/** prctl option: read the dumpable flag. */
export const PR_GET_DUMPABLE = 3;
/** prctl option: set the dumpable flag. */
export const PR_SET_DUMPABLE = 4;

/** The outcome of hardenProcess. */
export interface HardeningResult {
  /** Whether the process is still dumpable afterwards (false = hardened). */
  dumpable: boolean;
  /** Whether all of the process's memory is locked (mlockall, see memory-lock.ts). */
  memoryLocked: boolean;
  /** Whether the locked arena for keys is in use (secret-bytes allocates from it). */
  secretsLocked: boolean;
  /** Bytes of the locked arena right after hardening (VmLck is at least this). */
  lockedBytes: number;
  /** Why the memory is not locked as a whole (when memoryLocked is false). */
  memoryLockReason?: string;
  /** True when swap is on and not disabled for this process's cgroup. */
  swapPossible: boolean;
}

/** Raw hygiene state, for tests and diagnostics. */
export interface HygieneStatus {
  /** prctl(PR_GET_DUMPABLE): 0 = not dumpable, 1 = dumpable, -1 = unknown. */
  dumpable: number;
  /** VmLck of /proc/self/status in kB (-1 = unknown). */
  vmLckKb: number;
}

interface Libc {
  prctl: (option: number, arg2: number) => number;
  errno: () => number;
}

/**
 * libc through koffi, loaded once. koffi is a native module: if it or libc.so.6 cannot be
 * loaded (another OS, a missing prebuilt binary), hygiene degrades to warnings instead of
 * keeping the process from starting.
 */
const libc: Libc | undefined = await (async () => {
  try {
    const koffi = (await import('koffi')).default;
    const lib = koffi.load('libc.so.6');
    // prctl is variadic in glibc: pass the extra arguments as unsigned long, as the
    // kernel reads them, through koffi's variadic call convention.
    const prctl = lib.func('int prctl(int option, ...)');
    return {
      prctl: (option: number, arg2: number) => prctl(option, 'unsigned long', arg2, 'unsigned long', 0, 'unsigned long', 0, 'unsigned long', 0) as number,
      errno: () => koffi.errno(),
    };
  } catch {
    return undefined;
  }
})();

function readProcFile(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

/** Whether swap is active and not switched off for our cgroup (cgroup v2 memory.swap.max = 0). */
function swapReachesProcess(): boolean {
  const swaps = readProcFile('/proc/swaps');
  // The first line is a header; any further line is an active swap area.
  const swapOn = swaps === undefined ? true : swaps.trim().split('\n').length > 1;
  if (!swapOn) return false;
  const cgroup = readProcFile('/proc/self/cgroup')
    ?.split('\n')
    .find((line) => line.startsWith('0::'))
    ?.slice(3);
  if (cgroup === undefined) return true;
  const max = readProcFile(`/sys/fs/cgroup${cgroup === '/' ? '' : cgroup}/memory.swap.max`);
  return max?.trim() !== '0';
}

/**
 * Reads the dumpable flag (prctl) and VmLck (/proc/self/status) of this process.
 * -1 stands for "could not be read".
 */
export function readHygieneStatus(): HygieneStatus {
  let dumpable = -1;
  if (libc) {
    const value = libc.prctl(PR_GET_DUMPABLE, 0);
    if (value >= 0) dumpable = value;
  }
  const match = /^VmLck:\s+(\d+)\s+kB$/m.exec(readProcFile('/proc/self/status') ?? '');
  const vmLckKb = match?.[1] === undefined ? -1 : Number(match[1]);
  return { dumpable, vmLckKb };
}

/**
 * Hardens the current process: makes it non-dumpable (prctl PR_SET_DUMPABLE 0), locks all
 * of its memory where it can (mode `auto`, the default) or must (`require`: throws a
 * precondition error when it cannot), and locks the arena that secret-bytes allocates keys
 * from (also with mlockall: the arena adds MADV_DONTDUMP and MADV_WIPEONFORK). Apart from
 * `require`, it never throws: a failure is a warning in the log and shows in the result.
 * Call it early, before any secret is loaded; a `run` command calls
 * relaunchWithMadviseShim() (memory-lock.ts) before it.
 */
export function hardenProcess(logger: Logger, options: { memoryLock?: MemoryLockMode } = {}): HardeningResult {
  const mode = options.memoryLock ?? 'auto';
  let dumpable = true;
  if (!libc) {
    logger.warn('process hardening unavailable: cannot load libc through koffi; the process stays dumpable');
  } else {
    const rc = libc.prctl(PR_SET_DUMPABLE, 0);
    if (rc !== 0) logger.warn('prctl(PR_SET_DUMPABLE, 0) failed; the process stays dumpable', { rc, errno: libc.errno() });
    dumpable = readHygieneStatus().dumpable !== 0;
  }

  const lock = lockAllMemory(mode);
  if (!lock.locked && mode === 'require') {
    throw errors.precondition(`cannot lock the process memory: ${lock.reason ?? 'unknown'}`, { hint: 'run as root or with CAP_IPC_LOCK, build dist/native (npm run build, needs a C compiler), or use --memory-lock auto' });
  }

  const arena = enableLockedMemory();
  if (arena.enabled) {
    logger.debug('keys are kept in locked memory', { locked_bytes: arena.lockedBytes });
  } else {
    logger.warn('keys cannot be kept in locked memory; they stay in ordinary memory', { reason: arena.reason ?? 'unknown' });
  }

  const swapPossible = !lock.locked && swapReachesProcess();
  if (lock.locked) {
    logger.debug('all memory of the process is locked (mlockall)');
  } else if (swapPossible) {
    logger.warn('swap is active and the process memory is not locked as a whole: keys are in locked memory, but transient copies of secrets elsewhere in the process may be written to swap', {
      reason: lock.reason ?? 'unknown',
      hint: 'run as root or with CAP_IPC_LOCK, or disable swap, use encrypted swap, or run the service with MemorySwapMax=0',
    });
  } else {
    logger.info('the process memory is not locked as a whole; swap cannot reach this process', { reason: lock.reason ?? 'unknown' });
  }
  return {
    dumpable,
    memoryLocked: lock.locked,
    secretsLocked: arena.enabled,
    lockedBytes: arena.lockedBytes,
    swapPossible,
    ...(lock.locked ? {} : { memoryLockReason: lock.reason ?? 'unknown' }),
  };
}
