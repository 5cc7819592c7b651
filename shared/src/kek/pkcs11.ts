/**
 * Wrapping a small secret (a 32-byte key-encryption key) with an AES key that never leaves
 * a PKCS#11 token (an HSM, a smart card, SoftHSM2).
 *
 * The token, the key and the module are named by a PKCS#11 URI (pkcs11-uri.ts); the PIN is
 * read from the URI's pin-source file (owner-only, like a key file), never from argv or
 * the environment. The module is driven through the npm package pkcs11js, except C_Login:
 * pkcs11js takes the PIN as a JavaScript string, which cannot be wiped, so the PIN goes to
 * the module's own C_Login through koffi as a Buffer we zero afterwards (dlopen returns the
 * same loaded module to both, so they share its sessions).
 *
 * Mechanism: CKM_AES_GCM through C_Encrypt/C_Decrypt with a random 96-bit IV, a 128-bit tag
 * and the caller's AAD (which binds what the secret is for). GCM is authenticated: a
 * different key in the token, or a changed record, is detected by the token. The wrapped
 * form also names the token's serial number, so "another token" is told apart from "the
 * key in the token was replaced or the record changed". (Some HSMs in FIPS mode insist on
 * generating the GCM IV themselves; such a token refuses C_EncryptInit here.)
 *
 * The key: an AES-256 secret-key object, CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not
 * CKA_EXTRACTABLE, allowed to encrypt and decrypt. wrap() may create it when the token has
 * no object the URI names (init on a fresh token needs no separate tool); unwrap() never
 * creates anything. An existing key that is extractable or not sensitive is refused: its
 * bytes could be read out of the token, which defeats the purpose.
 *
 * A module is loaded, initialised and finalised per call, and calls are serialised in the
 * process: PKCS#11 modules keep global state, and these calls are rare (start-up, init).
 */
import { createRequire } from 'node:module';
import type * as Pkcs11Js from 'pkcs11js';
import { stat } from 'node:fs/promises';
import { DomainError } from '../errors.js';
import { ownedCopy, randomSecret, wipe } from '../secret-bytes.js';
import { formatPkcs11Uri, parsePkcs11Uri, type Pkcs11Uri } from './pkcs11-uri.js';
import { readSecretTextFile } from './secret-file.js';

type Pkcs11Module = typeof Pkcs11Js;
type Pkcs11 = InstanceType<Pkcs11Module['PKCS11']>;
type Handle = Buffer;

/** The wrapped form of a secret; JSON-serialisable, holds no secret in the clear. */
export interface Pkcs11WrappedSecret {
  mechanism: 'aes-256-gcm';
  /** Base64 of the 12-byte IV. */
  iv: string;
  /** Base64 of ciphertext || 16-byte tag. */
  ciphertext: string;
  /** The token's serial number and label (CK_TOKEN_INFO, blanks trimmed) at wrap time. */
  tokenSerial: string;
  tokenLabel: string;
}

/** A PKCS#11 URI checked for our use (see pkcs11KeyUri). */
export interface Pkcs11KeyUri {
  readonly uri: Pkcs11Uri;
  /** The canonical text (formatPkcs11Uri), as stored in records. */
  readonly text: string;
}

/** Longest PIN accepted, in bytes. */
export const MAX_PIN_LENGTH = 256;
const IV_LENGTH = 12;
const TAG_LENGTH = 16;
/** Longest secret wrapped (we wrap 32-byte keys; a bound keeps buffers small). */
const MAX_SECRET_LENGTH = 1024;

// PKCS#11 return values we tell apart (PKCS#11 2.40, pkcs11t.h).
const CKR_OK = 0x0;
const CKR_PIN_INCORRECT = 0xa0;
const CKR_PIN_INVALID = 0xa1;
const CKR_PIN_LEN_RANGE = 0xa2;
const CKR_PIN_EXPIRED = 0xa3;
const CKR_PIN_LOCKED = 0xa4;
const CKR_USER_ALREADY_LOGGED_IN = 0x100;
const CKR_USER_PIN_NOT_INITIALIZED = 0x102;
const CKR_TOKEN_NOT_PRESENT = 0xe0;
const CKR_DEVICE_REMOVED = 0x32;
const CKU_USER = 1;

