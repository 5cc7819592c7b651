/**
 * Tests of the at-rest envelope (shared/src/envelope.ts): frozen known-answer vectors
 * computed three ways, round trips, and every way an envelope must refuse to open.
 */
import test from 'ava';
import { createCipheriv } from 'node:crypto';
import { loadSodium, sodium } from '../../shared/src/sodium.js';
import {
  DecryptionError,
  ENVELOPE_OVERHEAD,
  ENVELOPE_VERSION,
  KEY_ID_LENGTH,
  destroyWrappingKey,
  envelopeKeyId,
  generateWrappingKey,
  open,
  seal,
  volumeSecretAad,
  type WrappingKey,
} from '../../shared/src/envelope.js';

test.before(async () => {
  await loadSodium();
});

const HEADER_LENGTH = 1 + KEY_ID_LENGTH;
const NONCE_LENGTH = 24;
const TAG_LENGTH = 16;

/** Bytes start, start+1, ... (mod 256). */
function counting(length: number, start: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (start + i) & 0xff);
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

/** A copy of buf with byte i XORed with mask. */
function flipped(buf: Uint8Array, i: number, mask = 0x01): Uint8Array {
  const out = Uint8Array.from(buf);
  out[i] = (out[i] ?? 0) ^ mask;
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  return Uint8Array.from(Buffer.concat(parts));
}

/**
 * The documented layout built by hand with libsodium's AEAD:
 * header = 0x01 || keyId; AD = header || utf8(aad); output header || nonce || ct.
 */
function expectedWithLibsodium(plaintext: Uint8Array, key: WrappingKey, aad: string, nonce: Uint8Array): Uint8Array {
  const header = concat(Uint8Array.of(0x01), key.id);
  const ad = concat(header, Buffer.from(aad, 'utf8'));
  const ct = sodium().crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, null, nonce, key.bytes);
  return concat(header, nonce, ct);
}

// --- An implementation of XChaCha20-Poly1305 independent of libsodium: HChaCha20 written
// here, ChaCha20-Poly1305 (RFC 8439) from Node's OpenSSL.

function rotl(x: number, n: number): number {
  return ((x << n) | (x >>> (32 - n))) >>> 0;
}

function hchacha20(key: Uint8Array, nonce16: Uint8Array): Uint8Array {
  const kv = new DataView(key.buffer, key.byteOffset, key.byteLength);
  const nv = new DataView(nonce16.buffer, nonce16.byteOffset, nonce16.byteLength);
  const s: number[] = [0x61707865, 0x3320646e, 0x79622d32, 0x6b206574];
  for (let i = 0; i < 8; i++) s.push(kv.getUint32(i * 4, true));
  for (let i = 0; i < 4; i++) s.push(nv.getUint32(i * 4, true));
  const at = (i: number): number => s[i] ?? 0;
  const qr = (a: number, b: number, c: number, d: number): void => {
    s[a] = (at(a) + at(b)) >>> 0;
    s[d] = rotl(at(d) ^ at(a), 16);
    s[c] = (at(c) + at(d)) >>> 0;
    s[b] = rotl(at(b) ^ at(c), 12);
    s[a] = (at(a) + at(b)) >>> 0;
    s[d] = rotl(at(d) ^ at(a), 8);
    s[c] = (at(c) + at(d)) >>> 0;
    s[b] = rotl(at(b) ^ at(c), 7);
  };
  for (let round = 0; round < 10; round++) {
    qr(0, 4, 8, 12);
    qr(1, 5, 9, 13);
    qr(2, 6, 10, 14);
    qr(3, 7, 11, 15);
    qr(0, 5, 10, 15);
    qr(1, 6, 11, 12);
    qr(2, 7, 8, 13);
    qr(3, 4, 9, 14);
  }
  const out = new Uint8Array(32);
  const ov = new DataView(out.buffer);
  [0, 1, 2, 3, 12, 13, 14, 15].forEach((w, i) => ov.setUint32(i * 4, at(w), true));
  return out;
}

function expectedWithOpenSsl(plaintext: Uint8Array, key: WrappingKey, aad: string, nonce: Uint8Array): Uint8Array {
  const header = concat(Uint8Array.of(0x01), key.id);
  const ad = concat(header, Buffer.from(aad, 'utf8'));
  const subkey = hchacha20(key.bytes, nonce.subarray(0, 16));
  const ietfNonce = concat(new Uint8Array(4), nonce.subarray(16, 24));
  const cipher = createCipheriv('chacha20-poly1305', subkey, ietfNonce, { authTagLength: TAG_LENGTH });
  cipher.setAAD(ad, { plaintextLength: plaintext.length });
  const ct = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return concat(header, nonce, ct, cipher.getAuthTag());
}

