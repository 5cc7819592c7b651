/**
 * Sealing the master key at rest.
 *
 * The master key is a WrappingKey (shared/src/envelope.ts): a random 8-byte id and 32
 * secret bytes. A sealer encrypts both with a key-encryption key (KEK) into an envelope
 * (AAD "virtkm/v1/master-key") and describes the result in a JSON-serialisable record:
 *
 *   { format: 'virtkm-master-key', version: 1, sealer: 'keyfile' | 'passphrase',
 *     keyId: <hex of the master key id>, params: {...}, envelope: <base64> }
 *
 * The sealed plaintext is id (8 bytes) || key (32 bytes), so the id round-trips inside the
 * authenticated ciphertext; `keyId` is a public copy (to name the key without unsealing it)
 * and must equal the sealed id, so editing it is detected.
 *
 * The envelope's own key-id field carries a KEK id, BLAKE2b-64 keyed by the KEK (a PRF:
 * it reveals nothing about the KEK). It tells "this is not the KEK that sealed the record"
 * (wrong key file, wrong passphrase) apart from "the record was damaged or tampered with".
 *
 * Sealers:
 * - key file: the KEK is 32 random bytes in a file of its own, mode 0600;
 * - passphrase: the KEK is Argon2id(passphrase, salt, opslimit, memlimit), with the salt
 *   and cost parameters stored in `params`;
 * - Shamir (shamir-sealer.ts): a random KEK split into k-of-n shares held by people; the
 *   record keeps only public commitments to the shares (params);
 * - PKCS#11 (pkcs11-sealer.ts): a random KEK wrapped by an AES key inside a token;
 * - TPM 2.0 (tpm-sealer.ts): a random KEK sealed to the TPM, optionally bound to PCRs.
 */
