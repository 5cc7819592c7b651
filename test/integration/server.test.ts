/**
 * The real server process, driven through the CLI and gRPC clients with real
 * certificates: roles, key release to the right host only, revocation, TLS refusals, bad
 * input, audit, and no plaintext secret at rest.
 */
import anyTest, { type TestFn } from 'ava';
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Metadata, makeGenericClientConstructor, status, type ServiceError } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import {
  KeyPacket,
  KeyServiceClient,
  VolumeFormat,
  VolumeServiceClient,
  type ReleaseKeysResponse,
} from '../../shared/src/api.js';
import { generateBoxKeyPair, openSealed, type BoxKeyPair } from '../../shared/src/box.js';
import { enrollHost } from '../../shared/src/enroll-client.js';
import { CLIENT_CHANNEL_OPTIONS, callOptions, channelCredentials } from '../../shared/src/grpc-client.js';
import { createCa, generateTlsKeyPair, issueCertificate, parseCredentialBundle } from '../../shared/src/pki.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { cli, clientsFor, initDataDir, runServerCommand, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';

interface EnrolledHost {
  name: string;
  box: BoxKeyPair;
  caCertPem: string;
  certPem: string;
  keyPem: string;
}

interface Ctx {
  dir: { path: string; remove: () => void };
  server: ServerProcess;
  admin: string;
  frontend: string;
  hostA: EnrolledHost;
  hostB: EnrolledHost;
  /** Plaintext secrets released during the tests, for the at-rest scan. */
  released: Buffer[];
}

const test = anyTest as TestFn<Ctx>;

const domainXml = (name: string, volumes: string[]) =>
  `<domain type='kvm'><name>${name}</name><memory unit='MiB'>256</memory><devices>${volumes
    .map((v, i) => `<disk type='volume' device='disk'><source pool='virtkm' volume='${v}'/><target dev='vd${String.fromCharCode(97 + i)}' bus='virtio'/></disk>`)
    .join('')}</devices></domain>`;

/** Promise wrapper that keeps the raw gRPC status code. */
function grpcCall<Res>(invoke: (cb: (err: ServiceError | null, res?: Res) => void) => unknown): Promise<{ code: number; res?: Res; details?: string }> {
  return new Promise((resolve) => invoke((err, res) => resolve(err ? { code: err.code, details: err.details } : { code: status.OK, ...(res === undefined ? {} : { res }) })));
}

async function enroll(t: { context: Ctx }, name: string): Promise<EnrolledHost> {
  const tok = await cli(['--server', t.context.server.address, '--credentials', t.context.admin, 'host', 'token', 'create', name, '--json']);
  if (tok.code !== 0) throw new Error(tok.stderr);
  const token = (JSON.parse(tok.stdout) as { token: string }).token;
  const tls = await generateTlsKeyPair();
  const box = generateBoxKeyPair();
  const res = await enrollHost(t.context.server.enrollAddress, token, { tlsPublicKey: tls.publicKeyDer, boxPublicKey: box.publicKey });
  return { name, box, caCertPem: res.caCertificatePem, certPem: res.certificatePem, keyPem: tls.privateKeyPem };
}

function keyClient(address: string, h: { caCertPem: string; certPem?: string; keyPem?: string }): KeyServiceClient {
  return new KeyServiceClient(address, channelCredentials(h), CLIENT_CHANNEL_OPTIONS);
}

function release(client: KeyServiceClient, volumeIds: string[]) {
  return grpcCall<ReleaseKeysResponse>((cb) => client.releaseKeys({ volumeIds }, new Metadata(), callOptions(10_000), cb));
}

const admin = (t: { context: Ctx }, ...args: string[]) => cli(['--server', t.context.server.address, '--credentials', t.context.admin, ...args]);

