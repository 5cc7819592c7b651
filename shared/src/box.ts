/**
 * Sealing key packets to a host's X25519 public key.
 *
 * The format is libsodium's crypto_box_seal exactly (ephemeral public key || box, nonce =
 * BLAKE2b-192(epk || pk)), so a host opens packets with libsodium's crypto_box_seal_open.
 * The server side computes the two X25519 operations with Node's native crypto (OpenSSL),
 * which is about three times faster than libsodium's WebAssembly build; the symmetric part
 * (HSalsa20, XSalsa20-Poly1305) uses libsodium. test/unit/box.test.ts checks both
 * directions against libsodium itself.
 */
import { createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { sodium } from './sodium.js';
import { wipe } from './secret-bytes.js';

/** DER prefix of an X25519 SubjectPublicKeyInfo; the raw 32-byte key follows it. */
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

/** Bytes crypto_box_seal adds to the plaintext (ephemeral key + MAC). */
export const SEAL_OVERHEAD = 32 + 16;

/** A recipient's public key, prepared once for repeated sealing. */
export interface BoxRecipient {
  readonly raw: Uint8Array;
  readonly keyObject: KeyObject;
}

/** Checks and prepares a raw 32-byte X25519 public key. Throws RangeError when unusable. */
export function boxRecipient(raw: Uint8Array): BoxRecipient {
  if (raw.length !== 32) throw new RangeError('X25519 public key must be 32 bytes');
  const keyObject = createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
  // Reject low-order points: a shared secret of all zeros would make the box predictable.
  const probe = generateKeyPairSync('x25519');
  let shared: Buffer;
  try {
    shared = diffieHellman({ privateKey: probe.privateKey, publicKey: keyObject });
  } catch {
    throw new RangeError('X25519 public key is of low order');
  }
  const zero = shared.every((b) => b === 0);
  wipe(shared);
  if (zero) throw new RangeError('X25519 public key is of low order');
  return { raw: Uint8Array.from(raw), keyObject };
}

/**
 * The X25519 half of one crypto_box_seal: a fresh ephemeral public key and its shared
 * secret with one recipient. Precomputed ones (server/src/vault/ephemeral-pool.ts) let the
 * hot path skip both X25519 operations. `shared` is secret; each may seal ONE message.
 */
export interface EphemeralShare {
  /** The ephemeral public key, 32 bytes. */
  readonly publicKey: Uint8Array;
  /** X25519(ephemeral secret key, recipient public key), 32 bytes. */
  readonly shared: Uint8Array;
}

/**
 * Generates a fresh ephemeral key pair and returns its public key and the shared secret
 * with `recipient`; the ephemeral secret key is not kept. The caller wipes `shared`.
 */
export function ephemeralShare(recipient: BoxRecipient): EphemeralShare {
  const eph = generateKeyPairSync('x25519');
  // The JWK export is the cheap way to the raw 32 bytes (the DER export costs ~50x more).
  const publicKey = Buffer.from(eph.publicKey.export({ format: 'jwk' }).x ?? '', 'base64url');
  if (publicKey.length !== 32) throw new Error('unexpected X25519 public key export');
  return { publicKey, shared: diffieHellman({ privateKey: eph.privateKey, publicKey: recipient.keyObject }) };
}

/** crypto_box_seal(message, recipient) with native X25519. */
export function sealToRecipient(message: Uint8Array, recipient: BoxRecipient): Uint8Array {
  const share = ephemeralShare(recipient);
  try {
    return sealWithShare(message, recipient, share);
  } finally {
    wipe(share.shared);
  }
}

/**
 * crypto_box_seal(message, recipient) with an ephemeral share computed beforehand for this
 * recipient (ephemeralShare). The caller wipes `share.shared` afterwards and never uses the
 * share again: a second message under the same share would reuse the nonce.
 */
export function sealWithShare(message: Uint8Array, recipient: BoxRecipient, share: EphemeralShare): Uint8Array {
  const s = sodium();
  const nonceInput = new Uint8Array(64);
  nonceInput.set(share.publicKey, 0);
  nonceInput.set(recipient.raw, 32);
  const nonce = s.crypto_generichash(24, nonceInput, null);
  // crypto_box_beforenm: k = HSalsa20(shared, 0^16)
  const k = s.crypto_core_hsalsa20(new Uint8Array(16), share.shared, null);
  try {
    const boxed = s.crypto_secretbox_easy(message, nonce, k);
    const out = new Uint8Array(32 + boxed.length);
    out.set(share.publicKey, 0);
    out.set(boxed, 32);
    return out;
  } finally {
    wipe(k);
  }
}

/** A host's X25519 key pair (libsodium format). The secret key is secret. */
export interface BoxKeyPair {
  publicKey: Uint8Array;
  secretKey: Uint8Array;
}

/** Generates an X25519 key pair for a host. */
export function generateBoxKeyPair(): BoxKeyPair {
  const kp = sodium().crypto_box_keypair();
  return { publicKey: kp.publicKey, secretKey: kp.privateKey };
}

/** crypto_box_seal_open; throws DecryptionError-like Error('cannot open sealed packet'). */
export function openSealed(sealed: Uint8Array, keyPair: BoxKeyPair): Uint8Array {
  try {
    return sodium().crypto_box_seal_open(sealed, keyPair.publicKey, keyPair.secretKey);
  } catch {
    throw new Error('cannot open sealed packet');
  }
}

/**
 * Prepared recipients by owner id, re-prepared when the owner's key changes: sealing many
 * packets to the same host imports its key once.
 */
export function createRecipientCache(): (ownerId: string, raw: Uint8Array) => BoxRecipient {
  const cache = new Map<string, { raw: Buffer; recipient: BoxRecipient }>();
  return (ownerId, raw) => {
    const hit = cache.get(ownerId);
    if (hit && hit.raw.equals(raw)) return hit.recipient;
    const recipient = boxRecipient(raw);
    cache.set(ownerId, { raw: Buffer.from(raw), recipient });
    return recipient;
  };
}
