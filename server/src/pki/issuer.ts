/**
 * The port through which services issue certificates from the internal CA.
 */
import type { RoleName } from '../domain/model.js';

/** Request to issue a client certificate. */
export interface IssueRequest {
  /** DER SubjectPublicKeyInfo of the subject's key (ECDSA P-256 or Ed25519). */
  publicKeyDer: Uint8Array;
  commonName: string;
  role: RoleName;
  validDays: number;
}

/** An issued certificate. */
export interface IssuedCertificate {
  certPem: string;
  /** Normalised serial (lower-case hex, no leading zeros). */
  serial: string;
  notAfter: Date;
}

/** Issues client certificates; holds the CA key in memory. */
export interface CertificateIssuer {
  readonly caCertPem: string;
  /** Hex SHA-256 of the CA certificate's DER, which agents pin at enrollment. */
  readonly caFingerprint: string;
  issue(req: IssueRequest): Promise<IssuedCertificate>;
}
