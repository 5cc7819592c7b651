/**
 * Ephemeral X25519 shares for key packets, computed ahead of time in a worker thread.
 *
 * crypto_box_seal needs a fresh ephemeral key pair per packet and one Diffie-Hellman with
 * the recipient: two X25519 operations, about 57 µs of CPU with the native libsodium
 * (110 µs through node:crypto before run G), which on the event loop would be a fifth of
 * a release. The recipient of a release is always a host whose key the server knows, so
 * both operations can be done before the request arrives: the worker
 * (ephemeral-worker.ts) produces, per active host, shares of (ephemeral public key, box
 * key); the event loop then only hashes the nonce and runs XSalsa20-Poly1305
 * (shared/src/box.ts sealWithShare). The packets are byte-for-byte crypto_box_seal.
 *
 * The box keys are secrets, handled as such:
 * - each share is handed out once (a cursor moves past it) and its secret is wiped in the
 *   slab by the caller right after sealing (the key vault does, in a finally); the shares
 *   not yet handed out are wiped when their host's pool is dropped and on close();
 * - a host's pool is dropped (wiped) when its key changes, when it has not been used for
 *   `idleMs`, and when more than `maxHosts` hosts have pools (least recently used first);
 * - nothing here is logged but counts.
 * When the pool of a host is empty (first release, or the worker cannot keep up because
 * the machine's cores are busy) `take` returns undefined and the caller seals inline as
 * before, so the pool only ever removes work from the event loop. A worker that fails is
 * not restarted; sealing then stays inline.
 */
import { Worker } from 'node:worker_threads';

import type { BoxRecipient, EphemeralShare } from '../../../shared/src/box.js';
import type { Logger } from '../../../shared/src/log.js';
import { silentLogger } from '../../../shared/src/log.js';
import type { ShareRequest, ShareResponse } from './ephemeral-worker.js';

/** Bytes per share in a slab: ephemeral public key, then box key. */
const SHARE_BYTES = 64;

/** Tunables; the defaults suit one server with a few busy hosts. */
export interface EphemeralPoolOptions {
  /** Shares asked of the worker at a time (default 128). */
  batch?: number;
  /** Shares kept ready per host, counting those being computed (default 1024). */
  perHost?: number;
  /** Most hosts with a pool (default 64). */
  maxHosts?: number;
  /** A host's pool is wiped after this long without a release (default 5 minutes). */
  idleMs?: number;
  logger?: Logger;
}

/** Where the key vault takes precomputed shares from. */
export interface EphemeralSource {
  /**
   * One share for this recipient, never handed out before, or undefined when none is ready
   * (the caller then computes one inline). The caller seals ONE message with it and wipes
   * `shared` right after.
   */
  take(ownerId: string, recipient: BoxRecipient): EphemeralShare | undefined;
}

/** Counters, for tests and the bench. */
export interface EphemeralPoolStats {
  /** Shares handed out. */
  hits: number;
  /** take() calls that found none ready. */
  misses: number;
  /** Shares ready now, over all hosts. */
  ready: number;
  /** Hosts with a pool. */
  hosts: number;
  /** Whether the worker is running. */
  workerUp: boolean;
}

/** The pool; see module comment. */
export interface EphemeralPool extends EphemeralSource {
  stats(): EphemeralPoolStats;
  /** Wipes every share and stops the worker. Idempotent; take() returns undefined afterwards. */
  close(): Promise<void>;
}

interface Slab {
  bytes: Uint8Array;
  next: number;
  count: number;
}

interface HostPool {
  raw: Buffer;
  slabs: Slab[];
  ready: number;
  requested: number;
  lastUsed: number;
}