function invalid(message: string): DomainError {
  return new DomainError('invalid_argument', message);
}

/**
 * Parses and checks a URI naming a wrapping key: an AES key (type=secret-key, or no type)
 * named by object= and/or id=, a module-path, and a PIN file (pin-source, or `pinFile`,
 * which takes precedence and is written into the canonical text).
 */
export function pkcs11KeyUri(text: string, pinFile?: string): Pkcs11KeyUri {
  const uri = parsePkcs11Uri(text);
  if (uri.type !== undefined && uri.type !== 'secret-key') throw invalid('PKCS#11 URI: the key must be type=secret-key');
  uri.type = 'secret-key';
  if (uri.object === undefined && uri.id === undefined) throw invalid('PKCS#11 URI: name the key with object=LABEL (and/or id=)');
  if (uri.modulePath === undefined) {
    throw new DomainError('invalid_argument', 'PKCS#11 URI: module-path is required', { hint: 'for SoftHSM2: ?module-path=/usr/lib/softhsm/libsofthsm2.so' });
  }
  if (uri.moduleName !== undefined) throw invalid('PKCS#11 URI: module-name is not supported; give module-path');
  if (pinFile !== undefined) {
    if (!pinFile.startsWith('/')) throw invalid('the PIN file must be an absolute path');
    uri.pinSource = pinFile;
  }
  if (uri.pinSource === undefined) throw invalid('PKCS#11 URI: a PIN file is required (pin-source=file:/path or --pin-file)');
  return { uri, text: formatPkcs11Uri(uri) };
}

/** Validates a parsed JSON value as a Pkcs11WrappedSecret; `onError` makes the error. */
export function parsePkcs11WrappedSecret(value: unknown, onError: (what: string) => Error): Pkcs11WrappedSecret {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw onError('not an object');
  const v = value as Record<string, unknown>;
  if (v['mechanism'] !== 'aes-256-gcm') throw onError('mechanism');
  const b64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
  const iv = v['iv'];
  if (typeof iv !== 'string' || !b64.test(iv) || Buffer.from(iv, 'base64').length !== IV_LENGTH) throw onError('iv');
  const ct = v['ciphertext'];
  if (typeof ct !== 'string' || !b64.test(ct)) throw onError('ciphertext');
  const ctLength = Buffer.from(ct, 'base64').length;
  if (ctLength <= TAG_LENGTH || ctLength > MAX_SECRET_LENGTH + TAG_LENGTH) throw onError('ciphertext');
  const serial = v['tokenSerial'];
  const label = v['tokenLabel'];
  if (typeof serial !== 'string' || serial.length > 64) throw onError('tokenSerial');
  if (typeof label !== 'string' || label.length > 64) throw onError('tokenLabel');
  return { mechanism: 'aes-256-gcm', iv, ciphertext: ct, tokenSerial: serial, tokenLabel: label };
}

// --- Module loading ----------------------------------------------------------------------

const requireCjs = createRequire(import.meta.url);
let pkcs11js: Pkcs11Module | undefined;

function loadPkcs11js(): Pkcs11Module {
  try {
    pkcs11js ??= requireCjs('pkcs11js') as Pkcs11Module;
    return pkcs11js;
  } catch (err) {
    throw new DomainError('unavailable', 'PKCS#11 support is not installed', { cause: err, hint: 'npm install pkcs11js (it compiles from source)' });
  }
}

type LoginFn = (session: bigint, userType: bigint, pin: Uint8Array, pinLength: bigint) => number | bigint;
const loginFns = new Map<string, LoginFn>();

/** The module's own C_Login, through koffi, taking the PIN as bytes. */
async function moduleLogin(modulePath: string): Promise<LoginFn> {
  const cached = loginFns.get(modulePath);
  if (cached) return cached;
  let fn: LoginFn;
  try {
    const koffi = (await import('koffi')).default;
    fn = koffi.load(modulePath).func('unsigned long C_Login(unsigned long, unsigned long, const uint8_t *pin, unsigned long)') as LoginFn;
  } catch (err) {
    throw new DomainError('unavailable', 'the PKCS#11 module does not export C_Login', { cause: err });
  }
  loginFns.set(modulePath, fn);
  return fn;
}

