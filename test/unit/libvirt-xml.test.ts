/**
 * Unit tests of the pure parts of the libvirt adapter: the XML helpers
 * (host-agent/src/libvirt/xml.ts), the libvirt error mapping (errors.ts) and the secret
 * value check (secret-value.ts). Parsers are run against XML captured from libvirt 9.0
 * (test/fixtures/libvirt) and against hostile input.
 */
import test from 'ava';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DomainError, type ErrorKind } from '../../shared/src/errors.js';
import {
  escapeXml,
  formatVirtkmMarker,
  parseDomainIdentity,
  parseSecretXml,
  parseVirtkmMarker,
  secretXml,
  usageIdOfVolume,
  volumeIdOfUsage,
} from '../../host-agent/src/libvirt/xml.js';
import { DISK_UNAVAILABLE_MESSAGE, LibvirtCallError, SECRET_MISSING_MESSAGE, START_FAILED_MESSAGE, toDomainError, VirErr, VirFrom, WRONG_KEY_MESSAGE, kindOfLibvirtCode } from '../../host-agent/src/libvirt/errors.js';
import { isPassphraseUtf8 } from '../../host-agent/src/libvirt/secret-value.js';

// Fixtures are not compiled: read them from the source tree (this file runs from dist/test/unit).
const FIXTURES = join(resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..'), 'test', 'fixtures', 'libvirt');
const fixture = (name: string): string => readFileSync(join(FIXTURES, name), 'utf8');

const UUID = '5d0c7a3e-2b1f-4c6d-8e9a-0f1b2c3d4e5f';

function kindOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    return err instanceof DomainError ? err.kind : `not a DomainError: ${String(err)}`;
  }
}

// ----- secret XML ------------------------------------------------------------------------

test('secretXml: private, ephemeral, usage volume virtkm:<id>, and parses back', (t) => {
  const xml = secretXml({ uuid: UUID, volumeId: 'vol-1', description: 'disk of web-1' });
  t.is(
    xml,
    `<secret ephemeral='yes' private='yes'><uuid>${UUID}</uuid><description>disk of web-1</description><usage type='volume'><volume>virtkm:vol-1</volume></usage></secret>`,
  );
  t.deepEqual(parseSecretXml(xml), { uuid: UUID, usageType: 'volume', usageId: 'virtkm:vol-1', description: 'disk of web-1', private: true, ephemeral: true });
});

test('secretXml: the description is escaped; bad UUIDs, ids and descriptions are invalid_argument', (t) => {
  const xml = secretXml({ uuid: UUID, volumeId: 'v', description: `a</description><x>&'"` });
  t.true(xml.includes('<description>a&lt;/description&gt;&lt;x&gt;&amp;&apos;&quot;</description>'));
  t.is(parseSecretXml(xml).description, `a</description><x>&'"`);
  t.is(kindOf(() => secretXml({ uuid: UUID.toUpperCase(), volumeId: 'v', description: '' })), 'invalid_argument');
  t.is(kindOf(() => secretXml({ uuid: 'x', volumeId: 'v', description: '' })), 'invalid_argument');
  for (const volumeId of ['', 'a b', 'a/b', '<v>', '-lead', 'x'.repeat(129)]) {
    t.is(kindOf(() => secretXml({ uuid: UUID, volumeId, description: '' })), 'invalid_argument', volumeId);
  }
  t.is(kindOf(() => secretXml({ uuid: UUID, volumeId: 'v', description: 'line\nbreak' })), 'invalid_argument');
  t.is(kindOf(() => secretXml({ uuid: UUID, volumeId: 'v', description: 'x'.repeat(257) })), 'invalid_argument');
});

