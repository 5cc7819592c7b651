/**
 * Who is calling: the principal named by the client certificate that the TLS layer has
 * already verified against the internal CA, checked on every call against the
 * certificates table so a revoked certificate is refused on its next call.
 *
 * The peer certificate is parsed once per TLS connection (it cannot change within one:
 * TLS 1.3 has no renegotiation), not on every call; the lookups that carry revocation
 * (certificate and host rows) still run on every call.
 */
import { TLSSocket, type PeerCertificate } from 'node:tls';
import type { ServerSurfaceCall } from '@grpc/grpc-js/build/src/server-call.js';
import { errors } from '../../../shared/src/errors.js';
import type { HostRecord, RoleName } from '../domain/model.js';
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
  /**
   * For hosts: the enrolled host's id and box public key as checked at authentication
   * (saves handlers a lookup). Other host fields (last seen, desired revision) are not
   * carried: they change without a credentials generation change.
   */
  host?: Pick<HostRecord, 'id' | 'boxPublicKey'>;
}

/** How a principal appears in the audit log. */
export function actorOf(p: Principal): string {
  return `${p.role}:${p.name}`;
}

const ROLES: readonly RoleName[] = ['admin', 'frontend', 'host'];

function firstValue(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

/** What is kept per TLS connection: the parsed certificate and its normalised serial. */
interface PeerIdentity {
  cert: PeerCertificate;
  serial: string;
}

const identities = new WeakMap<TLSSocket, PeerIdentity | null>();

/**
 * The principal last checked against the store for a connection, with the store's
 * credentials generation at that time. A call on the same connection reuses it while the
 * generation is unchanged: no certificate or host record changed since, so the database
 * would give the same answer (a revocation changes the generation, so the next call checks
 * again and is refused). Only successful checks are kept.
 */
const checked = new WeakMap<TLSSocket, { generation: number; principal: Principal; expiresAtMs: number }>();

/**
 * The TLS socket under a grpc-js server call. grpc-js does not expose it, so this follows
 * its internal shape (1.14: call.call -> nextCall... -> stream.session.socket) and returns
 * undefined when that shape is not found, in which case the caller uses getAuthContext().
 */
function tlsSocketOf(call: ServerSurfaceCall): TLSSocket | undefined {
  let c: unknown = (call as { call?: unknown }).call;
  for (let depth = 0; depth < 16 && typeof c === 'object' && c !== null; depth++) {
    const stream = (c as { stream?: { session?: { socket?: unknown } } }).stream;
    if (stream !== undefined) {
      const socket = stream.session?.socket;
      return socket instanceof TLSSocket ? socket : undefined;
    }
    c = (c as { nextCall?: unknown }).nextCall;
  }
  return undefined;
}

function identityOf(cert: PeerCertificate | undefined): PeerIdentity | null {
  if (!cert || !cert.raw || !cert.serialNumber || !cert.subject) return null;
  return { cert, serial: normalizeSerial(cert.serialNumber) };
}

/**
 * The verified client certificate of the call's connection (`socket`: tlsSocketOf(call)),
 * parsed once per connection.
 */
function peerIdentity(call: ServerSurfaceCall, socket: TLSSocket | undefined): PeerIdentity | null {
  if (!socket) return identityOf(call.getAuthContext().sslPeerCertificate);
  // As grpc-js's getAuthContext: no certificate unless the TLS layer verified it.
  if (!socket.authorized) return null;
  let id = identities.get(socket);
  if (id === undefined) {
    id = identityOf(socket.getPeerCertificate());
    identities.set(socket, id);
  }
  return id;
}

/**
 * Authenticates the caller of `call`. Throws unauthenticated when there is no verified
 * client certificate or it is unknown, revoked or expired, and permission_denied when its
 * role is not in `allowed`.
 */
export function authenticate(call: ServerSurfaceCall, store: StoreReader, allowed: readonly RoleName[]): Principal {
  const socket = tlsSocketOf(call);
  const generation = store.credentialsGeneration();
  let known = socket && checked.get(socket);
  if (!known || known.generation !== generation) {
    known = { generation, ...checkPrincipal(call, socket, store) };
    if (socket) checked.set(socket, known);
  }
  // TLS checks the validity period at the handshake only; a connection can outlive it.
  if (Date.now() >= known.expiresAtMs) throw errors.unauthenticated('client certificate has expired');
  const { principal } = known;
  if (!allowed.includes(principal.role)) throw errors.denied(`role ${principal.role} may not call this method`);
  // A copy: handlers must not be able to change what later calls of the connection see.
  return { ...principal };
}

/**
 * Checks the connection's certificate against the store: the principal and the end of the
 * certificate's validity, or unauthenticated.
 */
function checkPrincipal(call: ServerSurfaceCall, socket: TLSSocket | undefined, store: StoreReader): { principal: Principal; expiresAtMs: number } {
  const id = peerIdentity(call, socket);
  if (!id) throw errors.unauthenticated('a client certificate is required');
  const { cert, serial } = id;
  const role = firstValue(cert.subject.OU) as RoleName | undefined;
  const name = firstValue(cert.subject.CN);
  if (!role || !ROLES.includes(role) || !name) throw errors.unauthenticated('client certificate names no virtkm role');
  const record = store.getCertificate(serial);
  if (!record || record.role !== role || record.name !== name) throw errors.unauthenticated('client certificate is not known to this server');
  if (record.revokedAt !== null) throw errors.unauthenticated('client certificate has been revoked');
  const principal: Principal = { role, name, serial };
  if (role === 'host') {
    const host = store.getHostByName(name);
    if (!host || host.state !== 'enrolled' || host.certSerial !== serial) throw errors.unauthenticated('host is not enrolled');
    principal.hostId = host.id;
    principal.host = { id: host.id, boxPublicKey: host.boxPublicKey };
  }
  const expiresAtMs = Date.parse(record.expiresAt);
  return { principal, expiresAtMs: Number.isNaN(expiresAtMs) ? 0 : expiresAtMs };
}
