/**
 * Checks on libvirt secret values, done on the bytes (never through a JS string, which could
 * not be wiped).
 *
 * QEMU reads a LUKS passphrase as UTF-8 text (qcrypto_secret_lookup_as_utf8, which uses
 * g_utf8_validate: no NUL bytes either) and refuses anything else when the guest starts. Raw
 * random key bytes are therefore not a usable passphrase: virtkm's keys must be encoded
 * (hex, for example) before they become secret values.
 */

/** Longest secret value accepted (virtkm's are 64 hex characters; libvirt allows more). */
export const MAX_SECRET_VALUE_BYTES = 4096;

/** Whether bytes are well-formed UTF-8 without NUL (what QEMU accepts as a passphrase). */
export function isPassphraseUtf8(bytes: Uint8Array): boolean {
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i] as number;
    if (b === 0) return false;
    if (b < 0x80) {
      i++;
      continue;
    }
    let need: number;
    let min: number;
    if (b >= 0xc2 && b <= 0xdf) {
      need = 1;
      min = 0x80;
    } else if (b >= 0xe0 && b <= 0xef) {
      need = 2;
      min = 0x800;
    } else if (b >= 0xf0 && b <= 0xf4) {
      need = 3;
      min = 0x10000;
    } else {
      return false; // continuation byte first, overlong lead (C0, C1) or beyond U+10FFFF
    }
    let cp = b & (0xff >> (need + 2));
    for (let k = 1; k <= need; k++) {
      const c = bytes[i + k];
      if (c === undefined || (c & 0xc0) !== 0x80) return false;
      cp = (cp << 6) | (c & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += need + 1;
  }
  return true;
}