test('parseSecretXml: secrets as libvirt prints them (virtkm and foreign)', (t) => {
  t.deepEqual(parseSecretXml(fixture('secret-virtkm.xml')), {
    uuid: UUID,
    usageType: 'volume',
    usageId: 'virtkm:7f3e9c1a-6b2d-4e8f-a1c3-5d7e9f0b2c4d',
    description: 'virtkm volume 7f3e9c1a-6b2d-4e8f-a1c3-5d7e9f0b2c4d (guest web-1)',
    private: true,
    ephemeral: true,
  });
  t.deepEqual(parseSecretXml(fixture('secret-foreign-ceph.xml')), {
    uuid: 'c2a1e0f4-9d8b-4a7c-b6e5-d4c3b2a1f0e9',
    usageType: 'ceph',
    usageId: 'client.libvirt secret',
    description: 'ceph client.libvirt',
    private: false,
    ephemeral: false,
  });
  t.like(parseSecretXml(`<secret><uuid>${UUID}</uuid></secret>`), { usageType: 'none', usageId: undefined, description: '', private: false });
  t.is(kindOf(() => parseSecretXml('<domain/>')), 'invalid_argument');
  t.is(kindOf(() => parseSecretXml('<secret>')), 'invalid_argument');
});

test('usage strings: only virtkm:<valid id> belongs to virtkm', (t) => {
  t.is(usageIdOfVolume('vol-1'), 'virtkm:vol-1');
  t.is(volumeIdOfUsage('virtkm:vol-1'), 'vol-1');
  t.is(volumeIdOfUsage('virtkm:'), undefined);
  t.is(volumeIdOfUsage('virtkm:a b'), undefined);
  t.is(volumeIdOfUsage('/var/lib/libvirt/images/x.img'), undefined);
  t.is(volumeIdOfUsage('VIRTKM:vol-1'), undefined);
  t.is(volumeIdOfUsage(undefined), undefined);
});

// ----- domain marker ---------------------------------------------------------------------

test('marker: format and parse round-trip', (t) => {
  const marker = { guestId: 'g-1', generation: 42 };
  const el = formatVirtkmMarker(marker);
  t.is(el, '<virtkm:guest xmlns:virtkm="urn:virtkm:1" id="g-1" generation="42"/>');
  t.deepEqual(parseVirtkmMarker(`<domain type='kvm'><name>x</name><metadata>${el}</metadata></domain>`), marker);
  t.is(kindOf(() => formatVirtkmMarker({ guestId: 'a"b', generation: 1 })), 'invalid_argument');
  t.is(kindOf(() => formatVirtkmMarker({ guestId: 'g', generation: -1 })), 'invalid_argument');
  t.is(kindOf(() => formatVirtkmMarker({ guestId: 'g', generation: 1.5 })), 'invalid_argument');
});

test('marker: found in domain XML captured from libvirt (inactive and running), next to foreign metadata', (t) => {
  const expected = { guestId: '0b6f1e0c-5a3e-4d7e-9a51-3c1f2d4e5f60', generation: 12 };
  t.deepEqual(parseVirtkmMarker(fixture('domain-virtkm-inactive.xml')), expected);
  t.deepEqual(parseVirtkmMarker(fixture('domain-virtkm-running.xml')), expected);
  t.deepEqual(parseDomainIdentity(fixture('domain-virtkm-running.xml')), { name: 'web-1', uuid: '4059a882-df13-4e57-a6c2-89ce50229b18' });
});

test('marker: matched by namespace URI, not by prefix or name', (t) => {
  const dom = (meta: string): string => `<domain type='kvm'><name>x</name><metadata>${meta}</metadata></domain>`;
  t.deepEqual(parseVirtkmMarker(dom('<v:guest xmlns:v="urn:virtkm:1" id="g" generation="1"/>')), { guestId: 'g', generation: 1 });
  t.deepEqual(parseVirtkmMarker(dom('<guest xmlns="urn:virtkm:1" id="g" generation="2"/>')), { guestId: 'g', generation: 2 });
  // Same prefix and name, other namespace: not virtkm's.
  t.is(parseVirtkmMarker(dom('<virtkm:guest xmlns:virtkm="urn:virtkm:2" id="g" generation="1"/>')), undefined);
  t.is(parseVirtkmMarker(dom('<guest id="g" generation="1"/>')), undefined);
  // Outside <metadata> it does not count.
  t.is(parseVirtkmMarker(`<domain><name>x</name><description><virtkm:guest xmlns:virtkm="urn:virtkm:1" id="g" generation="1"/></description></domain>`), undefined);
  t.is(parseVirtkmMarker(`<domain type='kvm'><name>x</name></domain>`), undefined);
  t.is(parseVirtkmMarker(`<domain type='kvm'><name>x</name><metadata/></domain>`), undefined);
});

