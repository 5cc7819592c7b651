/**
 * The enrollment token format: `vkm1.<id>.<secret>.<ca>` where id is 9 random bytes, secret
 * 32 random bytes and ca the SHA-256 of the CA certificate, all base64url. The server
 * stores only SHA-256(secret); the agent pins the CA by its fingerprint, so enrollment
 * needs no prior trust (as kubeadm's discovery token CA hash does).
 */
import { errors } from './errors.js';

/** The parts of an enrollment token. */
export interface EnrollmentToken {
  id: string;
  secret: Uint8Array;
  /** Hex SHA-256 of the CA certificate DER. */
  caFingerprint: string;
}

/** Formats a token for the admin to hand to the host. */
export function formatEnrollmentToken(t: EnrollmentToken): string {
  return ['vkm1', t.id, Buffer.from(t.secret).toString('base64url'), Buffer.from(t.caFingerprint, 'hex').toString('base64url')].join('.');
}

/** Parses a token; any malformation is the same unauthenticated error. */
export function parseEnrollmentToken(token: string): EnrollmentToken {
  const bad = () => errors.unauthenticated('invalid or expired enrollment token');
  if (token.length > 200) throw bad();
  const parts = token.trim().split('.');
  if (parts.length !== 4 || parts[0] !== 'vkm1') throw bad();
  const [, id, secret, ca] = parts as [string, string, string, string];
  // Node's base64url decoder skips foreign characters: check the alphabet and length first.
  if (!/^[A-Za-z0-9_-]{43}$/.test(secret) || !/^[A-Za-z0-9_-]{43}$/.test(ca)) throw bad();
  const secretBytes = Buffer.from(secret, 'base64url');
  const caBytes = Buffer.from(ca, 'base64url');
  if (!/^[A-Za-z0-9_-]{12}$/.test(id) || secretBytes.length !== 32 || caBytes.length !== 32) throw bad();
  return { id, secret: secretBytes, caFingerprint: caBytes.toString('hex') };
}
