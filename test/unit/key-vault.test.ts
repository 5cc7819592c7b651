/**
 * Tests of the key vault (server/src/vault/key-vault.ts): sealing new secrets, turning a
 * sealed secret into a key packet for one host, refusals, and server secrets.
 */
import test from 'ava';
import { loadSodium } from '../../shared/src/sodium.js';
import { KeyPacket, VolumeFormat } from '../../shared/src/api.js';
import { boxRecipient, generateBoxKeyPair, openSealed, type BoxKeyPair } from '../../shared/src/box.js';
import { DecryptionError, generateWrappingKey, open, seal, volumeSecretAad, type WrappingKey } from '../../shared/src/envelope.js';
import { DomainError } from '../../shared/src/errors.js';
import { KEY_PACKET_TYPE, createKeyVault, type KeyVault, type PacketRecipient } from '../../server/src/vault/key-vault.js';
import { FORMAT_TO_API } from '../../shared/src/formats.js';
import type { KeyVersionRecord, VolumeFormatName, VolumeRecord } from '../../server/src/domain/model.js';

test.before(async () => {
  await loadSodium();
});

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

/** A vault and an independent copy of its master key (the vault wipes its own on close). */
function makeVault(): { vault: KeyVault; master: WrappingKey; copy: WrappingKey } {
  const master = generateWrappingKey();
  const copy = { id: Uint8Array.from(master.id), bytes: Uint8Array.from(master.bytes) };
  return { vault: createKeyVault(master), master, copy };
}

const VOLUME_ID = '6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b';
const HOST_ID = 'a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d';
const ISSUED_AT = '2024-05-01T12:00:00.000Z';

function volumeRecord(format: VolumeFormatName, overrides: Partial<VolumeRecord> = {}): VolumeRecord {
  return {
    id: VOLUME_ID,
    name: 'data-disk',
    sizeBytes: 10n * 1024n * 1024n * 1024n,
    format,
    cipher: 'aes-xts-plain64',
    keySizeBits: 512,
    sectorSize: format === 'luks2' || format === 'plain' ? 4096 : 512,
    activeVersion: 2,
    createdAt: '2024-01-01T00:00:00.000Z',
    ...overrides,
  };
}

function keyVersion(sealed: Uint8Array | null, version = 2, volumeId = VOLUME_ID): KeyVersionRecord {
  return { volumeId, version, state: sealed === null ? 'destroyed' : 'active', sealed, createdAt: '2024-01-01T00:00:00.000Z' };
}

function host(): { keys: BoxKeyPair; to: PacketRecipient } {
  const keys = generateBoxKeyPair();
  return { keys, to: { hostId: HOST_ID, recipient: boxRecipient(keys.publicKey) } };
}

function isInternal(err: unknown): boolean {
  return err instanceof DomainError && err.kind === 'internal' && err.message === 'internal error' && err.hint === undefined;
}

test('FORMAT_TO_API maps every format to its API enum', (t) => {
  t.deepEqual(
    { ...FORMAT_TO_API },
    {
      luks: VolumeFormat.VOLUME_FORMAT_LUKS,
      'qcow2-luks': VolumeFormat.VOLUME_FORMAT_QCOW2_LUKS,
      luks2: VolumeFormat.VOLUME_FORMAT_LUKS2,
      plain: VolumeFormat.VOLUME_FORMAT_PLAIN,
      raw: VolumeFormat.VOLUME_FORMAT_RAW,
      qcow2: VolumeFormat.VOLUME_FORMAT_QCOW2,
    },
  );
  t.is(KEY_PACKET_TYPE, 'virtkm.keypacket.v1');
});

test('newSealedSecret: an envelope of the requested length under the master key, bound to (volume, version)', (t) => {
  const { vault, copy } = makeVault();
  for (const len of [32, 64]) {
    const env = vault.newSealedSecret(VOLUME_ID, 3, len);
    const secret = open(env, copy, volumeSecretAad(VOLUME_ID, 3));
    t.is(secret.length, len);
    t.false(secret.every((b) => b === 0), 'secret is not all zeros (was not wiped before sealing)');
    t.throws(() => open(env, copy, volumeSecretAad(VOLUME_ID, 4)), { instanceOf: DecryptionError });
    t.throws(() => open(env, copy, volumeSecretAad('6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4c', 3)), { instanceOf: DecryptionError });
    t.throws(() => open(env, generateWrappingKey(), volumeSecretAad(VOLUME_ID, 3)), { instanceOf: DecryptionError });
  }
});