test.before(async (t) => {
  await loadSodium();
  const dir = tempDir();
  initDataDir(join(dir.path, 'data'));
  const server = await startServer(join(dir.path, 'data'));
  t.context = { dir, server, admin: join(dir.path, 'data', 'admin.pem'), frontend: join(dir.path, 'frontend.pem'), released: [] } as unknown as Ctx;
  const fe = await admin(t, 'credential', 'create', 'portal', '--role', 'frontend', '--out', t.context.frontend);
  if (fe.code !== 0) throw new Error(fe.stderr);
  t.context.hostA = await enroll(t, 'host-a');
  t.context.hostB = await enroll(t, 'host-b');
});

test.after.always(async (t) => {
  if (t.context.server) t.is(await t.context.server.stop(), 0, 'the server exits cleanly on SIGTERM');
  t.context.dir?.remove();
});

test.serial('CLI creates, lists, shows and deletes volumes with --json and table output', async (t) => {
  const created = await admin(t, 'volume', 'create', 'cli-vol', '--size', '1G', '--format', 'qcow2-luks', '--json');
  t.is(created.code, 0, created.stderr);
  const v = JSON.parse(created.stdout) as { id: string; name: string; size_bytes: string; format: string; cipher: string; key_size_bits: number; active_key_version: number };
  t.is(v.name, 'cli-vol');
  t.is(v.size_bytes, String(1024 ** 3));
  t.is(v.format, 'qcow2-luks');
  t.is(v.cipher, 'aes-xts-plain64');
  t.is(v.key_size_bits, 512);
  t.is(v.active_key_version, 1);

  const list = await admin(t, 'volume', 'list', '--json');
  t.is(list.code, 0);
  t.true((JSON.parse(list.stdout) as { id: string }[]).some((x) => x.id === v.id));
  const table = await admin(t, 'volume', 'list');
  t.regex(table.stdout, /^NAME\s+ID\s+SIZE/m);
  t.regex(table.stdout, /cli-vol\s+\S+\s+1GiB\s+qcow2-luks/);

  const shown = await admin(t, 'volume', 'show', v.id, '--json');
  t.is((JSON.parse(shown.stdout) as { name: string }).name, 'cli-vol');
  const byName = await admin(t, 'volume', 'show', 'cli-vol');
  t.regex(byName.stdout, /v1\s+active/);

  const dup = await admin(t, 'volume', 'create', 'cli-vol', '--size', '1G', '--format', 'luks');
  t.is(dup.code, 1);
  t.regex(dup.stderr, /^virtkm: volume name already exists/m);

  const del = await admin(t, 'volume', 'delete', 'cli-vol');
  t.is(del.code, 0, del.stderr);
  const gone = await admin(t, 'volume', 'show', 'cli-vol');
  t.is(gone.code, 3);
  t.regex(gone.stderr, /^virtkm: volume "cli-vol" not found/m);
});

test.serial('CLI usage errors and bad values exit 2 with a message on stderr', async (t) => {
  const noFormat = await admin(t, 'volume', 'create', 'x1', '--size', '1G');
  t.is(noFormat.code, 2);
  t.regex(noFormat.stderr, /virtkm: .*--format/);
  const badSize = await admin(t, 'volume', 'create', 'x1', '--size', '12 parsecs', '--format', 'luks');
  t.is(badSize.code, 2);
  t.regex(badSize.stderr, /virtkm: invalid size/);
  const tooSmall = await admin(t, 'volume', 'create', 'x1', '--size', '1K', '--format', 'luks');
  t.is(tooSmall.code, 2);
  t.regex(tooSmall.stderr, /volume size must be between/);
  const noServer = await cli(['volume', 'list']);
  t.is(noServer.code, 2);
  t.regex(noServer.stderr, /virtkm: no server address\nvirtkm: hint: /);
});