test('the test HChaCha20 matches the draft-irtf-cfrg-xchacha test vector', (t) => {
  const key = Buffer.from('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex');
  const nonce = Buffer.from('000000090000004a0000000031415927', 'hex');
  t.is(hex(hchacha20(key, nonce)), '82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc');
});

interface Vector {
  name: string;
  key: WrappingKey;
  nonce: Uint8Array;
  plaintext: Uint8Array;
  aad: string;
  /** Frozen: a change here is a change of the on-disk format. */
  envelopeHex: string;
}

const VECTORS: Vector[] = [
  {
    name: 'volume secret',
    key: { id: Buffer.from('0123456789abcdef', 'hex'), bytes: counting(32, 0x80) },
    nonce: counting(24, 0x40),
    plaintext: Buffer.from('virtkm known-answer vector one', 'utf8'),
    aad: 'virtkm/v1/volume/0f8e4c1a-7b2d-4e3f-9a10-5c6d7e8f9012/3',
    envelopeHex:
      '010123456789abcdef404142434445464748494a4b4c4d4e4f5051525354555657' +
      '87650180309dd431957d00bddbcff3264522004e7321ff98a5c8d5632c30f8014a9101bfe916e685c369cd79415e',
  },
  {
    name: 'empty plaintext',
    key: { id: Buffer.from('fedcba9876543210', 'hex'), bytes: counting(32, 0x20) },
    nonce: counting(24, 0xa0),
    plaintext: new Uint8Array(0),
    aad: 'virtkm/v1/server-secret/ca-key',
    envelopeHex: '01fedcba9876543210a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b76925c2d2f43861781c7b6a1922f0191d',
  },
  {
    name: 'non-ASCII plaintext and AAD',
    key: { id: Buffer.from('0123456789abcdef', 'hex'), bytes: counting(32, 0x80) },
    nonce: counting(24, 0xa0),
    plaintext: Buffer.from('ünïcødé', 'utf8'),
    aad: 'aad/π/✓',
    envelopeHex:
      '010123456789abcdefa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7' + '3d22dfe175ce965ecfc7170ea93baad2c995471b5fed6e9f4807c7',
  },
];

for (const v of VECTORS) {
  test(`known answer (${v.name}): seal gives the frozen envelope`, (t) => {
    const env = seal(v.plaintext, v.key, v.aad, v.nonce);
    t.is(hex(env), v.envelopeHex);
    t.is(env.length, v.plaintext.length + ENVELOPE_OVERHEAD);
  });

  test(`known answer (${v.name}): the frozen envelope equals the documented layout computed independently`, (t) => {
    t.is(hex(expectedWithLibsodium(v.plaintext, v.key, v.aad, v.nonce)), v.envelopeHex);
    t.is(hex(expectedWithOpenSsl(v.plaintext, v.key, v.aad, v.nonce)), v.envelopeHex);
  });

  test(`known answer (${v.name}): the frozen envelope opens to the plaintext`, (t) => {
    const env = Buffer.from(v.envelopeHex, 'hex');
    t.is(hex(envelopeKeyId(env)), hex(v.key.id));
    t.is(hex(open(env, v.key, v.aad)), hex(v.plaintext));
  });
}

test('constants describe the layout', (t) => {
  t.is(ENVELOPE_VERSION, 1);
  t.is(KEY_ID_LENGTH, 8);
  t.is(ENVELOPE_OVERHEAD, 1 + 8 + 24 + 16);
});

test('round trip for several lengths under a generated key', (t) => {
  const key = generateWrappingKey();
  for (const len of [0, 1, 31, 32, 64, 1000, 65536]) {
    const pt = counting(len, len);
    const aad = volumeSecretAad('vol', len);
    const env = seal(pt, key, aad);
    t.is(env.length, len + ENVELOPE_OVERHEAD);
    t.is(env[0], ENVELOPE_VERSION);
    t.is(hex(env.subarray(1, HEADER_LENGTH)), hex(key.id));
    t.deepEqual(Uint8Array.from(open(env, key, aad)), pt);
  }
});

test('the ciphertext does not contain the plaintext', (t) => {
  const key = generateWrappingKey();
  const pt = Buffer.from('a very recognisable plaintext string', 'utf8');
  const env = seal(pt, key, 'x');
  t.is(Buffer.from(env).indexOf(pt), -1);
});

