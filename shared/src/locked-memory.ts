/**
 * Locked memory for secret bytes, outside the V8 heap.
 *
 * Why an arena when the services also lock all of their memory (shared/src/memory-lock.ts):
 * whole-process locking needs CAP_IPC_LOCK, a kernel with MADV_DONTNEED_LOCKED and a
 * preloaded native library; where any of these is missing, the keys themselves still live
 * in locked memory through this arena. And in every mode the arena adds what mlockall does
 * not: exclusion from core dumps and from forked children.
 *
 * What this module does: it maps chunks of anonymous memory (1 MiB each) with
 * mmap, locks them with mlock (they count in VmLck and never reach swap), excludes them from
 * core dumps (MADV_DONTDUMP) and from forked children (MADV_WIPEONFORK: a child sees zeros),
 * and hands out slots of it as Buffers backed by external ArrayBuffers (koffi.view). V8
 * never moves, copies or frees that memory: only the ArrayBuffer object lives in the V8
 * heap, the bytes do not. shared/src/secret-bytes.ts allocates ownedCopy() and
 * randomSecret() from here once enableLockedMemory() has run (hardenProcess does it), so
 * the master key, host keys and the key caches' plaintext keys live in locked memory.
 *
 * What the arena alone does not lock: everything else. Secrets that pass through other
 * buffers on their way (file reads, protobuf decoding, libsodium's WebAssembly memory,
 * OpenSSL's own copies, hex passphrases built for tools, PEM strings) live in ordinary
 * memory for a moment; a wipe() zeroes the ones we own, and only the whole-process lock
 * keeps their pages out of swap.
 *
 * Slots: size classes of 32 bytes to 4 KiB carved from 64 KiB slabs. A slot returns to its
 * free list, zeroed, when its ArrayBuffer is garbage-collected (FinalizationRegistry), so a
 * subarray or another view of the same ArrayBuffer keeps the slot alive and never sees it
 * reused. Requests larger than 4 KiB, or once the arena has reached its limit, return
 * undefined and callers fall back to the ordinary heap; status() counts those fallbacks.
 */
import { readFileSync } from 'node:fs';

/** Bytes in one mapped and locked chunk. */
export const CHUNK_BYTES = 1 << 20;
const SLAB_BYTES = 64 << 10;
const SIZE_CLASSES = [32, 64, 128, 256, 512, 1024, 2048, 4096] as const;
/** The largest allocation served from locked memory. */
export const MAX_LOCKED_ALLOCATION = SIZE_CLASSES[SIZE_CLASSES.length - 1]!;
/** Default limit of the arena (chunks are mapped on demand up to it). */
export const DEFAULT_MAX_LOCKED_BYTES = 64 << 20;

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MADV_DONTDUMP = 16;
const MADV_WIPEONFORK = 18;

interface Native {
  mmap: (length: number) => bigint | null;
  munmap: (addr: bigint, length: number) => number;
  mlock: (addr: bigint, length: number) => number;
  madvise: (addr: bigint, length: number, advice: number) => number;
  view: (addr: bigint, length: number) => ArrayBuffer;
  errno: () => number;
}

/** libc through koffi; undefined when koffi or libc cannot be loaded (then nothing is locked). */
const native: Native | undefined = await (async () => {
  try {
    const koffi = (await import('koffi')).default;
    const lib = koffi.load('libc.so.6');
    const mmap = lib.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)');
    const munmap = lib.func('int munmap(void *addr, size_t length)');
    const mlock = lib.func('int mlock(void *addr, size_t len)');
    const madvise = lib.func('int madvise(void *addr, size_t len, int advice)');
    return {
      mmap: (length: number) => {
        const p = mmap(null, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) as bigint | null;
        // MAP_FAILED is (void *)-1.
        return p === null || p === 0xffffffffffffffffn ? null : p;
      },
      munmap: (addr, length) => munmap(addr, length) as number,
      mlock: (addr, length) => mlock(addr, length) as number,
      madvise: (addr, length, advice) => madvise(addr, length, advice) as number,
      view: (addr, length) => koffi.view(addr, length),
      errno: () => koffi.errno(),
    };
  } catch {
    return undefined;
  }
})();

