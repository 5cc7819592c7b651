/**
 * Tests of key-packet sealing (shared/src/box.ts): the output must be libsodium's
 * crypto_box_seal format exactly, in both directions, and recipients must be checked.
 */
import test from 'ava';
import { loadSodium, sodium } from '../../shared/src/sodium.js';
import { SEAL_OVERHEAD, boxRecipient, ephemeralShare, generateBoxKeyPair, openSealed, sealToRecipient, sealWithShare } from '../../shared/src/box.js';

test.before(async () => {
  await loadSodium();
});

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

function message(length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 7 + 3) & 0xff);
}

function flipped(buf: Uint8Array, i: number, mask = 0x01): Uint8Array {
  const out = Uint8Array.from(buf);
  out[i] = (out[i] ?? 0) ^ mask;
  return out;
}

const LENGTHS = [0, 1, 100, 4096];
const cannotOpen = { instanceOf: Error, message: 'cannot open sealed packet' } as const;

test('SEAL_OVERHEAD equals crypto_box_SEALBYTES', (t) => {
  t.is(SEAL_OVERHEAD, sodium().crypto_box_SEALBYTES);
  t.is(SEAL_OVERHEAD, 48);
});

test('generateBoxKeyPair makes an X25519 pair (public = scalarmult_base(secret))', (t) => {
  const kp = generateBoxKeyPair();
  t.is(kp.publicKey.length, 32);
  t.is(kp.secretKey.length, 32);
  t.is(hex(sodium().crypto_scalarmult_base(kp.secretKey)), hex(kp.publicKey));
  t.not(hex(generateBoxKeyPair().publicKey), hex(kp.publicKey));
});

for (const len of LENGTHS) {
  test(`sealToRecipient output (${len} bytes) opens with libsodium's crypto_box_seal_open and with openSealed`, (t) => {
    const host = generateBoxKeyPair();
    const m = message(len);
    const sealed = sealToRecipient(m, boxRecipient(host.publicKey));
    t.is(sealed.length, len + SEAL_OVERHEAD);
    t.deepEqual(Uint8Array.from(sodium().crypto_box_seal_open(sealed, host.publicKey, host.secretKey)), m);
    t.deepEqual(Uint8Array.from(openSealed(sealed, host)), m);
  });

  test(`libsodium's crypto_box_seal output (${len} bytes) opens with openSealed`, (t) => {
    const host = generateBoxKeyPair();
    const m = message(len);
    const sealed = sodium().crypto_box_seal(m, host.publicKey);
    t.is(sealed.length, len + SEAL_OVERHEAD);
    t.deepEqual(Uint8Array.from(openSealed(sealed, host)), m);
  });
}

test('every seal uses a fresh ephemeral key', (t) => {
  const host = generateBoxKeyPair();
  const r = boxRecipient(host.publicKey);
  const m = message(32);
  const a = sealToRecipient(m, r);
  const b = sealToRecipient(m, r);
  t.not(hex(a.subarray(0, 32)), hex(b.subarray(0, 32)));
  t.not(hex(a), hex(b));
  // The ephemeral public key is a usable (not low-order) X25519 key.
  t.notThrows(() => boxRecipient(a.subarray(0, 32)));
});

test('the sealed packet does not contain the message', (t) => {
  const host = generateBoxKeyPair();
  const m = Buffer.from('a recognisable volume passphrase!', 'utf8');
  const sealed = sealToRecipient(m, boxRecipient(host.publicKey));
  t.is(Buffer.from(sealed).indexOf(m), -1);
});

test("a packet sealed to host A does not open with host B's keys", (t) => {
  const a = generateBoxKeyPair();
  const b = generateBoxKeyPair();
  const sealed = sealToRecipient(message(64), boxRecipient(a.publicKey));
  t.throws(() => openSealed(sealed, b), cannotOpen);
  t.throws(() => sodium().crypto_box_seal_open(sealed, b.publicKey, b.secretKey));
  // A's public key with B's secret key (mismatched pair) fails too.
  t.throws(() => openSealed(sealed, { publicKey: a.publicKey, secretKey: b.secretKey }), cannotOpen);
  // B's public key with A's secret key: the nonce is derived from the recipient key, so it fails.
  t.throws(() => openSealed(sealed, { publicKey: b.publicKey, secretKey: a.secretKey }), cannotOpen);
  t.deepEqual(Uint8Array.from(openSealed(sealed, a)), message(64));
});

test('tampering any byte of a sealed packet makes it fail to open', (t) => {
  const host = generateBoxKeyPair();
  const sealed = sealToRecipient(message(16), boxRecipient(host.publicKey));
  for (let i = 0; i < sealed.length; i++) {
    t.throws(() => openSealed(flipped(sealed, i), host), cannotOpen, `byte ${i}`);
    t.throws(() => openSealed(flipped(sealed, i, 0x40), host), cannotOpen, `byte ${i} (0x40)`);
  }
});

