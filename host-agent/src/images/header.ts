/**
 * Recognizing images by their first bytes. Pure functions over byte arrays; the store reads
 * the bytes. Fail closed: anything that carries a LUKS or qcow2 magic is reported as such,
 * however damaged the rest is, so an encrypted image is never mistaken for raw data.
 *
 * Layouts used (all integers big-endian):
 * - LUKS1 and LUKS2 primary header: magic "LUKS\xba\xbe" at 0, version u16 at 6, UUID
 *   (40 bytes, NUL-terminated ASCII) at 168 in both versions; LUKS1 payload offset
 *   (in 512-byte sectors) u32 at 104.
 * - LUKS2 secondary header: magic "SKUL\xba\xbe" at one of the offsets in
 *   LUKS2_SECONDARY_OFFSETS (it survives a wiped or overwritten primary header).
 * - qcow2: magic "QFI\xfb" at 0, version u32 at 4, virtual size u64 at 24, crypt_method
 *   u32 at 32 (0 none, 1 legacy AES, 2 LUKS).
 */
import { errors } from '../../../shared/src/errors.js';

/** Bytes inspect reads from the start of an image. */
export const HEADER_PROBE_BYTES = 4096;

/** Where a LUKS2 secondary header can start (the primary header's size, 16 KiB to 4 MiB). */
export const LUKS2_SECONDARY_OFFSETS: readonly number[] = [0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];

const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const LUKS2_SECONDARY_MAGIC = Buffer.from([0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe]);
const QCOW_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);
const UUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** qcow2 crypt_method values. */
export const QCOW2_CRYPT_NONE = 0;
/** Legacy qcow2 AES encryption (insecure, unsupported by virtkm). */
export const QCOW2_CRYPT_AES = 1;
/** qcow2 with an embedded LUKS header. */
export const QCOW2_CRYPT_LUKS = 2;

/** What the first bytes of an image say. Fields are absent when the bytes are too short. */
export type HeaderFacts =
  | { type: 'luks'; version: 1 | 2; uuid?: string; payloadOffsetBytes?: bigint }
  | { type: 'qcow2'; version?: number; virtualSizeBytes?: bigint; cryptMethod?: number }
  | { type: 'none' };

function startsWith(bytes: Uint8Array, magic: Buffer, at = 0): boolean {
  if (bytes.length < at + magic.length) return false;
  return Buffer.from(bytes.buffer, bytes.byteOffset + at, magic.length).equals(magic);
}

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The LUKS UUID at offset 168 (primary or LUKS2 secondary header), when present and well-formed. */
export function parseLuksUuid(bytes: Uint8Array): string | undefined {
  if (bytes.length < 168 + 36) return undefined;
  const field = Buffer.from(bytes.buffer, bytes.byteOffset + 168, Math.min(40, bytes.length - 168));
  const end = field.indexOf(0);
  const text = field.subarray(0, end < 0 ? field.length : end).toString('latin1');
  return UUID_RE.test(text) ? text.toLowerCase() : undefined;
}

/**
 * Recognizes the header at the start of an image. Throws failed_precondition for a LUKS
 * magic with an unknown version: it is encrypted, but nothing here can handle it.
 */
export function parseImageHeader(bytes: Uint8Array): HeaderFacts {
  if (startsWith(bytes, LUKS_MAGIC)) {
    // Too short for the version field: LUKS all the same (fail closed). The caller sees
    // no UUID and no payload offset and reports the image as damaged.
    if (bytes.length < 8) return { type: 'luks', version: 1 };
    const version = view(bytes).getUint16(6);
    if (version !== 1 && version !== 2) {
      throw errors.precondition('the image has a LUKS header of an unknown version', { hint: 'it is treated as encrypted and left alone' });
    }
    const facts: HeaderFacts = { type: 'luks', version };
    const uuid = parseLuksUuid(bytes);
    if (uuid) facts.uuid = uuid;
    if (version === 1 && bytes.length >= 108) facts.payloadOffsetBytes = BigInt(view(bytes).getUint32(104)) * 512n;
    return facts;
  }
  if (startsWith(bytes, QCOW_MAGIC)) {
    const facts: HeaderFacts = { type: 'qcow2' };
    const v = view(bytes);
    if (bytes.length >= 8) facts.version = v.getUint32(4);
    if (bytes.length >= 32) facts.virtualSizeBytes = v.getBigUint64(24);
    if (bytes.length >= 36) facts.cryptMethod = v.getUint32(32);
    return facts;
  }
  return { type: 'none' };
}

/** True when the bytes start with a LUKS2 secondary header magic. */
export function isLuks2SecondaryHeader(bytes: Uint8Array): boolean {
  return startsWith(bytes, LUKS2_SECONDARY_MAGIC);
}