/** What the arena holds, for logs, health output and tests. */
export interface LockedMemoryStatus {
  /** Whether enableLockedMemory() succeeded (secret-bytes then allocates from here). */
  enabled: boolean;
  /** Why it is not enabled or stopped growing (errno text); undefined when all is well. */
  reason: string | undefined;
  /** Bytes mapped and locked (chunks × 1 MiB). */
  lockedBytes: number;
  /** Bytes of slots handed out and not yet collected. */
  inUseBytes: number;
  /** Allocations served from locked memory since start. */
  allocations: number;
  /** Allocations that fell back to the ordinary heap (too large, arena full, not enabled). */
  fallbacks: number;
}

interface Chunk {
  base: bigint;
  /** A view of the whole chunk, for zeroing released slots. */
  bytes: Uint8Array;
  /** Next unused offset (slabs are carved from the front). */
  next: number;
}

interface Slot {
  chunk: number;
  offset: number;
  cls: number;
}

const chunks: Chunk[] = [];
/** Free slots per size class index. */
const freeLists: Slot[][] = SIZE_CLASSES.map(() => []);
let enabled = false;
let reason: string | undefined = native ? 'not enabled' : 'koffi or libc.so.6 cannot be loaded';
let maxBytes = DEFAULT_MAX_LOCKED_BYTES;
let canGrow = true;
let inUseBytes = 0;
let allocations = 0;
let fallbacks = 0;
/** The locked address of each ArrayBuffer handed out (for tests and isLockedBuffer). */
const addresses = new WeakMap<ArrayBufferLike, bigint>();

const released = new FinalizationRegistry<Slot>((slot) => {
  // The ArrayBuffer is gone, so no view of it exists: zero the slot and reuse it.
  const chunk = chunks[slot.chunk];
  if (!chunk) return;
  chunk.bytes.fill(0, slot.offset, slot.offset + SIZE_CLASSES[slot.cls]!);
  inUseBytes -= SIZE_CLASSES[slot.cls]!;
  freeLists[slot.cls]!.push(slot);
});

function errnoText(what: string): string {
  const e = native?.errno() ?? 0;
  const name = e === 12 ? 'ENOMEM' : e === 1 ? 'EPERM' : e === 11 ? 'EAGAIN' : e === 22 ? 'EINVAL' : `errno ${e}`;
  const hint = e === 12 || e === 1 || e === 11 ? ' (RLIMIT_MEMLOCK too low: raise LimitMEMLOCK or grant CAP_IPC_LOCK)' : '';
  return `${what} failed: ${name}${hint}`;
}

/** Maps, locks and advises one more chunk; false (and `reason` set) when that fails. */
function addChunk(): boolean {
  if (!native || !canGrow) return false;
  if ((chunks.length + 1) * CHUNK_BYTES > maxBytes) {
    canGrow = false;
    reason = `the locked arena reached its limit of ${maxBytes} bytes`;
    return false;
  }
  const base = native.mmap(CHUNK_BYTES);
  if (base === null) {
    canGrow = false;
    reason = errnoText('mmap');
    return false;
  }
  if (native.mlock(base, CHUNK_BYTES) !== 0) {
    // Unlocked memory is no better than the heap: give it back and stop growing.
    reason = errnoText('mlock');
    native.munmap(base, CHUNK_BYTES);
    canGrow = false;
    return false;
  }
  // Both are defence in depth (the process is non-dumpable anyway); failures are harmless.
  native.madvise(base, CHUNK_BYTES, MADV_DONTDUMP);
  native.madvise(base, CHUNK_BYTES, MADV_WIPEONFORK);
  chunks.push({ base, bytes: new Uint8Array(native.view(base, CHUNK_BYTES)), next: 0 });
  return true;
}

