/**
 * X.509 helpers of virtkm's internal CA, used by the server and the host agent.
 *
 * - One self-signed ECDSA P-256 CA (pathLen 0: it signs leaf certificates only).
 * - Leaf certificates carry the caller's identity in the subject: O=virtkm, OU=<role>,
 *   CN=<name>. The server authorises by role, so the role is fixed at issuance.
 * - Private keys travel as PKCS#8 PEM strings, because that is what grpc-js and Node's tls
 *   accept; they are never logged and never appear in error messages.
 *
 * All certificate encoding is done by @peculiar/x509 (never hand-rolled ASN.1); quick
 * synchronous checks of existing PEM files use Node's own (OpenSSL) X509Certificate.
 */
import {
  X509Certificate as NodeX509Certificate,
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPair,
  randomFillSync,
  webcrypto,
  KeyObject,
} from 'node:crypto';
import { isIP } from 'node:net';
import { promisify } from 'node:util';
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { DomainError } from './errors.js';
import { wipe } from './secret-bytes.js';

// --- Loading @peculiar/x509 ------------------------------------------------------------
//
// @peculiar/x509 registers its algorithms through tsyringe, which needs the Reflect
// metadata API: reflect-metadata is imported first (ES modules evaluate in import order).

// Node's WebCrypto, explicitly (the library would otherwise look for a global one).
x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

// --- Types -------------------------------------------------------------------------------

/** The role a certificate grants; it is the certificate subject's OU. */
export type CertificateRole = 'admin' | 'frontend' | 'host' | 'server';

/** Every role, in a fixed order. */
export const CERTIFICATE_ROLES: readonly CertificateRole[] = ['admin', 'frontend', 'host', 'server'];

/** The subject's O of every certificate virtkm issues. */
export const SUBJECT_ORGANIZATION = 'virtkm';

/** A PEM certificate and its PKCS#8 PEM private key (the key is secret). */
export interface CertificateAuthority {
  certPem: string;
  keyPem: string;
}

/** A freshly generated TLS key pair. The private key PEM is secret. */
export interface TlsKeyPair {
  /** PKCS#8 PEM ("-----BEGIN PRIVATE KEY-----"). */
  privateKeyPem: string;
  /** DER SubjectPublicKeyInfo, to be sent to the CA. */
  publicKeyDer: Uint8Array;
}

/** Options of createCa. */
export interface CreateCaOptions {
  commonName: string;
  validDays: number;
}

/** Options of issueCertificate. */
export interface IssueCertificateOptions {
  ca: CertificateAuthority;
  /** DER SubjectPublicKeyInfo of an EC P-256 or Ed25519 key. */
  publicKeyDer: Uint8Array;
  commonName: string;
  role: CertificateRole;
  validDays: number;
  /** Server certificates only; default ['localhost'] (an empty list means none). */
  dnsNames?: string[];
  /** Server certificates only; default ['127.0.0.1', '::1'] (an empty list means none). */
  ipAddresses?: string[];
}

/** An issued certificate. */
export interface IssuedCertificate {
  certPem: string;
  /** Lower-case hex of the 16-byte positive serial number (32 hex digits). */
  serial: string;
  notAfter: Date;
}

/** Who a verified peer certificate names. */
export interface PeerIdentity {
  role: CertificateRole;
  /** The subject's CN. */
  name: string;
  /** Lower-case hex serial. */
  serial: string;
  notAfter: Date;
}

/** The three PEM blocks of a credential bundle. `keyPem` is secret. */
export interface CredentialBundle {
  caCertPem: string;
  certPem: string;
  keyPem: string;
}

// --- Constants and small helpers ---------------------------------------------------------

const ECDSA_P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const SIGNING_ALGORITHM = { name: 'ECDSA', hash: 'SHA-256' } as const;
const SERIAL_BYTES = 16;
const MAX_VALID_DAYS = 36500;
const MAX_COMMON_NAME_LENGTH = 64; // RFC 5280 ub-common-name
/** Certificates are back-dated a little so that peers with a slow clock accept them. */
const CLOCK_SKEW_MS = 5 * 60 * 1000;
const DAY_MS = 24 * 60 * 60 * 1000;
const DEFAULT_SERVER_DNS_NAMES: readonly string[] = ['localhost'];
const DEFAULT_SERVER_IP_ADDRESSES: readonly string[] = ['127.0.0.1', '::1'];
const DNS_NAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
// eslint-disable-next-line no-control-regex
const CONTROL_CHARACTERS = /[\u0000-\u001f\u007f-\u009f]/;