/**
 * The module must be an absolute path to a regular file nobody but its owner can change:
 * the path comes from a record on disk, and loading a library runs its code.
 */
async function checkModule(path: string): Promise<void> {
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    throw new DomainError('failed_precondition', 'the PKCS#11 module named by module-path does not exist', { cause: err, hint: 'install the token\'s PKCS#11 library (SoftHSM2: apt-get install softhsm2)' });
  }
  if (!info.isFile()) throw new DomainError('failed_precondition', 'the PKCS#11 module named by module-path is not a file');
  if ((info.mode & 0o022) !== 0) throw new DomainError('failed_precondition', 'the PKCS#11 module is writable by group or others', { hint: 'chmod go-w on the module' });
}

function rvOf(err: unknown): number | undefined {
  const code = (err as { code?: unknown }).code;
  return typeof code === 'number' ? code : undefined;
}

function tokenError(what: string, err: unknown): DomainError {
  const rv = rvOf(err);
  if (rv === CKR_TOKEN_NOT_PRESENT || rv === CKR_DEVICE_REMOVED) return new DomainError('unavailable', 'the PKCS#11 token is not present', { cause: err });
  return new DomainError('unavailable', `PKCS#11 ${what} failed${rv === undefined ? '' : ` (CKR 0x${rv.toString(16)})`}`, { cause: err });
}

// --- Sessions ----------------------------------------------------------------------------

let queue: Promise<unknown> = Promise.resolve();

/** Runs calls into PKCS#11 modules one at a time in this process. */
function serialised<T>(fn: () => Promise<T>): Promise<T> {
  const next = queue.then(fn, fn);
  queue = next.catch(() => undefined);
  return next;
}

const trimmed = (s: string): string => s.replace(/[ \0]+$/, '');

interface OpenToken {
  p: Pkcs11;
  mod: Pkcs11Module;
  session: Handle;
  serial: string;
  label: string;
}

function matchesSlot(p: Pkcs11, slot: Handle, uri: Pkcs11Uri): { serial: string; label: string } | undefined {
  const token = p.C_GetTokenInfo(slot);
  const label = trimmed(token.label);
  const serial = trimmed(token.serialNumber);
  if (uri.token !== undefined && uri.token !== label) return undefined;
  if (uri.serial !== undefined && uri.serial !== serial) return undefined;
  if (uri.manufacturer !== undefined && uri.manufacturer !== trimmed(token.manufacturerID)) return undefined;
  if (uri.model !== undefined && uri.model !== trimmed(token.model)) return undefined;
  if (uri.slotId !== undefined && BigInt(uri.slotId) !== slot.readBigUInt64LE(0)) return undefined;
  if (uri.slotDescription !== undefined || uri.slotManufacturer !== undefined) {
    const info = p.C_GetSlotInfo(slot);
    if (uri.slotDescription !== undefined && uri.slotDescription !== trimmed(info.slotDescription)) return undefined;
    if (uri.slotManufacturer !== undefined && uri.slotManufacturer !== trimmed(info.manufacturerID)) return undefined;
  }
  return { serial, label };
}

function checkLibrary(p: Pkcs11, uri: Pkcs11Uri): void {
  if (uri.libraryManufacturer === undefined && uri.libraryDescription === undefined && uri.libraryVersion === undefined) return;
  const info = p.C_GetInfo();
  const version = `${info.libraryVersion.major}.${info.libraryVersion.minor}`;
  const ok =
    (uri.libraryManufacturer === undefined || uri.libraryManufacturer === trimmed(info.manufacturerID)) &&
    (uri.libraryDescription === undefined || uri.libraryDescription === trimmed(info.libraryDescription)) &&
    (uri.libraryVersion === undefined || uri.libraryVersion === version || `${uri.libraryVersion}.0` === version);
  if (!ok) throw new DomainError('not_found', 'the PKCS#11 module does not match the library attributes of the URI');
}

