// Unit tests of the closed error vocabulary and its mapping to gRPC status codes.
import test from 'ava';
import { status as GrpcStatus } from '@grpc/grpc-js';

import {
  DomainError,
  ERROR_KINDS,
  GRPC_STATUS_OF_KIND,
  errors,
  isDomainError,
  kindOfGrpcStatus,
  toWireError,
} from '../../shared/src/errors.js';
import type { ErrorKind } from '../../shared/src/errors.js';

/** A message full of things that must never reach a client. */
const LEAKY_MESSAGE = 'SqliteError: no such table at /var/lib/secret-path SELECT * FROM volume_keys WHERE id = 7';

test('ERROR_KINDS lists every kind exactly once', (t) => {
  t.is(new Set(ERROR_KINDS).size, ERROR_KINDS.length);
  t.deepEqual([...ERROR_KINDS].sort(), Object.keys(GRPC_STATUS_OF_KIND).sort());
});

test('every kind maps to a distinct gRPC status', (t) => {
  const seen = new Map<number, ErrorKind>();
  for (const kind of ERROR_KINDS) {
    const code = GRPC_STATUS_OF_KIND[kind];
    t.is(typeof code, 'number', `${kind} has a numeric status`);
    t.not(code, GrpcStatus.OK, `${kind} must not map to OK`);
    t.false(seen.has(code), `${kind} shares status ${code} with ${String(seen.get(code))}`);
    seen.set(code, kind);
  }
  t.is(seen.size, ERROR_KINDS.length);
});

test('the mapping uses the expected gRPC codes', (t) => {
  t.is(GRPC_STATUS_OF_KIND.not_found, GrpcStatus.NOT_FOUND);
  t.is(GRPC_STATUS_OF_KIND.already_exists, GrpcStatus.ALREADY_EXISTS);
  t.is(GRPC_STATUS_OF_KIND.invalid_argument, GrpcStatus.INVALID_ARGUMENT);
  t.is(GRPC_STATUS_OF_KIND.failed_precondition, GrpcStatus.FAILED_PRECONDITION);
  t.is(GRPC_STATUS_OF_KIND.permission_denied, GrpcStatus.PERMISSION_DENIED);
  t.is(GRPC_STATUS_OF_KIND.unauthenticated, GrpcStatus.UNAUTHENTICATED);
  t.is(GRPC_STATUS_OF_KIND.resource_exhausted, GrpcStatus.RESOURCE_EXHAUSTED);
  t.is(GRPC_STATUS_OF_KIND.unavailable, GrpcStatus.UNAVAILABLE);
  t.is(GRPC_STATUS_OF_KIND.internal, GrpcStatus.INTERNAL);
});

test('GRPC_STATUS_OF_KIND is frozen', (t) => {
  t.true(Object.isFrozen(GRPC_STATUS_OF_KIND));
});

for (const kind of ERROR_KINDS) {
  test(`kindOfGrpcStatus inverts GRPC_STATUS_OF_KIND for ${kind}`, (t) => {
    t.is(kindOfGrpcStatus(GRPC_STATUS_OF_KIND[kind]), kind);
  });
}

test('kindOfGrpcStatus maps codes without a kind of their own', (t) => {
  t.is(kindOfGrpcStatus(GrpcStatus.DEADLINE_EXCEEDED), 'unavailable');
  t.is(kindOfGrpcStatus(GrpcStatus.CANCELLED), 'unavailable');
  t.is(kindOfGrpcStatus(GrpcStatus.OUT_OF_RANGE), 'invalid_argument');
  t.is(kindOfGrpcStatus(GrpcStatus.UNKNOWN), 'internal');
  t.is(kindOfGrpcStatus(GrpcStatus.DATA_LOSS), 'internal');
  t.is(kindOfGrpcStatus(GrpcStatus.UNIMPLEMENTED), 'internal');
  t.is(kindOfGrpcStatus(GrpcStatus.ABORTED), 'internal');
  t.is(kindOfGrpcStatus(9999), 'internal');
});

test('toWireError of a plain Error is INTERNAL "internal error" and hides the message', (t) => {
  const err = new Error(LEAKY_MESSAGE);
  const wire = toWireError(err);
  t.is(wire.code, GrpcStatus.INTERNAL);
  t.is(wire.details, 'internal error');
  t.is(wire.hint, undefined);
  t.true(wire.unexpected);
  const serialized = JSON.stringify(wire);
  t.false(serialized.includes('/var/lib/secret-path'));
  t.false(serialized.includes('SELECT * FROM'));
  t.false(serialized.includes('SqliteError'));
});