/** Creates a pool; the worker starts on the first take(). */
export function createEphemeralPool(options: EphemeralPoolOptions = {}): EphemeralPool {
  const batch = options.batch ?? 128;
  const perHost = options.perHost ?? 1024;
  const maxHosts = options.maxHosts ?? 64;
  const idleMs = options.idleMs ?? 5 * 60_000;
  const logger = options.logger ?? silentLogger;
  if (![batch, perHost, maxHosts, idleMs].every((n) => Number.isSafeInteger(n) && n > 0) || batch > perHost) {
    throw new RangeError('ephemeral pool options must be positive integers with batch <= perHost');
  }

  // Map order is recency order: a host is moved to the end on every take().
  const pools = new Map<string, HostPool>();
  const pending = new Map<number, { ownerId: string; pool: HostPool; count: number }>();
  let nextId = 1;
  let worker: Worker | undefined;
  let workerFailed = false;
  let closed = false;
  let sweeper: NodeJS.Timeout | undefined;
  let hits = 0;
  let misses = 0;

  const wipeSlab = (s: Slab) => s.bytes.fill(0);
  const drop = (ownerId: string) => {
    const p = pools.get(ownerId);
    if (!p) return;
    for (const s of p.slabs) wipeSlab(s);
    p.slabs = [];
    p.ready = 0;
    pools.delete(ownerId);
  };

  const stopWorker = (why: string, err?: unknown) => {
    if (!worker) return;
    const w = worker;
    worker = undefined;
    pending.clear();
    if (why !== 'close') {
      workerFailed = true;
      logger.warn('ephemeral key worker stopped; sealing inline', { reason: why, error: err instanceof Error ? err.message : undefined });
    }
    w.off('message', onMessage);
    w.unref();
    void w.terminate();
  };

  const onMessage = (res: ShareResponse) => {
    const req = pending.get(res.id);
    pending.delete(res.id);
    if ('error' in res) {
      if (req) req.pool.requested -= req.count;
      logger.warn('ephemeral key worker refused a request', { error: res.error });
      return;
    }
    const slab: Slab = { bytes: new Uint8Array(res.slab), next: 0, count: res.count };
    if (!req) {
      wipeSlab(slab);
      return;
    }
    req.pool.requested -= req.count;
    // The host's pool was dropped or re-created (new key) meanwhile: the shares are useless.
    if (closed || pools.get(req.ownerId) !== req.pool || slab.bytes.length !== res.count * SHARE_BYTES) {
      wipeSlab(slab);
      return;
    }
    req.pool.slabs.push(slab);
    req.pool.ready += slab.count;
  };

  const startWorker = (): Worker | undefined => {
    if (worker || workerFailed || closed) return worker;
    try {
      const w = new Worker(new URL('./ephemeral-worker.js', import.meta.url));
      w.on('message', onMessage);
      w.on('error', (err) => stopWorker('error', err));
      w.on('exit', (code) => {
        if (worker === w) stopWorker(`exit ${code}`);
      });
      // After the listeners: adding a 'message' listener refs the worker's port again.
      w.unref();
      worker = w;
      sweeper = setInterval(sweep, Math.min(idleMs, 60_000));
      sweeper.unref();
    } catch (err) {
      workerFailed = true;
      logger.warn('ephemeral key worker did not start; sealing inline', { error: err instanceof Error ? err.message : String(err) });
    }
    return worker;
  };

  const sweep = () => {
    const now = Date.now();
    for (const [ownerId, p] of pools) if (now - p.lastUsed >= idleMs) drop(ownerId);
  };

  const refill = (ownerId: string, p: HostPool) => {
    const w = startWorker();
    if (!w) return;
    while (p.ready + p.requested + batch <= perHost) {
      const id = nextId++;
      pending.set(id, { ownerId, pool: p, count: batch });
      p.requested += batch;
      w.postMessage({ id, recipient: p.raw, count: batch } satisfies ShareRequest);
    }
  };

  return {
    take(ownerId, recipient) {
      if (closed) return undefined;
      let p = pools.get(ownerId);
      if (p && !p.raw.equals(recipient.raw)) {
        drop(ownerId);
        p = undefined;
      }
      if (p) {
        pools.delete(ownerId);
        pools.set(ownerId, p);
      } else {
        p = { raw: Buffer.from(recipient.raw), slabs: [], ready: 0, requested: 0, lastUsed: 0 };
        pools.set(ownerId, p);
        while (pools.size > maxHosts) drop(pools.keys().next().value as string);
      }
      p.lastUsed = Date.now();
      // Refill at half: the worker then has time to answer before the pool runs dry.
      if (p.ready + p.requested <= perHost / 2) refill(ownerId, p);
      const slab = p.slabs[0];
      if (!slab) {
        misses++;
        return undefined;
      }
      const off = slab.next * SHARE_BYTES;
      slab.next++;
      p.ready--;
      if (slab.next === slab.count) p.slabs.shift();
      hits++;
      return { publicKey: slab.bytes.subarray(off, off + 32), sharedKey: slab.bytes.subarray(off + 32, off + SHARE_BYTES) };
    },
    stats() {
      let ready = 0;
      for (const p of pools.values()) ready += p.ready;
      return { hits, misses, ready, hosts: pools.size, workerUp: worker !== undefined };
    },
    close() {
      if (closed) return Promise.resolve();
      closed = true;
      if (sweeper) clearInterval(sweeper);
      for (const ownerId of [...pools.keys()]) drop(ownerId);
      // Not awaited: the worker is unref'd and holds nothing worth waiting for (its slabs
      // still in flight die with it, unread; those already here were wiped just above).
      stopWorker('close');
      return Promise.resolve();
    },
  };
}
