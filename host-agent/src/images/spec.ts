/**
 * Validation of image specs and the translation of dm-crypt cipher names to QEMU's. Pure
 * functions. The accepted ciphers are the server's (XTS with plain64 IVs), so that every
 * format can hold every volume and conversions between formats keep the cipher.
 */
import { isAbsolute, normalize } from 'node:path';
import { errors } from '../../../shared/src/errors.js';
import type { ImageFormat, ImageSpec } from './types.js';

/** Block cipher families accepted, in both dm-crypt and QEMU naming. */
export type CipherFamily = 'aes' | 'serpent' | 'twofish';

/** A dm-crypt cipher spec split into its parts. */
export interface ParsedCipher {
  family: CipherFamily;
  mode: 'xts';
  ivgen: 'plain64';
}

/** QEMU's names for a cipher (qemu-img create -o cipher-alg=...,cipher-mode=...,ivgen-alg=...). */
export interface QemuCipherOptions {
  cipherAlg: string;
  cipherMode: string;
  ivgenAlg: string;
}

const CIPHER_RE = /^(aes|serpent|twofish)-xts-plain64$/;
const FORMATS: readonly ImageFormat[] = ['luks', 'qcow2-luks', 'luks2', 'plain', 'raw', 'qcow2'];

/** Parses a dm-crypt cipher spec such as aes-xts-plain64. */
export function parseCipher(cipher: string): ParsedCipher {
  const m = CIPHER_RE.exec(cipher);
  const family = m?.[1] as CipherFamily | undefined;
  if (!family) {
    throw errors.invalid('unsupported cipher', { hint: 'supported: aes-xts-plain64, serpent-xts-plain64, twofish-xts-plain64' });
  }
  return { family, mode: 'xts', ivgen: 'plain64' };
}

/**
 * QEMU's cipher options for a dm-crypt cipher and key size. XTS uses two keys of half the
 * size each: a 512-bit XTS key is AES-256 in QEMU's naming, a 256-bit one AES-128.
 */
export function qemuCipherOptions(cipher: string, keySizeBits: number): QemuCipherOptions {
  const parsed = parseCipher(cipher);
  if (keySizeBits !== 256 && keySizeBits !== 512) throw errors.invalid('key size must be 256 or 512 bits');
  return { cipherAlg: `${parsed.family}-${keySizeBits / 2}`, cipherMode: parsed.mode, ivgenAlg: parsed.ivgen };
}

/** Checks an image path: absolute, normalized, no NUL, not a directory name. */
export function checkImagePath(path: string): string {
  if (typeof path !== 'string' || path.length === 0 || path.length > 4096 || path.includes('\0')) throw errors.invalid('invalid image path');
  if (!isAbsolute(path) || normalize(path) !== path || path.endsWith('/')) {
    throw errors.invalid('an image path must be absolute and normalized', { hint: 'e.g. /var/lib/virtkm/images/NAME.img' });
  }
  return path;
}

/** Validates a whole spec for create, testKey and open; returns it unchanged. */
export function checkImageSpec(spec: ImageSpec): ImageSpec {
  checkImagePath(spec.path);
  if (!FORMATS.includes(spec.format)) throw errors.invalid('unknown image format', { hint: `formats: ${FORMATS.join(', ')}` });
  parseCipher(spec.cipher);
  if (spec.keySizeBits !== 256 && spec.keySizeBits !== 512) throw errors.invalid('key size must be 256 or 512 bits');
  if (spec.sectorSize !== 512 && spec.sectorSize !== 4096) throw errors.invalid('sector size must be 512 or 4096');
  if ((spec.format === 'luks' || spec.format === 'qcow2-luks') && spec.sectorSize !== 512) {
    throw errors.invalid(`sector size is fixed at 512 for format ${spec.format}`);
  }
  if (typeof spec.sizeBytes !== 'bigint' || spec.sizeBytes <= 0n || spec.sizeBytes % BigInt(spec.sectorSize) !== 0n) {
    throw errors.invalid('image size must be a positive multiple of the sector size');
  }
  if (spec.sizeBytes > 1n << 53n) throw errors.invalid('image size is too large');
  return spec;
}
