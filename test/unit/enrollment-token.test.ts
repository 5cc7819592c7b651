/**
 * Tests of the enrollment token format (shared/src/enrollment-token.ts).
 */
import test, { type ExecutionContext } from 'ava';
import { createHash, randomBytes } from 'node:crypto';
import { loadSodium } from '../../shared/src/sodium.js';
import { DomainError } from '../../shared/src/errors.js';
import { formatEnrollmentToken, parseEnrollmentToken, type EnrollmentToken } from '../../shared/src/enrollment-token.js';

test.before(async () => {
  await loadSodium();
});

const MESSAGE = 'invalid or expired enrollment token';

function sampleToken(): EnrollmentToken {
  return {
    id: randomBytes(9).toString('base64url'),
    secret: randomBytes(32),
    caFingerprint: createHash('sha256').update('a CA certificate').digest('hex'),
  };
}

/** A fixed token whose text is known in full. */
const FIXED: EnrollmentToken = {
  id: 'AAECAwQFBgcI',
  secret: Uint8Array.from({ length: 32 }, (_, i) => i),
  caFingerprint: 'ff'.repeat(32),
};
const FIXED_TEXT = 'vkm1.AAECAwQFBgcI.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8.__________________________________________8';

function unauthenticated(t: ExecutionContext, token: string, label = JSON.stringify(token)): void {
  const err = t.throws(() => parseEnrollmentToken(token), { instanceOf: DomainError }, label);
  t.is(err?.kind, 'unauthenticated', label);
  t.is(err?.message, MESSAGE, label);
  t.is(err?.hint, undefined, label);
}

function parts(token: string): [string, string, string, string] {
  const p = token.split('.');
  if (p.length !== 4) throw new Error('test token must have four parts');
  return p as [string, string, string, string];
}

test('format gives vkm1.<id>.<secret>.<ca> in base64url', (t) => {
  t.is(formatEnrollmentToken(FIXED), FIXED_TEXT);
});

test('parse of the known text gives the parts back', (t) => {
  const parsed = parseEnrollmentToken(FIXED_TEXT);
  t.is(parsed.id, FIXED.id);
  t.deepEqual(Uint8Array.from(parsed.secret), FIXED.secret);
  t.is(parsed.caFingerprint, FIXED.caFingerprint);
});

