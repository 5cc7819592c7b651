// Unit tests of the audit hash chain (pure functions, no database).
import test from 'ava';

import { GENESIS_HASH, auditHash, canonicalJson, verifyChain } from '../../server/src/audit/chain.js';
import type { AuditHashFields } from '../../server/src/audit/chain.js';
import type { AuditRecord } from '../../server/src/domain/model.js';

/** Builds a valid chain of n events. */
function makeChain(n: number): AuditRecord[] {
  const out: AuditRecord[] = [];
  let prev = GENESIS_HASH;
  for (let seq = 1; seq <= n; seq++) {
    const fields: AuditHashFields = {
      seq,
      time: `2024-01-01T00:00:${String(seq % 60).padStart(2, '0')}.000Z`,
      actor: 'admin:alice',
      action: seq % 2 === 0 ? 'key.release' : 'volume.create',
      target: `vol-${seq}`,
      outcome: 'ok',
      detailJson: canonicalJson({ n: seq }),
    };
    const hash = auditHash(prev, fields);
    out.push({ ...fields, prevHash: prev, hash });
    prev = hash;
  }
  return out;
}

test('GENESIS_HASH is 64 zeros', (t) => {
  t.is(GENESIS_HASH, '0'.repeat(64));
});

test('canonicalJson sorts keys recursively and has no whitespace', (t) => {
  t.is(canonicalJson({ b: 1, a: 'x', c: { z: true, y: null } }), '{"a":"x","b":1,"c":{"y":null,"z":true}}');
  t.is(canonicalJson({}), '{}');
  t.is(canonicalJson([3, 'a', { b: 2, a: 1 }]), '[3,"a",{"a":1,"b":2}]');
  t.is(canonicalJson({ a: undefined, b: 2 }), '{"b":2}');
  t.is(canonicalJson({ 'quote"key': 'line\nbreak' }), '{"quote\\"key":"line\\nbreak"}');
});

test('canonicalJson is independent of insertion order', (t) => {
  const x: Record<string, number> = {};
  const y: Record<string, number> = {};
  for (const k of ['q', 'a', 'm', 'B', '_']) x[k] = k.length;
  for (const k of ['_', 'B', 'm', 'a', 'q']) y[k] = k.length;
  t.is(canonicalJson(x), canonicalJson(y));
});

test('canonicalJson refuses non-finite numbers and unsupported types', (t) => {
  t.throws(() => canonicalJson({ n: Number.NaN }), { instanceOf: TypeError });
  t.throws(() => canonicalJson({ n: Infinity }), { instanceOf: TypeError });
  t.throws(() => canonicalJson({ n: 1n } as unknown as Record<string, number>), { instanceOf: TypeError });
});

test('auditHash is deterministic, hex, and covers every field', (t) => {
  const base: AuditHashFields = {
    seq: 7,
    time: '2024-05-01T12:00:00.000Z',
    actor: 'host:h1',
    action: 'key.release',
    target: 'vol-1',
    outcome: 'ok',
    detailJson: '{"v":1}',
  };
  const h = auditHash(GENESIS_HASH, base);
  t.regex(h, /^[0-9a-f]{64}$/);
  t.is(auditHash(GENESIS_HASH, { ...base }), h);
  const variants: AuditHashFields[] = [
    { ...base, seq: 8 },
    { ...base, time: '2024-05-01T12:00:00.001Z' },
    { ...base, actor: 'host:h2' },
    { ...base, action: 'key.refuse' },
    { ...base, target: 'vol-2' },
    { ...base, outcome: 'denied' },
    { ...base, detailJson: '{"v":2}' },
  ];
  for (const v of variants) t.not(auditHash(GENESIS_HASH, v), h);
  t.not(auditHash('1'.repeat(64), base), h);
});

test('auditHash encoding is unambiguous across field boundaries', (t) => {
  const a: AuditHashFields = { seq: 1, time: 't', actor: 'ab', action: 'c', target: 'x', outcome: 'ok', detailJson: '{}' };
  const b: AuditHashFields = { ...a, actor: 'a', action: 'bc' };
  t.not(auditHash(GENESIS_HASH, a), auditHash(GENESIS_HASH, b));
});

