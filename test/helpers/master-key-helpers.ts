/**
 * Helpers of the master key tests (issue 5): unsealing a data directory's master key
 * in-process, inserting many volumes straight through the store (fast, server stopped),
 * and opening every sealed secret to check that nothing was lost.
 */
import { createHash, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { destroyWrappingKey, open, seal, volumeSecretAad, type WrappingKey } from '../../shared/src/envelope.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { randomSecret, wipe } from '../../shared/src/secret-bytes.js';
import { readMasterKeyFile } from '../../server/src/master-key/master-key-file.js';
import { keyFileSealer, passphraseSealer } from '../../server/src/master-key/sealers.js';
import { shamirRecordSealer, shareFilesSource } from '../../server/src/master-key/shamir-sealer.js';
import { openSqliteStore } from '../../server/src/store/sqlite-store.js';

/** How to unseal a data directory in the test process. */
export type Unlock = { keyfile: true } | { passphraseFile: string } | { shareFiles: string[] };

/** Unseals DIR/master-key.json (the caller destroys the key). */
export async function unsealDataDir(dir: string, how: Unlock = { keyfile: true }): Promise<WrappingKey> {
  await loadSodium();
  const record = await readMasterKeyFile(dir);
  if ('keyfile' in how) return keyFileSealer(join(dir, 'master.kek')).unseal(record);
  if ('passphraseFile' in how) return passphraseSealer({ source: { file: how.passphraseFile } }).unseal(record);
  const s = shamirRecordSealer(shareFilesSource(how.shareFiles));
  try {
    return await s.unseal(record);
  } finally {
    s.dispose();
  }
}

/**
 * Inserts `count` volumes (one active key version each) straight through the store, in
 * units of 500: far faster than the API, which is not what these tests measure.
 */
export async function insertVolumes(dbPath: string, masterKey: WrappingKey, count: number, prefix = 'bulk'): Promise<void> {
  await loadSodium();
  const store = openSqliteStore({ path: dbPath });
  try {
    const now = new Date().toISOString();
    for (let start = 0; start < count; start += 500) {
      const units: Promise<void>[] = [];
      for (let i = start; i < Math.min(count, start + 500); i++) {
        const id = randomUUID();
        const secret = randomSecret(64);
        const sealed = seal(secret, masterKey, volumeSecretAad(id, 1));
        wipe(secret);
        units.push(
          store.write((tx) => {
            tx.insertVolume({ id, name: `${prefix}-${i}`, sizeBytes: 1n << 30n, format: 'luks2', cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512, activeVersion: 1, createdAt: now });
            tx.insertKeyVersion({ volumeId: id, version: 1, state: 'active', sealed, createdAt: now });
          }),
        );
      }
      await Promise.all(units);
    }
  } finally {
    await store.close();
  }
}

/**
 * Opens every sealed secret of the database with `masterKey` and returns "volume/version"
 * -> SHA-256 of the secret. Throws if any does not open.
 */
export async function openAllSecrets(dbPath: string, masterKey: WrappingKey): Promise<Map<string, string>> {
  await loadSodium();
  const store = openSqliteStore({ path: dbPath });
  const out = new Map<string, string>();
  try {
    let token = '';
    do {
      const page = store.listVolumes({ pageSize: 1000, pageToken: token });
      for (const v of page.items) {
        for (const k of store.getKeyVersions(v.id)) {
          if (k.sealed === null) continue;
          const plain = open(k.sealed, masterKey, volumeSecretAad(v.id, k.version));
          out.set(`${v.id}/${k.version}`, createHash('sha256').update(plain).digest('hex'));
          wipe(plain);
        }
      }
      token = page.nextPageToken;
    } while (token);
    return out;
  } finally {
    await store.close();
  }
}

/** Opens DIR/ca-key.sealed and DIR/server-key.sealed with the key; throws if either fails. */
export function openServerSecrets(dir: string, masterKey: WrappingKey): void {
  for (const [file, label] of [['ca-key.sealed', 'ca-key'], ['server-key.sealed', 'server-tls-key']] as const) {
    wipe(open(readFileSync(join(dir, file)), masterKey, `virtkm/v1/server-secret/${label}`));
  }
}

/** The database's master_key.id setting. */
export function committedMasterKeyId(dbPath: string): Promise<string | undefined> {
  const store = openSqliteStore({ path: dbPath });
  const id = store.getSetting('master_key.id');
  return store.close().then(() => id);
}

export { destroyWrappingKey };