test('format/parse round trip for random tokens', (t) => {
  for (let i = 0; i < 50; i++) {
    const tok = sampleToken();
    const text = formatEnrollmentToken(tok);
    t.regex(text, /^vkm1\.[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{43}$/);
    const parsed = parseEnrollmentToken(text);
    t.is(parsed.id, tok.id);
    t.is(Buffer.from(parsed.secret).toString('hex'), Buffer.from(tok.secret).toString('hex'));
    t.is(parsed.caFingerprint, tok.caFingerprint);
  }
});

test('the fingerprint comes back in lower-case hex', (t) => {
  const parsed = parseEnrollmentToken(formatEnrollmentToken({ ...FIXED, caFingerprint: 'AB'.repeat(32) }));
  t.is(parsed.caFingerprint, 'ab'.repeat(32));
});

test('surrounding whitespace (as pasted from a terminal) is tolerated', (t) => {
  t.is(parseEnrollmentToken(`  ${FIXED_TEXT}\n`).id, FIXED.id);
});

test('wrong prefix is unauthenticated', (t) => {
  const [, id, secret, ca] = parts(FIXED_TEXT);
  for (const prefix of ['vkm0', 'vkm2', 'VKM1', 'vkm', '', 'xvkm1']) {
    unauthenticated(t, [prefix, id, secret, ca].join('.'));
  }
});

test('wrong number of parts is unauthenticated', (t) => {
  const [prefix, id, secret, ca] = parts(FIXED_TEXT);
  unauthenticated(t, [prefix, id, secret].join('.'), '3 parts');
  unauthenticated(t, [prefix, id].join('.'), '2 parts');
  unauthenticated(t, prefix, '1 part');
  unauthenticated(t, [prefix, id, secret, ca, 'extra'].join('.'), '5 parts');
  unauthenticated(t, `${FIXED_TEXT}.`, 'trailing dot');
  unauthenticated(t, '', 'empty');
  unauthenticated(t, '...', 'only dots');
});

test('a bad id is unauthenticated', (t) => {
  const [prefix, , secret, ca] = parts(FIXED_TEXT);
  for (const id of ['', 'AAECAwQFBgc', 'AAECAwQFBgcIA', 'AAECAwQF+gcI', 'AAECAwQF/gcI', 'AAECAwQFBgc=', 'AAECAwQF gcI', 'ÄAECAwQFBgcI']) {
    unauthenticated(t, [prefix, id, secret, ca].join('.'), `id ${JSON.stringify(id)}`);
  }
});

test('bad base64 in the secret or the CA part is unauthenticated', (t) => {
  const [prefix, id, secret, ca] = parts(FIXED_TEXT);
  for (const junk of ['!!!!', 'not base64 at all', '****************************************************', '']) {
    unauthenticated(t, [prefix, id, junk, ca].join('.'), `secret ${JSON.stringify(junk)}`);
    unauthenticated(t, [prefix, id, secret, junk].join('.'), `ca ${JSON.stringify(junk)}`);
  }
});

test('a short or long secret or CA hash is unauthenticated', (t) => {
  const [prefix, id, , ca] = parts(FIXED_TEXT);
  const b64 = (n: number): string => Buffer.alloc(n, 7).toString('base64url');
  for (const n of [0, 1, 16, 31, 33, 64]) {
    unauthenticated(t, [prefix, id, b64(n), ca].join('.'), `secret of ${n} bytes`);
    unauthenticated(t, [prefix, id, b64(32), b64(n)].join('.'), `ca of ${n} bytes`);
  }
  // One character short of 32 bytes.
  const [, , secret] = parts(FIXED_TEXT);
  unauthenticated(t, [prefix, id, secret.slice(0, -1), ca].join('.'), 'secret missing a character');
});

test('an overlong token is unauthenticated before any parsing', (t) => {
  unauthenticated(t, FIXED_TEXT + ' '.repeat(201), 'valid token padded past 200 characters');
  unauthenticated(t, 'x'.repeat(201));
  unauthenticated(t, 'vkm1.' + 'A'.repeat(100_000));
});

test('every malformation gives exactly the same error (no oracle)', (t) => {
  const messages = new Set<string>();
  const kinds = new Set<string>();
  for (const bad of ['', 'vkm2.a.b.c', 'vkm1.a.b', 'vkm1.AAECAwQFBgcI.AAEC.AAEC', 'x'.repeat(500), FIXED_TEXT.replace('vkm1', 'vkm9')]) {
    try {
      parseEnrollmentToken(bad);
      t.fail(`accepted ${bad}`);
    } catch (err) {
      t.true(err instanceof DomainError);
      messages.add((err as DomainError).message);
      kinds.add((err as DomainError).kind);
    }
  }
  t.deepEqual([...messages], [MESSAGE]);
  t.deepEqual([...kinds], ['unauthenticated']);
});

// Found while writing these tests (see the report): Node's base64url decoder skips
// characters outside the alphabet and accepts '+', '/' and '=' padding, so a secret or CA
// part that is not canonical base64url still parses when it happens to decode to 32 bytes.
test('non-base64url characters in the secret or CA part are unauthenticated', (t) => {
  const [prefix, id, secret, ca] = parts(FIXED_TEXT);
  unauthenticated(t, [prefix, id, `${secret.slice(0, 10)}!${secret.slice(10)}`, ca].join('.'), 'secret with "!"');
  unauthenticated(t, [prefix, id, secret, `${ca.slice(0, 5)}*${ca.slice(5)}`].join('.'), 'ca with "*"');
  unauthenticated(t, [prefix, id, `${secret}=`, ca].join('.'), 'secret with padding');
  const caStandard = Buffer.from(FIXED.caFingerprint, 'hex').toString('base64');
  t.regex(caStandard, /\//);
  unauthenticated(t, [prefix, id, secret, caStandard].join('.'), 'standard base64 alphabet and padding');
});
