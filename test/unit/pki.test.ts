/**
 * Tests of shared/src/pki.ts: CA creation, issuance, identity parsing, credential bundles,
 * and a real TLS 1.3 mutual handshake with Node's tls (OpenSSL) using the issued PEMs.
 */
import anyTest, { type TestFn } from 'ava';
import { execFileSync } from 'node:child_process';
import { X509Certificate as NodeX509Certificate, generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import {
  type CertificateAuthority,
  type CertificateRole,
  type PeerIdentity,
  CERTIFICATE_ROLES,
  certFingerprint,
  createCa,
  formatCredentialBundle,
  generateTlsKeyPair,
  issueCertificate,
  parseCredentialBundle,
  parsePeerIdentity,
} from '../../shared/src/pki.js';
import { DomainError } from '../../shared/src/errors.js';

// Loaded after pki.js, which provides the Reflect metadata API the library needs.
const x509 = await import('@peculiar/x509');

interface Issued {
  certPem: string;
  keyPem: string;
  serial: string;
}

interface Context {
  ca: CertificateAuthority;
  otherCa: CertificateAuthority;
  server: Issued;
  host: Issued;
}

const test = anyTest as TestFn<Context>;

async function issue(ca: CertificateAuthority, role: CertificateRole, commonName: string): Promise<Issued> {
  const kp = await generateTlsKeyPair();
  const cert = await issueCertificate({ ca, publicKeyDer: kp.publicKeyDer, commonName, role, validDays: 30 });
  return { certPem: cert.certPem, keyPem: kp.privateKeyPem, serial: cert.serial };
}

test.before(async (t) => {
  const ca = await createCa({ commonName: 'virtkm test CA', validDays: 365 });
  const otherCa = await createCa({ commonName: 'virtkm test CA', validDays: 365 });
  t.context = {
    ca,
    otherCa,
    server: await issue(ca, 'server', 'virtkm-server'),
    host: await issue(ca, 'host', 'hv-01.example'),
  };
});

function expectDomainError(t: { true: (v: boolean, m?: string) => void; is: (a: unknown, b: unknown, m?: string) => void }, err: unknown, kind: string): DomainError {
  t.true(err instanceof DomainError, `expected a DomainError, got ${String(err)}`);
  const e = err as DomainError;
  t.is(e.kind, kind);
  return e;
}

test('generateTlsKeyPair gives a PKCS#8 PEM P-256 private key and an SPKI DER public key', async (t) => {
  const kp = await generateTlsKeyPair();
  t.regex(kp.privateKeyPem, /^-----BEGIN PRIVATE KEY-----\n/);
  t.true(kp.publicKeyDer instanceof Uint8Array);
  const pub = new x509.PublicKey(kp.publicKeyDer);
  t.is(pub.algorithm.name, 'ECDSA');
  t.is((pub.algorithm as EcKeyAlgorithmLike).namedCurve, 'P-256');
});

interface EcKeyAlgorithmLike {
  name: string;
  namedCurve?: string;
}

test('createCa makes a self-signed CA with critical basicConstraints pathLen 0 and keyCertSign|cRLSign', async (t) => {
  const cert = new x509.X509Certificate(t.context.ca.certPem);
  t.true(await cert.isSelfSigned());
  t.deepEqual(cert.subjectName.getField('CN'), ['virtkm test CA']);
  t.deepEqual(cert.subjectName.getField('O'), ['virtkm']);
  const bc = cert.getExtension(x509.BasicConstraintsExtension);
  t.truthy(bc);
  t.true(bc?.ca);
  t.is(bc?.pathLength, 0);
  t.true(bc?.critical);
  const ku = cert.getExtension(x509.KeyUsagesExtension);
  t.is(ku?.usages, x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign);
  t.true(ku?.critical);
  t.truthy(cert.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId);
  t.regex(t.context.ca.keyPem, /^-----BEGIN PRIVATE KEY-----\n/);
  t.regex(cert.serialNumber, /^[0-7][0-9a-f]{31}$/);
});

test('issued certificates round-trip through parsePeerIdentity for every role, from PEM and DER', async (t) => {
  for (const role of CERTIFICATE_ROLES) {
    const kp = await generateTlsKeyPair();
    const name = `${role}-principal`;
    const issued = await issueCertificate({ ca: t.context.ca, publicKeyDer: kp.publicKeyDer, commonName: name, role, validDays: 10 });
    t.regex(issued.serial, /^[0-7][0-9a-f]{31}$/, 'serial is 16 bytes, positive, lower-case hex');
    t.not(issued.serial.slice(0, 2), '00');
    const fromPem = parsePeerIdentity(issued.certPem);
    const der = new Uint8Array(new NodeX509Certificate(issued.certPem).raw);
    const fromDer = parsePeerIdentity(der);
    const expected: PeerIdentity = { role, name, serial: issued.serial, notAfter: issued.notAfter };
    t.deepEqual(fromPem, expected);
    t.deepEqual(fromDer, expected);
    const days = (issued.notAfter.getTime() - Date.now()) / 86_400_000;
    t.true(days > 9.99 && days <= 10, `notAfter about 10 days ahead (${days})`);

    const cert = new x509.X509Certificate(issued.certPem);
    t.deepEqual(cert.subjectName.getField('OU'), [role]);
    t.deepEqual(cert.subjectName.getField('CN'), [name]);
    t.deepEqual(cert.subjectName.getField('O'), ['virtkm']);
    t.true(await cert.verify({ publicKey: new x509.X509Certificate(t.context.ca.certPem).publicKey, signatureOnly: true }));
    const bc = cert.getExtension(x509.BasicConstraintsExtension);
    t.false(bc?.ca);
    t.true(bc?.critical);
    const ku = cert.getExtension(x509.KeyUsagesExtension);
    t.true(((ku?.usages ?? 0) & x509.KeyUsageFlags.digitalSignature) !== 0);
    t.true(((ku?.usages ?? 0) & (x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign)) === 0);
    const eku = [...(cert.getExtension(x509.ExtendedKeyUsageExtension)?.usages ?? [])];
    t.deepEqual(eku, role === 'server' ? [x509.ExtendedKeyUsage.serverAuth] : [x509.ExtendedKeyUsage.clientAuth]);
    const caSki = new x509.X509Certificate(t.context.ca.certPem).getExtension(x509.SubjectKeyIdentifierExtension)?.keyId;
    t.is(cert.getExtension(x509.AuthorityKeyIdentifierExtension)?.keyId, caSki);
    const san = cert.getExtension(x509.SubjectAlternativeNameExtension);
    if (role === 'server') {
      t.deepEqual(
        san?.names.toJSON().map((n) => `${n.type}:${n.value}`),
        ['dns:localhost', 'ip:127.0.0.1', 'ip:::1'],
      );
    } else {
      t.is(san, null);
    }
  }
});

test('serials are unique', async (t) => {
  const kp = await generateTlsKeyPair();
  const serials = new Set<string>();
  for (let i = 0; i < 20; i++) {
    serials.add((await issueCertificate({ ca: t.context.ca, publicKeyDer: kp.publicKeyDer, commonName: 'x', role: 'admin', validDays: 1 })).serial);
  }
  t.is(serials.size, 20);
});

test('server certificates carry the given DNS names and IP addresses', async (t) => {
  const kp = await generateTlsKeyPair();
  const issued = await issueCertificate({
    ca: t.context.ca,
    publicKeyDer: kp.publicKeyDer,
    commonName: 'kms.example',
    role: 'server',
    validDays: 5,
    dnsNames: ['kms.example', 'kms'],
    ipAddresses: ['10.0.0.5', 'fd00::5'],
  });
  const node = new NodeX509Certificate(issued.certPem);
  t.is(node.subjectAltName, 'DNS:kms.example, DNS:kms, IP Address:10.0.0.5, IP Address:FD00:0:0:0:0:0:0:5');
  t.is(node.checkHost('kms.example'), 'kms.example');
  t.is(node.checkIP('10.0.0.5'), '10.0.0.5');
});

test('Ed25519 public keys are accepted', async (t) => {
  const { publicKey } = generateKeyPairSync('ed25519');
  const der = new Uint8Array(publicKey.export({ format: 'der', type: 'spki' }));
  const issued = await issueCertificate({ ca: t.context.ca, publicKeyDer: der, commonName: 'hv-ed', role: 'host', validDays: 1 });
  t.is(parsePeerIdentity(issued.certPem).role, 'host');
  t.is(new x509.X509Certificate(issued.certPem).publicKey.algorithm.name, 'Ed25519');
});

test('public keys other than EC P-256 and Ed25519 are refused with invalid_argument', async (t) => {
  const spki = (k: ReturnType<typeof generateKeyPairSync>['publicKey']) => new Uint8Array(k.export({ format: 'der', type: 'spki' }));
  const bad: [string, Uint8Array][] = [
    ['RSA', spki(generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey)],
    ['P-384', spki(generateKeyPairSync('ec', { namedCurve: 'P-384' }).publicKey)],
    ['secp256k1', spki(generateKeyPairSync('ec', { namedCurve: 'secp256k1' }).publicKey)],
    ['X25519', spki(generateKeyPairSync('x25519').publicKey)],
    ['Ed448', spki(generateKeyPairSync('ed448').publicKey)],
    ['garbage', new Uint8Array([0x30, 0x03, 0x02, 0x01, 0x01])],
    ['empty', new Uint8Array(0)],
  ];
  for (const [label, der] of bad) {
    const err = await t.throwsAsync(issueCertificate({ ca: t.context.ca, publicKeyDer: der, commonName: 'x', role: 'host', validDays: 1 }));
    expectDomainError(t, err, 'invalid_argument');
    t.log(`${label}: ${err?.message}`);
  }
});

test('bad issuance options are refused with invalid_argument', async (t) => {
  const kp = await generateTlsKeyPair();
  const base = { ca: t.context.ca, publicKeyDer: kp.publicKeyDer, commonName: 'ok', role: 'host' as CertificateRole, validDays: 1 };
  const cases: [string, Parameters<typeof issueCertificate>[0]][] = [
    ['empty name', { ...base, commonName: '' }],
    ['long name', { ...base, commonName: 'x'.repeat(65) }],
    ['control character', { ...base, commonName: 'a\nb' }],
    ['zero days', { ...base, validDays: 0 }],
    ['fractional days', { ...base, validDays: 1.5 }],
    ['unknown role', { ...base, role: 'root' as CertificateRole }],
    ['bad DNS name', { ...base, role: 'server', dnsNames: ['bad name'] }],
    ['bad IP', { ...base, role: 'server', ipAddresses: ['999.1.1.1'] }],
    ['no SAN', { ...base, role: 'server', dnsNames: [], ipAddresses: [] }],
    ['SAN on client', { ...base, dnsNames: ['x.example'] }],
    ['CA key of another CA', { ...base, ca: { certPem: t.context.ca.certPem, keyPem: t.context.otherCa.keyPem } }],
    ['leaf as CA', { ...base, ca: { certPem: t.context.host.certPem, keyPem: t.context.host.keyPem } }],
    ['garbage CA key', { ...base, ca: { certPem: t.context.ca.certPem, keyPem: 'not a key' } }],
  ];
  for (const [label, opts] of cases) {
    const err = await t.throwsAsync(issueCertificate(opts), undefined, label);
    expectDomainError(t, err, 'invalid_argument');
  }
});

test('names with DN syntax characters stay one CN (no DN injection)', async (t) => {
  const kp = await generateTlsKeyPair();
  const name = 'evil, OU=admin+CN=x';
  const issued = await issueCertificate({ ca: t.context.ca, publicKeyDer: kp.publicKeyDer, commonName: name, role: 'host', validDays: 1 });
  t.deepEqual(parsePeerIdentity(issued.certPem), { role: 'host', name, serial: issued.serial, notAfter: issued.notAfter });
});

test('parsePeerIdentity refuses certificates that do not name a virtkm identity with unauthenticated', async (t) => {
  const caCert = new x509.X509Certificate(t.context.ca.certPem);
  const signingKey = await webcryptoImportCaKey(t.context.ca.keyPem);
  const kp = await generateTlsKeyPair();
  const make = async (subject: string) =>
    (
      await x509.X509CertificateGenerator.create({
        subject,
        issuer: caCert.subjectName,
        publicKey: kp.publicKeyDer,
        signingKey,
        signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      })
    ).toString('pem');
  const subjects = ['O=virtkm, OU=intruder, CN=x', 'OU=admin, CN=x', 'O=other, OU=admin, CN=x', 'O=virtkm, CN=x', 'O=virtkm, OU=admin', 'O=virtkm, OU=admin, OU=host, CN=x'];
  for (const subject of subjects) {
    const pem = await make(subject);
    expectDomainError(t, t.throws(() => parsePeerIdentity(pem), undefined, subject), 'unauthenticated');
    expectDomainError(t, t.throws(() => parsePeerIdentity(new Uint8Array(new NodeX509Certificate(pem).raw)), undefined, subject), 'unauthenticated');
  }
  // The same library call with a proper subject passes, so the refusals above are about the subject.
  t.is(parsePeerIdentity(await make('O=virtkm, OU=admin, CN=x')).role, 'admin');
  expectDomainError(t, t.throws(() => parsePeerIdentity(new Uint8Array([1, 2, 3]))), 'unauthenticated');
  expectDomainError(t, t.throws(() => parsePeerIdentity('hello')), 'unauthenticated');
});

async function webcryptoImportCaKey(keyPem: string) {
  const { createPrivateKey, webcrypto } = await import('node:crypto');
  const der = createPrivateKey(keyPem).export({ format: 'der', type: 'pkcs8' });
  return webcrypto.subtle.importKey('pkcs8', der, { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
}

test('certFingerprint is the hex SHA-256 of the DER', (t) => {
  const fp = certFingerprint(t.context.host.certPem);
  t.regex(fp, /^[0-9a-f]{64}$/);
  t.is(fp, new NodeX509Certificate(t.context.host.certPem).fingerprint256.replace(/:/g, '').toLowerCase());
  expectDomainError(t, t.throws(() => certFingerprint('nope')), 'invalid_argument');
});

test('credential bundles round-trip and are accepted by OpenSSL', (t) => {
  const parts = { caCertPem: t.context.ca.certPem, certPem: t.context.host.certPem, keyPem: t.context.host.keyPem };
  const bundle = formatCredentialBundle(parts);
  t.regex(bundle, /^-----BEGIN CERTIFICATE-----\n[\s\S]+-----BEGIN CERTIFICATE-----\n[\s\S]+-----BEGIN PRIVATE KEY-----\n[\s\S]+-----END PRIVATE KEY-----\n$/);
  const parsed = parseCredentialBundle(bundle);
  t.deepEqual(parsed, parts);
  // CRLF line ends and surrounding text are tolerated.
  t.deepEqual(parseCredentialBundle(`# virtkm credentials\r\n${bundle.replace(/\n/g, '\r\n')}`), parts);
  // Node's tls accepts the pieces as they are.
  t.notThrows(() => tls.createSecureContext({ ca: parsed.caCertPem, cert: parsed.certPem, key: parsed.keyPem }));
});

test('credential bundle problems are invalid_argument with clear messages and no key material', (t) => {
  const { ca, host, server, otherCa } = t.context;
  const keyBody = host.keyPem.split('\n')[1] ?? '';
  const cases: [string, string, RegExp][] = [
    ['empty', '', /CA certificate is missing/],
    ['only CA', ca.certPem, /client certificate is missing/],
    ['no key', ca.certPem + host.certPem, /private key is missing/],
    ['key first', host.keyPem + ca.certPem + host.certPem, /expected the CA certificate in position 1, found a private key/],
    ['swapped certificates', host.certPem + ca.certPem + host.keyPem, /first certificate is not a CA/],
    ['wrong key', ca.certPem + host.certPem + server.keyPem, /private key does not belong to the client certificate/],
    ['other CA', otherCa.certPem + host.certPem + host.keyPem, /not issued by the CA certificate/],
    ['extra block', ca.certPem + host.certPem + host.keyPem + ca.certPem, /unexpected extra PEM block/],
    ['encrypted key', ca.certPem + host.certPem + '-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n', /encrypted private keys are not supported/],
    ['corrupt key', ca.certPem + host.certPem + '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n', /private key is not a valid private key/],
  ];
  for (const [label, pem, message] of cases) {
    const err = expectDomainError(t, t.throws(() => parseCredentialBundle(pem), undefined, label), 'invalid_argument');
    t.regex(err.message, message, label);
    t.false(err.message.includes(keyBody), `${label}: message has no key material`);
    t.false(err.message.includes('PRIVATE KEY-----'), `${label}: message has no PEM`);
  }
  expectDomainError(t, t.throws(() => formatCredentialBundle({ caCertPem: ca.certPem, certPem: host.certPem, keyPem: '' })), 'invalid_argument');
});

// --- TLS 1.3 mutual authentication with Node's tls --------------------------------------

interface HandshakeResult {
  accepted: boolean;
  peer?: PeerIdentity;
  protocol?: string | null;
  serverError?: string;
  clientError?: string;
}

async function handshake(serverCreds: { key: string; cert: string; ca: string }, clientCreds: { key?: string; cert?: string; ca: string }): Promise<HandshakeResult> {
  let peer: PeerIdentity | undefined;
  let serverError: string | undefined;
  const server = tls.createServer({ ...serverCreds, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' }, (socket) => {
    peer = parsePeerIdentity(new Uint8Array(socket.getPeerCertificate().raw));
    socket.end('ok\n');
  });
  server.on('tlsClientError', (err) => {
    serverError = err.message;
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  try {
    return await new Promise<HandshakeResult>((resolve) => {
      let data = '';
      let protocol: string | null = null;
      const socket = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', minVersion: 'TLSv1.3', ...clientCreds });
      const timer = setTimeout(() => {
        socket.destroy();
        resolve({ accepted: false, peer, clientError: 'timeout', serverError });
      }, 5000);
      socket.on('secureConnect', () => {
        protocol = socket.getProtocol();
      });
      socket.on('data', (chunk: Buffer) => {
        data += chunk.toString();
      });
      socket.on('error', (err) => {
        clearTimeout(timer);
        resolve({ accepted: false, peer, clientError: err.message, serverError });
      });
      socket.on('close', () => {
        clearTimeout(timer);
        resolve(data === 'ok\n' ? { accepted: true, peer, protocol } : { accepted: false, peer, serverError, clientError: 'closed' });
      });
    });
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

test.serial('TLS 1.3 mutual handshake succeeds with issued certificates and the server reads the peer identity', async (t) => {
  const { ca, server, host } = t.context;
  const result = await handshake({ key: server.keyPem, cert: server.certPem, ca: ca.certPem }, { key: host.keyPem, cert: host.certPem, ca: ca.certPem });
  t.true(result.accepted, JSON.stringify(result));
  t.is(result.protocol, 'TLSv1.3');
  t.is(result.peer?.role, 'host');
  t.is(result.peer?.name, 'hv-01.example');
  t.is(result.peer?.serial, host.serial);
});

test.serial('TLS 1.3 mutual handshake works with an Ed25519 client key', async (t) => {
  const { ca, server } = t.context;
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  const issued = await issueCertificate({ ca, publicKeyDer: new Uint8Array(publicKey.export({ format: 'der', type: 'spki' })), commonName: 'alice', role: 'admin', validDays: 1 });
  const key = privateKey.export({ format: 'pem', type: 'pkcs8' }).toString();
  const result = await handshake({ key: server.keyPem, cert: server.certPem, ca: ca.certPem }, { key, cert: issued.certPem, ca: ca.certPem });
  t.true(result.accepted, JSON.stringify(result));
  t.is(result.peer?.role, 'admin');
});

test.serial('TLS handshake is refused for a client certificate from another CA', async (t) => {
  const { ca, otherCa, server } = t.context;
  const stranger = await issue(otherCa, 'admin', 'mallory');
  const result = await handshake({ key: server.keyPem, cert: server.certPem, ca: ca.certPem }, { key: stranger.keyPem, cert: stranger.certPem, ca: ca.certPem });
  t.false(result.accepted);
  t.log(`server: ${result.serverError}; client: ${result.clientError}`);
  t.truthy(result.serverError);
  t.is(result.peer, undefined, 'the server never accepted the connection');
});

test.serial('TLS handshake is refused without a client certificate', async (t) => {
  const { ca, server } = t.context;
  const result = await handshake({ key: server.keyPem, cert: server.certPem, ca: ca.certPem }, { ca: ca.certPem });
  t.false(result.accepted);
  t.log(`server: ${result.serverError}; client: ${result.clientError}`);
  t.truthy(result.serverError);
  t.is(result.peer, undefined, 'the server never accepted the connection');
});

test.serial('the client refuses a server certificate from another CA', async (t) => {
  const { ca, otherCa, host } = t.context;
  const fake = await issue(otherCa, 'server', 'fake-server');
  const result = await handshake({ key: fake.keyPem, cert: fake.certPem, ca: ca.certPem }, { key: host.keyPem, cert: host.certPem, ca: ca.certPem });
  t.false(result.accepted);
  t.log(`client: ${result.clientError}`);
  t.truthy(result.clientError);
});

test.serial('a client certificate cannot serve as a server certificate (extKeyUsage)', async (t) => {
  const { ca, host } = t.context;
  const result = await handshake({ key: host.keyPem, cert: host.certPem, ca: ca.certPem }, { key: host.keyPem, cert: host.certPem, ca: ca.certPem });
  t.false(result.accepted);
  t.log(`client: ${result.clientError}`);
});

test('openssl verify -x509_strict accepts the issued certificates (when openssl is installed)', (t) => {
  let version: string;
  try {
    version = execFileSync('openssl', ['version'], { encoding: 'utf8' }).trim();
  } catch {
    t.log('SKIPPED: no openssl command on this machine');
    t.pass();
    return;
  }
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-pki-'));
  try {
    writeFileSync(join(dir, 'ca.pem'), t.context.ca.certPem);
    writeFileSync(join(dir, 'server.pem'), t.context.server.certPem);
    writeFileSync(join(dir, 'host.pem'), t.context.host.certPem);
    const run = (purpose: string, file: string) =>
      execFileSync('openssl', ['verify', '-x509_strict', '-purpose', purpose, '-CAfile', join(dir, 'ca.pem'), join(dir, file)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    t.regex(run('sslserver', 'server.pem'), /OK/);
    t.regex(run('sslclient', 'host.pem'), /OK/);
    t.throws(() => run('sslserver', 'host.pem'));
    t.log(version);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