const generateKeyPairAsync = promisify(generateKeyPair);

function invalid(message: string): DomainError {
  return new DomainError('invalid_argument', message);
}

function isRole(value: string): value is CertificateRole {
  return (CERTIFICATE_ROLES as readonly string[]).includes(value);
}

function checkCommonName(name: string, what: string): void {
  if (name.length === 0 || name.length > MAX_COMMON_NAME_LENGTH) {
    throw invalid(`${what} must be 1 to ${MAX_COMMON_NAME_LENGTH} characters`);
  }
  if (CONTROL_CHARACTERS.test(name) || name.trim() !== name) {
    throw invalid(`${what} must not contain control characters or surrounding spaces`);
  }
}

function checkValidDays(days: number): void {
  if (!Number.isInteger(days) || days < 1 || days > MAX_VALID_DAYS) {
    throw invalid(`validity must be a whole number of days from 1 to ${MAX_VALID_DAYS}`);
  }
}

/**
 * A random positive serial of exactly SERIAL_BYTES bytes: the first byte is drawn again
 * until it is in 0x01..0x7f, so the DER INTEGER needs no sign byte and has no leading
 * zero, and the hex read back from the certificate is the hex generated here.
 */
function randomSerialHex(): string {
  const bytes = Buffer.alloc(SERIAL_BYTES);
  randomFillSync(bytes);
  const first = Buffer.alloc(1);
  while (bytes[0] === undefined || bytes[0] === 0 || bytes[0] > 0x7f) {
    randomFillSync(first);
    bytes[0] = first[0] ?? 0;
  }
  return bytes.toString('hex');
}

/** PEM text with exactly one trailing newline, as PEM files conventionally end. */
function pemText(pem: string): string {
  return pem.replace(/\r\n/g, '\n').replace(/\n*$/, '\n');
}

function validityWindow(validDays: number): { notBefore: Date; notAfter: Date } {
  const now = Date.now();
  return { notBefore: new Date(now - CLOCK_SKEW_MS), notAfter: new Date(now + validDays * DAY_MS) };
}

/** Parses a PEM certificate, turning any failure into invalid_argument. */
function parseCertificatePem(pem: string, what: string): x509.X509Certificate {
  if (!/-----BEGIN CERTIFICATE-----/.test(pem)) throw invalid(`${what} is not a PEM certificate`);
  try {
    return new x509.X509Certificate(pem);
  } catch {
    throw invalid(`${what} is not a valid certificate`);
  }
}

/**
 * Checks a DER SubjectPublicKeyInfo and returns its canonical DER re-encoding. Only EC
 * P-256 and Ed25519 keys are accepted.
 */
function checkedPublicKeyDer(der: Uint8Array): Buffer {
  let key: KeyObject;
  try {
    key = createPublicKey({ key: Buffer.from(der), format: 'der', type: 'spki' });
  } catch {
    throw invalid('public key is not a valid DER SubjectPublicKeyInfo');
  }
  const type = key.asymmetricKeyType;
  const ok = type === 'ed25519' || (type === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1');
  if (!ok) throw invalid('public key must be EC P-256 or Ed25519');
  return key.export({ format: 'der', type: 'spki' });
}

/**
 * Imports the CA's PKCS#8 PEM private key for signing, after checking it is the key of
 * the CA certificate. The intermediate DER copy is wiped.
 */
async function importCaSigningKey(ca: CertificateAuthority, caCert: x509.X509Certificate): Promise<webcrypto.CryptoKey> {
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: ca.keyPem, format: 'pem' });
  } catch {
    // Deliberately no cause: parser errors are not worth the risk of echoing key material.
    throw invalid('CA private key is not a valid PEM private key');
  }
  if (privateKey.asymmetricKeyType !== 'ec' || privateKey.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw invalid('CA private key must be EC P-256');
  }
  const derivedPublic = createPublicKey(privateKey).export({ format: 'der', type: 'spki' });
  if (!Buffer.from(caCert.publicKey.rawData).equals(derivedPublic)) {
    throw invalid('CA private key does not match the CA certificate');
  }
  const pkcs8 = privateKey.export({ format: 'der', type: 'pkcs8' });
  try {
    return await webcrypto.subtle.importKey('pkcs8', pkcs8, ECDSA_P256, false, ['sign']);
  } finally {
    wipe(pkcs8);
  }
}

