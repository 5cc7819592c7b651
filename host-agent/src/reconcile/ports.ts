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

/**
 * Whether an existing image of `kind` may serve as a volume of `format`. A `raw` volume's
 * file is the guest's disk byte for byte: the guest decides what its first bytes look like
 * (a guest that puts LUKS on its whole disk makes it look like a LUKS image; one may even
 * write a qcow2 magic), so for raw any existing file matches. The domain pins the format
 * (`<driver type='raw'/>`), so QEMU never probes it. Every other format has a header that
 * virtkm wrote and the guest cannot change.
 */
export function imageMatchesFormat(format: AgentVolumeFormat, kind: ImageInfo['kind']): boolean {
  if (kind === 'missing') return false;
  return format === 'raw' || kind === KIND_OF_FORMAT[format];
}
