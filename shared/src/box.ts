/**
 * Key packets between server and hosts: the server's sealing (box-seal.ts, native libsodium)
 * and the host's side, key pairs and crypto_box_seal_open, with libsodium's WebAssembly
 * build, which every process has.
 */
import { sodium } from './sodium.js';

export * from './box-seal.js';

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