test.serial('a host gets the secrets of volumes of guests placed on it, sealed to its own key', async (t) => {
  const a1 = JSON.parse((await admin(t, 'volume', 'create', 'a-disk1', '--size', '2G', '--format', 'luks', '--json')).stdout) as { id: string };
  const a2 = JSON.parse((await admin(t, 'volume', 'create', 'a-disk2', '--size', '2G', '--format', 'plain', '--key-size', '512', '--json')).stdout) as { id: string };
  const xmlPath = join(t.context.dir.path, 'guest-a.xml');
  writeFileSync(xmlPath, domainXml('guest-a', ['a-disk1', 'a-disk2']));
  const def = await admin(t, 'guest', 'define', 'guest-a', '--xml', xmlPath, '--host', 'host-a', '--autostart', '--json');
  t.is(def.code, 0, def.stderr);
  t.is((JSON.parse(def.stdout) as { host: string }).host, 'host-a');

  const client = keyClient(t.context.server.address, t.context.hostA);
  const r = await release(client, [a1.id, a2.id]);
  client.close();
  t.is(r.code, status.OK, r.details);
  t.is(r.res!.packets.length, 2);
  const secrets = r.res!.packets.map((p) => {
    const packet = KeyPacket.decode(openSealed(p.sealed, t.context.hostA.box));
    t.is(packet.type, 'virtkm.keypacket.v1');
    t.is(packet.volumeId, p.volumeId);
    t.is(packet.keyVersion, 1);
    t.is(packet.hostId.length, 36);
    return packet;
  });
  t.is(secrets[0]!.mechanism, VolumeFormat.VOLUME_FORMAT_LUKS);
  t.is(secrets[0]!.secret.length, 32);
  t.is(secrets[1]!.mechanism, VolumeFormat.VOLUME_FORMAT_PLAIN);
  t.is(secrets[1]!.secret.length, 64, 'plain dm-crypt gets the 512-bit data key itself');
  t.false(secrets[0]!.secret.equals(secrets[1]!.secret));
  // Host B cannot open a packet sealed to host A.
  t.throws(() => openSealed(r.res!.packets[0]!.sealed, t.context.hostB.box));
  t.context.released.push(...secrets.map((s) => Buffer.from(s.secret)));

  const audit = await admin(t, 'audit', 'list', '--action', 'key.release', '--json');
  const events = JSON.parse(audit.stdout) as { actor: string; target: string }[];
  t.true(events.some((e) => e.actor === 'host:host-a' && e.target === a1.id));
});

test.serial('a host cannot get keys of a guest placed elsewhere, nor of unknown volumes; refusals are audited', async (t) => {
  const vol = JSON.parse((await admin(t, 'volume', 'create', 'a-only', '--size', '1G', '--format', 'luks2', '--json')).stdout) as { id: string };
  const xmlPath = join(t.context.dir.path, 'guest-a2.xml');
  writeFileSync(xmlPath, domainXml('guest-a2', ['a-only']));
  t.is((await admin(t, 'guest', 'define', 'guest-a2', '--xml', xmlPath, '--host', 'host-a')).code, 0);
  const b = keyClient(t.context.server.address, t.context.hostB);
  const r = await release(b, [vol.id]);
  t.is(r.code, status.PERMISSION_DENIED);
  const unknown = await release(b, ['00000000-0000-4000-8000-000000000000']);
  t.is(unknown.code, status.PERMISSION_DENIED, 'unknown and foreign volumes look the same');
  const notAnId = await release(b, ['a-only']);
  t.is(notAnId.code, status.INVALID_ARGUMENT);
  b.close();
  const refusals = JSON.parse((await admin(t, 'audit', 'list', '--action', 'key.refuse', '--json')).stdout) as { actor: string; target: string; outcome: string }[];
  t.true(refusals.some((e) => e.actor === 'host:host-b' && e.target === vol.id && e.outcome === 'denied'));

  // After a move, the new host gets the key and the old one does not.
  t.is((await admin(t, 'guest', 'move', 'guest-a2', '--to', 'host-b')).code, 0);
  const b2 = keyClient(t.context.server.address, t.context.hostB);
  t.is((await release(b2, [vol.id])).code, status.OK);
  b2.close();
  const a = keyClient(t.context.server.address, t.context.hostA);
  t.is((await release(a, [vol.id])).code, status.PERMISSION_DENIED);
  a.close();
});

