/**
 * `virtkm-server reseal --data-dir DIR --to KIND [options]`: the same master key, sealed
 * another way. The server is stopped: the command takes the data directory's exclusive
 * lock, as `run` does. No volume secret is touched: only master-key.json changes (and the
 * material of the old and new sealers: key files, the transport key of sealed mode).
 *
 * Order (see master-key/registry.ts for why it is crash-safe):
 *   settle an interrupted rotation; unseal with the current sealer (its unseal options);
 *   prepare the target (new key file under a pending name, new Shamir split, ...);
 *   seal the same master key; for Shamir, make the TLS key available to sealed mode;
 *   replace master-key.json atomically (temp, fsync, rename, directory fsync);
 *   retire the old sealer's material; commit the new one's; drop the transport key
 *   when the new sealer does not start sealed; audit.
 */
import { existsSync } from 'node:fs';
import { destroyWrappingKey, type WrappingKey } from '../../../shared/src/envelope.js';
import { errors } from '../../../shared/src/errors.js';
import { createLogger } from '../../../shared/src/log.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { readMasterKeyFile, replaceSealedRecordFile } from '../master-key/master-key-file.js';
import { sealerFactory, type PreparedSealer, type SealerOptionValues } from '../master-key/registry.js';
import { openSqliteStore } from '../store/sqlite-store.js';
import { dataDirPaths } from './data-dir.js';
import { cliSealerContext } from './master-key-access.js';
import { recordMasterKeyId, settleMasterKeyFiles } from './master-key-rotation.js';
import { ensureTransportTlsKey, removeTransportTlsKey } from './sealed-mode.js';

/** Options: the data directory, the target kind, and every sealer's options (registry). */
export interface ResealOptions extends Record<string, unknown> {
  dataDir: string;
  to: string;
}

/** Runs the reseal; prints a summary (and new Shamir shares, once) on stdout. */
export async function resealCommand(o: ResealOptions, out?: (s: string | Uint8Array) => void): Promise<void> {
  await loadSodium();
  const target = sealerFactory(o.to);
  const paths = dataDirPaths(o.dataDir);
  if (!existsSync(paths.masterKey)) throw errors.precondition(`${o.dataDir} is not an initialised data directory`);
  const ctx = cliSealerContext(paths.dir, out);
  const logger = createLogger({ component: 'virtkm-server', level: 'warn' });
  const store = openSqliteStore({ path: paths.db, logger: logger.child('store'), exclusive: true });
  let key: WrappingKey | undefined;
  let source: PreparedSealer | undefined;
  let prepared: PreparedSealer | undefined;
  try {
    await settleMasterKeyFiles(paths, store, logger);
    const record = await readMasterKeyFile(paths.dir);
    source = await sealerFactory(record.sealer).prepareUnseal(ctx, record, o as SealerOptionValues);
    key = await source.sealer.unseal(record);
    await recordMasterKeyId(store, key);

    prepared = await target.prepareSeal(ctx, o as SealerOptionValues);
    let written = false;
    try {
      const next = await prepared.sealer.seal(key);
      if (target.unsealsOnline) await ensureTransportTlsKey(paths, key);
      await replaceSealedRecordFile(paths.masterKey, next);
      written = true;
    } finally {
      if (!written) await prepared.abort?.();
    }
    await source.retire?.();
    await prepared.commit?.();
    if (!target.unsealsOnline) await removeTransportTlsKey(paths);
    await store.write((tx) =>
      tx.appendAudit({ actor: 'server', action: 'master_key.reseal', target: record.keyId, outcome: 'ok', detail: { from: record.sealer, to: target.kind } }),
    );
    ctx.out(`resealed master key ${record.keyId}: ${record.sealer} -> ${target.kind} (${target.description})\n`);
  } finally {
    if (key) destroyWrappingKey(key);
    source?.dispose();
    prepared?.dispose();
    await store.close();
  }
}
