/**
 * Who is calling: the principal named by the client certificate that the TLS layer has
 * already verified against the internal CA, checked on every call against the
 * certificates table so a revoked certificate is refused on its next call.
 */
import type { ServerSurfaceCall } from '@grpc/grpc-js/build/src/server-call.js';
import { errors } from '../../../shared/src/errors.js';
import type { RoleName } from '../domain/model.js';
import { normalizeSerial } from '../domain/serial.js';
import type { StoreReader } from '../store/ports.js';

/** An authenticated caller. */
export interface Principal {
  role: RoleName;
  name: string;
  /** Normalised certificate serial. */
  serial: string;
  /** For hosts: the host id. */
  hostId?: string;
}

/** How a principal appears in the audit log. */
export function actorOf(p: Principal): string {
  return `${p.role}:${p.name}`;
}

const ROLES: readonly RoleName[] = ['admin', 'frontend', 'host'];

function firstValue(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

/**
 * Authenticates the caller of `call`. Throws unauthenticated when there is no verified
 * client certificate or it is unknown or revoked, and permission_denied when its role is
 * not in `allowed`.
 */
export function authenticate(call: ServerSurfaceCall, store: StoreReader, allowed: readonly RoleName[]): Principal {
  const cert = call.getAuthContext().sslPeerCertificate;
  if (!cert || !cert.serialNumber || !cert.subject) throw errors.unauthenticated('a client certificate is required');
  const role = firstValue(cert.subject.OU) as RoleName | undefined;
  const name = firstValue(cert.subject.CN);
  if (!role || !ROLES.includes(role) || !name) throw errors.unauthenticated('client certificate names no virtkm role');
  const serial = normalizeSerial(cert.serialNumber);
  const record = store.getCertificate(serial);
  if (!record || record.role !== role || record.name !== name) throw errors.unauthenticated('client certificate is not known to this server');
  if (record.revokedAt !== null) throw errors.unauthenticated('client certificate has been revoked');
  const principal: Principal = { role, name, serial };
  if (role === 'host') {
    const host = store.getHostByName(name);
    if (!host || host.state !== 'enrolled' || host.certSerial !== serial) throw errors.unauthenticated('host is not enrolled');
    principal.hostId = host.id;
  }
  if (!allowed.includes(role)) throw errors.denied(`role ${role} may not call this method`);
  return principal;
}