test.serial('roles: a host cannot create volumes, a frontend cannot read the audit log or manage hosts', async (t) => {
  const hostVolumes = new VolumeServiceClient(t.context.server.address, channelCredentials(t.context.hostA), CLIENT_CHANNEL_OPTIONS);
  const r = await grpcCall((cb) => hostVolumes.createVolume({ name: 'by-host', sizeBytes: 1n << 30n, format: VolumeFormat.VOLUME_FORMAT_LUKS, cipher: undefined }, new Metadata(), callOptions(), cb));
  hostVolumes.close();
  t.is(r.code, status.PERMISSION_DENIED);
  t.is(r.details, 'role host may not call this method');

  const fe = (...args: string[]) => cli(['--server', t.context.server.address, '--credentials', t.context.frontend, ...args]);
  const auditList = await fe('audit', 'list');
  t.is(auditList.code, 4);
  t.regex(auditList.stderr, /^virtkm: role frontend may not call this method/m);
  t.is((await fe('host', 'token', 'create', 'sneaky')).code, 4);
  // ...but a frontend does manage volumes and guests.
  const created = await fe('volume', 'create', 'fe-vol', '--size', '1G', '--format', 'luks', '--json');
  t.is(created.code, 0, created.stderr);
  // A host's key service refuses admins: nobody but a host gets a plaintext secret.
  const adminBundle = parseCredentialBundle(readFileSync(t.context.admin, 'utf8'));
  const k = keyClient(t.context.server.address, adminBundle);
  const vol = JSON.parse(created.stdout) as { id: string };
  t.is((await release(k, [vol.id])).code, status.PERMISSION_DENIED);
  k.close();
});

test.serial('connections without a client certificate, or with one from another CA, are refused', async (t) => {
  const noCert = keyClient(t.context.server.address, { caCertPem: t.context.hostA.caCertPem });
  const r1 = await release(noCert, ['00000000-0000-4000-8000-000000000000']);
  noCert.close();
  t.is(r1.code, status.UNAVAILABLE, 'the TLS handshake fails');

  const rogueCa = await createCa({ commonName: 'rogue', validDays: 1 });
  const kp = await generateTlsKeyPair();
  const rogue = await issueCertificate({ ca: rogueCa, publicKeyDer: kp.publicKeyDer, commonName: 'admin', role: 'admin', validDays: 1 });
  const rc = new VolumeServiceClient(t.context.server.address, channelCredentials({ caCertPem: t.context.hostA.caCertPem, certPem: rogue.certPem, keyPem: kp.privateKeyPem }), CLIENT_CHANNEL_OPTIONS);
  const r2 = await grpcCall((cb) => rc.listVolumes({ page: undefined, namePrefix: '', format: 0 }, new Metadata(), callOptions(), cb));
  rc.close();
  t.not(r2.code, status.OK);
  // The server still serves.
  t.is((await admin(t, 'volume', 'list')).code, 0);
});

