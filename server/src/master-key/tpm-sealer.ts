/**
 * The TPM 2.0 master key sealer: the master key is sealed (sealers.ts: sealUnderKek) under
 * a random 32-byte KEK, and the KEK is sealed to the TPM, optionally bound to PCR values
 * (shared/src/kek/tpm2.ts, tpm2-tools). The record keeps the TCTI, the PCR selection and
 * the sealed object's public and private parts, which are useless without this TPM (and,
 * with PCRs, without the same boot state).
 *
 * Another TPM, or a cleared one, cannot load the object: unauthenticated. Changed PCR
 * values: failed_precondition. Either way nothing is changed on disk.
 */
import { DomainError } from '../../../shared/src/errors.js';
import { checkTcti, parsePcrSelection, tpmSeal, tpmUnseal } from '../../../shared/src/kek/tpm2.js';
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
  type TpmSealedMasterKey,
} from './sealers.js';

/** Options of tpmSealer. */
export interface TpmSealerOptions {
  /** TCTI to seal with (default device:/dev/tpmrm0); unseal uses the record's. */
  tcti?: string;
  /** PCR selection to bind to ("sha256:0,7"); none by default. */
  pcrs?: string;
}

/** A sealer whose KEK is sealed to a TPM (see the module comment). */
export function tpmSealer(options: TpmSealerOptions = {}): MasterKeySealer {
  return {
    kind: 'tpm2',
    async seal(masterKey) {
      const kek = randomSecret(KEK_LENGTH);
      try {
        const params = await tpmSeal(kek, { ...(options.tcti ? { tcti: options.tcti } : {}), ...(options.pcrs ? { pcrs: options.pcrs } : {}) });
        const { keyId, envelope } = sealUnderKek(masterKey, await kekWrappingKey(kek));
        return { format: SEALED_MASTER_KEY_FORMAT, version: SEALED_MASTER_KEY_VERSION, sealer: 'tpm2', keyId, params, envelope };
      } finally {
        wipe(kek);
      }
    },
    async unseal(sealed) {
      if (sealed.sealer !== 'tpm2') throw wrongSealer('tpm2', sealed);
      const checked = parseSealedMasterKey(sealed) as TpmSealedMasterKey;
      const kek = await tpmUnseal(checked.params);
      try {
        if (kek.length !== KEK_LENGTH) throw new DomainError('failed_precondition', 'the TPM gave back a secret of the wrong size', { hint: 'restore master-key.json from a backup' });
        return unsealUnderKek(checked, await kekWrappingKey(kek), () => new DomainError('unauthenticated', 'the TPM-sealed key did not seal this master key'));
      } finally {
        wipe(kek);
      }
    },
  };
}

/** TPM 2.0 in the sealer registry (registry.ts). */
export const tpmFactory: SealerFactory = {
  kind: 'tpm2',
  description: 'a key-encryption key sealed to the TPM 2.0, optionally bound to PCR values',
  sealOptions: [
    { flags: '--tpm-tcti <tcti>', description: 'tpm2: how to reach the TPM (default device:/dev/tpmrm0; swtpm:host=H,port=P for swtpm)' },
    { flags: '--tpm-pcrs <selection>', description: 'tpm2: bind to the current values of these PCRs, e.g. sha256:0,7' },
  ],
  unsealOptions: [],
  unsealsOnline: false,
  async prepareSeal(_ctx, options) {
    const tcti = optionString(options, 'tpmTcti');
    const pcrs = optionString(options, 'tpmPcrs');
    // Checked now, so bad options are refused before anything else happens.
    if (tcti !== undefined) checkTcti(tcti);
    if (pcrs !== undefined) parsePcrSelection(pcrs);
    return { sealer: tpmSealer({ ...(tcti ? { tcti } : {}), ...(pcrs ? { pcrs } : {}) }), dispose() {} };
  },
  async prepareUnseal(_ctx, record) {
    if (record.sealer !== 'tpm2') throw wrongSealer('tpm2', record);
    // Sealing again (a master key rotation) keeps the TPM and the PCR selection.
    return { sealer: tpmSealer({ tcti: record.params.tcti, ...(record.params.pcrs ? { pcrs: record.params.pcrs } : {}) }), dispose() {} };
  },
};