test('generateWrappingKey makes fresh 8-byte ids and 32-byte keys; destroyWrappingKey zeroes the key', (t) => {
  const a = generateWrappingKey();
  const b = generateWrappingKey();
  t.is(a.id.length, KEY_ID_LENGTH);
  t.is(a.bytes.length, 32);
  t.not(hex(a.id), hex(b.id));
  t.not(hex(a.bytes), hex(b.bytes));
  destroyWrappingKey(a);
  t.true(a.bytes.every((x) => x === 0));
});

test('seal refuses malformed keys and nonces', (t) => {
  const key = generateWrappingKey();
  t.throws(() => seal(new Uint8Array(1), { id: new Uint8Array(7), bytes: key.bytes }, 'a'), { instanceOf: RangeError });
  t.throws(() => seal(new Uint8Array(1), { id: key.id, bytes: new Uint8Array(16) }, 'a'), { instanceOf: RangeError });
  t.throws(() => seal(new Uint8Array(1), key, 'a', new Uint8Array(12)), { instanceOf: RangeError });
});

test('random nonce: sealing the same plaintext twice gives different envelopes that both open', (t) => {
  const key = generateWrappingKey();
  const pt = counting(32, 7);
  const a = seal(pt, key, 'aad');
  const b = seal(pt, key, 'aad');
  t.not(hex(a), hex(b));
  t.not(hex(a.subarray(HEADER_LENGTH, HEADER_LENGTH + NONCE_LENGTH)), hex(b.subarray(HEADER_LENGTH, HEADER_LENGTH + NONCE_LENGTH)));
  t.deepEqual(Uint8Array.from(open(a, key, 'aad')), pt);
  t.deepEqual(Uint8Array.from(open(b, key, 'aad')), pt);
});

// --- Refusals. All of them must be the same DecryptionError.

const base = VECTORS[0] as Vector;
const baseEnvelope = (): Uint8Array => Buffer.from(base.envelopeHex, 'hex');
const failure = { instanceOf: DecryptionError, message: 'decryption failed' } as const;

test('DecryptionError says exactly "decryption failed" and nothing more', (t) => {
  const err = t.throws(() => open(baseEnvelope(), base.key, 'wrong aad'), failure);
  t.is(err?.name, 'DecryptionError');
  t.is(err?.message, 'decryption failed');
  t.is(err?.cause, undefined);
  t.false(String(err?.stack).includes('wrong aad'));
  t.is(new DecryptionError().message, 'decryption failed');
});

test('flipping any single byte of the envelope makes it refuse to open', (t) => {
  const env = baseEnvelope();
  for (let i = 0; i < env.length; i++) {
    t.throws(() => open(flipped(env, i), base.key, base.aad), failure, `byte ${i}`);
    t.throws(() => open(flipped(env, i, 0x80), base.key, base.aad), failure, `byte ${i} (high bit)`);
  }
});

test('tampered ciphertext byte', (t) => {
  t.throws(() => open(flipped(baseEnvelope(), HEADER_LENGTH + NONCE_LENGTH + 3), base.key, base.aad), failure);
});

test('tampered tag', (t) => {
  const env = baseEnvelope();
  t.throws(() => open(flipped(env, env.length - 1), base.key, base.aad), failure);
  t.throws(() => open(flipped(env, env.length - TAG_LENGTH), base.key, base.aad), failure);
});

test('tampered nonce', (t) => {
  t.throws(() => open(flipped(baseEnvelope(), HEADER_LENGTH), base.key, base.aad), failure);
  t.throws(() => open(flipped(baseEnvelope(), HEADER_LENGTH + NONCE_LENGTH - 1), base.key, base.aad), failure);
});

test('tampered version byte', (t) => {
  for (const v of [0x00, 0x02, 0xff]) {
    const env = baseEnvelope();
    env[0] = v;
    t.throws(() => envelopeKeyId(env), failure);
    t.throws(() => open(env, base.key, base.aad), failure);
    t.throws(() => open(env, () => base.key, base.aad), failure);
  }
});

test('tampered key id byte: refused both by id lookup and by the AEAD (the header is authenticated)', (t) => {
  const env = flipped(baseEnvelope(), 1);
  t.throws(() => open(env, base.key, base.aad), failure);
  // A lookup that ignores the id hands over the right key: the AEAD must still refuse,
  // because the key id is part of the additional data.
  let seenId = '';
  t.throws(
    () =>
      open(
        env,
        (id) => {
          seenId = hex(id);
          return base.key;
        },
        base.aad,
      ),
    failure,
  );
  t.is(seenId, hex(flipped(base.key.id, 0)));
});