test.serial('bad input gets the right code and the server keeps serving', async (t) => {
  const c = clientsFor(t.context.server.address, t.context.admin);
  const md = () => new Metadata();
  const define = (xml: string, name = 'bad-guest') => grpcCall((cb) => c.guests.defineGuest({ name, domainXml: xml, volumes: [], host: '', autostart: false }, md(), callOptions(), cb));
  t.is((await define('<domain type="kvm"><devices>')).code, status.INVALID_ARGUMENT);
  const big = `<domain type='kvm'><description>${'x'.repeat(10 * 1024 * 1024)}</description></domain>`;
  t.is((await define(big)).code, status.RESOURCE_EXHAUSTED, '10 MB XML exceeds the message limit');
  const large = `<domain type='kvm'><description>${'x'.repeat(300 * 1024)}</description></domain>`;
  const lr = await define(large);
  t.is(lr.code, status.RESOURCE_EXHAUSTED);
  t.regex(lr.details ?? '', /domain XML exceeds/);
  const xxe = `<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain type='kvm'><name>&x;</name></domain>`;
  const xr = await define(xxe);
  t.is(xr.code, status.INVALID_ARGUMENT);
  t.notRegex(xr.details ?? '', /root:/);
  const unmanaged = `<domain type='kvm'><devices><disk type='file' device='disk'><source file='/var/lib/x.img'/></disk></devices></domain>`;
  t.is((await define(unmanaged)).code, status.INVALID_ARGUMENT);
  const unknownVol = `<domain type='kvm'><devices><disk type='volume' device='disk'><source pool='virtkm' volume='nope'/></disk></devices></domain>`;
  t.is((await define(unknownVol)).code, status.NOT_FOUND);
  t.is((await define(domainXml('x', []), 'bad/name')).code, status.INVALID_ARGUMENT);

  t.is((await grpcCall((cb) => c.volumes.getVolume({ volume: 'y'.repeat(300) }, md(), callOptions(), cb))).code, status.INVALID_ARGUMENT);
  t.is((await grpcCall((cb) => c.volumes.getVolume({ volume: '00000000-0000-4000-8000-000000000000' }, md(), callOptions(), cb))).code, status.NOT_FOUND);
  t.is((await grpcCall((cb) => c.volumes.createVolume({ name: 'enum', sizeBytes: 1n << 30n, format: 99 as VolumeFormat, cipher: undefined }, md(), callOptions(), cb))).code, status.INVALID_ARGUMENT);
  t.is((await grpcCall((cb) => c.volumes.createVolume({ name: 'huge', sizeBytes: (1n << 64n) - 1n, format: VolumeFormat.VOLUME_FORMAT_LUKS, cipher: undefined }, md(), callOptions(), cb))).code, status.INVALID_ARGUMENT);
  t.is((await grpcCall((cb) => c.volumes.listVolumes({ page: { pageSize: 10, pageToken: '!!garbage!!' }, namePrefix: '', format: 0 }, md(), callOptions(), cb))).code, status.INVALID_ARGUMENT);
  t.is((await grpcCall((cb) => c.volumes.listVolumes({ page: undefined, namePrefix: 'p'.repeat(2 * 1024 * 1024), format: 0 }, md(), callOptions(), cb))).code, status.RESOURCE_EXHAUSTED);
  t.is((await grpcCall((cb) => c.hosts.createEnrollmentToken({ host: 'h', ttlSeconds: 10 ** 9 }, md(), callOptions(), cb))).code, status.INVALID_ARGUMENT);

  const Health = makeGenericClientConstructor(healthService, 'Health');
  const bundle = parseCredentialBundle(readFileSync(t.context.admin, 'utf8'));
  const health = new Health(t.context.server.address, channelCredentials(bundle));
  const h = await grpcCall<{ status: string }>((cb) => (health as unknown as { check: (r: object, cb: unknown) => void }).check({ service: '' }, cb));
  health.close();
  t.is(h.code, status.OK);
  t.is(h.res?.status, 'SERVING');
  c.close();
  t.is((await admin(t, 'volume', 'list')).code, 0);
  t.notRegex(t.context.server.logs(), /"level":"error"/, 'no bad input above is an internal error');
});

test.serial('a revoked host is refused on its next call', async (t) => {
  const b = keyClient(t.context.server.address, t.context.hostB);
  const vols = JSON.parse((await admin(t, 'guest', 'show', 'guest-a2', '--json')).stdout) as { volume_ids: string[] };
  t.is((await release(b, vols.volume_ids)).code, status.OK);
  const rev = await admin(t, 'host', 'revoke', 'host-b');
  t.is(rev.code, 0, rev.stderr);
  const after = await release(b, vols.volume_ids);
  b.close();
  t.is(after.code, status.UNAUTHENTICATED);
  const hosts = JSON.parse((await admin(t, 'host', 'list', '--json')).stdout) as { name: string; state: string }[];
  t.is(hosts.find((h) => h.name === 'host-b')?.state, 'revoked');
});

