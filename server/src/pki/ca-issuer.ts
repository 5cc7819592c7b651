/**
 * The CertificateIssuer adapter over the internal CA (shared/src/pki.ts). The CA private
 * key stays in this closure for the life of the server.
 */
import { certFingerprint, issueCertificate, type CertificateAuthority } from '../../../shared/src/pki.js';
import { normalizeSerial } from '../domain/serial.js';
import type { CertificateIssuer } from './issuer.js';

/** Creates an issuer from the unsealed CA. */
export function createCaIssuer(ca: CertificateAuthority): CertificateIssuer {
  return {
    caCertPem: ca.certPem,
    caFingerprint: certFingerprint(ca.certPem),
    async issue(req) {
      const cert = await issueCertificate({ ca, publicKeyDer: req.publicKeyDer, commonName: req.commonName, role: req.role, validDays: req.validDays });
      return { certPem: cert.certPem, serial: normalizeSerial(cert.serial), notAfter: cert.notAfter };
    },
  };
}
