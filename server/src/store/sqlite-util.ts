/**
 * Helpers shared by the SQLite adapter's tables: constraint errors mapped to DomainErrors,
 * opaque keyset page tokens and name ranges.
 */
import Database from 'better-sqlite3';

import type { DomainError} from '../../../shared/src/errors.js';
import { errors } from '../../../shared/src/errors.js';
import type { Page } from '../domain/model.js';

/** Largest page any list returns. */
export const MAX_PAGE_SIZE = 1000;
/**
 * Upper bound of a name range with no prefix. In SQLite every BLOB sorts after every TEXT
 * and TEXT affinity does not convert BLOBs, so `name < X''` holds for all names while
 * staying an index range bound (one prepared statement serves both cases).
 */
export const NO_UPPER_BOUND = Buffer.alloc(0);

/** The exclusive upper bound of a name range: a string, or NO_UPPER_BOUND. */
export type NameUpperBound = string | Buffer;

// ---------------------------------------------------------------------------------------
// Errors

export function sqliteCode(err: unknown): string | undefined {
  if (err instanceof Database.SqliteError) return err.code;
  return undefined;
}

/** What a constraint violation of one statement means, in caller terms. */
export interface ConstraintNames {
  /** Entity named when a UNIQUE constraint (other than the primary key) fails, e.g. "volume name". */
  unique?: string;
  /** Entity named when the primary key is taken, e.g. "volume". */
  primary?: string;
  /** Entity named when a referenced row is missing, e.g. "volume". */
  foreign?: string;
}

/**
 * Maps a SQLite constraint error to a DomainError whose message names the entity only
 * (never SQL, table or values); any other error is returned unchanged and becomes
 * INTERNAL at the RPC layer. Classification uses SQLite's extended result code.
 */
export function mapConstraint(err: unknown, names: ConstraintNames): unknown {
  const code = sqliteCode(err);
  if (code === 'SQLITE_CONSTRAINT_UNIQUE' && names.unique) return errors.alreadyExists(names.unique, { cause: err });
  if (code === 'SQLITE_CONSTRAINT_PRIMARYKEY' && names.primary) return errors.alreadyExists(names.primary, { cause: err });
  if (code === 'SQLITE_CONSTRAINT_FOREIGNKEY' && names.foreign) return errors.notFound(names.foreign, { cause: err });
  return err;
}

export function run(fn: () => void, names: ConstraintNames): void {
  try {
    fn();
  } catch (err) {
    throw mapConstraint(err, names);
  }
}

// ---------------------------------------------------------------------------------------
// Pagination

export type TokenKind = 'volume' | 'guest' | 'host' | 'audit' | 'rotation';

export function badToken(): DomainError {
  return errors.invalid('invalid page token');
}

/** Opaque page token: base64url of the JSON array [kind, lastKey]. */
export function encodePageToken(kind: TokenKind, key: string | number | readonly string[]): string {
  return Buffer.from(JSON.stringify([kind, key]), 'utf8').toString('base64url');
}

/** Inverse of encodePageToken; undefined for "" (first page). */
export function decodePageToken(token: string, kind: TokenKind): unknown {
  if (token === '') return undefined;
  if (token.length > 4096 || !/^[A-Za-z0-9_-]+$/.test(token)) throw badToken();
  const raw = Buffer.from(token, 'base64url');
  // Node's decoder is lenient; a token that does not re-encode to itself was not ours.
  if (raw.toString('base64url') !== token) throw badToken();
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw.toString('utf8'));
  } catch {
    throw badToken();
  }
  if (!Array.isArray(parsed) || parsed.length !== 2 || parsed[0] !== kind) throw badToken();
  return parsed[1];
}

export function decodeNameToken(token: string, kind: TokenKind): string | undefined {
  const key = decodePageToken(token, kind);
  if (key === undefined) return undefined;
  if (typeof key !== 'string') throw badToken();
  return key;
}

export function decodeSeqToken(token: string): number | undefined {
  const key = decodePageToken(token, 'audit');
  if (key === undefined) return undefined;
  if (typeof key !== 'number' || !Number.isSafeInteger(key) || key < 0) throw badToken();
  return key;
}

export function clampPageSize(n: number): number {
  if (!Number.isFinite(n)) return MAX_PAGE_SIZE;
  return Math.min(MAX_PAGE_SIZE, Math.max(1, Math.trunc(n)));
}

/** SQLite's default BINARY collation compares UTF-8 bytes; so must we. */
export function compareUtf8(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/**
 * Smallest string greater than every string starting with `prefix`, or NO_UPPER_BOUND.
 * Code-point order equals UTF-8 byte order, so incrementing the last code point works;
 * trailing U+10FFFF cannot be incremented and is dropped first (carry), and the surrogate
 * range is skipped because it has no UTF-8 encoding.
 */
export function prefixUpperBound(prefix: string): NameUpperBound {
  const cps = Array.from(prefix, (c) => c.codePointAt(0) ?? 0);
  while (cps.length > 0 && cps[cps.length - 1] === 0x10ffff) cps.pop();
  const last = cps.pop();
  if (last === undefined) return NO_UPPER_BOUND;
  cps.push(last + 1 === 0xd800 ? 0xe000 : last + 1);
  return String.fromCodePoint(...cps);
}

/**
 * Index range [start, end) of names with the prefix that come after `after`. `after + "\0"`
 * is the smallest string greater than `after` in byte order, which turns the exclusive
 * keyset bound into an inclusive one so both cases share one statement.
 */
export function nameRange(prefix: string, after: string | undefined): { start: string; end: NameUpperBound } {
  let start = prefix;
  if (after !== undefined) {
    const successor = after + '\u0000';
    if (compareUtf8(successor, start) > 0) start = successor;
  }
  return { start, end: prefix === '' ? NO_UPPER_BOUND : prefixUpperBound(prefix) };
}

/** Rows were fetched with LIMIT pageSize + 1: the extra row only says "there is more". */
export function toPage<T>(items: T[], limit: number, tokenOf: (last: T) => string): Page<T> {
  if (items.length <= limit) return { items, nextPageToken: '' };
  const pageItems = items.slice(0, limit);
  const last = pageItems[pageItems.length - 1];
  return { items: pageItems, nextPageToken: last === undefined ? '' : tokenOf(last) };
}
