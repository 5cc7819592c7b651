/**
 * Validation of volume parameters and the safe defaults for ciphers. Pure functions.
 */
import { errors } from '../../../shared/src/errors.js';
import { DECRYPTED_FORM, ENCRYPTED_FORM, isUnencryptedFormat } from '../../../shared/src/formats.js';
import type { VolumeFormatName } from './model.js';

export { isUnencryptedFormat };

/** Smallest and largest volume sizes accepted. */
export const MIN_VOLUME_BYTES = 1n << 20n; // 1 MiB
export const MAX_VOLUME_BYTES = 1n << 46n; // 64 TiB

/** Ciphers accepted, in dm-crypt notation; QEMU gets the equivalent alg/mode/ivgen. */
export const ALLOWED_CIPHERS: readonly string[] = ['aes-xts-plain64', 'serpent-xts-plain64', 'twofish-xts-plain64'];

/** Defaults: AES-256 in XTS mode (512-bit XTS key), 512-byte sectors. */
export const DEFAULT_CIPHER = 'aes-xts-plain64';
export const DEFAULT_KEY_SIZE_BITS = 512;
export const DEFAULT_SECTOR_SIZE = 512;

/** Length of the random keyslot passphrase of LUKS-type volumes (not a password: 256 bits). */
export const PASSPHRASE_BYTES = 32;

/** A validated, complete cipher specification. */
export interface CompiledCipherSpec {
  cipher: string;
  keySizeBits: number;
  sectorSize: number;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** True when s has the shape of a virtkm id (a lower-case UUID). */
export function isId(s: string): boolean {
  return UUID_RE.test(s);
}

/** Checks a resource name (volumes, guests, hosts, principals). */
export function checkName(kind: string, name: string): string {
  if (!NAME_RE.test(name)) {
    throw errors.invalid(`invalid ${kind} name`, { hint: 'names are 1-63 characters of letters, digits, ".", "_" and "-", starting with a letter or digit' });
  }
  if (isId(name)) throw errors.invalid(`invalid ${kind} name: a name must not look like an id`);
  return name;
}

/** Checks a volume size against the limits and the sector size. */
export function checkSize(sizeBytes: bigint, sectorSize: number): bigint {
  if (sizeBytes < MIN_VOLUME_BYTES || sizeBytes > MAX_VOLUME_BYTES) {
    throw errors.invalid(`volume size must be between ${MIN_VOLUME_BYTES} and ${MAX_VOLUME_BYTES} bytes`);
  }
  if (sizeBytes % BigInt(sectorSize) !== 0n) throw errors.invalid(`volume size must be a multiple of the sector size (${sectorSize})`);
  return sizeBytes;
}

/** Applies defaults to a requested cipher spec and validates it for the format. */
export function compileCipherSpec(format: VolumeFormatName, req: { cipher?: string; keySizeBits?: number; sectorSize?: number }): CompiledCipherSpec {
  const cipher = req.cipher ? req.cipher : DEFAULT_CIPHER;
  const keySizeBits = req.keySizeBits ? req.keySizeBits : DEFAULT_KEY_SIZE_BITS;
  const sectorSize = req.sectorSize ? req.sectorSize : DEFAULT_SECTOR_SIZE;
  if (!ALLOWED_CIPHERS.includes(cipher)) {
    throw errors.invalid(`unsupported cipher "${cipher.slice(0, 40)}"`, { hint: `supported: ${ALLOWED_CIPHERS.join(', ')}` });
  }
  // XTS splits the key in two halves: 256 bits = AES-128, 512 bits = AES-256.
  if (keySizeBits !== 256 && keySizeBits !== 512) throw errors.invalid('key size must be 256 or 512 bits for XTS');
  if (sectorSize !== 512 && sectorSize !== 4096) throw errors.invalid('sector size must be 512 or 4096');
  // raw and qcow2 keep the cipher for the day they are encrypted (as luks, qcow2-luks).
  if ((format === 'luks' || format === 'qcow2-luks' || isUnencryptedFormat(format)) && sectorSize !== 512) {
    throw errors.invalid(`sector size is fixed at 512 for format ${format}`);
  }
  return { cipher, keySizeBits, sectorSize };
}

/** Length of the random secret stored for a volume of this format. */
export function secretLength(format: VolumeFormatName, spec: CompiledCipherSpec): number {
  // plain dm-crypt has no keyslots: the secret is the data key itself.
  return format === 'plain' ? spec.keySizeBits / 8 : PASSPHRASE_BYTES;
}

/**
 * The format an encryption (kind "encrypt") or decryption ("decrypt") of a volume of
 * `format` leads to; failed_precondition when that conversion does not exist.
 */
export function convertedFormat(format: VolumeFormatName, kind: 'encrypt' | 'decrypt'): VolumeFormatName {
  if (kind === 'encrypt') {
    if (!isUnencryptedFormat(format)) throw errors.precondition(`the volume is already encrypted (${format})`);
    return ENCRYPTED_FORM[format];
  }
  if (isUnencryptedFormat(format)) throw errors.precondition(`the volume is not encrypted (${format})`);
  const to = DECRYPTED_FORM[format];
  if (!to) {
    throw errors.precondition(`a ${format} volume cannot be decrypted by virtkm yet`, { hint: 'decrypting (and encrypting) works for luks <-> raw and qcow2-luks <-> qcow2' });
  }
  return to;
}

/** Clamps a requested page size to [1, 1000], 0 meaning the default 100. */
export function pageSize(requested: number): number {
  if (!requested) return 100;
  return Math.min(Math.max(requested, 1), 1000);
}
