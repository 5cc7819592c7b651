/**
 * The versioned envelope that seals secrets at rest under a wrapping key (the master key).
 *
 * Layout (version 1):
 *   byte 0        version (0x01)
 *   bytes 1..8    wrapping key id (8 bytes)
 *   bytes 9..32   XChaCha20-Poly1305 nonce (24 bytes, random)
 *   bytes 33..    ciphertext || 16-byte tag
 * The AEAD's additional data is bytes 0..8 (version and key id) followed by the caller's
 * AAD string, which binds the identity of what is sealed (for example
 * `virtkm/v1/volume/<id>/<version>`), so a sealed value copied elsewhere does not open.
 */
import { sodium } from './sodium.js';
import { randomSecret, wipe } from './secret-bytes.js';

/** Current envelope version. */
export const ENVELOPE_VERSION = 1;
/** Length of a wrapping key id. */
export const KEY_ID_LENGTH = 8;
const NONCE_LENGTH = 24;
const TAG_LENGTH = 16;
const HEADER_LENGTH = 1 + KEY_ID_LENGTH;
/** Bytes an envelope adds to its plaintext. */
export const ENVELOPE_OVERHEAD = HEADER_LENGTH + NONCE_LENGTH + TAG_LENGTH;

/** A 256-bit wrapping key with its public id. The bytes are secret. */
export interface WrappingKey {
  readonly id: Uint8Array;
  readonly bytes: Uint8Array;
}

/**
 * Raised for every failure to open an envelope (wrong key, wrong AAD, tampering, bad
 * format): it deliberately says nothing more.
 */
export class DecryptionError extends Error {
  constructor() {
    super('decryption failed');
    this.name = 'DecryptionError';
  }
}

function additionalData(header: Uint8Array, aad: string): Uint8Array {
  const aadBytes = Buffer.from(aad, 'utf8');
  const out = new Uint8Array(header.length + aadBytes.length);
  out.set(header, 0);
  out.set(aadBytes, header.length);
  return out;
}

function checkKey(key: WrappingKey): void {
  if (key.id.length !== KEY_ID_LENGTH) throw new RangeError(`wrapping key id must be ${KEY_ID_LENGTH} bytes`);
  if (key.bytes.length !== 32) throw new RangeError('wrapping key must be 32 bytes');
}

/**
 * Seals plaintext under key, bound to aad. `nonce` is for known-answer tests only;
 * production callers leave it out and get a fresh random nonce.
 */
export function seal(plaintext: Uint8Array, key: WrappingKey, aad: string, nonce?: Uint8Array): Uint8Array {
  checkKey(key);
  const n = nonce ?? randomSecret(NONCE_LENGTH);
  if (n.length !== NONCE_LENGTH) throw new RangeError('nonce must be 24 bytes');
  const header = new Uint8Array(HEADER_LENGTH);
  header[0] = ENVELOPE_VERSION;
  header.set(key.id, 1);
  const ct = sodium().crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, additionalData(header, aad), null, n, key.bytes);
  const out = new Uint8Array(HEADER_LENGTH + NONCE_LENGTH + ct.length);
  out.set(header, 0);
  out.set(n, HEADER_LENGTH);
  out.set(ct, HEADER_LENGTH + NONCE_LENGTH);
  return out;
}

/** Returns the wrapping key id an envelope names, or throws DecryptionError if malformed. */
export function envelopeKeyId(envelope: Uint8Array): Uint8Array {
  if (envelope.length < ENVELOPE_OVERHEAD || envelope[0] !== ENVELOPE_VERSION) throw new DecryptionError();
  return envelope.slice(1, HEADER_LENGTH);
}

/**
 * Opens an envelope. `keys` finds the wrapping key by id (more than one during a master
 * key rotation). Any failure is a DecryptionError. The caller owns (and wipes) the result.
 */
export function open(envelope: Uint8Array, keys: WrappingKey | ((id: Uint8Array) => WrappingKey | undefined), aad: string): Uint8Array {
  const id = envelopeKeyId(envelope);
  const key = typeof keys === 'function' ? keys(id) : Buffer.compare(Buffer.from(keys.id), Buffer.from(id)) === 0 ? keys : undefined;
  if (!key) throw new DecryptionError();
  const header = envelope.subarray(0, HEADER_LENGTH);
  const nonce = envelope.subarray(HEADER_LENGTH, HEADER_LENGTH + NONCE_LENGTH);
  const ct = envelope.subarray(HEADER_LENGTH + NONCE_LENGTH);
  try {
    return sodium().crypto_aead_xchacha20poly1305_ietf_decrypt(null, ct, additionalData(header, aad), nonce, key.bytes);
  } catch {
    throw new DecryptionError();
  }
}

/** The AAD that binds a sealed volume secret to its volume and key version. */
export function volumeSecretAad(volumeId: string, version: number): string {
  return `virtkm/v1/volume/${volumeId}/${version}`;
}

/** Creates a fresh random wrapping key with a random id. */
export function generateWrappingKey(): WrappingKey {
  return { id: randomSecret(KEY_ID_LENGTH), bytes: randomSecret(32) };
}

/** Zeroes a wrapping key's secret bytes. */
export function destroyWrappingKey(key: WrappingKey): void {
  wipe(key.bytes);
}