test('marker: malformed, duplicated or hostile input is invalid_argument', (t) => {
  const dom = (meta: string): string => `<domain><name>x</name><metadata>${meta}</metadata></domain>`;
  const m = (attrs: string): string => `<virtkm:guest xmlns:virtkm="urn:virtkm:1" ${attrs}/>`;
  for (const attrs of ['generation="1"', 'id="g"', 'id="" generation="1"', 'id="g" generation="-1"', 'id="g" generation="1e3"', 'id="g" generation="99999999999999999"', 'id="a b" generation="1"']) {
    t.is(kindOf(() => parseVirtkmMarker(dom(m(attrs)))), 'invalid_argument', attrs);
  }
  t.is(kindOf(() => parseVirtkmMarker(dom(m('id="a" generation="1"') + m('id="b" generation="1"')))), 'invalid_argument');
  t.is(kindOf(() => parseVirtkmMarker('<domain><name>x</name>')), 'invalid_argument');
  t.is(kindOf(() => parseVirtkmMarker('')), 'invalid_argument');
  t.is(kindOf(() => parseVirtkmMarker('<secret/>')), 'invalid_argument');
  t.is(kindOf(() => parseVirtkmMarker('<d:domain xmlns:d="urn:x"/>')), 'invalid_argument');
  const laughs = `<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><domain><name>&b;</name></domain>`;
  t.is(kindOf(() => parseVirtkmMarker(laughs)), 'invalid_argument');
  t.is(kindOf(() => parseVirtkmMarker(`<domain><name>${'x'.repeat(3 * 1024 * 1024)}</name></domain>`)), 'resource_exhausted');
});

test('escapeXml escapes the five XML specials', (t) => {
  t.is(escapeXml(`<a href="x">&'`), '&lt;a href=&quot;x&quot;&gt;&amp;&apos;');
});

// ----- error mapping ---------------------------------------------------------------------

const call = (code: number, domain: number, message = 'libvirt says no at /var/lib/libvirt/x'): LibvirtCallError =>
  new LibvirtCallError('virSomething', { code, domain, message });

test('errors: libvirt codes map to kinds; the message never carries libvirt text', (t) => {
  // An operation without rules of its own: the plain code table applies.
  const op = { op: 'other.op', subject: 'domain "web-1"' };
  const cases: [number, ErrorKind][] = [
    [VirErr.NO_DOMAIN, 'not_found'],
    [VirErr.NO_SECRET, 'not_found'],
    [VirErr.DOM_EXIST, 'already_exists'],
    [VirErr.XML_ERROR, 'invalid_argument'],
    [VirErr.XML_INVALID_SCHEMA, 'invalid_argument'],
    [VirErr.CONFIG_UNSUPPORTED, 'invalid_argument'],
    [VirErr.OPERATION_INVALID, 'failed_precondition'],
    [VirErr.ACCESS_DENIED, 'permission_denied'],
    [VirErr.NO_CONNECT, 'unavailable'],
    [VirErr.OPERATION_TIMEOUT, 'unavailable'],
    [VirErr.INTERNAL_ERROR, 'internal'],
    [VirErr.OPERATION_FAILED, 'internal'],
    [12345, 'internal'],
  ];
  for (const [code, kind] of cases) {
    const err = toDomainError(call(code, VirFrom.QEMU), op);
    t.is(err.kind, kind, `code ${code}`);
    t.is(kindOfLibvirtCode(code), kind);
    t.false(err.message.includes('/var/lib'), `code ${code}: ${err.message}`);
    t.true(err.cause instanceof LibvirtCallError, 'libvirt detail kept as the cause');
  }
  t.is(toDomainError(call(VirErr.NO_DOMAIN, VirFrom.QEMU), op).message, 'domain "web-1" not found');
  t.is(toDomainError(call(VirErr.OPERATION_INVALID, VirFrom.QEMU), { op: 'domain.start', subject: 'domain "a"' }).message, 'domain "a": already running');
  t.is(toDomainError(call(VirErr.OPERATION_INVALID, VirFrom.QEMU), { op: 'domain.destroy', subject: 'domain "a"' }).message, 'domain "a": not running');
});

