/**
 * Options of `virtkm-server run`, compiled once: defaults applied, values checked, frozen.
 */
import { errors } from '../../../shared/src/errors.js';
import { parseDurationSeconds } from '../domain/duration.js';
import type { LogLevel } from '../../../shared/src/log.js';
import { parseMemoryLockMode, type MemoryLockMode } from '../../../shared/src/memory-lock.js';
import { SQLITE_DURABILITIES, type SqliteDurability } from '../store/sqlite-store.js';

/** What the operator may set. */
export interface ServerRunOptions {
  dataDir: string;
  listen?: string;
  enrollListen?: string;
  passphraseFile?: string;
  logLevel?: string;
  shutdownGraceMs?: number;
  hostCertDays?: number;
  /** Durations as text ("30s", "7d") and a count, as given on the command line. */
  rotationInterval?: string;
  rotationsPerHost?: string;
  keyGrace?: string;
  /** auto (default), require or off: see shared/src/memory-lock.ts. */
  memoryLock?: string;
  /** async-wal-sync (default) or full-sync: see server/src/store/sqlite-store.ts. */
  durability?: string;
}

/** Options with defaults applied. */
export interface CompiledServerRunOptions {
  readonly dataDir: string;
  readonly listen: string;
  /** "" disables the enrollment listener. */
  readonly enrollListen: string;
  readonly passphraseFile: string | undefined;
  readonly logLevel: LogLevel;
  readonly shutdownGraceMs: number;
  readonly hostCertDays: number;
  readonly rotation: { readonly intervalMs: number; readonly maxPerHost: number; readonly graceSeconds: number };
  readonly memoryLock: MemoryLockMode;
  readonly durability: SqliteDurability;
}

/** Default main listener (loopback: exposing it is a deliberate choice). */
export const DEFAULT_LISTEN = '127.0.0.1:7443';
const LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error'];

function checkAddress(flag: string, a: string): string {
  if (!/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(a) || Number(a.slice(a.lastIndexOf(':') + 1)) > 65535) {
    throw errors.invalid(`${flag} must be HOST:PORT`);
  }
  return a;
}

function checkRange(flag: string, n: number, min: number, max: number): number {
  if (!Number.isInteger(n) || n < min || n > max) throw errors.invalid(`${flag} must be between ${min} and ${max}`);
  return n;
}

function checkDurability(d: string): SqliteDurability {
  if (!(SQLITE_DURABILITIES as readonly string[]).includes(d)) throw errors.invalid(`--durability must be one of ${SQLITE_DURABILITIES.join(', ')}`);
  return d as SqliteDurability;
}

/** Applies defaults and validates. */
export function compileServerRunOptions(o: ServerRunOptions): CompiledServerRunOptions {
  if (!o.dataDir) throw errors.invalid('--data-dir is required');
  const level = (o.logLevel ?? 'info') as LogLevel;
  if (!LEVELS.includes(level)) throw errors.invalid(`--log-level must be one of ${LEVELS.join(', ')}`);
  const listen = checkAddress('--listen', o.listen ?? DEFAULT_LISTEN);
  return Object.freeze({
    dataDir: o.dataDir,
    listen,
    enrollListen: o.enrollListen ? checkAddress('--enroll-listen', o.enrollListen) : '',
    passphraseFile: o.passphraseFile,
    logLevel: level,
    shutdownGraceMs: o.shutdownGraceMs ?? 10_000,
    hostCertDays: o.hostCertDays ?? 365,
    memoryLock: parseMemoryLockMode(o.memoryLock),
    durability: checkDurability(o.durability ?? 'async-wal-sync'),
    rotation: Object.freeze({
      intervalMs: checkRange('--rotation-interval', parseDurationSeconds(o.rotationInterval ?? '30s', '--rotation-interval'), 1, 86400) * 1000,
      maxPerHost: checkRange('--rotations-per-host', Number(o.rotationsPerHost ?? '2'), 1, 64),
      graceSeconds: checkRange('--key-grace', parseDurationSeconds(o.keyGrace ?? '7d', '--key-grace'), 0, 10 * 31536000),
    }),
  });
}