/**
 * Loads the module, finds the one token the URI names, opens a session and logs in with
 * the PIN file; runs fn; then logs out, closes and finalises whatever happens.
 */
async function withToken<T>(key: Pkcs11KeyUri, readWrite: boolean, fn: (t: OpenToken) => T): Promise<T> {
  const { uri } = key;
  const modulePath = uri.modulePath ?? '';
  const pinSource = uri.pinSource ?? '';
  await checkModule(modulePath);
  const mod = loadPkcs11js();
  const login = await moduleLogin(modulePath);
  const pin = await readSecretTextFile(pinSource, 'PIN file', MAX_PIN_LENGTH);
  const p = new mod.PKCS11();
  let loaded = false;
  let initialised = false;
  let session: Handle | undefined;
  let loggedIn = false;
  try {
    try {
      p.load(modulePath);
      loaded = true;
      p.C_Initialize();
      initialised = true;
    } catch (err) {
      throw new DomainError('unavailable', 'the PKCS#11 module cannot be loaded or initialised', { cause: err });
    }
    checkLibrary(p, uri);
    let slots: Handle[];
    try {
      slots = p.C_GetSlotList(true);
    } catch (err) {
      throw tokenError('C_GetSlotList', err);
    }
    const found: { slot: Handle; serial: string; label: string }[] = [];
    for (const slot of slots) {
      const m = matchesSlot(p, slot, uri);
      if (m) found.push({ slot, ...m });
    }
    if (found.length === 0) throw new DomainError('not_found', 'no PKCS#11 token matches the URI', { hint: 'check token= (the label) and that the token is present' });
    if (found.length > 1) throw new DomainError('invalid_argument', `${found.length} PKCS#11 tokens match the URI`, { hint: 'name one: add serial= to the URI' });
    const { slot, serial, label } = found[0]!;
    try {
      session = p.C_OpenSession(slot, mod.CKF_SERIAL_SESSION | (readWrite ? mod.CKF_RW_SESSION : 0));
    } catch (err) {
      throw tokenError('C_OpenSession', err);
    }
    const rv = Number(login(session.readBigUInt64LE(0), BigInt(CKU_USER), pin, BigInt(pin.length)));
    wipe(pin);
    if (rv === CKR_PIN_INCORRECT || rv === CKR_PIN_INVALID || rv === CKR_PIN_LEN_RANGE) {
      throw new DomainError('unauthenticated', 'wrong PIN for the PKCS#11 token', { hint: 'check the PIN file; tokens lock the PIN after repeated failures' });
    }
    if (rv === CKR_PIN_LOCKED) throw new DomainError('permission_denied', "the PKCS#11 token's user PIN is locked", { hint: 'unlock it with the security officer PIN' });
    if (rv === CKR_PIN_EXPIRED) throw new DomainError('permission_denied', "the PKCS#11 token's user PIN has expired");
    if (rv === CKR_USER_PIN_NOT_INITIALIZED) throw new DomainError('failed_precondition', 'the PKCS#11 token has no user PIN yet', { hint: 'initialise the token first' });
    if (rv !== CKR_OK && rv !== CKR_USER_ALREADY_LOGGED_IN) throw tokenError('C_Login', Object.assign(new Error('C_Login'), { code: rv }));
    loggedIn = rv === CKR_OK;
    return fn({ p, mod, session, serial, label });
  } finally {
    wipe(pin);
    if (session !== undefined) {
      if (loggedIn) {
        try {
          p.C_Logout(session);
        } catch {
          // Closing the session below ends the login anyway.
        }
      }
      try {
        p.C_CloseSession(session);
      } catch {
        // Finalising ends every session.
      }
    }
    if (initialised) {
      try {
        p.C_Finalize();
      } catch {
        // Nothing more to release.
      }
    }
    if (loaded) {
      try {
        p.close();
      } catch {
        // The module stays loaded for koffi's C_Login anyway.
      }
    }
  }
}

