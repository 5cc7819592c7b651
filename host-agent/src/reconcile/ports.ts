/**
 * What the reconciler needs from the image layer and from dm-crypt: the ports defined in
 * host-agent/src/images/types.ts (real adapters: qemu-img, cryptsetup), under the names the
 * reconciler uses.
 */
import type { VolumeKeyring } from '../../../shared/src/keyring.js';
import { KIND_OF_FORMAT, type DmCryptMapper, type ImageFormat, type ImageInfo, type ImageSpec, type ImageStore } from '../images/types.js';

export type { ImageInfo, ImageSpec };
/** Volume formats as the agent names them. */
export type AgentVolumeFormat = ImageFormat;
/** Creating and checking encrypted images. */
export type ImagePort = Pick<ImageStore, 'create' | 'inspect' | 'testKey' | 'remove'>;
/** Opening dm-crypt mappings for luks2 and plain volumes. */
export type DmCryptPort = DmCryptMapper;
/**
 * The agent's kernel keyring (shared/src/keyring.ts): the key of each open dm-crypt mapping
 * is held there as a logon key, handed to dm-crypt by reference, and unlinked once its
 * mapping is no longer needed (the guest stopped, moved or was wiped).
 */
export type KeyringPort = Pick<VolumeKeyring, 'load' | 'retain'>;

/** The image kind a format must have on disk (plain dm-crypt has no header: raw). */
export function expectedKind(format: AgentVolumeFormat): ImageInfo['kind'] {
  return KIND_OF_FORMAT[format];
}
