/**
 * The audit log's hash chain: pure functions, no I/O.
 *
 * Every event stores `prev_hash` (the previous event's hash, GENESIS_HASH for seq 1) and
 * `hash` = auditHash(prev_hash, fields). Editing any field of an event, deleting an event
 * in the middle, or reordering events breaks the chain at the first affected event.
 *
 * Limits, by design of a keyless chain:
 * - Removing events from the END (truncating the tail) leaves a valid, shorter chain; it
 *   cannot be detected from the log alone. verifyChain reports the head hash so that an
 *   operator can record it elsewhere (ticket, SIEM, paper) and compare later.
 * - Someone able to rewrite the database can recompute every hash after an edit. Again
 *   only an externally anchored head hash reveals that.
 */
import { createHash } from 'node:crypto';

import type { AuditRecord } from '../domain/model.js';
import type { AuditVerification } from '../store/ports.js';

/** prev_hash of the first event: 64 zeros (hex of 32 zero bytes). */
export const GENESIS_HASH = '0'.repeat(64);

/** Domain-separation tag, the first field hashed, so these hashes cannot collide with other uses of SHA-256. */
const HASH_TAG = 'virtkm.audit.v1';

/** The fields of an event covered by its hash (everything but prevHash and hash). */
export type AuditHashFields = Pick<AuditRecord, 'seq' | 'time' | 'actor' | 'action' | 'target' | 'outcome' | 'detailJson'>;

/** Values canonicalJson accepts. */
export type JsonValue = string | number | boolean | null | readonly JsonValue[] | { readonly [key: string]: JsonValue | undefined };

/**
 * Canonical JSON: object keys sorted by UTF-16 code units (as Array.prototype.sort does),
 * no whitespace, numbers and strings as JSON.stringify writes them, properties whose value
 * is undefined omitted. Equal data always gives the same text, which is what the hash needs.
 * Throws TypeError for non-finite numbers and for values JSON cannot represent (a
 * programming error: audit details are plain scalars).
 */
export function canonicalJson(value: JsonValue): string {
  if (value === null) return 'null';
  switch (typeof value) {
    case 'string':
    case 'boolean':
      return JSON.stringify(value);
    case 'number':
      // JSON.stringify would silently write null for these: refuse instead.
      if (!Number.isFinite(value)) throw new TypeError('canonicalJson: non-finite number');
      return JSON.stringify(value);
    case 'object':
      break;
    default:
      throw new TypeError(`canonicalJson: unsupported type ${typeof value}`);
  }
  if (Array.isArray(value)) {
    return '[' + (value as readonly JsonValue[]).map((v) => canonicalJson(v)).join(',') + ']';
  }
  const obj = value as { readonly [key: string]: JsonValue | undefined };
  const parts: string[] = [];
  for (const key of Object.keys(obj).sort()) {
    const v = obj[key];
    if (v === undefined) continue;
    parts.push(JSON.stringify(key) + ':' + canonicalJson(v));
  }
  return '{' + parts.join(',') + '}';
}

const HASH_TAG_BYTES = Buffer.from(HASH_TAG, 'ascii');

/**
 * Hash of one audit event, lower-case hex SHA-256.
 *
 * Exact encoding (version 1). The SHA-256 input is the concatenation of nine fields, each
 * written as a 4-byte big-endian unsigned length followed by that many bytes:
 *   1. the ASCII tag "virtkm.audit.v1"
 *   2. prevHash: the 32 raw bytes of the 64-digit hex string
 *   3. seq: 8 bytes, unsigned big-endian
 *   4. time, 5. actor, 6. action, 7. target, 8. outcome, 9. detailJson: UTF-8 bytes
 * The length prefixes make the encoding unambiguous: no two different field tuples give
 * the same byte string (unlike plain concatenation or a separator that may occur in data).
 * Throws TypeError when prevHash is not 64 hex digits or seq is not a safe non-negative integer.
 */
export function auditHash(prevHash: string, fields: AuditHashFields): string {
  if (!/^[0-9a-f]{64}$/.test(prevHash)) throw new TypeError('auditHash: prevHash must be 64 lower-case hex digits');
  if (!Number.isSafeInteger(fields.seq) || fields.seq < 0) throw new TypeError('auditHash: seq must be a non-negative safe integer');
  // The whole input in one buffer and one hash update: this runs for every audited call.
  const texts = [fields.time, fields.actor, fields.action, fields.target, fields.outcome, fields.detailJson];
  let size = 4 + HASH_TAG_BYTES.length + 4 + 32 + 4 + 8;
  for (const text of texts) size += 4 + Buffer.byteLength(text, 'utf8');
  const buf = Buffer.allocUnsafe(size);
  let o = buf.writeUInt32BE(HASH_TAG_BYTES.length, 0);
  o += HASH_TAG_BYTES.copy(buf, o);
  o = buf.writeUInt32BE(32, o);
  o += buf.write(prevHash, o, 32, 'hex');
  o = buf.writeUInt32BE(8, o);
  o = buf.writeBigUInt64BE(BigInt(fields.seq), o);
  for (const text of texts) {
    const len = buf.write(text, o + 4, 'utf8');
    buf.writeUInt32BE(len, o);
    o += 4 + len;
  }
  return createHash('sha256').update(buf).digest('hex');
}

/**
 * Verifies a chain given in ascending seq order, starting at seq 1. Stops at the first
 * problem; checks per event, in this order:
 *   - "sequence gap": seq is not previous seq + 1 (an event was deleted, or the first
 *     event is not seq 1); "sequence out of order" when seq went down or repeated;
 *   - "prev_hash mismatch": prev_hash is not the previous event's hash (deleted, reordered
 *     or swapped events, or an edited prev_hash);
 *   - "hash mismatch": the stored hash is not the hash of the event's fields (edited field
 *     or edited hash).
 * firstBadSeq is the seq of the event where the chain breaks, eventsChecked counts the
 * events read (including the bad one), headHash is the hash of the last event that
 * verified (GENESIS_HASH for an empty or immediately broken chain). A truncated tail is
 * not detectable here: compare headHash with an anchored copy.
 */
export function verifyChain(records: Iterable<AuditRecord>): AuditVerification {
  let expectedSeq = 1;
  let prev = GENESIS_HASH;
  let checked = 0;
  const fail = (seq: number, problem: string): AuditVerification => ({
    ok: false,
    eventsChecked: checked,
    firstBadSeq: seq,
    problem,
    headHash: prev,
  });
  for (const r of records) {
    checked++;
    if (r.seq !== expectedSeq) return fail(r.seq, r.seq > expectedSeq ? 'sequence gap' : 'sequence out of order');
    if (r.prevHash !== prev) return fail(r.seq, 'prev_hash mismatch');
    // prevHash equals a hash we computed (or GENESIS), so auditHash cannot throw on it.
    if (auditHash(r.prevHash, r) !== r.hash) return fail(r.seq, 'hash mismatch');
    prev = r.hash;
    expectedSeq++;
  }
  return { ok: true, eventsChecked: checked, firstBadSeq: 0, problem: '', headHash: prev };
}
