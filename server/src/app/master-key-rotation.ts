/**
 * `virtkm-server rotate-master-key`: a new master key, every secret sealed under the old
 * one rewrapped under the new one, the new key sealed with the same sealer, the old one
 * gone. The server is stopped (the command takes the data directory's exclusive lock).
 *
 * What is sealed under the master key: every key_versions.sealed in the database, and
 * the two server secrets DIR/ca-key.sealed and DIR/server-key.sealed. (DIR/server-key.transport,
 * sealed-mode.ts, is under its own key file, not the master key.)
 *
 * Crash safety: the database row `settings[master_key.id]` names the master key the
 * database is sealed under, and it changes in the same transaction as the rows. Steps:
 *   1. seal the new key (same sealer) into DIR/master-key.next.json     (durable)
 *   2. seal the server secrets under it into DIR/<name>.next            (durable)
 *   3. ONE transaction: rewrap every key_versions.sealed, set master_key.id, audit
 *   4. rename the .next secrets over the current ones, then master-key.next.json over
 *      master-key.json (each rename atomic, directory fsynced)
 * At start (settleMasterKeyFiles, run by `run`, `reseal` and this command under the lock,
 * before any unseal): if master-key.next.json exists and its key id is master_key.id, the
 * transaction committed: finish step 4; otherwise it did not: delete the .next files. Both
 * are plain renames and deletes, so a sealed (Shamir) server settles before its unseal.
 * Killed at any point, the server starts with one of the two keys and loses nothing.
 *
 * The old key is wiped from memory; its sealed record is replaced (rename) and the old
 * envelopes in the database are overwritten in place (secure_delete, WAL checkpointed on
 * close). Copies in backups are outside our reach.
 */
import { existsSync, readFileSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fsyncDir } from '../../../shared/src/durable-fs.js';
import { DecryptionError, destroyWrappingKey, envelopeKeyId, generateWrappingKey, open, seal, volumeSecretAad, type WrappingKey } from '../../../shared/src/envelope.js';
import { errors } from '../../../shared/src/errors.js';
import { createLogger, type Logger } from '../../../shared/src/log.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { readMasterKeyFile, readSealedRecordFileIfExists, replaceSealedRecordFile } from '../master-key/master-key-file.js';
import { sealerFactory, type SealerOptionValues } from '../master-key/registry.js';
import { openSqliteStore } from '../store/sqlite-store.js';
import type { Store } from '../store/ports.js';
import { dataDirPaths, SERVER_SECRET_LABELS, writeFileAtomic, type DataDirPaths } from './data-dir.js';
import { cliSealerContext } from './master-key-access.js';

/** Setting naming the master key (hex id) the database's sealed secrets are under. */
export const MASTER_KEY_ID_SETTING = 'master_key.id';
/** The new master key's record while a rotation is under way. */
export const NEXT_MASTER_KEY_FILE = 'master-key.next.json';
const NEXT_SUFFIX = '.next';

const serverSecretAad = (label: string) => `virtkm/v1/server-secret/${label}`;

/** The server secrets sealed under the master key: file and label. */
function serverSecrets(paths: DataDirPaths): { path: string; label: string }[] {
  return [
    { path: paths.caKeySealed, label: SERVER_SECRET_LABELS.caKey },
    { path: paths.serverKeySealed, label: SERVER_SECRET_LABELS.serverKey },
  ];
}

/** What settleMasterKeyFiles found and did. */
export type SettleOutcome = 'clean' | 'finished' | 'undone';

async function finishSwap(paths: DataDirPaths): Promise<void> {
  for (const s of serverSecrets(paths)) {
    if (existsSync(s.path + NEXT_SUFFIX)) await rename(s.path + NEXT_SUFFIX, s.path);
  }
  await fsyncDir(paths.dir);
  await rename(join(paths.dir, NEXT_MASTER_KEY_FILE), paths.masterKey);
  await fsyncDir(paths.dir);
}

async function undoNext(paths: DataDirPaths): Promise<void> {
  // Secrets first: a .next secret never outlives the record that explains it.
  for (const s of serverSecrets(paths)) await rm(s.path + NEXT_SUFFIX, { force: true });
  await fsyncDir(paths.dir);
  await rm(join(paths.dir, NEXT_MASTER_KEY_FILE), { force: true });
  await fsyncDir(paths.dir);
}

/**
 * Finishes or undoes an interrupted rotation (see module comment), then checks that
 * master-key.json holds the key the database is sealed under. Call under the lock.
 */
export async function settleMasterKeyFiles(paths: DataDirPaths, store: Store, logger?: Logger): Promise<SettleOutcome> {
  const committed = store.getSetting(MASTER_KEY_ID_SETTING);
  const next = await readSealedRecordFileIfExists(join(paths.dir, NEXT_MASTER_KEY_FILE));
  let outcome: SettleOutcome = 'clean';
  if (next && committed === next.keyId) {
    await finishSwap(paths);
    outcome = 'finished';
  } else if (next || serverSecrets(paths).some((s) => existsSync(s.path + NEXT_SUFFIX))) {
    await undoNext(paths);
    outcome = 'undone';
  }
  if (outcome !== 'clean') logger?.warn(outcome === 'finished' ? 'finished an interrupted master key rotation' : 'undid an interrupted master key rotation (it had not committed)');
  const current = await readMasterKeyFile(paths.dir);
  if (committed !== undefined && committed !== current.keyId) {
    throw errors.precondition('master-key.json does not hold the master key the database is sealed under', {
      hint: `the database names master key ${committed}; restore the matching master-key.json from a backup`,
    });
  }
  return outcome;
}