test('newSealedSecret gives a different secret every time', (t) => {
  const { vault, copy } = makeVault();
  const aad = volumeSecretAad(VOLUME_ID, 1);
  const a = open(vault.newSealedSecret(VOLUME_ID, 1, 32), copy, aad);
  const b = open(vault.newSealedSecret(VOLUME_ID, 1, 32), copy, aad);
  t.not(hex(a), hex(b));
});

for (const format of Object.keys(FORMAT_TO_API) as VolumeFormatName[]) {
  test(`packetForHost (${format}): the host opens and decodes a complete, correct key packet`, (t) => {
    const { vault, copy } = makeVault();
    const { keys, to } = host();
    const volume = volumeRecord(format);
    const sealed = vault.newSealedSecret(VOLUME_ID, 2, format === 'plain' ? 64 : 32);
    const sealedBefore = hex(sealed);
    const expectedSecret = open(sealed, copy, volumeSecretAad(VOLUME_ID, 2));

    const packet = vault.packetForHost(volume, keyVersion(sealed), to, ISSUED_AT);
    t.is(packet.volumeId, VOLUME_ID);
    t.is(packet.keyVersion, 2);

    const decoded = KeyPacket.decode(openSealed(packet.sealed, keys));
    t.is(decoded.type, 'virtkm.keypacket.v1');
    t.is(decoded.volumeId, VOLUME_ID);
    t.is(decoded.keyVersion, 2);
    t.is(decoded.hostId, HOST_ID);
    t.is(decoded.mechanism, FORMAT_TO_API[format]);
    t.deepEqual(decoded.cipher, { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: volume.sectorSize });
    t.is(decoded.sizeBytes, 10n * 1024n * 1024n * 1024n);
    t.is(decoded.issuedAt, ISSUED_AT);
    t.is(hex(decoded.secret), hex(expectedSecret));
    t.is(decoded.secret.length, format === 'plain' ? 64 : 32);
    t.false(decoded.secret.every((b) => b === 0), 'the secret in the packet was not wiped before sealing');
    // The stored envelope is left untouched.
    t.is(hex(sealed), sealedBefore);
  });
}

test('packetForHost: the packet does not open for another host', (t) => {
  const { vault } = makeVault();
  const { to } = host();
  const other = generateBoxKeyPair();
  const packet = vault.packetForHost(volumeRecord('luks'), keyVersion(vault.newSealedSecret(VOLUME_ID, 2, 32)), to, ISSUED_AT);
  t.throws(() => openSealed(packet.sealed, other), { message: 'cannot open sealed packet' });
});

test('packetForHost uses the version and volume of the key record, and fields of the volume', (t) => {
  const { vault, copy } = makeVault();
  const { keys, to } = host();
  const volume = volumeRecord('luks2', { cipher: 'serpent-xts-plain64', keySizeBits: 256, sectorSize: 512, sizeBytes: 1n << 40n });
  const sealed = vault.newSealedSecret(VOLUME_ID, 7, 32);
  const packet = vault.packetForHost(volume, keyVersion(sealed, 7), to, ISSUED_AT);
  t.is(packet.keyVersion, 7);
  const decoded = KeyPacket.decode(openSealed(packet.sealed, keys));
  t.is(decoded.keyVersion, 7);
  t.deepEqual(decoded.cipher, { cipher: 'serpent-xts-plain64', keySizeBits: 256, sectorSize: 512 });
  t.is(decoded.sizeBytes, 1n << 40n);
  t.is(hex(decoded.secret), hex(open(sealed, copy, volumeSecretAad(VOLUME_ID, 7))));
});

test('packetForHost: a destroyed key version is failed_precondition', (t) => {
  const { vault } = makeVault();
  const { to } = host();
  const err = t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(null, 4), to, ISSUED_AT), { instanceOf: DomainError });
  t.is(err?.kind, 'failed_precondition');
  t.regex(err?.message ?? '', /destroyed/);
});