// --- Key pairs and certificates ----------------------------------------------------------

/** Generates an ECDSA P-256 key pair for TLS: PKCS#8 PEM private key, SPKI DER public key. */
export async function generateTlsKeyPair(): Promise<TlsKeyPair> {
  const { privateKey, publicKey } = await generateKeyPairAsync('ec', { namedCurve: 'P-256' });
  return {
    privateKeyPem: privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
    publicKeyDer: new Uint8Array(publicKey.export({ format: 'der', type: 'spki' })),
  };
}

/**
 * Creates a self-signed ECDSA P-256 CA: subject O=virtkm, CN=<commonName>; critical
 * basicConstraints CA:true pathLen 0; critical keyUsage keyCertSign|cRLSign; a
 * subjectKeyIdentifier. Returns the certificate and its PKCS#8 PEM private key (secret).
 */
export async function createCa(opts: CreateCaOptions): Promise<CertificateAuthority> {
  checkCommonName(opts.commonName, 'CA common name');
  checkValidDays(opts.validDays);
  const keys = await webcrypto.subtle.generateKey(ECDSA_P256, true, ['sign', 'verify']);
  const { notBefore, notAfter } = validityWindow(opts.validDays);
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerialHex(),
    name: [{ O: [SUBJECT_ORGANIZATION] }, { CN: [opts.commonName] }],
    notBefore,
    notAfter,
    keys,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  const pkcs8 = KeyObject.from(keys.privateKey).export({ format: 'der', type: 'pkcs8' });
  try {
    return { certPem: pemText(cert.toString('pem')), keyPem: pemText(x509.PemConverter.encode(pkcs8, 'PRIVATE KEY')) };
  } finally {
    wipe(pkcs8);
  }
}

/**
 * Issues a leaf certificate for the given public key, signed by the CA.
 *
 * Subject O=virtkm, OU=<role>, CN=<commonName>; critical basicConstraints CA:false;
 * critical keyUsage digitalSignature; extKeyUsage clientAuth (admin, frontend, host) or
 * serverAuth (server); authority and subject key identifiers; subjectAltName for server
 * certificates (DNS names and IP addresses, default localhost, 127.0.0.1 and ::1).
 * A public key that is not EC P-256 or Ed25519 is refused with invalid_argument.
 */
