/**
 * How a volume's random secret is presented to the tools.
 *
 * LUKS-type volumes (luks, qcow2-luks, luks2): the keyslot passphrase is the lower-case hex
 * of the secret, as ASCII bytes without a newline (32 random bytes -> 64 characters). The
 * same bytes go to every consumer: qemu-img/qemu-io (secret object, file=/dev/fd/3,
 * format=raw), libvirt (virSecretSetValue: libvirt hands the value to QEMU, which treats it
 * the same way) and cryptsetup (--key-file -, which reads every byte, no newline handling).
 *
 * Why not the raw bytes: QEMU reads LUKS passphrases with qcrypto_secret_lookup_as_utf8(),
 * which refuses data that is not valid UTF-8 ("Data from secret sec0 is not valid UTF-8")
 * and NUL bytes count as invalid. 32 random bytes are almost never valid UTF-8. Checked
 * here with qemu-img 7.2 and with libvirt 9.0 starting a domain (same QEMU error through
 * libvirt), while cryptsetup 2.6 accepted raw bytes with 0x00 and 0x0a. Hex works for all
 * three and loses no entropy (256 bits either way); a LUKS header created by one tool opens
 * with the others. The hex is written into a Buffer byte by byte, never through a JS
 * string, because strings cannot be wiped.
 *
 * plain dm-crypt has no keyslots: its secret is the data key itself (keySizeBits / 8 raw
 * bytes) and goes to `cryptsetup open --type plain --key-file - --keyfile-size N` unchanged
 * (cryptsetup uses a key file in plain mode as the binary key, without hashing).
 */
import { errors } from '../../../shared/src/errors.js';

/** Length bounds of a LUKS-type volume secret, in bytes (virtkm uses 32). */
export const LUKS_SECRET_MIN_BYTES = 16;
/** See LUKS_SECRET_MIN_BYTES. */
export const LUKS_SECRET_MAX_BYTES = 64;

const HEX_DIGITS = Buffer.from('0123456789abcdef', 'latin1');

/**
 * The passphrase bytes for a LUKS-type volume: lower-case ASCII hex of the secret, in a
 * buffer of its own that the caller wipes after use.
 */
export function luksPassphrase(secret: Uint8Array): Buffer {
  if (secret.length < LUKS_SECRET_MIN_BYTES || secret.length > LUKS_SECRET_MAX_BYTES) {
    throw errors.invalid(`a volume secret has ${LUKS_SECRET_MIN_BYTES} to ${LUKS_SECRET_MAX_BYTES} bytes`);
  }
  const out = Buffer.allocUnsafeSlow(secret.length * 2);
  for (let i = 0; i < secret.length; i++) {
    const byte = secret[i] ?? 0;
    out[2 * i] = HEX_DIGITS[byte >> 4] ?? 0;
    out[2 * i + 1] = HEX_DIGITS[byte & 0x0f] ?? 0;
  }
  return out;
}

/** Checks that a plain dm-crypt secret is exactly the data key (keySizeBits / 8 bytes). */
export function checkPlainKey(secret: Uint8Array, keySizeBits: number): Uint8Array {
  if (secret.length * 8 !== keySizeBits) throw errors.invalid(`a plain dm-crypt key has ${keySizeBits / 8} bytes`);
  return secret;
}
