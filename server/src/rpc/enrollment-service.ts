/**
 * EnrollmentService: a host trades a one-time token and its public keys for a host
 * certificate. Served only on the enrollment listener (no client certificate required).
 */
import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import type { EnrollmentServiceServer } from '../../../shared/src/api.js';
import { boxRecipient } from '../../../shared/src/box.js';
import { parseEnrollmentToken } from '../../../shared/src/enrollment-token.js';
import { errors, toWireError } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import type { HostRecord } from '../domain/model.js';
import type { CertificateIssuer } from '../pki/issuer.js';
import { sendError, type RpcContext } from './handler.js';

/** Dependencies of the enrollment service. */
export interface EnrollmentServiceDeps extends RpcContext {
  clock: Clock;
  issuer: CertificateIssuer;
  /** Validity of host certificates in days. */
  hostCertDays: number;
  /** The main listener's address for agents ("" when unknown or a wildcard). */
  apiAddress: () => string;
}

/** Creates the grpc-js implementation of EnrollmentService. */
export function createEnrollmentService(deps: EnrollmentServiceDeps): EnrollmentServiceServer {
  const { store, clock, issuer } = deps;
  const auditBudget = perSecondBudget(20);
  const refused = () => errors.unauthenticated('invalid or expired enrollment token');
  const enroll = async (req: { token: string; tlsPublicKey: Buffer; boxPublicKey: Buffer }) => {
    const token = parseEnrollmentToken(req.token);
    const record = store.getEnrollmentToken(token.id);
    const now = clock.now();
    const hash = createHash('sha256').update(token.secret).digest();
    if (!record || record.secretHash.length !== hash.length || !timingSafeEqual(record.secretHash, hash)) throw refused();
    if (record.usedAt !== null || Date.parse(record.expiresAt) <= now.getTime()) throw refused();
    if (token.caFingerprint !== issuer.caFingerprint) throw refused();
    try {
      boxRecipient(req.boxPublicKey);
    } catch {
      throw errors.invalid('box public key must be a valid 32-byte X25519 key');
    }
    const cert = await issuer.issue({ publicKeyDer: req.tlsPublicKey, commonName: record.hostName, role: 'host', validDays: deps.hostCertDays });
    const at = clock.now().toISOString();
    const host = await store.write((tx) => {
      if (!tx.consumeEnrollmentToken(token.id, at)) throw refused();
      const existing = tx.getHostByName(record.hostName);
      if (existing && existing.state === 'enrolled') throw errors.alreadyExists(`host "${record.hostName}"`);
      // A revoked host enrolling again keeps its id (and so its guests' placement) but gets
      // new keys and a new certificate; the old certificate stays revoked.
      const h: HostRecord = {
        id: existing?.id ?? randomUUID(),
        name: record.hostName,
        state: 'enrolled',
        boxPublicKey: Uint8Array.from(req.boxPublicKey),
        certSerial: cert.serial,
        enrolledAt: at,
        revokedAt: null,
        lastSeenAt: at,
        desiredRevision: existing?.desiredRevision ?? 0,
      };
      if (existing) {
        tx.updateHost(h);
        // A re-enrolled host starts with no cached keys: forget its old reports so the first
        // desired state carries every key it needs.
        tx.replaceHostReport(h.id, [], []);
      } else {
        tx.insertHost(h);
      }
      tx.insertCertificate({ serial: cert.serial, role: 'host', name: h.name, issuedAt: at, expiresAt: cert.notAfter.toISOString(), revokedAt: null });
      tx.appendAudit({ actor: `host:${h.name}`, action: 'host.enroll', target: h.id, outcome: 'ok', detail: { token_id: token.id, serial: cert.serial, reenrolled: existing !== undefined } });
      return h;
    });
    return { hostId: host.id, host: host.name, certificatePem: cert.certPem, caCertificatePem: issuer.caCertPem, apiAddress: deps.apiAddress() };
  };
  return {
    enroll: (call, callback) => {
      enroll(call.request).then(
        (res) => callback(null, res),
        async (err: unknown) => {
          // Failed enrollments are audited (they may be someone guessing tokens), at a bounded
          // rate because the caller is anonymous and must not be able to flood the log.
          if (auditBudget.take(clock.now().getTime())) await store
            .write((tx) => tx.appendAudit({ actor: 'anonymous', action: 'host.enroll', target: '', outcome: 'denied', detail: { reason: toWireError(err).details.slice(0, 120) } }))
            .catch(() => undefined);
          sendError(deps, 'Enroll', err, callback as never);
        },
      );
    },
  };
}

/** Allows at most `n` events per wall-clock second. */
function perSecondBudget(n: number): { take(nowMs: number): boolean } {
  let second = 0;
  let used = 0;
  return {
    take(nowMs) {
      const s = Math.floor(nowMs / 1000);
      if (s !== second) {
        second = s;
        used = 0;
      }
      return ++used <= n;
    },
  };
}