export async function issueCertificate(opts: IssueCertificateOptions): Promise<IssuedCertificate> {
  if (!isRole(opts.role)) throw invalid('unknown certificate role');
  checkCommonName(opts.commonName, 'certificate name');
  checkValidDays(opts.validDays);
  const publicKeyDer = checkedPublicKeyDer(opts.publicKeyDer);
  const caCert = parseCertificatePem(opts.ca.certPem, 'CA certificate');
  const caConstraints = caCert.getExtension(x509.BasicConstraintsExtension);
  if (!caConstraints?.ca) throw invalid('CA certificate is not a CA');
  const signingKey = await importCaSigningKey(opts.ca, caCert);

  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
    new x509.ExtendedKeyUsageExtension([opts.role === 'server' ? x509.ExtendedKeyUsage.serverAuth : x509.ExtendedKeyUsage.clientAuth]),
    await x509.SubjectKeyIdentifierExtension.create(publicKeyDer),
  ];
  const caKeyId = caCert.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId;
  extensions.push(caKeyId ? new x509.AuthorityKeyIdentifierExtension(caKeyId) : await x509.AuthorityKeyIdentifierExtension.create(caCert.publicKey));

  if (opts.role === 'server') {
    const dnsNames = opts.dnsNames ?? DEFAULT_SERVER_DNS_NAMES;
    const ipAddresses = opts.ipAddresses ?? DEFAULT_SERVER_IP_ADDRESSES;
    for (const name of dnsNames) if (!DNS_NAME.test(name)) throw invalid('server DNS names must be plain host names');
    for (const ip of ipAddresses) if (isIP(ip) === 0) throw invalid('server IP addresses must be IPv4 or IPv6 addresses');
    if (dnsNames.length + ipAddresses.length === 0) throw invalid('a server certificate needs at least one DNS name or IP address');
    extensions.push(
      new x509.SubjectAlternativeNameExtension([
        ...dnsNames.map((value) => ({ type: 'dns' as const, value })),
        ...ipAddresses.map((value) => ({ type: 'ip' as const, value })),
      ]),
    );
  } else if ((opts.dnsNames?.length ?? 0) + (opts.ipAddresses?.length ?? 0) > 0) {
    throw invalid('only server certificates carry DNS names or IP addresses');
  }

  const { notBefore, notAfter } = validityWindow(opts.validDays);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerialHex(),
    subject: [{ O: [SUBJECT_ORGANIZATION] }, { OU: [opts.role] }, { CN: [opts.commonName] }],
    // The CA's own encoded Name, so the issuer matches the CA subject byte for byte.
    issuer: caCert.subjectName,
    notBefore,
    notAfter,
    publicKey: publicKeyDer,
    signingKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions,
  });
  return { certPem: pemText(cert.toString('pem')), serial: cert.serialNumber.toLowerCase(), notAfter: cert.notAfter };
}

/**
 * Reads the identity from a peer certificate (DER, as grpc-js and Node tls give it, or
 * PEM). It does not verify the certificate: call it only for a certificate the TLS layer
 * has already verified against the CA. Anything that is not a virtkm identity (no O=virtkm,
 * not exactly one OU and one CN, unknown role, unparsable) is unauthenticated.
 */
export function parsePeerIdentity(derOrPem: Uint8Array | string): PeerIdentity {
  const refused = () => new DomainError('unauthenticated', 'peer certificate does not name a virtkm identity');
  let cert: x509.X509Certificate;
  try {
    if (typeof derOrPem === 'string') {
      if (!/-----BEGIN CERTIFICATE-----/.test(derOrPem)) throw refused();
      cert = new x509.X509Certificate(derOrPem);
    } else {
      // A copy: the library needs a plain view, and grpc's Buffer may be a pooled slice.
      cert = new x509.X509Certificate(new Uint8Array(derOrPem));
    }
  } catch {
    throw refused();
  }
  const subject = cert.subjectName;
  const orgs = subject.getField('O');
  const units = subject.getField('OU');
  const names = subject.getField('CN');
  const role = units[0];
  const name = names[0];
  if (orgs.length !== 1 || orgs[0] !== SUBJECT_ORGANIZATION) throw refused();
  if (units.length !== 1 || role === undefined || !isRole(role)) throw refused();
  if (names.length !== 1 || name === undefined || name.length === 0) throw refused();
  return { role, name, serial: cert.serialNumber.toLowerCase(), notAfter: cert.notAfter };
}

/** Lower-case hex SHA-256 of a PEM certificate's DER encoding. */
export function certFingerprint(pem: string): string {
  const cert = parseCertificatePem(pem, 'certificate');
  return createHash('sha256').update(new Uint8Array(cert.rawData)).digest('hex');
}

// --- Credential bundles ------------------------------------------------------------------

interface PemBlock {
  label: string;
  /** The whole block, normalised to "\n" line ends, ending with "\n". */
  text: string;
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]{1,40})-----\n([A-Za-z0-9+/=\n]*?)\n?-----END \1-----/g;
const PRIVATE_KEY_LABELS = new Set(['PRIVATE KEY', 'EC PRIVATE KEY']);