function keyTemplate(mod: Pkcs11Module, uri: Pkcs11Uri): { type: number; value: number | boolean | string | Buffer }[] {
  const t: { type: number; value: number | boolean | string | Buffer }[] = [{ type: mod.CKA_CLASS, value: mod.CKO_SECRET_KEY }];
  if (uri.object !== undefined) t.push({ type: mod.CKA_LABEL, value: uri.object });
  if (uri.id !== undefined) t.push({ type: mod.CKA_ID, value: uri.id });
  return t;
}

function findKeys(t: OpenToken, uri: Pkcs11Uri): Handle[] {
  const { p, mod, session } = t;
  try {
    p.C_FindObjectsInit(session, keyTemplate(mod, uri));
    const found = p.C_FindObjects(session, 2);
    p.C_FindObjectsFinal(session);
    return found;
  } catch (err) {
    throw tokenError('C_FindObjects', err);
  }
}

/** Refuses a key whose bytes could leave the token, or that cannot do AES-GCM both ways. */
function checkKey(t: OpenToken, key: Handle): void {
  const { p, mod, session } = t;
  let attrs;
  try {
    attrs = p.C_GetAttributeValue(session, key, [{ type: mod.CKA_KEY_TYPE }, { type: mod.CKA_SENSITIVE }, { type: mod.CKA_EXTRACTABLE }, { type: mod.CKA_ENCRYPT }, { type: mod.CKA_DECRYPT }]);
  } catch (err) {
    throw tokenError('C_GetAttributeValue', err);
  }
  const asNumber = (v: unknown) => (Buffer.isBuffer(v) ? (v.length >= 8 ? Number(v.readBigUInt64LE(0)) : v.length > 0 ? v[0]! : -1) : Number(v));
  const asBool = (v: unknown) => (Buffer.isBuffer(v) ? v.length > 0 && v[0] !== 0 : Boolean(v));
  const [type, sensitive, extractable, encrypt, decrypt] = attrs.map((a) => a.value);
  if (asNumber(type) !== mod.CKK_AES) throw new DomainError('failed_precondition', 'the PKCS#11 object the URI names is not an AES key');
  if (!asBool(sensitive) || asBool(extractable)) {
    throw new DomainError('failed_precondition', 'the PKCS#11 key can be extracted from the token', { hint: 'use a key created with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false' });
  }
  if (!asBool(encrypt) || !asBool(decrypt)) throw new DomainError('failed_precondition', 'the PKCS#11 key is not allowed to encrypt and decrypt');
}

function generateKey(t: OpenToken, uri: Pkcs11Uri): Handle {
  const { p, mod, session } = t;
  try {
    return p.C_GenerateKey(session, { mechanism: mod.CKM_AES_KEY_GEN, parameter: undefined as never }, [
      ...keyTemplate(mod, uri),
      { type: mod.CKA_KEY_TYPE, value: mod.CKK_AES },
      { type: mod.CKA_VALUE_LEN, value: 32 },
      { type: mod.CKA_TOKEN, value: true },
      { type: mod.CKA_PRIVATE, value: true },
      { type: mod.CKA_SENSITIVE, value: true },
      { type: mod.CKA_EXTRACTABLE, value: false },
      { type: mod.CKA_ENCRYPT, value: true },
      { type: mod.CKA_DECRYPT, value: true },
      { type: mod.CKA_WRAP, value: false },
      { type: mod.CKA_UNWRAP, value: false },
    ]);
  } catch (err) {
    throw tokenError('C_GenerateKey', err);
  }
}

function gcm(mod: Pkcs11Module, iv: Buffer, aad: string) {
  return { mechanism: mod.CKM_AES_GCM, parameter: { type: mod.CK_PARAMS_AES_GCM, iv, ivBits: IV_LENGTH * 8, aad: Buffer.from(aad, 'utf8'), tagBits: TAG_LENGTH * 8 } };
}

/** Options of pkcs11Wrap. */
export interface Pkcs11WrapOptions {
  /** Create the key (see the module comment) when the token has none the URI names. */
  createKeyIfMissing?: boolean;
}

/**
 * Encrypts `secret` (the caller keeps and wipes it) with the token key, bound to `aad`.
 * Returns the wrapped form and whether the key was created now.
 */
