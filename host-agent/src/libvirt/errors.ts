/**
 * libvirt errors (virError: code from virErrorNumber, domain from virErrorDomain) mapped to
 * the closed ErrorKind vocabulary. The kind comes from the numeric code and error domain
 * only. Numbers checked against libvirt 9.0's <libvirt/virterror.h>; libvirt never
 * renumbers them (they are ABI).
 */
import { DomainError, type ErrorKind } from '../../../shared/src/errors.js';

/** virErrorNumber values virtkm distinguishes. */
export const VirErr = {
  INTERNAL_ERROR: 1,
  NO_MEMORY: 2,
  NO_SUPPORT: 3,
  NO_CONNECT: 5,
  INVALID_CONN: 6,
  INVALID_DOMAIN: 7,
  INVALID_ARG: 8,
  OPERATION_FAILED: 9,
  OS_TYPE: 16,
  NO_NAME: 21,
  XML_ERROR: 27,
  DOM_EXIST: 28,
  OPERATION_DENIED: 29,
  SYSTEM_ERROR: 38,
  RPC: 39,
  NO_DOMAIN: 42,
  AUTH_FAILED: 45,
  OPERATION_INVALID: 55,
  INVALID_SECRET: 65,
  NO_SECRET: 66,
  CONFIG_UNSUPPORTED: 67,
  OPERATION_TIMEOUT: 68,
  ARGUMENT_UNSUPPORTED: 74,
  NO_DOMAIN_METADATA: 80,
  OPERATION_UNSUPPORTED: 84,
  AGENT_UNRESPONSIVE: 86,
  RESOURCE_BUSY: 87,
  ACCESS_DENIED: 88,
  XML_INVALID_SCHEMA: 92,
  AUTH_UNAVAILABLE: 94,
} as const;

/** virErrorDomain values virtkm distinguishes. */
export const VirFrom = {
  NONE: 0,
  RPC: 7,
  QEMU: 10,
  REMOTE: 13,
  STORAGE: 18,
  SECURITY: 24,
  SECRET: 30,
} as const;

/** The parts of a virError virtkm keeps (copied out of libvirt's memory). */
export interface LibvirtErrorInfo {
  /** virErrorNumber; 0 when libvirt reported a failure without an error (should not happen). */
  code: number;
  /** virErrorDomain: which part of libvirt raised it. */
  domain: number;
  /** libvirt's message: may contain paths and QEMU output, never secret values. Log only. */
  message: string;
}

/**
 * A failed libvirt call with libvirt's own error, used as the cause of the DomainError the
 * adapter throws. Its message is for the agent log, never for the server or the CLI.
 */
export class LibvirtCallError extends Error {
  readonly call: string;
  readonly code: number;
  readonly domain: number;

  constructor(call: string, info: LibvirtErrorInfo) {
    super(`${call}: ${info.message || 'libvirt reported a failure without an error'} (code ${info.code}, domain ${info.domain})`);
    this.name = 'LibvirtCallError';
    this.call = call;
    this.code = info.code;
    this.domain = info.domain;
  }
}

/** The kind of a libvirt error code, before the operation's own refinements. */
export function kindOfLibvirtCode(code: number): ErrorKind {
  switch (code) {
    case VirErr.NO_DOMAIN:
    case VirErr.NO_SECRET:
      return 'not_found';
    case VirErr.DOM_EXIST:
      return 'already_exists';
    case VirErr.INVALID_ARG:
    case VirErr.OS_TYPE:
    case VirErr.NO_NAME:
    case VirErr.XML_ERROR:
    case VirErr.XML_INVALID_SCHEMA:
    case VirErr.CONFIG_UNSUPPORTED:
    case VirErr.INVALID_SECRET:
      return 'invalid_argument';
    case VirErr.OPERATION_INVALID:
    case VirErr.NO_SUPPORT:
    case VirErr.ARGUMENT_UNSUPPORTED:
    case VirErr.OPERATION_UNSUPPORTED:
      return 'failed_precondition';
    case VirErr.OPERATION_DENIED:
    case VirErr.ACCESS_DENIED:
    case VirErr.AUTH_FAILED:
      return 'permission_denied';
    case VirErr.NO_CONNECT:
    case VirErr.INVALID_CONN:
    case VirErr.RPC:
    case VirErr.OPERATION_TIMEOUT:
    case VirErr.RESOURCE_BUSY:
    case VirErr.AGENT_UNRESPONSIVE:
    case VirErr.AUTH_UNAVAILABLE:
      return 'unavailable';
    case VirErr.NO_MEMORY:
      return 'resource_exhausted';
    default:
      return 'internal';
  }
}

/** What the adapter was doing, for the error message and operation-specific rules. */
export interface LibvirtOperation {
  /** e.g. 'domain.start', 'secret.define'. */
  op: string;
  /** e.g. `domain "web-1"` or `secret 0f...`: safe to show (no paths, no values). */
  subject: string;
}

