/**
 * The PKCS#11 master key sealer: the master key is sealed (sealers.ts: sealUnderKek) under
 * a random 32-byte KEK, and the KEK is wrapped by an AES key that never leaves a PKCS#11
 * token (shared/src/kek/pkcs11.ts: AES-256-GCM inside the token, PIN from a file).
 *
 * The record keeps the token key's canonical URI (module-path and pin-source included: the
 * server needs nothing else to start) and the wrapped KEK; none of it is secret. Sealing
 * creates the key in the token when the URI names none (a fresh token needs no separate
 * tool); unsealing never creates anything.
 *
 * Why a KEK rather than wrapping the master key itself: the record keeps the one format of
 * every sealer, the envelope's KEK id tells "another token key" from "damaged record",
 * and a master key rotation seals the new key under the same token key.
 */
import { isAbsolute, resolve } from 'node:path';
import { DomainError } from '../../../shared/src/errors.js';
import { pkcs11KeyUri, pkcs11Unwrap, pkcs11Wrap } from '../../../shared/src/kek/pkcs11.js';
import { randomSecret, wipe } from '../../../shared/src/secret-bytes.js';
import type { SealerFactory } from './registry.js';
import { optionString } from './sealer-options.js';
import {
  KEK_LENGTH,
  SEALED_MASTER_KEY_FORMAT,
  SEALED_MASTER_KEY_VERSION,
  kekWrappingKey,
  parseSealedMasterKey,
  sealUnderKek,
  unsealUnderKek,
  wrongSealer,
  type MasterKeySealer,
  type Pkcs11SealedMasterKey,
} from './sealers.js';

/** AAD binding the wrapped KEK to its purpose inside the token's AES-GCM. */
export const PKCS11_KEK_AAD = 'virtkm/v1/master-key/pkcs11-kek';

/** Options of pkcs11Sealer. */
export interface Pkcs11SealerOptions {
  /** The token key's PKCS#11 URI; needed to seal (unseal uses the record's). */
  uri?: string;
  /** Absolute path of the PIN file; overrides the URI's pin-source. */
  pinFile?: string;
  /** Told when seal() created the key in the token. */
  onKeyCreated?: () => void;
}

/** A sealer whose KEK is wrapped by a key in a PKCS#11 token (see the module comment). */
export function pkcs11Sealer(options: Pkcs11SealerOptions): MasterKeySealer {
  return {
    kind: 'pkcs11',
    async seal(masterKey) {
      if (options.uri === undefined) throw new DomainError('invalid_argument', 'a PKCS#11 URI is required to seal (--pkcs11-uri)');
      const key = pkcs11KeyUri(options.uri, options.pinFile);
      const kek = randomSecret(KEK_LENGTH);
      try {
        const { wrapped, keyCreated } = await pkcs11Wrap(key, kek, PKCS11_KEK_AAD, { createKeyIfMissing: true });
        if (keyCreated) options.onKeyCreated?.();
        const { keyId, envelope } = sealUnderKek(masterKey, await kekWrappingKey(kek));
        return { format: SEALED_MASTER_KEY_FORMAT, version: SEALED_MASTER_KEY_VERSION, sealer: 'pkcs11', keyId, params: { uri: key.text, ...wrapped }, envelope };
      } finally {
        wipe(kek);
      }
    },
    async unseal(sealed) {
      if (sealed.sealer !== 'pkcs11') throw wrongSealer('pkcs11', sealed);
      // Re-validated here: the record may not have come through parseSealedMasterKey.
      const checked = parseSealedMasterKey(sealed) as Pkcs11SealedMasterKey;
      const { uri, ...wrapped } = checked.params;
      const kek = await pkcs11Unwrap(pkcs11KeyUri(uri, options.pinFile), wrapped, PKCS11_KEK_AAD);
      try {
        return unsealUnderKek(checked, await kekWrappingKey(kek), () => new DomainError('unauthenticated', "the PKCS#11 token's key did not seal this master key"));
      } finally {
        wipe(kek);
      }
    },
  };
}

/** PKCS#11 in the sealer registry (registry.ts). */
export const pkcs11Factory: SealerFactory = {
  kind: 'pkcs11',
  description: 'a key-encryption key wrapped by an AES key inside a PKCS#11 token (HSM, smart card, SoftHSM2)',
  sealOptions: [
    { flags: '--pkcs11-uri <uri>', description: 'pkcs11: the token key, e.g. pkcs11:token=T;object=virtkm-kek?module-path=/usr/lib/softhsm/libsofthsm2.so (created when missing)' },
    { flags: '--pin-file <file>', description: "pkcs11: file (0600) holding the token's user PIN (else the URI's pin-source)" },
  ],
  unsealOptions: [],
  unsealsOnline: false,
  async prepareSeal(ctx, options) {
    const uri = optionString(options, 'pkcs11Uri');
    if (uri === undefined) throw new DomainError('invalid_argument', 'sealing with a PKCS#11 token needs --pkcs11-uri URI');
    const pin = optionString(options, 'pinFile');
    const pinFile = pin === undefined ? undefined : isAbsolute(pin) ? pin : resolve(pin);
    // Checked now, so a bad URI is refused before anything else happens.
    pkcs11KeyUri(uri, pinFile);
    return {
      sealer: pkcs11Sealer({ uri, ...(pinFile ? { pinFile } : {}), onKeyCreated: () => ctx.err('created the AES key in the PKCS#11 token (sensitive, not extractable)\n') }),
      dispose() {},
    };
  },
  async prepareUnseal(_ctx, record) {
    if (record.sealer !== 'pkcs11') throw wrongSealer('pkcs11', record);
    return { sealer: pkcs11Sealer({ uri: record.params.uri }), dispose() {} };
  },
};
