/**
 * Key rotation on a host: the port between the agent's rotation driver and the
 * mechanisms that change an image's key (rekey: a new keyslot passphrase, metadata only;
 * reencrypt: a new data key, every block rewritten).
 *
 * Every mechanism is crash-safe by construction and idempotent: `run` may be called again
 * after the agent, the server or the tool was killed at any moment (kill -9), and it then
 * finds out from the image itself (which of the two keys opens it, leftover temporary
 * files, header backups, a LUKS2 reencryption in progress, a block job) where it stopped,
 * and resumes or rolls forward. At every instant the image opens with the old key or the
 * new key (both are kept by the server until the host confirms). A mechanism never leaves
 * an image that neither key opens; when it cannot go on it restores the old state.
 *
 * Secrets: `oldKey` and `newKey` are the volume secrets (raw bytes) of the two key
 * versions; the mechanism turns them into tool passphrases with images/passphrase.ts and
 * hands them to tools only on stdin or extra fds (runTool). It never wipes the caller's
 * buffers; it wipes every copy it makes.
 */
import type { ImageFormat, ImageSpec } from '../images/types.js';

/** The two operations. */
export type RotationKind = 'rekey' | 'reencrypt';

/** An image format, including unencrypted ones (for encrypting or decrypting a volume). */
export type AnyImageFormat = ImageFormat | 'raw' | 'qcow2';

/** One rotation of one image. */
export interface RotationJob {
  /** The server's id of the rotation (stable across restarts; used to name temporaries). */
  rotationId: string;
  volumeId: string;
  kind: RotationKind;
  /**
   * The image as it must be at the end (path, target format, cipher, size). The path is
   * the volume's canonical image path, the same before and after.
   */
  target: ImageSpec | UnencryptedTarget;
  /** Format of the image before the rotation (differs from target.format only when encrypting or decrypting). */
  fromFormat: AnyImageFormat;
  /** Secret of the active key version; undefined when the image is unencrypted. */
  oldKey: Uint8Array | undefined;
  /** Secret of the new (pending) key version; undefined when decrypting. */
  newKey: Uint8Array | undefined;
}

/** Target of a decryption: an unencrypted image at the same path. */
export interface UnencryptedTarget {
  path: string;
  format: 'raw' | 'qcow2';
  sizeBytes: bigint;
}

/** Progress of a running rotation. */
export interface RotationProgress {
  /** What is happening now, e.g. "header backup", "copying", "verifying", "pivot". */
  step: string;
  bytesDone: bigint;
  bytesTotal: bigint;
  /** Current rate, bytes per second (0 when unknown). */
  bytesPerSecond: number;
}

/** Hooks of a run. */
export interface RotationHooks {
  /** Called with progress, at most a few times per second. */
  onProgress?: (p: RotationProgress) => void;
  /** Aborting stops the tool; the image stays openable by one of the two keys. */
  signal?: AbortSignal;
}

/** How a finished run left the image. */
export interface RotationResult {
  /** Always 'new': the image opens with the new key (or is unencrypted after decrypting), and no longer with the old one. */
  opensWith: 'new';
  /** Whether the data was checked against the source (reencrypt) or the header against both keys (rekey). */
  verified: boolean;
  /** Bytes rewritten (0 for rekey). */
  bytesRewritten: bigint;
}

/**
 * One mechanism (rekey with qemu-img amend, rekey with cryptsetup, reencrypt with qemu-img
 * convert, cryptsetup reencrypt, live blockcopy). `run` resumes where a killed run stopped.
 * Errors are DomainErrors: invalid_argument (job does not fit the mechanism),
 * failed_precondition (neither key opens the image, the image is of another kind, the
 * guest runs where the mechanism needs it stopped), resource_exhausted (not enough free
 * space for the copy; checked before anything is written), unavailable (tool missing or
 * aborted), internal.
 */
export interface RotationMechanism {
  readonly name: string;
  run(job: RotationJob, hooks?: RotationHooks): Promise<RotationResult>;
}
