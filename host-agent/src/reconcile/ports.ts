/**
 * What the reconciler needs from the image layer and from dm-crypt, as small interfaces.
 * The real adapters are host-agent/src/images/ (qemu-img, cryptsetup).
 */

/** Volume formats as the agent names them. */
export type AgentVolumeFormat = 'luks' | 'qcow2-luks' | 'luks2' | 'plain';

/** Everything needed to create or check one image. */
export interface ImageSpec {
  path: string;
  format: AgentVolumeFormat;
  sizeBytes: bigint;
  cipher: string;
  keySizeBits: number;
  sectorSize: number;
}

/** What is at an image path. */
export interface ImageInfo {
  exists: boolean;
  kind: 'luks1' | 'luks2' | 'qcow2-luks' | 'qcow2' | 'raw' | 'missing';
}

/** Creating and checking encrypted images. */
export interface ImagePort {
  /** Creates the image; refuses an existing path. */
  create(spec: ImageSpec, secret: Uint8Array): Promise<void>;
  inspect(path: string): Promise<ImageInfo>;
  /** True when the secret opens the image, false for a wrong key; other failures throw. */
  testKey(path: string, spec: ImageSpec, secret: Uint8Array): Promise<boolean>;
}

/** Opening dm-crypt mappings for luks2 and plain volumes. */
export interface DmCryptPort {
  /** Why dm-crypt cannot be used here, or undefined when it can. */
  unavailableReason(): Promise<string | undefined>;
  /** Opens (idempotent) and returns the mapping's device path. */
  open(spec: ImageSpec, name: string, secret: Uint8Array): Promise<string>;
  close(name: string): Promise<void>;
  /** Names of mappings virtkm opened (prefix virtkm-). */
  list(): Promise<string[]>;
}

/** The image kind a format must have on disk. */
export function expectedKind(format: AgentVolumeFormat): ImageInfo['kind'] {
  switch (format) {
    case 'luks':
      return 'luks1';
    case 'qcow2-luks':
      return 'qcow2-luks';
    case 'luks2':
      return 'luks2';
    case 'plain':
      // plain dm-crypt has no header: its ciphertext looks like random raw data.
      return 'raw';
  }
}
