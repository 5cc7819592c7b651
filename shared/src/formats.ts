/**
 * Volume formats: the API enum and the names used on the command line, in the database
 * and by the agent. One mapping for server and agent.
 */
import { VolumeFormat } from './api.js';

/** How a volume is encrypted on the host (raw and qcow2: not at all). */
export type VolumeFormatName = 'luks' | 'qcow2-luks' | 'luks2' | 'plain' | 'raw' | 'qcow2';

/** The unencrypted formats: no secret, no key version. */
export type UnencryptedFormatName = 'raw' | 'qcow2';

/** API enum value of each format. */
export const FORMAT_TO_API: Readonly<Record<VolumeFormatName, VolumeFormat>> = Object.freeze({
  luks: VolumeFormat.VOLUME_FORMAT_LUKS,
  'qcow2-luks': VolumeFormat.VOLUME_FORMAT_QCOW2_LUKS,
  luks2: VolumeFormat.VOLUME_FORMAT_LUKS2,
  plain: VolumeFormat.VOLUME_FORMAT_PLAIN,
  raw: VolumeFormat.VOLUME_FORMAT_RAW,
  qcow2: VolumeFormat.VOLUME_FORMAT_QCOW2,
});

/** The format name of an API enum value; undefined for unspecified or unknown values. */
export function formatFromApiValue(f: VolumeFormat): VolumeFormatName | undefined {
  return (Object.keys(FORMAT_TO_API) as VolumeFormatName[]).find((k) => FORMAT_TO_API[k] === f);
}

/** True for the formats without encryption (and so without a key). */
export function isUnencryptedFormat(f: VolumeFormatName): f is UnencryptedFormatName {
  return f === 'raw' || f === 'qcow2';
}

/**
 * The pairs that encrypting and decrypting convert between with qemu-img (same container:
 * a raw file becomes a QEMU LUKS file, a qcow2 a qcow2 with a LUKS header). luks2 and
 * plain have no unencrypted counterpart here.
 */
export const ENCRYPTED_FORM: Readonly<Record<UnencryptedFormatName, 'luks' | 'qcow2-luks'>> = Object.freeze({ raw: 'luks', qcow2: 'qcow2-luks' });
export const DECRYPTED_FORM: Readonly<Partial<Record<VolumeFormatName, UnencryptedFormatName>>> = Object.freeze({ luks: 'raw', 'qcow2-luks': 'qcow2' });
