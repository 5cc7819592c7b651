/**
 * Volume formats: the API enum and the names used on the command line, in the database
 * and by the agent. One mapping for server and agent.
 */
import { VolumeFormat } from './api.js';

/** How a volume is encrypted on the host. */
export type VolumeFormatName = 'luks' | 'qcow2-luks' | 'luks2' | 'plain';

/** API enum value of each format. */
export const FORMAT_TO_API: Readonly<Record<VolumeFormatName, VolumeFormat>> = Object.freeze({
  luks: VolumeFormat.VOLUME_FORMAT_LUKS,
  'qcow2-luks': VolumeFormat.VOLUME_FORMAT_QCOW2_LUKS,
  luks2: VolumeFormat.VOLUME_FORMAT_LUKS2,
  plain: VolumeFormat.VOLUME_FORMAT_PLAIN,
});

/** The format name of an API enum value; undefined for unspecified or unknown values. */
export function formatFromApiValue(f: VolumeFormat): VolumeFormatName | undefined {
  return (Object.keys(FORMAT_TO_API) as VolumeFormatName[]).find((k) => FORMAT_TO_API[k] === f);
}
