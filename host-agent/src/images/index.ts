/**
 * The image layer: the ImageStore and DmCryptMapper ports, their real adapters, and how a
 * volume secret is presented to qemu-img, libvirt and cryptsetup (luksPassphrase).
 */
export { createDmCryptMapper, checkMappingName, MAPPING_PREFIX, NO_DEVICE_MAPPER } from './dm-crypt.js';
export type { DmCryptMapperOptions } from './dm-crypt.js';
export { removeStaleTemporaries, isTemporaryName } from './files.js';
export { createHostImageStore, DEFAULT_ITER_TIMES_MS, LUKS2_DATA_OFFSET_BYTES, LUKS2_PBKDF2_ITERATIONS } from './image-store.js';
export type { HostImageStoreOptions } from './image-store.js';
export { luksPassphrase, checkPlainKey, LUKS_SECRET_MIN_BYTES, LUKS_SECRET_MAX_BYTES } from './passphrase.js';
export { checkImageSpec, checkImagePath, parseCipher, qemuCipherOptions } from './spec.js';
export { parseImageHeader, parseLuksUuid } from './header.js';
export { parseQemuImgInfo, parseLuks2Metadata } from './tool-json.js';
export { KIND_OF_FORMAT } from './types.js';
export type { DmCryptMapper, ImageFormat, ImageInfo, ImageKind, ImageSpec, ImageStore } from './types.js';