test('auditHash rejects a malformed prevHash', (t) => {
  const f: AuditHashFields = { seq: 1, time: 't', actor: 'a', action: 'b', target: 'c', outcome: 'ok', detailJson: '{}' };
  t.throws(() => auditHash('xyz', f), { instanceOf: TypeError });
  t.throws(() => auditHash('A'.repeat(64), f), { instanceOf: TypeError });
});

test('verifyChain accepts a valid chain and reports its head', (t) => {
  const chain = makeChain(50);
  const v = verifyChain(chain);
  t.true(v.ok);
  t.is(v.eventsChecked, 50);
  t.is(v.firstBadSeq, 0);
  t.is(v.problem, '');
  t.is(v.headHash, chain[49]!.hash);
});

test('verifyChain on an empty log is ok with the genesis head', (t) => {
  t.deepEqual(verifyChain([]), { ok: true, eventsChecked: 0, firstBadSeq: 0, problem: '', headHash: GENESIS_HASH });
});

test('verifyChain detects an edited field', (t) => {
  const chain = makeChain(10);
  chain[4] = { ...chain[4]!, target: 'vol-other' };
  const v = verifyChain(chain);
  t.false(v.ok);
  t.is(v.firstBadSeq, 5);
  t.is(v.problem, 'hash mismatch');
  t.is(v.headHash, chain[3]!.hash);
  t.is(v.eventsChecked, 5);
});

test('verifyChain detects an edited hash', (t) => {
  const chain = makeChain(10);
  chain[6] = { ...chain[6]!, hash: 'f'.repeat(64) };
  const v = verifyChain(chain);
  t.is(v.firstBadSeq, 7);
  t.is(v.problem, 'hash mismatch');
});

test('verifyChain detects a deleted middle event as a sequence gap', (t) => {
  const chain = makeChain(10);
  chain.splice(3, 1); // removes seq 4
  const v = verifyChain(chain);
  t.false(v.ok);
  t.is(v.firstBadSeq, 5);
  t.is(v.problem, 'sequence gap');
});

test('verifyChain detects a deleted first event', (t) => {
  const v = verifyChain(makeChain(5).slice(1));
  t.is(v.firstBadSeq, 2);
  t.is(v.problem, 'sequence gap');
  t.is(v.headHash, GENESIS_HASH);
});

test('verifyChain detects deletion with renumbering as prev_hash mismatch', (t) => {
  const chain = makeChain(6);
  chain.splice(2, 1);
  const renumbered = chain.map((r, i) => ({ ...r, seq: i + 1 }));
  const v = verifyChain(renumbered);
  t.is(v.firstBadSeq, 3);
  t.is(v.problem, 'prev_hash mismatch');
});

test('verifyChain detects swapped events', (t) => {
  const chain = makeChain(8);
  const a = chain[2]!;
  const b = chain[3]!;
  // Swap contents but keep each row's seq, as a database edit would.
  chain[2] = { ...b, seq: 3 };
  chain[3] = { ...a, seq: 4 };
  const v = verifyChain(chain);
  t.is(v.firstBadSeq, 3);
  t.is(v.problem, 'prev_hash mismatch');
});

test('verifyChain reports reordered sequence numbers', (t) => {
  const chain = makeChain(5);
  const v = verifyChain([chain[0]!, chain[1]!, chain[0]!]);
  t.is(v.firstBadSeq, 1);
  t.is(v.problem, 'sequence out of order');
});

test('a truncated tail still verifies (documented limit): only the head hash differs', (t) => {
  const chain = makeChain(10);
  const full = verifyChain(chain);
  const cut = verifyChain(chain.slice(0, 7));
  t.true(cut.ok);
  t.not(cut.headHash, full.headHash);
});

test('verifyChain consumes a lazy iterable and stops at the first problem', (t) => {
  const chain = makeChain(20);
  chain[9] = { ...chain[9]!, outcome: 'denied' };
  let pulled = 0;
  function* gen() {
    for (const r of chain) {
      pulled++;
      yield r;
    }
  }
  const v = verifyChain(gen());
  t.is(v.firstBadSeq, 10);
  t.is(pulled, 10);
});