import { constants as fsConstants } from 'node:fs';
import { open as openFile, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { DecryptionError, KEY_ID_LENGTH, envelopeKeyId, open, seal, type WrappingKey } from '../../../shared/src/envelope.js';
import { DomainError } from '../../../shared/src/errors.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { ownedCopy, randomSecret, wipe } from '../../../shared/src/secret-bytes.js';
import { openSecretFile, readBounded, type BoundedRead } from './secret-files.js';
import { fsyncDir } from '../../../shared/src/durable-fs.js';
import { parsePkcs11WrappedSecret, pkcs11KeyUri, type Pkcs11WrappedSecret } from '../../../shared/src/kek/pkcs11.js';
import { parseTpmSealedSecret, type TpmSealedSecret } from '../../../shared/src/kek/tpm2.js';

// --- Record ------------------------------------------------------------------------------

/** `format` of every sealed master key record. */
export const SEALED_MASTER_KEY_FORMAT = 'virtkm-master-key';
/** Current record version. */
export const SEALED_MASTER_KEY_VERSION = 1;
/** AAD of the master key envelope. */
export const MASTER_KEY_AAD = 'virtkm/v1/master-key';
/** Length of a key-encryption key and of a key file. */
export const KEK_LENGTH = 32;
/** Length of the Argon2id salt. */
export const PASSPHRASE_SALT_LENGTH = 16;
/** Longest passphrase accepted, in bytes. */
export const MAX_PASSPHRASE_LENGTH = 4096;

/** How a master key is sealed. */
export type SealerKind = 'keyfile' | 'passphrase' | 'shamir' | 'pkcs11' | 'tpm2';

/** Key file records need no parameters. */
export type KeyFileSealParams = Record<string, never>;

/** Argon2id cost parameters (libsodium crypto_pwhash units: passes and bytes). */
export interface Argon2idCost {
  opslimit: number;
  memlimit: number;
}

/** Parameters of a passphrase record. */
export interface PassphraseSealParams extends Argon2idCost {
  kdf: 'argon2id13';
  /** Base64 of the 16-byte salt. */
  salt: string;
}

interface SealedMasterKeyBase {
  format: typeof SEALED_MASTER_KEY_FORMAT;
  version: typeof SEALED_MASTER_KEY_VERSION;
  /** Lower-case hex of the master key's 8-byte id. */
  keyId: string;
  /** Base64 of the envelope (shared/src/envelope.ts) holding id || key. */
  envelope: string;
}

/** A master key sealed with a key file. */
export interface KeyFileSealedMasterKey extends SealedMasterKeyBase {
  sealer: 'keyfile';
  params: KeyFileSealParams;
}

/** A master key sealed with a passphrase. */
export interface PassphraseSealedMasterKey extends SealedMasterKeyBase {
  sealer: 'passphrase';
  params: PassphraseSealParams;
}

/**
 * Parameters of a Shamir record (shamir-sealer.ts): the KEK is split into `shares` shares,
 * any `threshold` of which rebuild it. Each share is committed to (keyed BLAKE2b-256 of
 * set id, index and share value: public, reveals nothing about a 256-bit share), so a
 * wrong share is recognised on its own, before it is combined with the others.
 */
export interface ShamirSealParams {
  scheme: 'shamir-gf256';
  threshold: number;
  shares: number;
  /** Hex of the share set's random 8-byte id (carried inside each share). */
  setId: string;
  /** Hex commitment of share i+1 at position i; length `shares`. */
  commitments: string[];
}

/** A master key sealed under a KEK split into Shamir shares. */
export interface ShamirSealedMasterKey extends SealedMasterKeyBase {
  sealer: 'shamir';
  params: ShamirSealParams;
}

/**
 * Parameters of a PKCS#11 record (pkcs11-sealer.ts): the canonical URI of the token key
 * (with module-path and pin-source) and the KEK wrapped by that key (shared/src/kek/pkcs11.ts).
 */
export interface Pkcs11SealParams extends Pkcs11WrappedSecret {
  uri: string;
}

/** A master key sealed under a KEK wrapped by a key inside a PKCS#11 token. */
export interface Pkcs11SealedMasterKey extends SealedMasterKeyBase {
  sealer: 'pkcs11';
  params: Pkcs11SealParams;
}

/** Parameters of a TPM record (tpm-sealer.ts): the KEK sealed to the TPM (shared/src/kek/tpm2.ts). */
export type TpmSealParams = TpmSealedSecret;

/** A master key sealed under a KEK sealed to a TPM 2.0. */
export interface TpmSealedMasterKey extends SealedMasterKeyBase {
  sealer: 'tpm2';
  params: TpmSealParams;
}

/** The JSON-serialisable record of a sealed master key. Holds no secret in the clear. */
export type SealedMasterKey = KeyFileSealedMasterKey | PassphraseSealedMasterKey | ShamirSealedMasterKey | Pkcs11SealedMasterKey | TpmSealedMasterKey;

/** Seals and unseals the master key with one kind of key-encryption key. */
export interface MasterKeySealer {
  readonly kind: SealerKind;
  /** Seals the master key (id and bytes). The caller keeps ownership of `masterKey`. */
  seal(masterKey: WrappingKey): Promise<SealedMasterKey>;
  /**
   * Unseals a record. The caller owns the result and destroys it (destroyWrappingKey).
   * Wrong KEK: DomainError unauthenticated. Damaged or tampered record: failed_precondition.
   */
  unseal(sealed: SealedMasterKey): Promise<WrappingKey>;
}

/** Bounds on stored Argon2id costs, so a tampered record cannot make unsealing hang. */
const ARGON2_BOUNDS = { opsMin: 1, opsMax: 64, memMin: 8192, memMax: 1024 * 1024 * 1024 } as const;
const HEX_KEY_ID = /^[0-9a-f]{16}$/;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function malformed(what: string): DomainError {
  return new DomainError('failed_precondition', `sealed master key record is malformed: ${what}`);
}

function damaged(): DomainError {
  return new DomainError('failed_precondition', 'sealed master key is damaged or has been tampered with', {
    hint: 'restore master-key.json from a backup',
  });
}

function decodeBase64(value: string): Buffer | undefined {
  return BASE64.test(value) ? Buffer.from(value, 'base64') : undefined;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function checkArgon2idCost(cost: Argon2idCost, onError: (what: string) => DomainError): void {
  const { opslimit, memlimit } = cost;
  if (!Number.isSafeInteger(opslimit) || opslimit < ARGON2_BOUNDS.opsMin || opslimit > ARGON2_BOUNDS.opsMax) {
    throw onError(`Argon2id opslimit must be an integer from ${ARGON2_BOUNDS.opsMin} to ${ARGON2_BOUNDS.opsMax}`);
  }
  if (!Number.isSafeInteger(memlimit) || memlimit < ARGON2_BOUNDS.memMin || memlimit > ARGON2_BOUNDS.memMax) {
    throw onError(`Argon2id memlimit must be an integer from ${ARGON2_BOUNDS.memMin} to ${ARGON2_BOUNDS.memMax} bytes`);
  }
}

/**
 * Validates a parsed JSON value as a SealedMasterKey and returns a clean copy holding only
 * the known fields. Anything else is DomainError failed_precondition naming the bad field.
 */
export function parseSealedMasterKey(value: unknown): SealedMasterKey {
  if (!isObject(value)) throw malformed('not a JSON object');
  if (value['format'] !== SEALED_MASTER_KEY_FORMAT) throw malformed('format');
  if (value['version'] !== SEALED_MASTER_KEY_VERSION) throw malformed('unsupported version');
  const keyId = value['keyId'];
  if (typeof keyId !== 'string' || !HEX_KEY_ID.test(keyId)) throw malformed('keyId');
  const envelope = value['envelope'];
  if (typeof envelope !== 'string' || decodeBase64(envelope) === undefined) throw malformed('envelope');
  const params = value['params'];
  if (!isObject(params)) throw malformed('params');
  const base = { format: SEALED_MASTER_KEY_FORMAT, version: SEALED_MASTER_KEY_VERSION, keyId, envelope } as const;
  switch (value['sealer']) {
    case 'keyfile':
      if (Object.keys(params).length !== 0) throw malformed('params');
      return { ...base, sealer: 'keyfile', params: {} };
    case 'passphrase': {
      const { kdf, salt, opslimit, memlimit } = params;
      if (kdf !== 'argon2id13') throw malformed('params.kdf');
      if (typeof salt !== 'string' || decodeBase64(salt)?.length !== PASSPHRASE_SALT_LENGTH) throw malformed('params.salt');
      if (typeof opslimit !== 'number' || typeof memlimit !== 'number') throw malformed('params.opslimit/memlimit');
      checkArgon2idCost({ opslimit, memlimit }, (what) => malformed(what));
      return { ...base, sealer: 'passphrase', params: { kdf, salt, opslimit, memlimit } };
    }
    case 'shamir': {
      const { scheme, threshold, shares, setId, commitments } = params;
      if (scheme !== 'shamir-gf256') throw malformed('params.scheme');
      if (typeof shares !== 'number' || !Number.isInteger(shares) || shares < 1 || shares > 255) throw malformed('params.shares');
      if (typeof threshold !== 'number' || !Number.isInteger(threshold) || threshold < 1 || threshold > shares) throw malformed('params.threshold');
      if (typeof setId !== 'string' || !HEX_KEY_ID.test(setId)) throw malformed('params.setId');
      if (!Array.isArray(commitments) || commitments.length !== shares || !commitments.every((c) => typeof c === 'string' && /^[0-9a-f]{64}$/.test(c))) {
        throw malformed('params.commitments');
      }
      return { ...base, sealer: 'shamir', params: { scheme, threshold, shares, setId, commitments: [...(commitments as string[])] } };
    }
    case 'pkcs11': {
      const { uri, ...wrapped } = params;
      if (typeof uri !== 'string') throw malformed('params.uri');
      let canonical: string;
      try {
        canonical = pkcs11KeyUri(uri).text;
      } catch {
        throw malformed('params.uri');
      }
      const checked = parsePkcs11WrappedSecret(wrapped, (what) => malformed(`params.${what}`));
      return { ...base, sealer: 'pkcs11', params: { uri: canonical, ...checked } };
    }
    case 'tpm2':
      return { ...base, sealer: 'tpm2', params: parseTpmSealedSecret(params, (what) => malformed(`params.${what}`)) };
    default:
      throw malformed('sealer');
  }
}

// --- Sealing core shared by both sealers --------------------------------------------------

const KEK_ID_CONTEXT = Buffer.from('virtkm/v1/kek-id', 'utf8');

/** The KEK as a WrappingKey whose id is BLAKE2b-64 keyed by the KEK (see module comment). */
export async function kekWrappingKey(kek: Uint8Array): Promise<WrappingKey> {
  const sodium = await loadSodium();
  return { id: sodium.crypto_generichash(KEY_ID_LENGTH, KEK_ID_CONTEXT, kek), bytes: kek };
}

function checkMasterKey(masterKey: WrappingKey): void {
  if (masterKey.id.length !== KEY_ID_LENGTH || masterKey.bytes.length !== 32) {
    throw new DomainError('invalid_argument', `master key must be a ${KEY_ID_LENGTH}-byte id and 32 bytes`);
  }
}

export function sealUnderKek(masterKey: WrappingKey, kek: WrappingKey): { keyId: string; envelope: string } {
  checkMasterKey(masterKey);
  const plaintext = Buffer.allocUnsafeSlow(KEY_ID_LENGTH + 32);
  try {
    plaintext.set(masterKey.id, 0);
    plaintext.set(masterKey.bytes, KEY_ID_LENGTH);
    const envelope = seal(plaintext, kek, MASTER_KEY_AAD);
    return { keyId: Buffer.from(masterKey.id).toString('hex'), envelope: Buffer.from(envelope).toString('base64') };
  } finally {
    wipe(plaintext);
  }
}

/**
 * Opens the envelope of `sealed` with `kek`. A KEK id mismatch is `wrongKek` (the caller's
 * unauthenticated error); any other failure is "damaged". Returns an owned master key.
 */
export function unsealUnderKek(sealed: SealedMasterKey, kek: WrappingKey, wrongKek: () => DomainError): WrappingKey {
  const envelope = decodeBase64(sealed.envelope);
  if (envelope === undefined) throw malformed('envelope');
  let plaintext: Uint8Array;
  try {
    if (!Buffer.from(envelopeKeyId(envelope)).equals(Buffer.from(kek.id))) throw wrongKek();
    plaintext = open(envelope, kek, MASTER_KEY_AAD);
  } catch (err) {
    if (err instanceof DecryptionError) throw damaged();
    throw err;
  }
  try {
    if (plaintext.length !== KEY_ID_LENGTH + 32) throw damaged();
    const id = ownedCopy(plaintext.subarray(0, KEY_ID_LENGTH));
    if (id.toString('hex') !== sealed.keyId) throw damaged();
    return { id, bytes: ownedCopy(plaintext.subarray(KEY_ID_LENGTH)) };
  } finally {
    wipe(plaintext);
  }
}

/** How each sealer kind is named in messages. */
const SEALER_DESCRIPTION: Readonly<Record<SealerKind, string>> = {
  keyfile: 'a key file',
  passphrase: 'a passphrase',
  shamir: 'Shamir shares',
  pkcs11: 'a PKCS#11 token',
  tpm2: 'a TPM',
};

export function wrongSealer(expected: SealerKind, sealed: SealedMasterKey): DomainError {
  const name = (kind: string) => SEALER_DESCRIPTION[kind as SealerKind] ?? kind;
  return new DomainError('failed_precondition', `the master key is sealed with ${name(sealed.sealer)}, not with ${name(expected)}`);
}

// --- Key file sealer ---------------------------------------------------------------------

/**
 * Creates a key file: 32 random bytes, mode 0600, created exclusively (an existing file is
 * never replaced: DomainError already_exists), written and fsynced, then its directory
 * fsynced. A failed write removes the partial file.
 */
export async function createKeyFile(path: string): Promise<void> {
  let handle: FileHandle;
  try {
    handle = await openFile(path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOCTTY, 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new DomainError('already_exists', 'key file already exists', { cause: err, hint: 'a key file is never overwritten' });
    throw new DomainError('failed_precondition', 'key file cannot be created', { cause: err });
  }
  const kek = randomSecret(KEK_LENGTH);
  try {
    // O_CREAT's mode is filtered by the umask, which can only remove bits; chmod anyway so
    // the result does not depend on the umask at all.
    await handle.chmod(0o600);
    await handle.writeFile(kek);
    await handle.sync();
    await handle.close();
  } catch (err) {
    await handle.close().catch(() => undefined);
    await unlink(path).catch(() => undefined);
    throw new DomainError('failed_precondition', 'key file cannot be written', { cause: err });
  } finally {
    wipe(kek);
  }
  await fsyncDir(dirname(path));
}

/** Reads and checks a key file; the caller wipes the returned KEK. */
async function readKeyFile(path: string): Promise<Buffer> {
  const { handle } = await openSecretFile(path, 'key file');
  let read: BoundedRead | undefined;
  try {
    read = await readBounded(handle, KEK_LENGTH);
    if (read.tooLong || read.length !== KEK_LENGTH) {
      throw new DomainError('failed_precondition', `key file is not a virtkm key file (it must hold exactly ${KEK_LENGTH} bytes)`);
    }
    return ownedCopy(read.buf.subarray(0, KEK_LENGTH));
  } finally {
    if (read) wipe(read.buf);
    await handle.close();
  }
}

/**
 * A sealer whose KEK is the key file at `path` (see createKeyFile). Both seal and unseal
 * read the existing file; a file that group or others can access is refused with
 * failed_precondition (hint: chmod 600). The wrong key file is unauthenticated.
 */
export function keyFileSealer(path: string): MasterKeySealer {
  const withKek = async <T>(fn: (kek: WrappingKey) => T): Promise<T> => {
    const bytes = await readKeyFile(path);
    try {
      return fn(await kekWrappingKey(bytes));
    } finally {
      wipe(bytes);
    }
  };
  return {
    kind: 'keyfile',
    async seal(masterKey) {
      const { keyId, envelope } = await withKek((kek) => sealUnderKek(masterKey, kek));
      return { format: SEALED_MASTER_KEY_FORMAT, version: SEALED_MASTER_KEY_VERSION, sealer: 'keyfile', keyId, params: {}, envelope };
    },
    async unseal(sealed) {
      if (sealed.sealer !== 'keyfile') throw wrongSealer('keyfile', sealed);
      return withKek((kek) =>
        unsealUnderKek(sealed, kek, () => new DomainError('unauthenticated', 'wrong key file', { hint: 'use the key file that sealed this master key' })),
      );
    },
  };
}

// --- Passphrase sealer -------------------------------------------------------------------

/**
 * Where the passphrase comes from: a file (one trailing "\n" or "\r\n" is removed; the
 * file must not be accessible by group or others), or a callback (for example a terminal
 * prompt). The sealer takes ownership of the bytes a callback returns and wipes them after
 * use. A passphrase is never a string, never in argv or the environment.
 */
export type PassphraseSource = { file: string } | { prompt: () => Promise<Uint8Array> };

/** Options of passphraseSealer. */
export interface PassphraseSealerOptions {
  source: PassphraseSource;
  /**
   * Argon2id cost for seal(); default libsodium's OPSLIMIT_MODERATE and MEMLIMIT_MODERATE
   * (3 passes, 256 MiB). unseal() uses the cost stored in the record.
   */
  cost?: Argon2idCost;
}

/**
 * Reads a passphrase file into an unpooled buffer that the caller wipes. One trailing
 * newline ("\n" or "\r\n") is removed; an empty or over-long passphrase is invalid_argument.
 */
export async function readPassphraseFile(path: string): Promise<Buffer> {
  const { handle } = await openSecretFile(path, 'passphrase file');
  let read: BoundedRead | undefined;
  try {
    // Up to the maximum plus a "\r\n" that is not part of the passphrase.
    read = await readBounded(handle, MAX_PASSPHRASE_LENGTH + 2);
    if (read.tooLong) throw new DomainError('invalid_argument', `passphrase is longer than ${MAX_PASSPHRASE_LENGTH} bytes`);
    return checkedPassphrase(ownedCopy(read.buf.subarray(0, stripNewline(read.buf, read.length))));
  } finally {
    if (read) wipe(read.buf);
    await handle.close();
  }
}

function stripNewline(buf: Uint8Array, length: number): number {
  if (length > 0 && buf[length - 1] === 0x0a) {
    return length > 1 && buf[length - 2] === 0x0d ? length - 2 : length - 1;
  }
  return length;
}

/** Refuses (and wipes) an empty or over-long passphrase. */
function checkedPassphrase<T extends Uint8Array>(passphrase: T): T {
  if (passphrase.length === 0 || passphrase.length > MAX_PASSPHRASE_LENGTH) {
    const empty = passphrase.length === 0;
    wipe(passphrase);
    throw new DomainError('invalid_argument', empty ? 'passphrase is empty' : `passphrase is longer than ${MAX_PASSPHRASE_LENGTH} bytes`);
  }
  return passphrase;
}

async function obtainPassphrase(source: PassphraseSource): Promise<Uint8Array> {
  if ('file' in source) return readPassphraseFile(source.file);
  return checkedPassphrase(await source.prompt());
}

/**
 * Derives the KEK with Argon2id and runs fn with it; the passphrase and the KEK are wiped
 * afterwards, whatever happens. (libsodium's WebAssembly wrapper copies the passphrase into
 * its own heap for the call; that copy is outside our reach.)
 */
async function withPassphraseKek<T>(source: PassphraseSource, salt: Uint8Array, cost: Argon2idCost, fn: (kek: WrappingKey) => Promise<T> | T): Promise<T> {
  const sodium = await loadSodium();
  const passphrase = await obtainPassphrase(source);
  let kek: Uint8Array | undefined;
  try {
    kek = sodium.crypto_pwhash(KEK_LENGTH, passphrase, salt, cost.opslimit, cost.memlimit, sodium.crypto_pwhash_ALG_ARGON2ID13);
    wipe(passphrase);
    return await fn(await kekWrappingKey(kek));
  } finally {
    wipe(passphrase, kek);
  }
}

/**
 * A sealer whose KEK is derived from a passphrase with Argon2id (random 16-byte salt;
 * cost stored in the record). A wrong passphrase is DomainError unauthenticated "wrong
 * passphrase" and nothing more.
 */
export function passphraseSealer(options: PassphraseSealerOptions): MasterKeySealer {
  if (options.cost) checkArgon2idCost(options.cost, (what) => new DomainError('invalid_argument', what));
  return {
    kind: 'passphrase',
    async seal(masterKey) {
      checkMasterKey(masterKey);
      const sodium = await loadSodium();
      const cost = options.cost ?? { opslimit: sodium.crypto_pwhash_OPSLIMIT_MODERATE, memlimit: sodium.crypto_pwhash_MEMLIMIT_MODERATE };
      const salt = randomSecret(PASSPHRASE_SALT_LENGTH);
      const { keyId, envelope } = await withPassphraseKek(options.source, salt, cost, (kek) => sealUnderKek(masterKey, kek));
      return {
        format: SEALED_MASTER_KEY_FORMAT,
        version: SEALED_MASTER_KEY_VERSION,
        sealer: 'passphrase',
        keyId,
        params: { kdf: 'argon2id13', salt: salt.toString('base64'), opslimit: cost.opslimit, memlimit: cost.memlimit },
        envelope,
      };
    },
    async unseal(sealed) {
      if (sealed.sealer !== 'passphrase') throw wrongSealer('passphrase', sealed);
      // Re-validated here: the record may not have come through parseSealedMasterKey.
      const checked = parseSealedMasterKey(sealed);
      if (checked.sealer !== 'passphrase') throw malformed('sealer');
      const salt = decodeBase64(checked.params.salt);
      if (salt === undefined) throw malformed('params.salt');
      return withPassphraseKek(options.source, salt, checked.params, (kek) =>
        unsealUnderKek(checked, kek, () => new DomainError('unauthenticated', 'wrong passphrase')),
      );
    },
  };
}
