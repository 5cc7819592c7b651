/**
 * The image layer's port: creating, recognizing, key-checking and removing encrypted disk
 * images, and opening dm-crypt mappings for the formats the kernel decrypts. The real
 * adapters are image-store.ts (qemu-img, qemu-io, cryptsetup) and dm-crypt.ts.
 */

/** How a volume is encrypted on disk; raw and qcow2 are unencrypted (no key). */
export type ImageFormat = 'luks' | 'qcow2-luks' | 'luks2' | 'plain' | 'raw' | 'qcow2';

/** What inspect finds at a path. */
export type ImageKind = 'luks1' | 'luks2' | 'qcow2-luks' | 'qcow2' | 'raw' | 'missing';

/** Everything needed to create or check one image. */
export interface ImageSpec {
  /** Absolute path of the image file. */
  path: string;
  format: ImageFormat;
  /**
   * Size the guest sees, in bytes (a multiple of sectorSize). The file is larger by the
   * header: QEMU's LUKS header (about 2 MiB), qcow2 metadata, or LUKS2's 16 MiB.
   */
  sizeBytes: bigint;
  /** dm-crypt notation, e.g. aes-xts-plain64; see cipher.ts for the accepted ones. */
  cipher: string;
  /** Data key size; XTS splits it in two, so 512 bits is AES-256 and 256 bits AES-128. */
  keySizeBits: 256 | 512;
  /** Encryption sector size; QEMU's LUKS (luks, qcow2-luks) supports 512 only. */
  sectorSize: 512 | 4096;
}

/** What is at an image path. */
export interface ImageInfo {
  exists: boolean;
  kind: ImageKind;
  /** Bytes the guest sees, when the header could be read and the file is a regular file. */
  virtualSizeBytes?: bigint;
  /** The LUKS UUID (luks1, luks2, qcow2-luks), when the header holds one. */
  uuid?: string;
  /**
   * The image is recognized (magic bytes) but its header or metadata cannot be read
   * completely, e.g. a truncated LUKS header. The kind still says what it is: an image that
   * looks encrypted is never reported as raw.
   */
  damaged?: true;
}

/** Creating and checking encrypted images. `secret` is the volume's random secret (raw bytes). */
export interface ImageStore {
  /**
   * Creates the image. Refuses (already_exists) when anything exists at the path, even an
   * empty file; a failed or interrupted create leaves nothing under the final name.
   */
  create(spec: ImageSpec, secret: Uint8Array): Promise<void>;
  /** Says what is at the path; 'missing' when nothing is. */
  inspect(path: string): Promise<ImageInfo>;
  /**
   * True when the secret opens the image, false when it is the wrong key; any other
   * failure (missing image, wrong kind, damaged header, tool failure) throws. For the
   * unencrypted formats (raw, qcow2) the secret is ignored (pass an empty one): true when
   * the image is of that kind and readable.
   */
  testKey(path: string, spec: ImageSpec, secret: Uint8Array): Promise<boolean>;
  /** Deletes the image file; nothing to do when it does not exist. */
  remove(path: string): Promise<void>;
}

/** Opening dm-crypt mappings for luks2 and plain volumes (the kernel decrypts those). */
export interface DmCryptMapper {
  /** Why dm-crypt cannot be used here, or undefined when it can. */
  unavailableReason(): Promise<string | undefined>;
  /**
   * Opens the mapping `name` (which must start with "virtkm-") over spec.path and returns
   * its device path. Idempotent: an open mapping of the same name over the same backing
   * file is returned as it is. `keyDescription` names a logon key in the caller's kernel
   * keyring holding the same key: a plain mapping then references it instead of carrying
   * the key (luks2 ignores it: cryptsetup 2.6 takes LUKS2 passphrases only from user space).
   */
  open(spec: ImageSpec, name: string, secret: Uint8Array, keyDescription?: string): Promise<string>;
  /** Closes the mapping; nothing to do when it is not open. */
  close(name: string): Promise<void>;
  /** Names of the open dm-crypt mappings whose name starts with "virtkm-". */
  list(): Promise<string[]>;
}

/** The kind a format has on disk (plain dm-crypt has no header: it looks like raw data). */
export const KIND_OF_FORMAT: Readonly<Record<ImageFormat, ImageKind>> = Object.freeze({
  luks: 'luks1',
  'qcow2-luks': 'qcow2-luks',
  luks2: 'luks2',
  plain: 'raw',
  raw: 'raw',
  qcow2: 'qcow2',
});

/** True for the unencrypted formats (no key, no libvirt secret, no dm-crypt). */
export function isUnencryptedImageFormat(f: ImageFormat): f is 'raw' | 'qcow2' {
  return f === 'raw' || f === 'qcow2';
}
