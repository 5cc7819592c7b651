/**
 * The client side of host enrollment. The token pins the CA by fingerprint, so the agent
 * needs no prior trust: it fetches the certificate chain the enrollment listener presents,
 * keeps the CA certificate whose SHA-256 matches the pin (and that signed the server's
 * certificate), and only then makes the Enroll call over TLS verified against that CA.
 */
import { createHash, X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { connect, type DetailedPeerCertificate } from 'node:tls';
import { Metadata } from '@grpc/grpc-js';
import { EnrollmentServiceClient, type EnrollResponse } from './api.js';
import { parseEnrollmentToken } from './enrollment-token.js';
import { errors } from './errors.js';
import { CLIENT_CHANNEL_OPTIONS, callOptions, channelCredentials, unaryCall } from './grpc-client.js';

function splitHostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[|\]$/g, '');
  return { host, port: Number(address.slice(i + 1)) };
}

function derToPem(der: Buffer): string {
  const b64 = der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`;
}

/**
 * Connects once without verification to read the presented chain, and returns the PEM of
 * the CA whose fingerprint is `pinHex`, after checking that it signed the server's
 * certificate. Throws unauthenticated when the pin does not match.
 */
export async function fetchPinnedCa(address: string, pinHex: string, timeoutMs = 10_000): Promise<string> {
  const { host, port } = splitHostPort(address);
  const chain = await new Promise<DetailedPeerCertificate>((resolve, reject) => {
    // Verification is off for this one read-only look at the chain: nothing is sent, and
    // the result is trusted only if it matches the pin from the token.
    // SNI only for names: an IP address as servername is deprecated (DEP0123).
    const socket = connect({ host, port, rejectUnauthorized: false, minVersion: 'TLSv1.3', ALPNProtocols: ['h2'], ...(isIP(host) === 0 ? { servername: host } : {}) });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(errors.invalid(`no TLS answer from ${address}`));
    }, timeoutMs);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      const cert = socket.getPeerCertificate(true);
      socket.end();
      resolve(cert);
    });
    socket.once('error', (e) => {
      clearTimeout(timer);
      reject(errors.precondition(`cannot reach enrollment listener ${address}`, { cause: e }));
    });
  });
  const leaf = chain.raw;
  const seen = new Set<string>();
  for (let c: DetailedPeerCertificate | undefined = chain; c && !seen.has(c.fingerprint256); c = c.issuerCertificate) {
    seen.add(c.fingerprint256);
    if (createHash('sha256').update(c.raw).digest('hex') === pinHex) {
      const ca = new X509Certificate(c.raw);
      if (!new X509Certificate(leaf).verify(ca.publicKey)) break;
      return derToPem(c.raw);
    }
  }
  throw errors.unauthenticated('the server does not present the CA the token names', { hint: 'check the address, or the token is for another server' });
}

/** Public keys a host enrolls with. */
export interface EnrollKeys {
  /** DER SPKI of the host's TLS key. */
  tlsPublicKey: Uint8Array;
  /** Raw X25519 public key. */
  boxPublicKey: Uint8Array;
}

/** Enrolls at `address` with a one-time token; returns the certificate and CA. */
export async function enrollHost(address: string, token: string, keys: EnrollKeys): Promise<EnrollResponse> {
  const parsed = parseEnrollmentToken(token);
  parsed.secret.fill(0);
  const caPem = await fetchPinnedCa(address, parsed.caFingerprint);
  const client = new EnrollmentServiceClient(address, channelCredentials({ caCertPem: caPem }), CLIENT_CHANNEL_OPTIONS);
  try {
    return await unaryCall<EnrollResponse>((cb) =>
      client.enroll({ token, tlsPublicKey: Buffer.from(keys.tlsPublicKey), boxPublicKey: Buffer.from(keys.boxPublicKey) }, new Metadata(), callOptions(), cb),
    );
  } finally {
    client.close();
  }
}
