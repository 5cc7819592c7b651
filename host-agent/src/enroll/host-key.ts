/**
 * The agent's host key (the WrappingKey that seals the autostart key cache) and how it is
 * protected, chosen at enroll (`--host-key-sealer`):
 *
 * - file (default): DIR/cache.key, 8-byte id || 32 bytes, mode 0600, created on first run
 *   (the layout before hardware sealers existed; a state directory without host-key.json
 *   is a file-sealed one);
 * - tpm2 / pkcs11: the key is made at enroll and sealed by the TPM or a PKCS#11 token key
 *   (shared/src/kek/sealed-secret.ts); DIR/host-key.json holds the sealed record, and the
 *   key exists in the clear only in the running agent's memory.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { errors } from '../../../shared/src/errors.js';
import { KEY_ID_LENGTH, generateWrappingKey, type WrappingKey } from '../../../shared/src/envelope.js';
import { checkKeySealerSpec, sealKey, unsealKey, type KeySealerSpec, type SealedKeyRecord } from '../../../shared/src/kek/sealed-secret.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import type { AgentStatePaths } from './state-dir.js';

/** Purpose of the host key's sealed record (bound into the PKCS#11 AAD). */
export const HOST_KEY_PURPOSE = 'agent-host-key';

/** Options of enroll that choose the host key's sealer. */
export interface HostKeySealerOptions {
  hostKeySealer?: string;
  pkcs11Uri?: string;
  pinFile?: string;
  tpmTcti?: string;
  tpmPcrs?: string;
}

/** The sealer the options ask for: undefined for the key file. Bad options: invalid_argument. */
export function hostKeySealerSpec(o: HostKeySealerOptions): KeySealerSpec | undefined {
  const kind = o.hostKeySealer ?? 'file';
  if (!['file', 'tpm2', 'pkcs11'].includes(kind)) throw errors.invalid('--host-key-sealer must be file, tpm2 or pkcs11');
  if (kind !== 'pkcs11' && (o.pkcs11Uri || o.pinFile)) throw errors.invalid('--pkcs11-uri and --pin-file apply to --host-key-sealer pkcs11 only');
  if (kind !== 'tpm2' && (o.tpmTcti || o.tpmPcrs)) throw errors.invalid('--tpm-tcti and --tpm-pcrs apply to --host-key-sealer tpm2 only');
  if (kind === 'file') return undefined;
  if (kind === 'tpm2') return checkKeySealerSpec({ kind: 'tpm2', ...(o.tpmTcti ? { tcti: o.tpmTcti } : {}), ...(o.tpmPcrs ? { pcrs: o.tpmPcrs } : {}) });
  if (!o.pkcs11Uri) throw errors.invalid('--host-key-sealer pkcs11 needs --pkcs11-uri URI');
  if (o.pinFile !== undefined && !o.pinFile.startsWith('/')) throw errors.invalid('--pin-file must be an absolute path (it is recorded in the state directory)');
  return checkKeySealerSpec({ kind: 'pkcs11', uri: o.pkcs11Uri, ...(o.pinFile ? { pinFile: o.pinFile } : {}) });
}

/** Makes a new host key and seals it (before enrolling: a failing token or TPM changes nothing). */
export async function sealNewHostKey(spec: KeySealerSpec): Promise<SealedKeyRecord> {
  const key = generateWrappingKey();
  try {
    return await sealKey(key, spec, HOST_KEY_PURPOSE);
  } finally {
    wipe(key.bytes);
  }
}

/** Writes the sealed record (0600, never replacing a file). */
export function writeHostKeyRecord(paths: AgentStatePaths, record: SealedKeyRecord): void {
  writeFileSync(paths.hostKeyRecord, JSON.stringify(record, null, 2) + '\n', { mode: 0o600, flag: 'wx' });
}

/** Reads the key file, creating it (0600) on first use. */
function fileHostKey(path: string): WrappingKey {
  if (!existsSync(path)) {
    const k = generateWrappingKey();
    const raw = Buffer.concat([k.id, k.bytes]);
    writeFileSync(path, raw, { mode: 0o600, flag: 'wx' });
    wipe(raw, k.bytes);
  }
  const raw = readFileSync(path);
  if (raw.length !== KEY_ID_LENGTH + 32) throw errors.precondition(`host key ${path} is damaged`);
  const key = { id: raw.subarray(0, KEY_ID_LENGTH), bytes: ownedCopy(raw.subarray(KEY_ID_LENGTH)) };
  raw.subarray(KEY_ID_LENGTH).fill(0);
  return key;
}

/** The host key of a state directory: unsealed by the TPM or token, or from the key file. */
export async function loadHostKey(paths: AgentStatePaths): Promise<WrappingKey> {
  if (!existsSync(paths.hostKeyRecord)) return fileHostKey(paths.cacheKey);
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(paths.hostKeyRecord, 'utf8'));
  } catch (err) {
    throw errors.precondition('host-key.json is not valid JSON', { cause: err });
  }
  return unsealKey(value, HOST_KEY_PURPOSE);
}