test('errors: transport failures and lost connections are unavailable whatever the code', (t) => {
  const op = { op: 'secret.list', subject: 'secrets' };
  t.is(toDomainError(call(VirErr.SYSTEM_ERROR, VirFrom.RPC), op).kind, 'unavailable');
  t.is(toDomainError(call(VirErr.INTERNAL_ERROR, VirFrom.RPC), op).kind, 'unavailable');
  t.is(toDomainError(call(VirErr.NO_SECRET, VirFrom.SECRET), op, true).kind, 'unavailable');
});

test('errors: a QEMU start failure is failed_precondition; the wrong-key message only for a LUKS keyslot failure', (t) => {
  const start = { op: 'domain.start', subject: 'domain "web-1"' };
  // Captured from libvirt 9.0 / QEMU 7.2 with a wrong secret value.
  const badKey =
    'internal error: qemu unexpectedly closed the monitor: 2026-11-24T13:17:22.437718Z qemu-system-x86_64: -blockdev {"node-name":"libvirt-1-format","read-only":false,"driver":"luks","key-secret":"libvirt-1-format-encryption-secret0","file":"libvirt-1-storage"}: Invalid password, cannot unlock any keyslot';
  const wrong = toDomainError(call(VirErr.INTERNAL_ERROR, VirFrom.QEMU, badKey), start);
  t.is(wrong.kind, 'failed_precondition');
  t.is(wrong.message, `domain "web-1": ${WRONG_KEY_MESSAGE}`);
  const kvm = toDomainError(call(VirErr.INTERNAL_ERROR, VirFrom.QEMU, 'internal error: qemu unexpectedly closed the monitor: Could not access KVM kernel module: Permission denied'), start);
  t.is(kvm.kind, 'failed_precondition');
  t.is(kvm.message, `domain "web-1": ${START_FAILED_MESSAGE}`);
  // Captured: a missing image (storage driver, errno-based) and a referenced secret without value.
  const noImage = toDomainError(call(VirErr.SYSTEM_ERROR, VirFrom.STORAGE, "Cannot access storage file '/tmp/nope/none.img': No such file or directory"), start);
  t.is(noImage.kind, 'failed_precondition');
  t.is(noImage.message, `domain "web-1": ${DISK_UNAVAILABLE_MESSAGE}`);
  const noValue = toDomainError(call(VirErr.NO_SECRET, VirFrom.SECRET, "Secret not found: secret '33333333-3333-4444-8555-666666666666' does not have a value"), start);
  t.is(noValue.kind, 'failed_precondition', "the domain exists: a missing secret is not the domain's not_found");
  t.is(noValue.message, `domain "web-1": ${SECRET_MISSING_MESSAGE}`);
  t.is(toDomainError(call(VirErr.NO_SECRET, VirFrom.SECRET), { op: 'secret.setValue', subject: 'secret x' }).kind, 'not_found');
  // The same code outside start, or from another part of libvirt, stays internal.
  t.is(toDomainError(call(VirErr.INTERNAL_ERROR, VirFrom.QEMU, badKey), { op: 'domain.define', subject: 'x' }).kind, 'internal');
  t.is(toDomainError(call(VirErr.INTERNAL_ERROR, VirFrom.SECRET, badKey), start).kind, 'internal');
});

// ----- secret values ---------------------------------------------------------------------

test('secret values: UTF-8 without NUL is accepted (what QEMU takes as a passphrase)', (t) => {
  const enc = (s: string): Uint8Array => new TextEncoder().encode(s);
  t.true(isPassphraseUtf8(enc('a'.repeat(64))));
  t.true(isPassphraseUtf8(enc('pässwörd €𝄞')));
  t.true(isPassphraseUtf8(new Uint8Array(0)));
  for (const bad of [[0x00], [0x41, 0x00], [0xff], [0x80], [0xc0, 0x80], [0xc3], [0xe0, 0x80, 0x80], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80]]) {
    t.false(isPassphraseUtf8(Uint8Array.from(bad)), JSON.stringify(bad));
  }
  // Random key bytes are almost never valid UTF-8: they must be encoded first.
  t.false(isPassphraseUtf8(Uint8Array.from([0x9f, 0x12, 0xe3, 0x01, 0xaa, 0x55, 0xc8, 0x20])));
});