function pemBlocks(pem: string): PemBlock[] {
  const text = pem.replace(/\r\n/g, '\n');
  const blocks: PemBlock[] = [];
  for (const match of text.matchAll(PEM_BLOCK)) {
    blocks.push({ label: match[1] ?? '', text: `${match[0]}\n` });
  }
  return blocks;
}

function describeBlock(label: string): string {
  if (label === 'CERTIFICATE') return 'a certificate';
  if (PRIVATE_KEY_LABELS.has(label)) return 'a private key';
  return `a "${label}" block`;
}

/**
 * Splits a credential bundle: one PEM file holding, in this order, the CA certificate,
 * the client's certificate and the client's private key (PKCS#8 "PRIVATE KEY" or SEC1 "EC
 * PRIVATE KEY"; not encrypted). Checks that the first certificate is a CA, that it issued
 * the second, and that the key belongs to the second. Every problem is invalid_argument
 * with a message that names the missing or wrong piece and never echoes key material.
 */
export function parseCredentialBundle(pem: string): CredentialBundle {
  const blocks = pemBlocks(pem);
  if (blocks.some((b) => b.label === 'ENCRYPTED PRIVATE KEY')) {
    throw invalid('credential bundle: encrypted private keys are not supported');
  }
  const expected = ['CERTIFICATE', 'CERTIFICATE', 'PRIVATE KEY'] as const;
  const what = ['the CA certificate', 'the client certificate', 'the private key'] as const;
  for (let i = 0; i < expected.length; i++) {
    const block = blocks[i];
    if (block === undefined) throw invalid(`credential bundle: ${what[i]} is missing (expected the CA certificate, the client certificate and the private key, in that order)`);
    const ok = expected[i] === 'PRIVATE KEY' ? PRIVATE_KEY_LABELS.has(block.label) : block.label === expected[i];
    if (!ok) throw invalid(`credential bundle: expected ${what[i]} in position ${i + 1}, found ${describeBlock(block.label)}`);
  }
  if (blocks.length > expected.length) throw invalid('credential bundle: unexpected extra PEM block after the private key');
  const [caBlock, certBlock, keyBlock] = blocks as [PemBlock, PemBlock, PemBlock];

  let caCert: NodeX509Certificate;
  let cert: NodeX509Certificate;
  try {
    caCert = new NodeX509Certificate(caBlock.text);
  } catch {
    throw invalid('credential bundle: the CA certificate is not a valid certificate');
  }
  try {
    cert = new NodeX509Certificate(certBlock.text);
  } catch {
    throw invalid('credential bundle: the client certificate is not a valid certificate');
  }
  if (!caCert.ca) throw invalid('credential bundle: the first certificate is not a CA certificate');
  if (cert.ca) throw invalid('credential bundle: the second certificate is a CA certificate, not a client certificate');
  if (!cert.checkIssued(caCert) || !cert.verify(caCert.publicKey)) {
    throw invalid('credential bundle: the client certificate was not issued by the CA certificate');
  }
  let keyPublic: Buffer;
  try {
    keyPublic = createPublicKey(createPrivateKey({ key: keyBlock.text, format: 'pem' })).export({ format: 'der', type: 'spki' });
  } catch {
    throw invalid('credential bundle: the private key is not a valid private key');
  }
  if (!keyPublic.equals(cert.publicKey.export({ format: 'der', type: 'spki' }))) {
    throw invalid('credential bundle: the private key does not belong to the client certificate');
  }
  return { caCertPem: caBlock.text, certPem: certBlock.text, keyPem: keyBlock.text };
}

/**
 * Joins the CA certificate, the client certificate and the private key into one bundle
 * (in that order) and checks the result with parseCredentialBundle.
 */
export function formatCredentialBundle(parts: CredentialBundle): string {
  const single = (pem: string, name: string): string => {
    const blocks = pemBlocks(pem);
    const block = blocks[0];
    if (blocks.length !== 1 || block === undefined) throw invalid(`${name} must be exactly one PEM block`);
    return block.text;
  };
  const text = single(parts.caCertPem, 'CA certificate') + single(parts.certPem, 'certificate') + single(parts.keyPem, 'private key');
  parseCredentialBundle(text);
  return text;
}
