/**
 * authenticate(): the per-connection cache of checked principals. A call on a connection
 * whose principal was checked reuses it while the store's credentials generation is
 * unchanged; any change makes the next call read the store again (a revocation refuses
 * it); an expired certificate is refused even on an open connection; role checks apply
 * to every call. The TLS socket is a real (unconnected) TLSSocket with the peer
 * certificate stubbed; the store is a small in-memory reader counting its lookups.
 */
import test from 'ava';
import { TLSSocket, type PeerCertificate } from 'node:tls';
import type { ServerSurfaceCall } from '@grpc/grpc-js/build/src/server-call.js';
import { DomainError } from '../../shared/src/errors.js';
import type { CertificateRecord, HostRecord } from '../../server/src/domain/model.js';
import { authenticate } from '../../server/src/rpc/auth.js';
import type { StoreReader } from '../../server/src/store/ports.js';

const FUTURE = new Date(Date.now() + 3600_000).toISOString();

interface FakeStore {
  reader: StoreReader;
  certs: Map<string, CertificateRecord>;
  hosts: Map<string, HostRecord>;
  lookups: number;
  bump(): void;
}

function fakeStore(): FakeStore {
  const certs = new Map<string, CertificateRecord>();
  const hosts = new Map<string, HostRecord>();
  let generation = 0;
  const s: FakeStore = {
    certs,
    hosts,
    lookups: 0,
    bump: () => void generation++,
    reader: {
      credentialsGeneration: () => generation,
      getCertificate: (serial: string) => {
        s.lookups++;
        return certs.get(serial);
      },
      getHostByName: (name: string) => {
        s.lookups++;
        return hosts.get(name);
      },
    } as unknown as StoreReader,
  };
  return s;
}

/** A grpc-js-shaped call on a TLS connection that presents the given certificate. */
function connection(serial: string, role: string, name: string): { call: () => ServerSurfaceCall } {
  const socket = new TLSSocket(null as never);
  const cert = { raw: Buffer.from('cert'), serialNumber: serial.toUpperCase(), subject: { OU: role, CN: name } } as unknown as PeerCertificate;
  Object.defineProperty(socket, 'authorized', { value: true });
  socket.getPeerCertificate = (() => cert) as TLSSocket['getPeerCertificate'];
  return { call: () => ({ call: { stream: { session: { socket } } } }) as unknown as ServerSurfaceCall };
}

function kindOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    return err instanceof DomainError ? err.kind : 'not a DomainError';
  }
}

function cert(serial: string, role: CertificateRecord['role'], name: string, expiresAt = FUTURE): CertificateRecord {
  return { serial, role, name, issuedAt: '2026-01-01T00:00:00.000Z', expiresAt, revokedAt: null };
}

function host(name: string, certSerial: string): HostRecord {
  return { id: `id-${name}`, name, state: 'enrolled', boxPublicKey: new Uint8Array(32).fill(7), certSerial, enrolledAt: '2026-01-01T00:00:00.000Z', revokedAt: null, lastSeenAt: null, desiredRevision: 1 };
}

test('a connection is checked once while the credentials generation is unchanged, and again after any change: a revocation refuses the next call', (t) => {
  const store = fakeStore();
  store.certs.set('a1', cert('a1', 'admin', 'alice'));
  const conn = connection('a1', 'admin', 'alice');
  const first = authenticate(conn.call(), store.reader, ['admin']);
  t.deepEqual([first.role, first.name, first.serial], ['admin', 'alice', 'a1']);
  t.is(store.lookups, 1);
  for (let i = 0; i < 5; i++) authenticate(conn.call(), store.reader, ['admin']);
  t.is(store.lookups, 1, 'later calls of the connection reuse the check');
  // Another connection with the same certificate is checked on its own.
  authenticate(connection('a1', 'admin', 'alice').call(), store.reader, ['admin']);
  t.is(store.lookups, 2);

  store.certs.set('a1', { ...cert('a1', 'admin', 'alice'), revokedAt: '2026-06-01T00:00:00.000Z' });
  authenticate(conn.call(), store.reader, ['admin']);
  t.is(store.lookups, 2, 'without a generation change the store is not read');
  store.bump();
  t.is(kindOf(() => authenticate(conn.call(), store.reader, ['admin'])), 'unauthenticated');
  t.is(store.lookups, 3);
  t.is(kindOf(() => authenticate(conn.call(), store.reader, ['admin'])), 'unauthenticated', 'a refused check is not cached as a success');
});

test('roles are checked on every call, also when the principal is cached', (t) => {
  const store = fakeStore();
  store.certs.set('f1', cert('f1', 'frontend', 'ui'));
  const conn = connection('f1', 'frontend', 'ui');
  t.is(authenticate(conn.call(), store.reader, ['frontend', 'admin']).role, 'frontend');
  t.is(kindOf(() => authenticate(conn.call(), store.reader, ['admin'])), 'permission_denied');
  t.is(authenticate(conn.call(), store.reader, ['frontend']).role, 'frontend');
});

test('an expired certificate is refused on an open connection, even with its check cached', (t) => {
  const store = fakeStore();
  const soon = new Date(Date.now() + 150).toISOString();
  store.certs.set('e1', cert('e1', 'admin', 'eve', soon));
  const conn = connection('e1', 'admin', 'eve');
  t.is(authenticate(conn.call(), store.reader, ['admin']).name, 'eve');
  const until = Date.now() + 1000;
  while (Date.now() < Date.parse(soon) && Date.now() < until) {
    // wait for the expiry (a busy wait of at most 150 ms keeps the test synchronous)
  }
  t.is(kindOf(() => authenticate(conn.call(), store.reader, ['admin'])), 'unauthenticated');
  t.is(store.lookups, 1, 'refused from the cached check');
});

test('hosts: the principal carries the host id and box key; a host record change (re-enrollment) is seen on the next call', (t) => {
  const store = fakeStore();
  store.certs.set('b1', cert('b1', 'host', 'kvm1'));
  store.hosts.set('kvm1', host('kvm1', 'b1'));
  const conn = connection('b1', 'host', 'kvm1');
  const p = authenticate(conn.call(), store.reader, ['host']);
  t.is(p.hostId, 'id-kvm1');
  t.deepEqual(Buffer.from(p.host?.boxPublicKey ?? []), Buffer.alloc(32, 7));
  // A handler changing its copy does not change what later calls see.
  p.hostId = 'someone-else';
  t.is(authenticate(conn.call(), store.reader, ['host']).hostId, 'id-kvm1');
  // Re-enrolled with a new certificate: the old one no longer names the host.
  store.hosts.set('kvm1', host('kvm1', 'b2'));
  store.bump();
  t.is(kindOf(() => authenticate(conn.call(), store.reader, ['host'])), 'unauthenticated');
});

test('a certificate unknown to the store, or naming another role or name, is refused', (t) => {
  const store = fakeStore();
  store.certs.set('c1', cert('c1', 'frontend', 'ui'));
  t.is(kindOf(() => authenticate(connection('c9', 'frontend', 'ui').call(), store.reader, ['frontend'])), 'unauthenticated');
  t.is(kindOf(() => authenticate(connection('c1', 'admin', 'ui').call(), store.reader, ['admin'])), 'unauthenticated');
  t.is(kindOf(() => authenticate(connection('c1', 'frontend', 'other').call(), store.reader, ['frontend'])), 'unauthenticated');
});
