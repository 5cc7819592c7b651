/**
 * The one closed error vocabulary of virtkm, and the one place where it maps to gRPC
 * status codes (both directions). Never classify errors by matching message text.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';

/** Every error virtkm reports belongs to exactly one of these kinds. */
export type ErrorKind =
  | 'not_found'
  | 'already_exists'
  | 'invalid_argument'
  | 'failed_precondition'
  | 'permission_denied'
  | 'unauthenticated'
  | 'resource_exhausted'
  | 'unavailable'
  | 'internal';

/** All kinds, for exhaustive iteration in tests. */
export const ERROR_KINDS: readonly ErrorKind[] = [
  'not_found',
  'already_exists',
  'invalid_argument',
  'failed_precondition',
  'permission_denied',
  'unauthenticated',
  'resource_exhausted',
  'unavailable',
  'internal',
];

/** Options of a DomainError beyond kind and message. */
export interface DomainErrorOptions {
  /** A short suggestion for the user (shown by the CLI as `virtkm: hint: ...`). */
  hint?: string;
  /** The underlying error, logged on the server side only, never sent to clients. */
  cause?: unknown;
}

/**
 * An error with a kind from the closed vocabulary. Its message is safe to show to the
 * caller: it never contains secrets, paths, SQL or host internals.
 */
export class DomainError extends Error {
  readonly kind: ErrorKind;
  readonly hint: string | undefined;

  constructor(kind: ErrorKind, message: string, options: DomainErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DomainError';
    this.kind = kind;
    this.hint = options.hint;
  }
}

/** Type guard for DomainError. */
export function isDomainError(err: unknown): err is DomainError {
  return err instanceof DomainError;
}

/** Kind to gRPC status code. Exhaustive: adding a kind fails compilation until mapped. */
export const GRPC_STATUS_OF_KIND: Readonly<Record<ErrorKind, GrpcStatus>> = Object.freeze({
  not_found: GrpcStatus.NOT_FOUND,
  already_exists: GrpcStatus.ALREADY_EXISTS,
  invalid_argument: GrpcStatus.INVALID_ARGUMENT,
  failed_precondition: GrpcStatus.FAILED_PRECONDITION,
  permission_denied: GrpcStatus.PERMISSION_DENIED,
  unauthenticated: GrpcStatus.UNAUTHENTICATED,
  resource_exhausted: GrpcStatus.RESOURCE_EXHAUSTED,
  unavailable: GrpcStatus.UNAVAILABLE,
  internal: GrpcStatus.INTERNAL,
});

/** gRPC status code to kind, for clients. Codes with no kind of their own become internal. */
export function kindOfGrpcStatus(code: number): ErrorKind {
  for (const kind of ERROR_KINDS) {
    if (GRPC_STATUS_OF_KIND[kind] === code) return kind;
  }
  switch (code) {
    case GrpcStatus.DEADLINE_EXCEEDED:
    case GrpcStatus.CANCELLED:
      return 'unavailable';
    case GrpcStatus.OUT_OF_RANGE:
      return 'invalid_argument';
    default:
      return 'internal';
  }
}

/** Metadata key carrying a DomainError's hint to clients. */
export const HINT_METADATA_KEY = 'virtkm-hint';

/** What a gRPC handler sends for an error: code and message safe for the caller. */
export interface WireError {
  code: GrpcStatus;
  details: string;
  hint: string | undefined;
  /** True when the error was not a DomainError: the detail belongs in the server log only. */
  unexpected: boolean;
}

/**
 * Maps any thrown value to what goes on the wire. Anything that is not a DomainError is
 * INTERNAL "internal error"; the caller logs the original.
 */
export function toWireError(err: unknown): WireError {
  if (isDomainError(err)) {
    return { code: GRPC_STATUS_OF_KIND[err.kind], details: err.message, hint: err.hint, unexpected: err.kind === 'internal' };
  }
  return { code: GrpcStatus.INTERNAL, details: 'internal error', hint: undefined, unexpected: true };
}

/** Shorthands for the common kinds. */
export const errors = {
  notFound: (what: string, options?: DomainErrorOptions) => new DomainError('not_found', `${what} not found`, options),
  alreadyExists: (what: string, options?: DomainErrorOptions) => new DomainError('already_exists', `${what} already exists`, options),
  invalid: (message: string, options?: DomainErrorOptions) => new DomainError('invalid_argument', message, options),
  precondition: (message: string, options?: DomainErrorOptions) => new DomainError('failed_precondition', message, options),
  denied: (message: string, options?: DomainErrorOptions) => new DomainError('permission_denied', message, options),
  unauthenticated: (message: string, options?: DomainErrorOptions) => new DomainError('unauthenticated', message, options),
  tooLarge: (message: string, options?: DomainErrorOptions) => new DomainError('resource_exhausted', message, options),
  internal: (cause?: unknown) => new DomainError('internal', 'internal error', { cause }),
} as const;
