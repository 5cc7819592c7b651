/**
 * TLS credentials for grpc-js: TLS 1.3 only, client certificate required and verified
 * against the internal CA on the main listener.
 */
import { ServerCredentials } from '@grpc/grpc-js';

/** Server credentials pinned to TLS 1.3. */
class Tls13ServerCredentials extends ServerCredentials {
  constructor(caPem: string, certPem: string, keyPem: Buffer, requireClientCert: boolean) {
    super(
      // requestCert + rejectUnauthorized: the handshake fails without a client
      // certificate that chains to our CA.
      { requestCert: requireClientCert, rejectUnauthorized: requireClientCert },
      { ca: Buffer.from(caPem), cert: Buffer.from(certPem), key: keyPem, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' },
    );
  }
  override _equals(other: ServerCredentials): boolean {
    return other === this;
  }
}

/** Credentials of the main listener: mutual TLS 1.3. */
export function mutualTlsCredentials(caPem: string, certPem: string, keyPem: Buffer): ServerCredentials {
  return new Tls13ServerCredentials(caPem, certPem, keyPem, true);
}

/** Credentials of the enrollment listener: TLS 1.3, no client certificate. */
export function serverOnlyTlsCredentials(caPem: string, certPem: string, keyPem: Buffer): ServerCredentials {
  return new Tls13ServerCredentials(caPem, certPem, keyPem, false);
}
