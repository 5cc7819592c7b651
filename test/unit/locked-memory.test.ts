/**
 * Tests of shared/src/locked-memory.ts and of secret-bytes allocating from it. They run in
 * the test worker itself (a process of its own per file): the arena only maps and locks a
 * few MiB, which is harmless here. Serial, because the arena is process-wide state.
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import {
  CHUNK_BYTES,
  MAX_LOCKED_ALLOCATION,
  enableLockedMemory,
  isLockedBuffer,
  lockedAddressOf,
  lockedAlloc,
  lockedMemoryStatus,
  lockedRegions,
  vmLckKb,
} from '../../shared/src/locked-memory.js';
import { ownedCopy, randomSecret } from '../../shared/src/secret-bytes.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** Collects garbage until FinalizationRegistry callbacks have had a chance to run. */
async function collect(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface Vma {
  start: bigint;
  end: bigint;
  lockedKb: number;
  flags: string[];
}

/** The mappings of this process from /proc/self/smaps. */
function smaps(): Vma[] {
  const out: Vma[] = [];
  let cur: Vma | undefined;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (head) {
      cur = { start: BigInt(`0x${head[1]}`), end: BigInt(`0x${head[2]}`), lockedKb: 0, flags: [] };
      out.push(cur);
    } else if (cur && line.startsWith('Locked:')) {
      cur.lockedKb = Number(/(\d+)/.exec(line)?.[1] ?? 0);
    } else if (cur && line.startsWith('VmFlags:')) {
      cur.flags = line.slice('VmFlags:'.length).trim().split(/\s+/);
    }
  }
  return out;
}

function vmaOf(address: bigint): Vma | undefined {
  return smaps().find((v) => v.start <= address && address < v.end);
}

test.serial('before it is enabled nothing is locked and secret-bytes uses the heap', (t) => {
  t.false(lockedMemoryStatus().enabled);
  t.is(lockedAlloc(32), undefined);
  const copy = ownedCopy(Buffer.from('0123456789abcdef0123456789abcdef'));
  t.false(isLockedBuffer(copy));
  t.is(copy.toString(), '0123456789abcdef0123456789abcdef');
  t.is(vmLckKb(), 0);
});

test.serial('enabling maps one locked, non-dumped, wipe-on-fork chunk (VmLck and smaps say so)', (t) => {
  const r = enableLockedMemory();
  t.true(r.enabled, r.reason);
  t.is(r.lockedBytes, CHUNK_BYTES);
  t.is(vmLckKb(), CHUNK_BYTES / 1024);
  const [region] = lockedRegions();
  t.truthy(region);
  const vma = vmaOf(region!.start);
  t.truthy(vma, 'the chunk is a mapping of this process');
  t.is(vma!.lockedKb, CHUNK_BYTES / 1024, 'all of it is resident and locked');
  for (const flag of ['lo', 'dd', 'wf']) t.true(vma!.flags.includes(flag), `VmFlags has ${flag}: ${vma!.flags.join(' ')}`);
  // Idempotent: no second chunk.
  t.is(enableLockedMemory().lockedBytes, CHUNK_BYTES);
});

test.serial('ownedCopy and randomSecret return locked buffers of their own with the right bytes', (t) => {
  const original = randomBytes(64);
  const copy = ownedCopy(original);
  t.true(isLockedBuffer(copy));
  t.true(copy.equals(original));
  t.is(copy.buffer.byteLength, 64, 'an ArrayBuffer of its own, not a slice of a pool');
  const address = lockedAddressOf(copy)!;
  const [region] = lockedRegions();
  t.true(address >= region!.start && address + 64n <= region!.end);
  t.true(vmaOf(address)!.flags.includes('lo'));

  const a = randomSecret(32);
  const b = randomSecret(32);
  t.true(isLockedBuffer(a) && isLockedBuffer(b));
  t.false(a.equals(Buffer.alloc(32)), 'random bytes were written');
  t.not(lockedAddressOf(a), lockedAddressOf(b));
  const before = Buffer.from(b);
  a.fill(0xff);
  t.true(b.equals(before), 'slots do not overlap');
});

test.serial('requests above 4 KiB fall back to the heap and are counted', (t) => {
  const before = lockedMemoryStatus().fallbacks;
  const big = ownedCopy(randomBytes(MAX_LOCKED_ALLOCATION + 1));
  t.false(isLockedBuffer(big));
  t.is(big.length, MAX_LOCKED_ALLOCATION + 1);
  t.is(lockedMemoryStatus().fallbacks, before + 1);
  t.true(isLockedBuffer(ownedCopy(randomBytes(MAX_LOCKED_ALLOCATION))));
});

test.serial('a slot returns to the arena, zeroed, once its buffer is collected; a live view keeps it', async (t) => {
  await collect();
  const inUse = lockedMemoryStatus().inUseBytes;
  // Allocated and dropped inside the closure: nothing refers to it afterwards.
  const droppedAddress = (() => lockedAddressOf(ownedCopy(Buffer.alloc(100, 0xab)))!)();
  const kept = ownedCopy(Buffer.alloc(100, 0xcd));
  const view = kept.subarray(10, 20);
  await collect();
  t.is(lockedMemoryStatus().inUseBytes, inUse + 128, 'the dropped slot was released, the viewed one was not');
  t.true(view.equals(Buffer.alloc(10, 0xcd)), 'the view still reads its own bytes');
  // The released slot is handed out again (last in, first out) and reads as zeros.
  const reused = lockedAlloc(100)!;
  t.is(lockedAddressOf(reused), droppedAddress);
  t.true(reused.equals(Buffer.alloc(100)), 'released slots are zeroed');
  t.true(kept.equals(Buffer.alloc(100, 0xcd)));
});

test.serial('the arena grows by locked chunks on demand and stops at its limit', (t) => {
  const keys: Buffer[] = [];
  // 20,000 keys of 64 bytes: more than one chunk.
  for (let i = 0; i < 20_000; i++) keys.push(randomSecret(64));
  t.true(keys.every((k) => isLockedBuffer(k)));
  const status = lockedMemoryStatus();
  t.true(status.lockedBytes >= 2 * CHUNK_BYTES, `locked ${status.lockedBytes}`);
  t.is(vmLckKb(), status.lockedBytes / 1024);

  // A limit equal to what is mapped: the next chunk is refused and requests fall back.
  enableLockedMemory({ maxBytes: status.lockedBytes });
  const fallbacks = status.fallbacks;
  let heap = 0;
  for (let i = 0; i < 20_000 && heap === 0; i++) {
    const k = randomSecret(2048);
    if (isLockedBuffer(k)) keys.push(k);
    else heap++;
  }
  t.is(heap, 1, 'once the arena is full a request is served from the heap');
  t.is(lockedMemoryStatus().fallbacks, fallbacks + 1);
  t.regex(lockedMemoryStatus().reason ?? '', /limit/);
  t.is(vmLckKb(), status.lockedBytes / 1024, 'no chunk beyond the limit');
});
