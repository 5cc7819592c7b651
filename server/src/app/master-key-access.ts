/**
 * Choosing and applying the master key's sealer for a data directory (see master-key/).
 */
import type { WrappingKey } from '../../../shared/src/envelope.js';
import { promptPassphrase } from '../../../shared/src/passphrase.js';
import { readMasterKeyFile, writeMasterKeyFile } from '../master-key/master-key-file.js';
import { createKeyFile, keyFileSealer, passphraseSealer, type Argon2idCost, type MasterKeySealer, type PassphraseSource } from '../master-key/sealers.js';
import { pkcs11Sealer } from '../master-key/pkcs11-sealer.js';
import { tpmSealer } from '../master-key/tpm-sealer.js';
import type { DataDirPaths } from './data-dir.js';
import { writeSync } from 'node:fs';
import type { SealedMasterKey } from '../master-key/sealers.js';
import { sealerFactory, type SealerContext, type SealerOptionValues } from '../master-key/registry.js';
import { newShamirSealer, type NewShamirOptions } from '../master-key/shamir-sealer.js';

/** How init protects a new master key. */
export type MasterKeyProtection =
  | { kind: 'keyfile' }
  | { kind: 'passphrase'; source: PassphraseSource; cost?: Argon2idCost }
  | { kind: 'pkcs11'; uri: string; pinFile?: string }
  | { kind: 'tpm2'; tcti?: string; pcrs?: string }
  | { kind: 'shamir'; threshold: number; shares: number; deliver: NewShamirOptions['deliver'] };

/** Seals a new master key into paths.masterKey (and creates the key file when used). */
export async function sealNewMasterKey(paths: DataDirPaths, masterKey: WrappingKey, protection: MasterKeyProtection): Promise<void> {
  let sealer: MasterKeySealer;
  if (protection.kind === 'keyfile') {
    await createKeyFile(paths.keyFile);
    sealer = keyFileSealer(paths.keyFile);
  } else if (protection.kind === 'pkcs11') {
    sealer = pkcs11Sealer({
      uri: protection.uri,
      ...(protection.pinFile ? { pinFile: protection.pinFile } : {}),
      onKeyCreated: () => process.stderr.write('created the AES key in the PKCS#11 token (sensitive, not extractable)\n'),
    });
  } else if (protection.kind === 'shamir') {
    const shamir = newShamirSealer(protection);
    try {
      await writeMasterKeyFile(paths.dir, await shamir.seal(masterKey));
    } finally {
      shamir.dispose();
    }
    return;
  } else if (protection.kind === 'tpm2') {
    sealer = tpmSealer({ ...(protection.tcti ? { tcti: protection.tcti } : {}), ...(protection.pcrs ? { pcrs: protection.pcrs } : {}) });
  } else {
    sealer = passphraseSealer({ source: protection.source, ...(protection.cost ? { cost: protection.cost } : {}) });
  }
  await writeMasterKeyFile(paths.dir, await sealer.seal(masterKey));
}

/** Unseals the master key of a data directory; a passphrase comes from a file or the terminal. */
export async function unsealMasterKey(paths: DataDirPaths, passphraseFile: string | undefined): Promise<WrappingKey> {
  const record = await readMasterKeyFile(paths.dir);
  // PKCS#11 and TPM records name their token or TPM themselves (URI with PIN file, TCTI).
  if (record.sealer === 'pkcs11') return pkcs11Sealer({ uri: record.params.uri }).unseal(record);
  if (record.sealer === 'tpm2') return tpmSealer().unseal(record);
  const sealer =
    record.sealer === 'keyfile'
      ? keyFileSealer(paths.keyFile)
      : passphraseSealer({ source: passphraseFile ? { file: passphraseFile } : { prompt: () => promptPassphrase('master key passphrase: ') } });
  return sealer.unseal(record);
}


// --- Sealers through the registry (reseal, rotate-master-key, run; issue 5) ----------------

/**
 * The SealerContext of a command run by an operator: output on stdout (bytes written
 * straight to fd 1, so share texts never become strings), notices on stderr, questions on
 * the terminal without echo.
 */
export function cliSealerContext(dir: string, out: (s: string | Uint8Array) => void = (s) => writeOut(s)): SealerContext {
  return {
    dir,
    out,
    err: (s) => process.stderr.write(s),
    ask: (prompt) => promptPassphrase(prompt),
  };
}

function writeOut(s: string | Uint8Array): void {
  const buf = typeof s === 'string' ? Buffer.from(s) : s;
  let off = 0;
  while (off < buf.length) off += writeSync(1, buf, off, buf.length - off);
}

/**
 * Unseals the master key of a data directory through the sealer registry, for sealers
 * that unseal offline (not Shamir: run-command's sealed mode handles it). `options` are
 * the sealer's unseal options (e.g. passphraseFile).
 */
export async function unsealMasterKeyWith(paths: DataDirPaths, record: SealedMasterKey, options: SealerOptionValues): Promise<WrappingKey> {
  const prepared = await sealerFactory(record.sealer).prepareUnseal(cliSealerContext(paths.dir), record, options);
  try {
    return await prepared.sealer.unseal(record);
  } finally {
    prepared.dispose();
  }
}