test('toWireError of non-Error thrown values is INTERNAL and hides them', (t) => {
  for (const thrown of [LEAKY_MESSAGE, { message: LEAKY_MESSAGE, kind: 'not_found' }, 42, null, undefined]) {
    const wire = toWireError(thrown);
    t.is(wire.code, GrpcStatus.INTERNAL);
    t.is(wire.details, 'internal error');
    t.true(wire.unexpected);
    t.false(JSON.stringify(wire).includes('/var/lib/secret-path'));
  }
});

test('toWireError does not trust an object that merely looks like a DomainError', (t) => {
  const fake = Object.assign(new Error(LEAKY_MESSAGE), { kind: 'not_found', hint: 'leak' });
  t.false(isDomainError(fake));
  const wire = toWireError(fake);
  t.is(wire.code, GrpcStatus.INTERNAL);
  t.is(wire.details, 'internal error');
  t.is(wire.hint, undefined);
});

test('toWireError of a DomainError keeps its message and hint', (t) => {
  const err = new DomainError('failed_precondition', 'volume is attached', { hint: 'detach the volume first' });
  const wire = toWireError(err);
  t.is(wire.code, GrpcStatus.FAILED_PRECONDITION);
  t.is(wire.details, 'volume is attached');
  t.is(wire.hint, 'detach the volume first');
  t.false(wire.unexpected);
});

test('toWireError of a DomainError without a hint has hint undefined', (t) => {
  const wire = toWireError(errors.notFound('volume vol-1'));
  t.is(wire.code, GrpcStatus.NOT_FOUND);
  t.is(wire.details, 'volume vol-1 not found');
  t.is(wire.hint, undefined);
  t.false(wire.unexpected);
});

test('toWireError never sends the cause of a DomainError', (t) => {
  const err = new DomainError('unavailable', 'store unavailable', { cause: new Error(LEAKY_MESSAGE) });
  const wire = toWireError(err);
  t.is(wire.code, GrpcStatus.UNAVAILABLE);
  t.is(wire.details, 'store unavailable');
  t.false(JSON.stringify(wire).includes('/var/lib/secret-path'));
});

test('an internal DomainError is flagged unexpected', (t) => {
  const wire = toWireError(errors.internal(new Error(LEAKY_MESSAGE)));
  t.is(wire.code, GrpcStatus.INTERNAL);
  t.is(wire.details, 'internal error');
  t.true(wire.unexpected);
  t.false(JSON.stringify(wire).includes('/var/lib/secret-path'));
});

for (const kind of ERROR_KINDS) {
  test(`toWireError maps a DomainError of kind ${kind} to its status`, (t) => {
    const wire = toWireError(new DomainError(kind, `a ${kind} error`, { hint: `hint for ${kind}` }));
    t.is(wire.code, GRPC_STATUS_OF_KIND[kind]);
    t.is(wire.details, `a ${kind} error`);
    t.is(wire.hint, `hint for ${kind}`);
    t.is(wire.unexpected, kind === 'internal');
  });
}

test('DomainError carries kind, hint, name and cause', (t) => {
  const cause = new Error('underlying');
  const err = new DomainError('permission_denied', 'not allowed', { hint: 'ask an admin', cause });
  t.true(err instanceof Error);
  t.true(isDomainError(err));
  t.is(err.name, 'DomainError');
  t.is(err.kind, 'permission_denied');
  t.is(err.message, 'not allowed');
  t.is(err.hint, 'ask an admin');
  t.is(err.cause, cause);
  t.false('cause' in new DomainError('not_found', 'x'));
});

test('the shorthands produce the right kinds', (t) => {
  const cases: Array<[DomainError, ErrorKind]> = [
    [errors.notFound('host h1'), 'not_found'],
    [errors.alreadyExists('volume v1'), 'already_exists'],
    [errors.invalid('bad name'), 'invalid_argument'],
    [errors.precondition('sealed'), 'failed_precondition'],
    [errors.denied('no'), 'permission_denied'],
    [errors.unauthenticated('who are you'), 'unauthenticated'],
    [errors.tooLarge('too big'), 'resource_exhausted'],
    [errors.internal(), 'internal'],
  ];
  for (const [err, kind] of cases) t.is(err.kind, kind);
  t.is(errors.alreadyExists('volume v1').message, 'volume v1 already exists');
  t.is(errors.internal(new Error(LEAKY_MESSAGE)).message, 'internal error');
  t.is(errors.invalid('bad', { hint: 'use lowercase' }).hint, 'use lowercase');
});