export function pkcs11Wrap(key: Pkcs11KeyUri, secret: Uint8Array, aad: string, options: Pkcs11WrapOptions = {}): Promise<{ wrapped: Pkcs11WrappedSecret; keyCreated: boolean }> {
  if (secret.length === 0 || secret.length > MAX_SECRET_LENGTH) throw invalid(`the secret to wrap must be 1 to ${MAX_SECRET_LENGTH} bytes`);
  return serialised(() =>
    withToken(key, options.createKeyIfMissing === true, (t) => {
      let keys = findKeys(t, key.uri);
      let keyCreated = false;
      if (keys.length === 0) {
        if (!options.createKeyIfMissing) throw new DomainError('not_found', 'the token has no key the PKCS#11 URI names');
        keys = [generateKey(t, key.uri)];
        keyCreated = true;
      }
      if (keys.length > 1) throw new DomainError('invalid_argument', 'the PKCS#11 URI names more than one key in the token', { hint: 'add id= to the URI' });
      checkKey(t, keys[0]!);
      const iv = randomSecret(IV_LENGTH);
      const input = ownedCopy(secret);
      const out = Buffer.allocUnsafeSlow(secret.length + TAG_LENGTH + 16);
      try {
        t.p.C_EncryptInit(t.session, gcm(t.mod, iv, aad), keys[0]!);
        const ct = t.p.C_Encrypt(t.session, input, out);
        if (ct.length !== secret.length + TAG_LENGTH) throw new DomainError('internal', 'the PKCS#11 token returned an unexpected AES-GCM output');
        return {
          wrapped: { mechanism: 'aes-256-gcm', iv: iv.toString('base64'), ciphertext: Buffer.from(ct).toString('base64'), tokenSerial: t.serial, tokenLabel: t.label },
          keyCreated,
        };
      } catch (err) {
        if (err instanceof DomainError) throw err;
        throw tokenError('AES-GCM encryption', err);
      } finally {
        wipe(input);
      }
    }),
  );
}

/**
 * Decrypts a wrapped secret with the token key. Another token (serial differs) or a token
 * key that does not open it (replaced key, changed record, other AAD): unauthenticated.
 * The caller owns and wipes the result.
 */
export function pkcs11Unwrap(key: Pkcs11KeyUri, wrapped: Pkcs11WrappedSecret, aad: string): Promise<Buffer> {
  const checked = parsePkcs11WrappedSecret(wrapped, (what) => new DomainError('failed_precondition', `wrapped secret is malformed: ${what}`));
  return serialised(() =>
    withToken(key, false, (t) => {
      if (checked.tokenSerial !== t.serial) {
        throw new DomainError('unauthenticated', 'the PKCS#11 token is not the one that sealed this key (its serial number differs)', { hint: 'use the token that sealed it' });
      }
      const keys = findKeys(t, key.uri);
      if (keys.length === 0) throw new DomainError('not_found', 'the token has no key the PKCS#11 URI names', { hint: 'the key was deleted from the token, or the URI is wrong' });
      if (keys.length > 1) throw new DomainError('invalid_argument', 'the PKCS#11 URI names more than one key in the token', { hint: 'add id= to the URI' });
      const ct = Buffer.from(checked.ciphertext, 'base64');
      const out = Buffer.allocUnsafeSlow(ct.length + 16);
      try {
        t.p.C_DecryptInit(t.session, gcm(t.mod, Buffer.from(checked.iv, 'base64'), aad), keys[0]!);
        let plain: Buffer;
        try {
          plain = t.p.C_Decrypt(t.session, ct, out);
        } catch (err) {
          // Tokens report a failed GCM tag check variously (CKR_ENCRYPTED_DATA_INVALID,
          // CKR_GENERAL_ERROR in SoftHSM2): any failure here means "does not open".
          throw new DomainError('unauthenticated', 'the key in the PKCS#11 token does not open this sealed key', {
            cause: err,
            hint: 'the key in the token was replaced, or the sealed record was changed',
          });
        }
        return ownedCopy(plain);
      } catch (err) {
        if (err instanceof DomainError) throw err;
        throw tokenError('AES-GCM decryption', err);
      } finally {
        wipe(out);
      }
    }),
  );
}