test('wrong AAD', (t) => {
  const env = baseEnvelope();
  t.throws(() => open(env, base.key, ''), failure);
  t.throws(() => open(env, base.key, base.aad + ' '), failure);
  t.throws(() => open(env, base.key, base.aad.slice(0, -1)), failure);
  t.throws(() => open(env, base.key, base.aad.toUpperCase()), failure);
});

test('wrong key: same id with other bytes, and other id', (t) => {
  const env = baseEnvelope();
  t.throws(() => open(env, { id: base.key.id, bytes: flipped(base.key.bytes, 0) }, base.aad), failure);
  t.throws(() => open(env, { id: base.key.id, bytes: generateWrappingKey().bytes }, base.aad), failure);
  t.throws(() => open(env, { id: flipped(base.key.id, 7), bytes: base.key.bytes }, base.aad), failure);
  t.throws(() => open(env, () => undefined, base.aad), failure);
});

test('truncated or empty envelopes', (t) => {
  const env = baseEnvelope();
  t.throws(() => open(new Uint8Array(0), base.key, base.aad), failure);
  t.throws(() => envelopeKeyId(new Uint8Array(0)), failure);
  for (let len = 0; len < env.length; len++) {
    t.throws(() => open(env.subarray(0, len), base.key, base.aad), failure, `length ${len}`);
  }
  // Extended by a byte is as bad as truncated.
  t.throws(() => open(concat(env, Uint8Array.of(0)), base.key, base.aad), failure);
});

test('an empty-plaintext envelope truncated below the overhead is refused', (t) => {
  const v = VECTORS[1] as Vector;
  const env = Buffer.from(v.envelopeHex, 'hex');
  t.is(env.length, ENVELOPE_OVERHEAD);
  t.is(open(env, v.key, v.aad).length, 0);
  t.throws(() => open(env.subarray(0, ENVELOPE_OVERHEAD - 1), v.key, v.aad), failure);
});

test('swapped rows: a secret sealed for (A, 1) opens neither as (B, 1) nor as (A, 2)', (t) => {
  const key = generateWrappingKey();
  const a = '3f2504e0-4f89-11d3-9a0c-0305e82c3301';
  const b = '3f2504e0-4f89-11d3-9a0c-0305e82c3302';
  t.is(volumeSecretAad(a, 1), `virtkm/v1/volume/${a}/1`);
  const secret = counting(32, 99);
  const env = seal(secret, key, volumeSecretAad(a, 1));
  t.deepEqual(Uint8Array.from(open(env, key, volumeSecretAad(a, 1))), secret);
  t.throws(() => open(env, key, volumeSecretAad(b, 1)), failure);
  t.throws(() => open(env, key, volumeSecretAad(a, 2)), failure);
  t.throws(() => open(env, key, volumeSecretAad(b, 2)), failure);
  // Neighbouring versions must not collide as strings either.
  t.not(volumeSecretAad(a, 1), volumeSecretAad(a, 11));
  t.throws(() => open(env, key, volumeSecretAad(a, 11)), failure);
});

test('key lookup picks the key by id (as during a master-key rotation)', (t) => {
  const oldKey = generateWrappingKey();
  const newKey = generateWrappingKey();
  const keys = [oldKey, newKey];
  const asked: string[] = [];
  const lookup = (id: Uint8Array): WrappingKey | undefined => {
    asked.push(hex(id));
    return keys.find((k) => hex(k.id) === hex(id));
  };
  const underNew = seal(Buffer.from('new'), newKey, 'x');
  const underOld = seal(Buffer.from('old'), oldKey, 'x');
  t.is(Buffer.from(open(underNew, lookup, 'x')).toString(), 'new');
  t.is(Buffer.from(open(underOld, lookup, 'x')).toString(), 'old');
  t.deepEqual(asked, [hex(newKey.id), hex(oldKey.id)]);
  t.is(hex(envelopeKeyId(underNew)), hex(newKey.id));
  // With only the old key known, the new envelope does not open.
  t.throws(() => open(underNew, (id) => (hex(id) === hex(oldKey.id) ? oldKey : undefined), 'x'), failure);
  // A single key given directly opens only its own envelopes.
  t.throws(() => open(underNew, oldKey, 'x'), failure);
});

test('open returns a buffer of its own: wiping it leaves the envelope intact', (t) => {
  const env = baseEnvelope();
  const before = hex(env);
  const pt = open(env, base.key, base.aad);
  pt.fill(0);
  t.is(hex(env), before);
  t.is(hex(open(env, base.key, base.aad)), hex(base.plaintext));
});
