/**
 * Sealing key packets to a host's X25519 public key.
 *
 * The format is libsodium's crypto_box_seal exactly (ephemeral public key || box, nonce =
 * BLAKE2b-192(epk || pk)), so a host opens packets with libsodium's crypto_box_seal_open.
 * The server side seals with the system's native libsodium (native-sodium.ts), about twice
 * as fast as X25519 through node:crypto and without copies of keys in a WebAssembly heap;
 * hosts open packets with the WebAssembly build (libsodium-wrappers-sumo; box.ts). This
 * module loads no WebAssembly, so the ephemeral-key worker thread can import it alone.
 * test/unit/box.test.ts checks both directions.
 */
import { nativeSodium } from './native-sodium.js';
import { wipe } from './secret-bytes.js';

/** Bytes crypto_box_seal adds to the plaintext (ephemeral key + MAC). */
export const SEAL_OVERHEAD = 32 + 16;

/** A recipient's public key, checked once for repeated sealing. */
export interface BoxRecipient {
  readonly raw: Uint8Array;
}

/** Checks a raw 32-byte X25519 public key. Throws RangeError when unusable. */
export function boxRecipient(raw: Uint8Array): BoxRecipient {
  if (raw.length !== 32) throw new RangeError('X25519 public key must be 32 bytes');
  const pk = Uint8Array.from(raw);
  // Reject small-order points (libsodium refuses them, and an all-zero shared secret):
  // a box to such a key would be predictable.
  const probe = ephemeralShare({ raw: pk });
  wipe(probe.sharedKey);
  return { raw: pk };
}

/**
 * The X25519 half of one crypto_box_seal, computed before the message is known: a fresh
 * ephemeral public key and the box key k = crypto_box_beforenm(recipient, ephemeral secret).
 * Precomputed ones (server/src/vault/ephemeral-pool.ts) let the hot path skip both X25519
 * operations. `sharedKey` is secret; each share may seal ONE message.
 */
export interface EphemeralShare {
  /** The ephemeral public key, 32 bytes. */
  readonly publicKey: Uint8Array;
  /** crypto_box_beforenm(recipient public key, ephemeral secret key), 32 bytes. */
  readonly sharedKey: Uint8Array;
}

/**
 * Generates a fresh ephemeral key pair and returns its public key and the box key with
 * `recipient`; the ephemeral secret key is wiped before returning. The caller wipes
 * `sharedKey`. Throws RangeError for a recipient key of small order.
 */
export function ephemeralShare(recipient: BoxRecipient): EphemeralShare {
  const n = nativeSodium();
  const secretKey = new Uint8Array(32);
  const publicKey = new Uint8Array(32);
  const sharedKey = new Uint8Array(32);
  try {
    n.randomBytes(secretKey);
    if (n.scalarmultBase(publicKey, secretKey) !== 0) throw new Error('X25519 key generation failed');
    if (n.boxBeforenm(sharedKey, recipient.raw, secretKey) !== 0) throw new RangeError('X25519 public key is of low order');
    return { publicKey, sharedKey };
  } catch (err) {
    wipe(sharedKey);
    throw err;
  } finally {
    wipe(secretKey);
  }
}

/** crypto_box_seal(message, recipient), natively. */
export function sealToRecipient(message: Uint8Array, recipient: BoxRecipient): Uint8Array {
  const out = new Uint8Array(message.length + SEAL_OVERHEAD);
  if (nativeSodium().boxSeal(out, message, recipient.raw) !== 0) throw new RangeError('X25519 public key is of low order');
  return out;
}

/**
 * crypto_box_seal(message, recipient) with an ephemeral share computed beforehand for this
 * recipient (ephemeralShare). The caller wipes `share.sharedKey` afterwards and never uses
 * the share again: a second message under the same share would reuse the nonce.
 */
export function sealWithShare(message: Uint8Array, recipient: BoxRecipient, share: EphemeralShare): Uint8Array {
  const n = nativeSodium();
  const nonceInput = new Uint8Array(64);
  nonceInput.set(share.publicKey, 0);
  nonceInput.set(recipient.raw, 32);
  const nonce = new Uint8Array(24);
  if (n.generichash(nonce, nonceInput) !== 0) throw new Error('BLAKE2b failed');
  const out = new Uint8Array(32 + message.length + 16);
  out.set(share.publicKey, 0);
  if (n.boxEasyAfternm(out.subarray(32), message, nonce, share.sharedKey) !== 0) throw new Error('XSalsa20-Poly1305 failed');
  return out;
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