/** Message of a start failure that QEMU reported (for example a disk it could not open). */
export const START_FAILED_MESSAGE = 'the guest failed to start (details in the agent log)';
/** Message of a start failure caused by a disk key that opens no keyslot. */
export const WRONG_KEY_MESSAGE = 'cannot unlock the disk: wrong key';
/** Message of a start failure caused by a disk image libvirt cannot access (missing, unreadable). */
export const DISK_UNAVAILABLE_MESSAGE = 'a disk image cannot be accessed (details in the agent log)';
/** Message of a start failure caused by a referenced libvirt secret that is missing or has no value. */
export const SECRET_MISSING_MESSAGE = "a disk's libvirt secret is missing or has no value";

/**
 * QEMU's text for a LUKS passphrase that opens no keyslot (crypto/block-luks.c, unchanged
 * since QEMU 2.6). libvirt reports it as a generic internal error, so the *kind* of the
 * failure cannot be told from the code; this text only chooses between two messages of the
 * same kind and is never used to decide a kind.
 */
const QEMU_LUKS_BAD_KEY_TEXT = 'cannot unlock any keyslot';

/**
 * Maps a failed libvirt call to a DomainError. `connectionLost` is true when the
 * connection was found dead after the failure: whatever the code, that is unavailable.
 */
export function toDomainError(cause: LibvirtCallError, operation: LibvirtOperation, connectionLost = false): DomainError {
  const { op, subject } = operation;
  if (connectionLost) {
    return new DomainError('unavailable', `libvirt connection lost during ${op}`, { cause, hint: 'is libvirtd running? (virsh -c qemu:///system version)' });
  }
  if (cause.domain === VirFrom.RPC || cause.domain === VirFrom.REMOTE) {
    // Transport trouble (socket closed, broken pipe, keepalive timeout) whatever the code.
    if (cause.code === VirErr.SYSTEM_ERROR || cause.code === VirErr.INTERNAL_ERROR || cause.code === VirErr.RPC) {
      return new DomainError('unavailable', `libvirt is unavailable (${op})`, { cause });
    }
  }
  // A secret a domain refers to (its disk encryption) is missing or has no value: the
  // domain itself exists, so this is not the domain's not_found.
  if (op.startsWith('domain.') && cause.code === VirErr.NO_SECRET) {
    return new DomainError('failed_precondition', `${subject}: ${SECRET_MISSING_MESSAGE}`, { cause });
  }
  if (op === 'domain.start') {
    // The storage driver could not access a disk image (missing file, permissions).
    if (cause.domain === VirFrom.STORAGE && kindOfLibvirtCode(cause.code) === 'internal') {
      return new DomainError('failed_precondition', `${subject}: ${DISK_UNAVAILABLE_MESSAGE}`, { cause });
    }
    // QEMU refused to start (exited before its monitor came up), or libvirt could not label
    // its files: the host or the disks are not as the definition needs them. A failed
    // precondition of this guest, not a virtkm bug.
    if ((cause.domain === VirFrom.QEMU || cause.domain === VirFrom.SECURITY) && kindOfLibvirtCode(cause.code) === 'internal') {
      const wrongKey = cause.domain === VirFrom.QEMU && cause.message.includes(QEMU_LUKS_BAD_KEY_TEXT);
      return new DomainError('failed_precondition', `${subject}: ${wrongKey ? WRONG_KEY_MESSAGE : START_FAILED_MESSAGE}`, { cause });
    }
  }
  const kind = kindOfLibvirtCode(cause.code);
  switch (kind) {
    case 'not_found':
      return new DomainError(kind, `${subject} not found`, { cause });
    case 'already_exists':
      return new DomainError(kind, `${subject} already exists`, { cause });
    case 'invalid_argument':
      return new DomainError(kind, `${subject}: libvirt rejected the definition (details in the agent log)`, { cause });
    case 'failed_precondition':
      return new DomainError(kind, `${subject}: ${preconditionText(op, cause.code)}`, { cause });
    case 'permission_denied':
      return new DomainError(kind, `${subject}: libvirt denied ${op}`, { cause });
    case 'unavailable':
      return new DomainError(kind, `libvirt is unavailable (${op})`, { cause, hint: 'is libvirtd running? (virsh -c qemu:///system version)' });
    case 'resource_exhausted':
      return new DomainError(kind, `libvirt ran out of memory (${op})`, { cause });
    default:
      return new DomainError('internal', 'internal error', { cause });
  }
}

function preconditionText(op: string, code: number): string {
  if (code !== VirErr.OPERATION_INVALID) return `${op} is not supported here`;
  switch (op) {
    case 'domain.start':
      return 'already running';
    case 'domain.destroy':
      return 'not running';
    default:
      return `${op} is not valid in the current state`;
  }
}
