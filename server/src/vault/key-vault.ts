/**
 * The key vault: the only server module that ever holds plaintext volume secrets. It owns
 * the unsealed master key, creates and seals new secrets, and turns a sealed secret into a
 * key packet sealed to one host. The store it is used with sees ciphertext only.
 */
import { KeyPacket, type SealedKeyPacket } from '../../../shared/src/api.js';
import { FORMAT_TO_API } from '../../../shared/src/formats.js';
import { sealToRecipient, sealWithShare, type BoxRecipient } from '../../../shared/src/box.js';
import { DecryptionError, destroyWrappingKey, open, seal, volumeSecretAad, type WrappingKey } from '../../../shared/src/envelope.js';
import { errors } from '../../../shared/src/errors.js';
import { randomSecret, wipe } from '../../../shared/src/secret-bytes.js';
import type { KeyVersionRecord, VolumeRecord } from '../domain/model.js';
import type { EphemeralSource } from './ephemeral-pool.js';

/** Type tag inside every key packet. */
export const KEY_PACKET_TYPE = 'virtkm.keypacket.v1';

/** The host a packet is for. */
export interface PacketRecipient {
  hostId: string;
  recipient: BoxRecipient;
  /**
   * Precomputed ephemeral shares (ephemeral-pool.ts) to seal with; without one, or when it
   * has none ready, the packet's ephemeral key is generated inline.
   */
  shares?: EphemeralSource;
}

/** Operations on secrets; see module comment. */
export interface KeyVault {
  /** Generates a random secret of `length` bytes for (volumeId, version) and returns it sealed. */
  newSealedSecret(volumeId: string, version: number, length: number): Uint8Array;
  /** Opens a stored key version and seals it into a key packet for one host. */
  packetForHost(volume: VolumeRecord, key: KeyVersionRecord, to: PacketRecipient, issuedAt: string): SealedKeyPacket;
  /** Seals a server secret (CA key, TLS key) under the master key, bound to a label. */
  sealServerSecret(label: string, plaintext: Uint8Array): Uint8Array;
  /** Opens a server secret sealed with sealServerSecret. Caller wipes the result. */
  openServerSecret(label: string, envelope: Uint8Array): Uint8Array;
  /** Wipes the master key; the vault is unusable afterwards. */
  close(): void;
}

const serverSecretAad = (label: string) => `virtkm/v1/server-secret/${label}`;

/** Creates the vault around an unsealed master key (which it takes ownership of). */
export function createKeyVault(masterKey: WrappingKey): KeyVault {
  let closed = false;
  const key = (): WrappingKey => {
    if (closed) throw errors.internal(new Error('key vault used after close'));
    return masterKey;
  };
  const openOrFail = (envelope: Uint8Array, aad: string): Uint8Array => {
    try {
      return open(envelope, key(), aad);
    } catch (err) {
      // A stored secret that does not open means tampering or a wrong master key: the
      // caller sees "internal error"; the server log gets the reason (never the bytes).
      if (err instanceof DecryptionError) throw errors.internal(new Error(`sealed secret does not open (aad ${aad})`));
      throw err;
    }
  };
  return {
    newSealedSecret(volumeId, version, length) {
      const secret = randomSecret(length);
      try {
        return seal(secret, key(), volumeSecretAad(volumeId, version));
      } finally {
        wipe(secret);
      }
    },
    packetForHost(volume, kv, to, issuedAt) {
      if (kv.volumeId !== volume.id) throw errors.internal(new Error('key version does not belong to the volume'));
      if (kv.sealed === null) throw errors.precondition(`key version ${kv.version} of volume ${volume.id} is destroyed`);
      const secret = openOrFail(kv.sealed, volumeSecretAad(kv.volumeId, kv.version));
      let encoded: Uint8Array | undefined;
      try {
        encoded = KeyPacket.encode({
          type: KEY_PACKET_TYPE,
          volumeId: volume.id,
          keyVersion: kv.version,
          hostId: to.hostId,
          mechanism: FORMAT_TO_API[volume.format],
          cipher: { cipher: volume.cipher, keySizeBits: volume.keySizeBits, sectorSize: volume.sectorSize },
          sizeBytes: volume.sizeBytes,
          // A view, not a copy: wiping `secret` wipes what the encoder read.
          secret: Buffer.from(secret.buffer, secret.byteOffset, secret.byteLength),
          issuedAt,
        }).finish();
        // Taken only now that the secret opened: a share is never spent on a failed packet.
        const share = to.shares?.take(to.hostId, to.recipient);
        let sealed: Uint8Array;
        try {
          sealed = share ? sealWithShare(encoded, to.recipient, share) : sealToRecipient(encoded, to.recipient);
        } finally {
          // One share, one packet: its secret is wiped in the pool's slab right away.
          if (share) wipe(share.sharedKey);
        }
        return { volumeId: volume.id, keyVersion: kv.version, sealed: Buffer.from(sealed.buffer, sealed.byteOffset, sealed.byteLength) };
      } finally {
        wipe(secret, encoded);
      }
    },
    sealServerSecret(label, plaintext) {
      return seal(plaintext, key(), serverSecretAad(label));
    },
    openServerSecret(label, envelope) {
      return openOrFail(envelope, serverSecretAad(label));
    },
    close() {
      if (!closed) destroyWrappingKey(masterKey);
      closed = true;
    },
  };
}