test.serial('no plaintext secret in the data directory or the logs; audit chain verifies', async (t) => {
  t.true(t.context.released.length >= 2);
  const files: string[] = [];
  const walk = (d: string) => {
    for (const f of readdirSync(d)) {
      const p = join(d, f);
      if (statSync(p).isDirectory()) walk(p);
      else files.push(p);
    }
  };
  walk(t.context.server.dataDir);
  t.true(files.some((f) => f.endsWith('virtkm.db')));
  for (const f of files) {
    const data = readFileSync(f);
    const text = data.toString('latin1');
    for (const s of t.context.released) {
      t.is(data.indexOf(s), -1, `raw secret found in ${f}`);
      t.false(text.includes(s.toString('hex')), `hex secret found in ${f}`);
      t.false(text.includes(s.toString('base64')), `base64 secret found in ${f}`);
    }
  }
  const logs = t.context.server.logs();
  for (const s of t.context.released) {
    t.false(logs.includes(s.toString('hex')));
    t.false(logs.includes(s.toString('base64')));
  }
  const v = await admin(t, 'audit', 'verify', '--json');
  t.is(v.code, 0, v.stdout + v.stderr);
  t.true((JSON.parse(v.stdout) as { ok: boolean }).ok);
});

test.serial('init refuses an initialised directory and changes nothing', (t) => {
  const dir = t.context.server.dataDir;
  const before = readdirSync(dir).map((f) => [f, createHash('sha256').update(readFileSync(join(dir, f))).digest('hex')]);
  const r = runServerCommand(['init', '--data-dir', dir]);
  t.not(r.code, 0);
  t.regex(r.stderr, /already exists/);
  const after = readdirSync(dir).map((f) => [f, createHash('sha256').update(readFileSync(join(dir, f))).digest('hex')]);
  // The database may be written by the running server; compare the files init would write.
  const stable = (rows: string[][]) => rows.filter(([f]) => !f!.startsWith('virtkm.db'));
  t.deepEqual(stable(after), stable(before));
});

test.serial('a broken default config file does not matter when flags say everything', async (t) => {
  const home = join(t.context.dir.path, 'home');
  const { mkdirSync } = await import('node:fs');
  mkdirSync(join(home, '.config', 'virtkm'), { recursive: true });
  writeFileSync(join(home, '.config', 'virtkm', 'config.json'), '{not json');
  const ok = await cli(['--server', t.context.server.address, '--credentials', t.context.admin, 'volume', 'list'], { HOME: home });
  t.is(ok.code, 0, ok.stderr);
  const bad = await cli(['volume', 'list'], { HOME: home });
  t.is(bad.code, 2);
  t.regex(bad.stderr, /cannot read config file/);
  writeFileSync(join(home, '.config', 'virtkm', 'config.json'), JSON.stringify({ server: t.context.server.address, credentials: t.context.admin }));
  t.is((await cli(['volume', 'list'], { HOME: home })).code, 0, 'the config file supplies server and credentials');
});

test.serial('the last admin credential cannot be revoked; another admin makes it possible', async (t) => {
  const admin0 = parseCredentialBundle(readFileSync(t.context.admin, 'utf8'));
  const { X509Certificate } = await import('node:crypto');
  const serial = new X509Certificate(admin0.certPem).serialNumber;
  const last = await admin(t, 'credential', 'revoke', serial);
  t.is(last.code, 1);
  t.regex(last.stderr, /last admin credential/);
  const second = join(t.context.dir.path, 'admin2.pem');
  t.is((await admin(t, 'credential', 'create', 'alice', '--role', 'admin', '--out', second)).code, 0);
  const viaSecond = await cli(['--server', t.context.server.address, '--credentials', second, 'credential', 'revoke', serial]);
  t.is(viaSecond.code, 0, viaSecond.stderr);
  const refused = await admin(t, 'volume', 'list');
  t.is(refused.code, 4, 'the revoked admin is refused on its next call');
});