/**
 * Checks an unsealed master key against the database (after settleMasterKeyFiles). A
 * database without the setting (made before it existed) gets it now.
 */
export async function recordMasterKeyId(store: Store, masterKey: WrappingKey): Promise<void> {
  const id = Buffer.from(masterKey.id).toString('hex');
  const committed = store.getSetting(MASTER_KEY_ID_SETTING);
  if (committed === undefined) await store.write((tx) => tx.setSetting(MASTER_KEY_ID_SETTING, id));
  else if (committed !== id) throw errors.precondition('the unsealed master key is not the one the database is sealed under');
}

/** Options of rotate-master-key: the data directory and the current sealer's unseal options. */
export interface RotateMasterKeyOptions extends Record<string, unknown> {
  dataDir: string;
}

/** Progress steps, printed as they complete (tests kill the process on them). */
export type RotationStep = 'unsealed' | 'next-record' | 'next-secrets' | 'committed' | 'swapped';

/** Runs the rotation; prints progress and a summary on stdout. */
export async function rotateMasterKeyCommand(o: RotateMasterKeyOptions, out: (s: string | Uint8Array) => void = (s) => process.stdout.write(s)): Promise<void> {
  await loadSodium();
  const paths = dataDirPaths(o.dataDir);
  if (!existsSync(paths.masterKey)) throw errors.precondition(`${o.dataDir} is not an initialised data directory`);
  const logger = createLogger({ component: 'virtkm-server', level: 'warn' });
  const store = openSqliteStore({ path: paths.db, logger: logger.child('store'), exclusive: true });
  const step = (s: RotationStep, extra = '') => out(`step ${s}${extra}\n`);
  let oldKey: WrappingKey | undefined;
  let newKey: WrappingKey | undefined;
  try {
    await settleMasterKeyFiles(paths, store, logger);
    const record = await readMasterKeyFile(paths.dir);
    const prepared = await sealerFactory(record.sealer).prepareUnseal(cliSealerContext(paths.dir, out), record, o as SealerOptionValues);
    try {
      oldKey = await prepared.sealer.unseal(record);
      await recordMasterKeyId(store, oldKey);
      step('unsealed');
      do newKey = generateWrappingKey();
      while (Buffer.from(newKey.id).equals(Buffer.from(oldKey.id)));
      const oldHex = Buffer.from(oldKey.id).toString('hex');
      const newHex = Buffer.from(newKey.id).toString('hex');

      // 1. The new record, beside the current one.
      await replaceSealedRecordFile(join(paths.dir, NEXT_MASTER_KEY_FILE), await prepared.sealer.seal(newKey));
      step('next-record');
      let committed = false;
      try {
        // 2. The server secrets under the new key, beside the current ones.
        for (const s of serverSecrets(paths)) {
          const plain = openSecret(readFileSync(s.path), oldKey, serverSecretAad(s.label), s.label);
          try {
            writeFileAtomic(s.path + NEXT_SUFFIX, seal(plain, newKey, serverSecretAad(s.label)), 0o600);
          } finally {
            wipe(plain);
          }
        }
        await fsyncDir(paths.dir);
        step('next-secrets');

        // 3. One transaction: every sealed secret, the key id, the audit event.
        const o1 = oldKey;
        const n1 = newKey;
        const count = await store.write((tx) => {
          const n = tx.rewrapSealedSecrets((volumeId, version, sealed) => rewrapOne(sealed, o1, n1, volumeSecretAad(volumeId, version), volumeId));
          tx.setSetting(MASTER_KEY_ID_SETTING, newHex);
          tx.appendAudit({ actor: 'server', action: 'master_key.rotate', target: newHex, outcome: 'ok', detail: { from: oldHex, to: newHex, secrets: n, sealer: record.sealer } });
          return n;
        });
        committed = true;
        step('committed', ` ${count}`);

        // 4. Swap the files in.
        await finishSwap(paths);
        step('swapped');
        out(`rotated the master key: ${oldHex} -> ${newHex}; ${count} volume secrets and ${serverSecrets(paths).length} server secrets rewrapped; sealed with ${record.sealer} as before\n`);
      } finally {
        if (!committed) await undoNext(paths).catch(() => undefined);
      }
    } finally {
      prepared.dispose();
    }
  } finally {
    if (oldKey) destroyWrappingKey(oldKey);
    if (newKey) destroyWrappingKey(newKey);
    await store.close();
  }
}

function openSecret(envelope: Uint8Array, key: WrappingKey, aad: string, what: string): Uint8Array {
  try {
    return open(envelope, key, aad);
  } catch (err) {
    if (err instanceof DecryptionError) throw errors.precondition(`${what} does not open with the current master key; nothing was changed`);
    throw err;
  }
}

/**
 * Rewraps one volume secret: under the old key, opened and sealed under the new; already
 * under the new key, left alone (undefined). Anything else aborts the transaction.
 */
function rewrapOne(sealed: Uint8Array, oldKey: WrappingKey, newKey: WrappingKey, aad: string, volumeId: string): Uint8Array | undefined {
  let id: Uint8Array;
  try {
    id = envelopeKeyId(sealed);
  } catch {
    throw errors.precondition(`a sealed secret of volume ${volumeId} is malformed; nothing was changed`);
  }
  if (Buffer.from(id).equals(Buffer.from(newKey.id))) return undefined;
  const plain = openSecret(sealed, oldKey, aad, `a sealed secret of volume ${volumeId}`);
  try {
    return seal(plain, newKey, aad);
  } finally {
    wipe(plain);
  }
}