/** Carves a new slab for size class `cls` into its free list; false when no memory is left. */
function addSlab(cls: number): boolean {
  let chunkIndex = chunks.findIndex((c) => c.next + SLAB_BYTES <= CHUNK_BYTES);
  if (chunkIndex < 0) {
    if (!addChunk()) return false;
    chunkIndex = chunks.length - 1;
  }
  const chunk = chunks[chunkIndex]!;
  const size = SIZE_CLASSES[cls]!;
  const start = chunk.next;
  chunk.next += SLAB_BYTES;
  const list = freeLists[cls]!;
  // Pushed in reverse so slots are handed out in address order (easier to read in tests).
  for (let off = start + SLAB_BYTES - size; off >= start; off -= size) list.push({ chunk: chunkIndex, offset: off, cls });
  return true;
}

/**
 * Maps and locks the first chunk and makes lockedAlloc() serve requests. Idempotent. Never
 * throws: when memory cannot be locked (no koffi, RLIMIT_MEMLOCK, no CAP_IPC_LOCK) it
 * returns the reason and secrets stay in ordinary memory.
 */
export function enableLockedMemory(options: { maxBytes?: number } = {}): { enabled: boolean; lockedBytes: number; reason: string | undefined } {
  if (options.maxBytes !== undefined) maxBytes = Math.max(CHUNK_BYTES, options.maxBytes);
  if (!enabled && native) {
    reason = undefined;
    canGrow = true;
    if (chunks.length > 0 || addChunk()) enabled = true;
  }
  return { enabled, lockedBytes: chunks.length * CHUNK_BYTES, reason };
}

/**
 * A zero-filled Buffer of `length` bytes in locked memory, with an ArrayBuffer of its own,
 * or undefined when locked memory is not enabled, `length` is 0 or above 4 KiB, or the arena
 * is full (the caller then uses the heap).
 */
export function lockedAlloc(length: number): Buffer | undefined {
  if (!enabled || !native || length <= 0 || length > MAX_LOCKED_ALLOCATION || !Number.isInteger(length)) {
    fallbacks++;
    return undefined;
  }
  const cls = SIZE_CLASSES.findIndex((s) => s >= length);
  const list = freeLists[cls]!;
  if (list.length === 0 && !addSlab(cls)) {
    fallbacks++;
    return undefined;
  }
  const slot = list.pop()!;
  const address = chunks[slot.chunk]!.base + BigInt(slot.offset);
  const ab = native.view(address, length);
  released.register(ab, slot);
  addresses.set(ab, address);
  inUseBytes += SIZE_CLASSES[cls]!;
  allocations++;
  return Buffer.from(ab);
}

/** Whether the bytes of `buf` lie in locked memory (the buffer came from lockedAlloc). */
export function isLockedBuffer(buf: Uint8Array): boolean {
  return addresses.has(buf.buffer);
}

/** The address of a locked buffer's first byte (for tests that check /proc/self/smaps). */
export function lockedAddressOf(buf: Uint8Array): bigint | undefined {
  const base = addresses.get(buf.buffer);
  return base === undefined ? undefined : base + BigInt(buf.byteOffset);
}

/** The arena's chunks as [start, end) address ranges. */
export function lockedRegions(): { start: bigint; end: bigint }[] {
  return chunks.map((c) => ({ start: c.base, end: c.base + BigInt(CHUNK_BYTES) }));
}

/** The arena's counters. */
export function lockedMemoryStatus(): LockedMemoryStatus {
  return { enabled, reason, lockedBytes: chunks.length * CHUNK_BYTES, inUseBytes, allocations, fallbacks };
}

/** VmLck of a process (kB) from /proc/<pid>/status; -1 when it cannot be read. */
export function vmLckKb(pid: number | 'self' = 'self'): number {
  try {
    const match = /^VmLck:\s+(\d+)\s+kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match?.[1] === undefined ? -1 : Number(match[1]);
  } catch {
    return -1;
  }
}