test('truncated and empty packets fail to open', (t) => {
  const host = generateBoxKeyPair();
  const sealed = sealToRecipient(message(5), boxRecipient(host.publicKey));
  t.throws(() => openSealed(new Uint8Array(0), host), cannotOpen);
  for (let len = 0; len < sealed.length; len++) {
    t.throws(() => openSealed(sealed.subarray(0, len), host), cannotOpen, `length ${len}`);
  }
  t.throws(() => openSealed(Uint8Array.from([...sealed, 0]), host), cannotOpen);
});

test('boxRecipient rejects keys that are not 32 bytes', (t) => {
  const good = generateBoxKeyPair().publicKey;
  for (const len of [0, 1, 31, 33, 64]) {
    const raw = new Uint8Array(len);
    raw.set(good.subarray(0, Math.min(len, 32)));
    t.throws(() => boxRecipient(raw), { instanceOf: RangeError, message: /32 bytes/ }, `length ${len}`);
  }
});

/** Points of small order on Curve25519 (and non-canonical encodings of them). */
const LOW_ORDER_POINTS = [
  '0000000000000000000000000000000000000000000000000000000000000000', // 0 (order 4)
  '0100000000000000000000000000000000000000000000000000000000000000', // 1 (order 1)
  '5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157', // order 8
  'e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800', // order 8
  'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p - 1 (order 2)
  'edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p = 0
  'eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p + 1 = 1
  '0000000000000000000000000000000000000000000000000000000000000080', // 0 with the top bit set
  '0100000000000000000000000000000000000000000000000000000000000080', // 1 with the top bit set
  '5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7', // order 8, top bit set
  'e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880', // order 8, top bit set
  'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff', // p - 1, top bit set
];

test('boxRecipient rejects low-order points (the ones libsodium refuses too)', (t) => {
  const probe = generateBoxKeyPair();
  for (const p of LOW_ORDER_POINTS) {
    const raw = Buffer.from(p, 'hex');
    t.throws(() => boxRecipient(raw), { instanceOf: RangeError, message: /low order/ }, p);
    // Sanity check of the list itself: libsodium calls each of them a weak public key.
    t.throws(() => sodium().crypto_scalarmult(probe.secretKey, raw), undefined, `libsodium accepts ${p}`);
  }
});

test('boxRecipient accepts a real public key and keeps a copy of it', (t) => {
  const host = generateBoxKeyPair();
  const raw = Uint8Array.from(host.publicKey);
  const r = boxRecipient(raw);
  t.is(hex(r.raw), hex(host.publicKey));
  raw.fill(0);
  t.is(hex(r.raw), hex(host.publicKey));
  // Still seals correctly after the caller's buffer changed.
  const sealed = sealToRecipient(message(10), r);
  t.deepEqual(Uint8Array.from(openSealed(sealed, host)), message(10));
});

test('one recipient seals many packets, each opening independently', (t) => {
  const host = generateBoxKeyPair();
  const r = boxRecipient(host.publicKey);
  for (let i = 0; i < 20; i++) {
    const m = message(i * 13);
    t.deepEqual(Uint8Array.from(sodium().crypto_box_seal_open(sealToRecipient(m, r), host.publicKey, host.secretKey)), m);
  }
});

test('sealWithShare with an ephemeralShare is crypto_box_seal: libsodium opens it, and the box key is beforenm from either side', (t) => {
  const host = generateBoxKeyPair();
  const r = boxRecipient(host.publicKey);
  const seen = new Set<string>();
  for (const len of LENGTHS) {
    const share = ephemeralShare(r);
    t.false(seen.has(hex(share.publicKey)), 'a fresh ephemeral key per share');
    seen.add(hex(share.publicKey));
    // The host computes the same key from its secret key and the ephemeral public key.
    t.is(hex(share.sharedKey), hex(sodium().crypto_box_beforenm(share.publicKey, host.secretKey)));
    const m = message(len);
    const sealed = sealWithShare(m, r, share);
    t.is(sealed.length, len + SEAL_OVERHEAD);
    t.is(hex(sealed.subarray(0, 32)), hex(share.publicKey));
    t.deepEqual(Uint8Array.from(sodium().crypto_box_seal_open(sealed, host.publicKey, host.secretKey)), m);
  }
});

test('the native seal refuses a low-order key even when boxRecipient was bypassed', (t) => {
  for (const p of LOW_ORDER_POINTS.slice(0, 4)) {
    const forged = { raw: Buffer.from(p, 'hex') };
    t.throws(() => sealToRecipient(message(8), forged), { instanceOf: RangeError, message: /low order/ }, p);
    t.throws(() => ephemeralShare(forged), { instanceOf: RangeError, message: /low order/ }, p);
  }
});
