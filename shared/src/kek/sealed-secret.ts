/**
 * A wrapping key (shared/src/envelope.ts: 8-byte id, 32 secret bytes) sealed by hardware:
 * a key in a PKCS#11 token (pkcs11.ts) or the TPM (tpm2.ts). The agent keeps its host key
 * this way (the key that seals its autostart cache), in a small JSON record:
 *
 *   { format: 'virtkm-sealed-key', version: 1, purpose, sealer: 'pkcs11' | 'tpm2',
 *     keyId: <hex of the key id>, params: {...} }
 *
 * `purpose` (for example "agent-host-key") and the key id are bound into the PKCS#11
 * AES-GCM AAD, so a record of one purpose does not open as another. The key id is public; the 32 bytes are
 * what the token or the TPM protects. The record holds nothing secret in the clear.
 */
import { DomainError } from '../errors.js';
import { KEY_ID_LENGTH, type WrappingKey } from '../envelope.js';
import { ownedCopy, wipe } from '../secret-bytes.js';
import { parsePkcs11WrappedSecret, pkcs11KeyUri, pkcs11Unwrap, pkcs11Wrap, type Pkcs11WrappedSecret } from './pkcs11.js';
import { checkTcti, parsePcrSelection, parseTpmSealedSecret, tpmSeal, tpmUnseal, type TpmSealedSecret } from './tpm2.js';

export const SEALED_KEY_FORMAT = 'virtkm-sealed-key';
export const SEALED_KEY_VERSION = 1;

/** How to seal: the token key (URI, PIN file) or the TPM (TCTI, PCRs). */
export type KeySealerSpec = { kind: 'pkcs11'; uri: string; pinFile?: string } | { kind: 'tpm2'; tcti?: string; pcrs?: string };

interface SealedKeyBase {
  format: typeof SEALED_KEY_FORMAT;
  version: typeof SEALED_KEY_VERSION;
  purpose: string;
  keyId: string;
}

/** A wrapping key sealed by a PKCS#11 token key or by a TPM. */
export type SealedKeyRecord =
  | (SealedKeyBase & { sealer: 'pkcs11'; params: Pkcs11WrappedSecret & { uri: string } })
  | (SealedKeyBase & { sealer: 'tpm2'; params: TpmSealedSecret });

const PURPOSE = /^[a-z0-9-]{1,64}$/;

/** PKCS#11 AES-GCM AAD: binds the purpose and the (public) key id to the wrapped bytes. */
function aadOf(purpose: string, keyId: string): string {
  return `virtkm/v1/sealed-key/${purpose}/${keyId}`;
}

/** Checks a sealer spec (URI, PIN file, TCTI, PCR selection) before anything is done. */
export function checkKeySealerSpec(spec: KeySealerSpec): KeySealerSpec {
  if (spec.kind === 'pkcs11') {
    pkcs11KeyUri(spec.uri, spec.pinFile);
    return spec;
  }
  if (spec.tcti !== undefined) checkTcti(spec.tcti);
  return { kind: 'tpm2', ...(spec.tcti ? { tcti: spec.tcti } : {}), ...(spec.pcrs ? { pcrs: parsePcrSelection(spec.pcrs) } : {}) };
}

/** Seals `key` (the caller keeps and destroys it) for `purpose` with the token or TPM. */
export async function sealKey(key: WrappingKey, spec: KeySealerSpec, purpose: string): Promise<SealedKeyRecord> {
  if (!PURPOSE.test(purpose)) throw new DomainError('invalid_argument', 'purpose must be lower-case letters, digits and dashes');
  if (key.id.length !== KEY_ID_LENGTH || key.bytes.length !== 32) throw new DomainError('invalid_argument', 'a wrapping key is an 8-byte id and 32 bytes');
  const base = { format: SEALED_KEY_FORMAT, version: SEALED_KEY_VERSION, purpose, keyId: Buffer.from(key.id).toString('hex') } as const;
  if (spec.kind === 'pkcs11') {
    const uri = pkcs11KeyUri(spec.uri, spec.pinFile);
    const { wrapped } = await pkcs11Wrap(uri, key.bytes, aadOf(purpose, base.keyId), { createKeyIfMissing: true });
    return { ...base, sealer: 'pkcs11', params: { uri: uri.text, ...wrapped } };
  }
  const params = await tpmSeal(key.bytes, { ...(spec.tcti ? { tcti: spec.tcti } : {}), ...(spec.pcrs ? { pcrs: spec.pcrs } : {}) });
  return { ...base, sealer: 'tpm2', params };
}

/** Validates a parsed JSON value as a SealedKeyRecord (failed_precondition naming the field). */
export function parseSealedKeyRecord(value: unknown): SealedKeyRecord {
  const bad = (what: string) => new DomainError('failed_precondition', `sealed key record is malformed: ${what}`);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('not a JSON object');
  const v = value as Record<string, unknown>;
  if (v['format'] !== SEALED_KEY_FORMAT) throw bad('format');
  if (v['version'] !== SEALED_KEY_VERSION) throw bad('unsupported version');
  const purpose = v['purpose'];
  if (typeof purpose !== 'string' || !PURPOSE.test(purpose)) throw bad('purpose');
  const keyId = v['keyId'];
  if (typeof keyId !== 'string' || !/^[0-9a-f]{16}$/.test(keyId)) throw bad('keyId');
  const params = v['params'];
  if (typeof params !== 'object' || params === null || Array.isArray(params)) throw bad('params');
  const base = { format: SEALED_KEY_FORMAT, version: SEALED_KEY_VERSION, purpose, keyId } as const;
  switch (v['sealer']) {
    case 'pkcs11': {
      const { uri, ...wrapped } = params as Record<string, unknown>;
      if (typeof uri !== 'string') throw bad('params.uri');
      let text: string;
      try {
        text = pkcs11KeyUri(uri).text;
      } catch {
        throw bad('params.uri');
      }
      return { ...base, sealer: 'pkcs11', params: { uri: text, ...parsePkcs11WrappedSecret(wrapped, (w) => bad(`params.${w}`)) } };
    }
    case 'tpm2':
      return { ...base, sealer: 'tpm2', params: parseTpmSealedSecret(params, (w) => bad(`params.${w}`)) };
    default:
      throw bad('sealer');
  }
}

/**
 * Unseals a record of `purpose` with its token or TPM. The caller owns the key and
 * destroys it (destroyWrappingKey).
 */
export async function unsealKey(value: unknown, purpose: string): Promise<WrappingKey> {
  const record = parseSealedKeyRecord(value);
  if (record.purpose !== purpose) throw new DomainError('failed_precondition', `the sealed key is for ${record.purpose}, not ${purpose}`);
  let bytes: Buffer;
  if (record.sealer === 'pkcs11') {
    const { uri, ...wrapped } = record.params;
    bytes = await pkcs11Unwrap(pkcs11KeyUri(uri), wrapped, aadOf(purpose, record.keyId));
  } else {
    bytes = await tpmUnseal(record.params);
  }
  if (bytes.length !== 32) {
    wipe(bytes);
    throw new DomainError('failed_precondition', 'the unsealed key has the wrong size');
  }
  return { id: ownedCopy(Buffer.from(record.keyId, 'hex')), bytes };
}
