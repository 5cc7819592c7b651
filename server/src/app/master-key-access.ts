/**
 * Choosing and applying the master key's sealer for a data directory (see master-key/).
 */
import type { WrappingKey } from '../../../shared/src/envelope.js';
import { promptPassphrase } from '../../../shared/src/passphrase.js';
import { readMasterKeyFile, writeMasterKeyFile } from '../master-key/master-key-file.js';
import { createKeyFile, keyFileSealer, passphraseSealer, type Argon2idCost, type MasterKeySealer, type PassphraseSource } from '../master-key/sealers.js';
import type { DataDirPaths } from './data-dir.js';

/** How init protects a new master key. */
export type MasterKeyProtection = { kind: 'keyfile' } | { kind: 'passphrase'; source: PassphraseSource; cost?: Argon2idCost };

/** Seals a new master key into paths.masterKey (and creates the key file when used). */
export async function sealNewMasterKey(paths: DataDirPaths, masterKey: WrappingKey, protection: MasterKeyProtection): Promise<void> {
  let sealer: MasterKeySealer;
  if (protection.kind === 'keyfile') {
    await createKeyFile(paths.keyFile);
    sealer = keyFileSealer(paths.keyFile);
  } else {
    sealer = passphraseSealer({ source: protection.source, ...(protection.cost ? { cost: protection.cost } : {}) });
  }
  await writeMasterKeyFile(paths.dir, await sealer.seal(masterKey));
}

/** Unseals the master key of a data directory; a passphrase comes from a file or the terminal. */
export async function unsealMasterKey(paths: DataDirPaths, passphraseFile: string | undefined): Promise<WrappingKey> {
  const record = await readMasterKeyFile(paths.dir);
  const sealer =
    record.sealer === 'keyfile'
      ? keyFileSealer(paths.keyFile)
      : passphraseSealer({ source: passphraseFile ? { file: passphraseFile } : { prompt: () => promptPassphrase('master key passphrase: ') } });
  return sealer.unseal(record);
}

