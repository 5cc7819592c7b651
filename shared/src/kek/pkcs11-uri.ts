/**
 * A strict parser and formatter for PKCS#11 URIs (RFC 7512), which name a token, an object
 * in it and the module (shared library) that reaches it:
 *
 *   pkcs11:token=virtkm;object=master-kek;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/virtkm/pin
 *
 * Strict: every path and query attribute RFC 7512 defines is understood, each may appear
 * once, values are checked against the RFC's character classes (anything else must be
 * percent-encoded), and anything unknown is refused rather than ignored, because a URI
 * that silently names less than its author meant could select the wrong token or key.
 * Vendor attributes (x-...) are refused too: we cannot honour them.
 *
 * `pin-value` is refused: a URI is stored in plain files (master-key.json, host-key.json)
 * and shown in logs, so a PIN never belongs in one. The PIN comes from `pin-source`, a file.
 */
import { DomainError } from '../errors.js';

/** Object classes of RFC 7512's `type` attribute. */
export type Pkcs11ObjectType = 'public' | 'private' | 'cert' | 'secret-key' | 'data';

/** A parsed PKCS#11 URI. Text attributes are decoded (UTF-8); `id` is raw bytes. */
export interface Pkcs11Uri {
  // Token attributes (CK_TOKEN_INFO).
  token?: string;
  manufacturer?: string;
  serial?: string;
  model?: string;
  // Library attributes (CK_INFO).
  libraryManufacturer?: string;
  libraryDescription?: string;
  libraryVersion?: string;
  // Object attributes.
  object?: string;
  type?: Pkcs11ObjectType;
  id?: Buffer;
  // Slot attributes (CK_SLOT_INFO, slot id).
  slotDescription?: string;
  slotManufacturer?: string;
  slotId?: number;
  // Query attributes.
  /** Where the PIN is: an absolute path (a `file:` URI is reduced to its path). */
  pinSource?: string;
  moduleName?: string;
  modulePath?: string;
}

type TextKey = Exclude<keyof Pkcs11Uri, 'id' | 'slotId' | 'type'>;

/** Path attribute names (RFC 7512 section 2.3) and where they go. */
const PATH_ATTRIBUTES: Readonly<Record<string, keyof Pkcs11Uri>> = {
  token: 'token',
  manufacturer: 'manufacturer',
  serial: 'serial',
  model: 'model',
  'library-manufacturer': 'libraryManufacturer',
  'library-description': 'libraryDescription',
  'library-version': 'libraryVersion',
  object: 'object',
  type: 'type',
  id: 'id',
  'slot-description': 'slotDescription',
  'slot-manufacturer': 'slotManufacturer',
  'slot-id': 'slotId',
};

/** Query attribute names. pin-value is known, and refused (see the module comment). */
const QUERY_ATTRIBUTES: Readonly<Record<string, keyof Pkcs11Uri | 'pinValue'>> = {
  'pin-source': 'pinSource',
  'pin-value': 'pinValue',
  'module-name': 'moduleName',
  'module-path': 'modulePath',
};

const OBJECT_TYPES: readonly Pkcs11ObjectType[] = ['public', 'private', 'cert', 'secret-key', 'data'];
const UNRESERVED = "A-Za-z0-9\\-._~";
/** pk11-pchar: unreserved, pct-encoded and these (RFC 7512: pk11-path-res-avail). */
const PATH_VALUE = new RegExp(`^(?:[${UNRESERVED}:\\[\\]@!$'()*+,=&]|%[0-9A-Fa-f]{2})*$`);
/** pk11-qchar: pk11-query-res-avail (no "&", which separates query attributes). */
const QUERY_VALUE = new RegExp(`^(?:[${UNRESERVED}:\\[\\]@!$'()*+,=;/?|]|%[0-9A-Fa-f]{2})*$`);
const NAME = /^[a-z][a-z0-9-]*$/;
/** Longest URI accepted (a real one is a few hundred characters). */
const MAX_URI_LENGTH = 4096;

