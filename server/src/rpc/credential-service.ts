/**
 * CredentialService (admin): client certificates for admins and frontends. The caller
 * generates the key pair and sends only the public key.
 */
import type { CredentialServiceServer } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import { checkName } from '../domain/volume-spec.js';
import type { CertificateIssuer } from '../pki/issuer.js';
import { actorOf } from './auth.js';
import { normalizeSerial } from '../domain/serial.js';
import { credentialRoleFromApi } from './convert.js';
import { unary, type RpcContext } from './handler.js';

/** Dependencies of the credential service. */
export interface CredentialServiceDeps extends RpcContext {
  clock: Clock;
  issuer: CertificateIssuer;
}

const ROLES = ['admin'] as const;
const DEFAULT_DAYS = 365;
const MAX_DAYS = 3650;

/** Creates the grpc-js implementation of CredentialService. */
export function createCredentialService(deps: CredentialServiceDeps): CredentialServiceServer {
  const { store, clock, issuer } = deps;
  return {
    issueCredential: unary(deps, 'IssueCredential', ROLES, async (req, p) => {
      const name = checkName('principal', req.name);
      const role = credentialRoleFromApi(req.role);
      if (req.validDays > MAX_DAYS) throw errors.invalid(`validity is at most ${MAX_DAYS} days`);
      const cert = await issuer.issue({ publicKeyDer: req.publicKey, commonName: name, role, validDays: req.validDays || DEFAULT_DAYS });
      const at = clock.now().toISOString();
      await store.write((tx) => {
        tx.insertCertificate({ serial: cert.serial, role, name, issuedAt: at, expiresAt: cert.notAfter.toISOString(), revokedAt: null });
        tx.appendAudit({ actor: actorOf(p), action: 'credential.issue', target: cert.serial, outcome: 'ok', detail: { name, role } });
      });
      return { certificatePem: cert.certPem, caCertificatePem: issuer.caCertPem, serial: cert.serial };
    }),
    revokeCredential: unary(deps, 'RevokeCredential', ROLES, async (req, p) => {
      if (!/^[0-9a-fA-F:]{1,80}$/.test(req.serial)) throw errors.invalid('invalid certificate serial');
      const serial = normalizeSerial(req.serial);
      const c = store.getCertificate(serial);
      if (!c) throw errors.notFound('certificate');
      if (c.role === 'host') throw errors.precondition('host certificates are revoked with `virtkm host revoke`');
      if (c.revokedAt !== null) throw errors.precondition('certificate is already revoked');
      await store.write((tx) => {
        // Checked in the transaction: two concurrent revocations cannot both pass it.
        if (c.role === 'admin' && tx.countActiveCertificates('admin') <= 1) {
          throw errors.precondition('this is the last admin credential', { hint: 'create another admin credential first' });
        }
        tx.revokeCertificate(serial, clock.now().toISOString());
        tx.appendAudit({ actor: actorOf(p), action: 'credential.revoke', target: serial, outcome: 'ok', detail: { name: c.name, role: c.role } });
      });
      return {};
    }),
  };
}