test('packetForHost: a secret sealed under another master key is "internal error" with no detail', (t) => {
  const { vault } = makeVault();
  const { to } = host();
  const foreign = seal(new Uint8Array(32).fill(9), generateWrappingKey(), volumeSecretAad(VOLUME_ID, 2));
  const err = t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(foreign), to, ISSUED_AT));
  t.true(isInternal(err), String(err));
  t.is(err?.message, 'internal error');
});

test('packetForHost: a secret under a master key with the same id but other bytes is "internal error"', (t) => {
  const { vault, copy } = makeVault();
  const { to } = host();
  const imposter = { id: copy.id, bytes: generateWrappingKey().bytes };
  const env = seal(new Uint8Array(32).fill(1), imposter, volumeSecretAad(VOLUME_ID, 2));
  const err = t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(env), to, ISSUED_AT));
  t.true(isInternal(err), String(err));
});

test('packetForHost: swapped rows (envelope of another volume or version) is "internal error"', (t) => {
  const { vault } = makeVault();
  const { to } = host();
  const otherVolume = vault.newSealedSecret('11111111-2222-4333-8444-555555555555', 2, 32);
  const otherVersion = vault.newSealedSecret(VOLUME_ID, 1, 32);
  t.true(isInternal(t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(otherVolume), to, ISSUED_AT))));
  t.true(isInternal(t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(otherVersion), to, ISSUED_AT))));
  // A server secret is not a volume secret either.
  const serverSecret = vault.sealServerSecret(volumeSecretAad(VOLUME_ID, 2), new Uint8Array(32));
  t.true(isInternal(t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(serverSecret), to, ISSUED_AT))));
});

test('packetForHost: a garbage envelope is "internal error"', (t) => {
  const { vault } = makeVault();
  const { to } = host();
  for (const junk of [new Uint8Array(0), new Uint8Array(80), Uint8Array.of(1, 2, 3)]) {
    t.true(isInternal(t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(junk), to, ISSUED_AT))));
  }
});

test('server secrets: seal/open round trip under the master key, bound to their label', (t) => {
  const { vault, copy } = makeVault();
  const pt = Buffer.from('-----BEGIN PRIVATE KEY----- not really', 'utf8');
  const env = vault.sealServerSecret('ca-key', pt);
  t.is(Buffer.from(vault.openServerSecret('ca-key', env)).toString('utf8'), pt.toString('utf8'));
  t.is(hex(open(env, copy, 'virtkm/v1/server-secret/ca-key')), hex(pt));
  t.true(isInternal(t.throws(() => vault.openServerSecret('tls-key', env))));
  t.true(isInternal(t.throws(() => vault.openServerSecret('ca-key ', env))));
  t.true(isInternal(t.throws(() => vault.openServerSecret('', env))));
  // Sealed under another master key.
  const other = createKeyVault(generateWrappingKey());
  t.true(isInternal(t.throws(() => other.openServerSecret('ca-key', env))));
  // A volume secret is not a server secret.
  const volumeEnv = vault.newSealedSecret(VOLUME_ID, 1, 32);
  t.true(isInternal(t.throws(() => vault.openServerSecret(volumeSecretAad(VOLUME_ID, 1), volumeEnv))));
});

test('server secrets: empty plaintext round trips', (t) => {
  const { vault } = makeVault();
  t.is(vault.openServerSecret('x', vault.sealServerSecret('x', new Uint8Array(0))).length, 0);
});

test('close wipes the master key and every later use throws internal error', (t) => {
  const { vault, master } = makeVault();
  const { to } = host();
  const sealed = vault.newSealedSecret(VOLUME_ID, 2, 32);
  const serverEnv = vault.sealServerSecret('l', Uint8Array.of(1));
  vault.close();
  t.true(master.bytes.every((b) => b === 0));
  t.true(isInternal(t.throws(() => vault.newSealedSecret(VOLUME_ID, 3, 32))));
  t.true(isInternal(t.throws(() => vault.packetForHost(volumeRecord('luks'), keyVersion(sealed), to, ISSUED_AT))));
  t.true(isInternal(t.throws(() => vault.sealServerSecret('l', Uint8Array.of(1)))));
  t.true(isInternal(t.throws(() => vault.openServerSecret('l', serverEnv))));
  t.notThrows(() => vault.close(), 'close is idempotent');
  t.true(isInternal(t.throws(() => vault.newSealedSecret(VOLUME_ID, 3, 32))));
});