function bad(what: string): DomainError {
  return new DomainError('invalid_argument', `PKCS#11 URI: ${what}`, { hint: 'the form is pkcs11:token=LABEL;object=LABEL;type=secret-key?module-path=/path/to/module.so&pin-source=file:/path/to/pin' });
}

function percentDecode(value: string, attr: string): Buffer {
  const out: number[] = [];
  for (let i = 0; i < value.length; i++) {
    const ch = value.charCodeAt(i);
    if (ch === 0x25) {
      out.push(parseInt(value.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      out.push(ch);
    }
  }
  const buf = Buffer.from(out);
  if (attr === 'id') return buf;
  // Text attributes are UTF-8: refuse what does not decode cleanly.
  const text = buf.toString('utf8');
  if (!Buffer.from(text, 'utf8').equals(buf)) throw bad(`${attr} is not valid UTF-8`);
  return buf;
}

function decodeText(value: string, attr: string): string {
  return percentDecode(value, attr).toString('utf8');
}

/** "file:/p", "file:///p" and "/p" name the absolute path /p; nothing else is a PIN source we read. */
function pinSourcePath(value: string): string {
  let path = value;
  if (path.startsWith('file://')) path = path.slice('file://'.length);
  else if (path.startsWith('file:')) path = path.slice('file:'.length);
  if (!path.startsWith('/') || path.includes('\0')) {
    throw bad('pin-source must be a file: an absolute path or a file: URI (file:/path)');
  }
  return path;
}

function assign(uri: Pkcs11Uri, key: keyof Pkcs11Uri, name: string, raw: string): void {
  if (uri[key] !== undefined) throw bad(`attribute ${name} appears more than once`);
  switch (key) {
    case 'id': {
      const id = percentDecode(raw, 'id');
      if (id.length === 0) throw bad('id is empty');
      uri.id = id;
      return;
    }
    case 'type': {
      const t = decodeText(raw, name);
      if (!OBJECT_TYPES.includes(t as Pkcs11ObjectType)) throw bad(`type must be one of ${OBJECT_TYPES.join(', ')}`);
      uri.type = t as Pkcs11ObjectType;
      return;
    }
    case 'slotId': {
      const t = decodeText(raw, name);
      if (!/^(0|[1-9][0-9]{0,19})$/.test(t) || !Number.isSafeInteger(Number(t))) throw bad('slot-id must be a decimal number');
      uri.slotId = Number(t);
      return;
    }
    case 'libraryVersion': {
      const t = decodeText(raw, name);
      if (!/^[0-9]{1,3}(\.[0-9]{1,3})?$/.test(t)) throw bad('library-version must be M or M.N');
      uri.libraryVersion = t;
      return;
    }
    case 'pinSource':
      uri.pinSource = pinSourcePath(decodeText(raw, name));
      return;
    case 'modulePath': {
      const path = decodeText(raw, name);
      if (!path.startsWith('/') || path.includes('\0')) throw bad('module-path must be an absolute path');
      uri.modulePath = path;
      return;
    }
    default: {
      const t = decodeText(raw, name);
      if (t.length === 0) throw bad(`${name} is empty`);
      uri[key as TextKey] = t;
    }
  }
}

function splitAttribute(part: string, where: string): [string, string] {
  const eq = part.indexOf('=');
  if (eq <= 0) throw bad(`"${part.slice(0, 40)}" in the ${where} is not NAME=VALUE`);
  const name = part.slice(0, eq);
  if (!NAME.test(name)) throw bad(`attribute name "${name.slice(0, 40)}" is not valid`);
  return [name, part.slice(eq + 1)];
}

/**
 * Parses a PKCS#11 URI strictly (see the module comment). Any problem is DomainError
 * invalid_argument naming it.
 */
export function parsePkcs11Uri(text: string): Pkcs11Uri {
  if (typeof text !== 'string' || text.length > MAX_URI_LENGTH) throw bad(`must be a string of at most ${MAX_URI_LENGTH} characters`);
  if (!/^pkcs11:/i.test(text)) throw bad('must start with "pkcs11:"');
  const rest = text.slice('pkcs11:'.length);
  const q = rest.indexOf('?');
  const path = q === -1 ? rest : rest.slice(0, q);
  const query = q === -1 ? undefined : rest.slice(q + 1);
  const uri: Pkcs11Uri = {};
  if (path !== '') {
    for (const part of path.split(';')) {
      const [name, value] = splitAttribute(part, 'path');
      const key = PATH_ATTRIBUTES[name];
      if (!key) throw bad(name.startsWith('x-') ? `vendor attribute ${name} is not supported` : `unknown path attribute ${name}`);
      if (!PATH_VALUE.test(value)) throw bad(`the value of ${name} has characters that must be percent-encoded`);
      assign(uri, key, name, value);
    }
  }
  if (query !== undefined) {
    if (query === '') throw bad('empty query');
    for (const part of query.split('&')) {
      const [name, value] = splitAttribute(part, 'query');
      const key = QUERY_ATTRIBUTES[name];
      if (!key) throw bad(name.startsWith('x-') ? `vendor attribute ${name} is not supported` : `unknown query attribute ${name}`);
      if (key === 'pinValue') throw bad('pin-value is not accepted (a PIN must not be written in a URI)');
      if (!QUERY_VALUE.test(value)) throw bad(`the value of ${name} has characters that must be percent-encoded`);
      assign(uri, key, name, value);
    }
  }
  return uri;
}

function encode(value: Uint8Array | string, keep: RegExp): string {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value);
  let out = '';
  for (const b of bytes) {
    const ch = String.fromCharCode(b);
    out += b < 0x80 && keep.test(ch) ? ch : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

const KEEP_PATH = /^[A-Za-z0-9\-._~:[\]@!$'()*+,]$/;
const KEEP_QUERY = /^[A-Za-z0-9\-._~:[\]@!$'()*+,/]$/;
const KEEP_ID = /^$/;

/**
 * Formats a URI in a canonical form (RFC 7512's attribute order, everything outside a small
 * safe set percent-encoded; the id always fully encoded; pin-source as a file: URI), so
 * parsePkcs11Uri(formatPkcs11Uri(u)) equals u.
 */
export function formatPkcs11Uri(uri: Pkcs11Uri): string {
  const path: string[] = [];
  const text = (name: string, v: string | undefined) => {
    if (v !== undefined) path.push(`${name}=${encode(v, KEEP_PATH)}`);
  };
  text('library-description', uri.libraryDescription);
  text('library-manufacturer', uri.libraryManufacturer);
  text('library-version', uri.libraryVersion);
  text('slot-description', uri.slotDescription);
  text('slot-manufacturer', uri.slotManufacturer);
  if (uri.slotId !== undefined) path.push(`slot-id=${uri.slotId}`);
  text('manufacturer', uri.manufacturer);
  text('model', uri.model);
  text('serial', uri.serial);
  text('token', uri.token);
  if (uri.id !== undefined) path.push(`id=${encode(uri.id, KEEP_ID)}`);
  text('object', uri.object);
  text('type', uri.type);
  const query: string[] = [];
  if (uri.moduleName !== undefined) query.push(`module-name=${encode(uri.moduleName, KEEP_QUERY)}`);
  if (uri.modulePath !== undefined) query.push(`module-path=${encode(uri.modulePath, KEEP_QUERY)}`);
  if (uri.pinSource !== undefined) query.push(`pin-source=${encode(`file:${uri.pinSource}`, KEEP_QUERY)}`);
  return `pkcs11:${path.join(';')}${query.length > 0 ? `?${query.join('&')}` : ''}`;
}
