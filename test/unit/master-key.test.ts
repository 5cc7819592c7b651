/**
 * Tests of server/src/master-key: the key file and passphrase sealers and master-key.json.
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { chmod, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateWrappingKey, type WrappingKey } from '../../shared/src/envelope.js';
import { DomainError, type ErrorKind } from '../../shared/src/errors.js';
import { loadSodium } from '../../shared/src/sodium.js';
import {
  KEK_LENGTH,
  createKeyFile,
  keyFileSealer,
  parseSealedMasterKey,
  passphraseSealer,
  readPassphraseFile,
  type PassphraseSealedMasterKey,
  type SealedMasterKey,
} from '../../server/src/master-key/sealers.js';
import { masterKeyFileExists, masterKeyFilePath, readMasterKeyFile, writeMasterKeyFile } from '../../server/src/master-key/master-key-file.js';

interface Context {
  dir: string;
}

const test = anyTest as TestFn<Context>;

/** Cheap Argon2id cost for tests (libsodium's minimums). */
const CHEAP = { opslimit: 1, memlimit: 8192 };

test.before(async () => {
  await loadSodium();
});

test.beforeEach(async (t) => {
  t.context.dir = await mkdtemp(join(tmpdir(), 'virtkm-mk-'));
});

test.afterEach.always(async (t) => {
  await rm(t.context.dir, { recursive: true, force: true });
});

async function expectDomainError(t: ExecutionContext<Context>, promise: Promise<unknown>, kind: ErrorKind, message?: RegExp | string): Promise<DomainError> {
  const err = await t.throwsAsync(promise);
  t.true(err instanceof DomainError, `expected DomainError, got ${String(err)}`);
  const e = err as DomainError;
  t.is(e.kind, kind, e.message);
  if (typeof message === 'string') t.is(e.message, message);
  else if (message) t.regex(e.message, message);
  return e;
}

function sameKey(t: ExecutionContext<Context>, actual: WrappingKey, expected: WrappingKey): void {
  t.true(Buffer.from(actual.id).equals(Buffer.from(expected.id)), 'same key id');
  t.true(Buffer.from(actual.bytes).equals(Buffer.from(expected.bytes)), 'same key bytes');
}

function bytes(text: string): Buffer {
  const out = Buffer.allocUnsafeSlow(Buffer.byteLength(text));
  out.write(text);
  return out;
}

/** A prompt callback that hands out fresh copies and remembers them for the wipe checks. */
function recordingPrompt(text: string): { prompt: () => Promise<Uint8Array>; given: Uint8Array[] } {
  const given: Uint8Array[] = [];
  return {
    given,
    prompt: async () => {
      const b = bytes(text);
      given.push(b);
      return b;
    },
  };
}

function flipBase64Byte(b64: string, index: number): string {
  const raw = Buffer.from(b64, 'base64');
  raw[index] = (raw[index] ?? 0) ^ 0x01;
  return raw.toString('base64');
}

// --- Key file ----------------------------------------------------------------------------

test('createKeyFile writes 32 random bytes with mode 0600 and never overwrites', async (t) => {
  const path = join(t.context.dir, 'master.kek');
  await createKeyFile(path);
  const info = await stat(path);
  t.is(info.mode & 0o777, 0o600);
  const first = await readFile(path);
  t.is(first.length, KEK_LENGTH);
  t.false(first.every((b) => b === 0));
  await expectDomainError(t, createKeyFile(path), 'already_exists');
  t.true((await readFile(path)).equals(first), 'existing key file unchanged');
});

// Serial: the umask is process-wide.
test.serial('createKeyFile gives 0600 even under a permissive umask', async (t) => {
  const old = process.umask(0);
  try {
    const path = join(t.context.dir, 'k');
    await createKeyFile(path);
    t.is((await stat(path)).mode & 0o777, 0o600);
  } finally {
    process.umask(old);
  }
});

test('key file sealer: seal then unseal returns the same master key (id and bytes)', async (t) => {
  const path = join(t.context.dir, 'master.kek');
  await createKeyFile(path);
  const sealer = keyFileSealer(path);
  t.is(sealer.kind, 'keyfile');
  const mk = generateWrappingKey();
  const sealed = await sealer.seal(mk);
  t.is(sealed.format, 'virtkm-master-key');
  t.is(sealed.version, 1);
  t.is(sealed.sealer, 'keyfile');
  t.deepEqual(sealed.params, {});
  t.is(sealed.keyId, Buffer.from(mk.id).toString('hex'));
  t.regex(sealed.envelope, /^[A-Za-z0-9+/]+=*$/);
  t.false(Buffer.from(sealed.envelope, 'base64').includes(Buffer.from(mk.bytes)), 'key bytes not in the clear');
  // JSON round trip, as on disk.
  const again = parseSealedMasterKey(JSON.parse(JSON.stringify(sealed)));
  const unsealed = await sealer.unseal(again);
  sameKey(t, unsealed, mk);
  t.is(unsealed.bytes.byteLength, 32);
  t.is(unsealed.bytes.buffer.byteLength, 32, 'unsealed key lives in a buffer of its own');
  // Sealing twice gives different envelopes (fresh nonce) that both open.
  const sealed2 = await sealer.seal(mk);
  t.not(sealed2.envelope, sealed.envelope);
  sameKey(t, await sealer.unseal(sealed2), mk);
});

test('key file sealer refuses the wrong key file with unauthenticated', async (t) => {
  const a = join(t.context.dir, 'a.kek');
  const b = join(t.context.dir, 'b.kek');
  await createKeyFile(a);
  await createKeyFile(b);
  const sealed = await keyFileSealer(a).seal(generateWrappingKey());
  await expectDomainError(t, keyFileSealer(b).unseal(sealed), 'unauthenticated', 'wrong key file');
});

test('key file sealer refuses a key file that group or others can access', async (t) => {
  const path = join(t.context.dir, 'master.kek');
  await createKeyFile(path);
  const sealed = await keyFileSealer(path).seal(generateWrappingKey());
  for (const mode of [0o640, 0o604, 0o660, 0o644, 0o601]) {
    await chmod(path, mode);
    const e = await expectDomainError(t, keyFileSealer(path).unseal(sealed), 'failed_precondition', /accessible by group or others/);
    t.regex(e.hint ?? '', /chmod 600/);
    t.false(e.message.includes(path), 'no path in the message');
    await expectDomainError(t, keyFileSealer(path).seal(generateWrappingKey()), 'failed_precondition');
  }
  await chmod(path, 0o400);
  t.truthy(await keyFileSealer(path).unseal(sealed), 'owner-only read is fine');
});

test('key file sealer refuses missing, short, long and non-regular key files', async (t) => {
  const mk = generateWrappingKey();
  await expectDomainError(t, keyFileSealer(join(t.context.dir, 'none')).seal(mk), 'not_found');
  const short = join(t.context.dir, 'short');
  await writeFile(short, Buffer.alloc(31, 1), { mode: 0o600 });
  await expectDomainError(t, keyFileSealer(short).seal(mk), 'failed_precondition', /exactly 32 bytes/);
  const long = join(t.context.dir, 'long');
  await writeFile(long, Buffer.alloc(33, 1), { mode: 0o600 });
  await expectDomainError(t, keyFileSealer(long).seal(mk), 'failed_precondition', /exactly 32 bytes/);
  await chmod(t.context.dir, 0o700);
  await expectDomainError(t, keyFileSealer(t.context.dir).seal(mk), 'failed_precondition', /not a regular file/);
});

test('key file sealer refuses a record sealed by a passphrase', async (t) => {
  const path = join(t.context.dir, 'k');
  await createKeyFile(path);
  const sealed = await passphraseSealer({ source: { prompt: async () => bytes('pw') }, cost: CHEAP }).seal(generateWrappingKey());
  await expectDomainError(t, keyFileSealer(path).unseal(sealed), 'failed_precondition', /sealed with a passphrase/);
});

test('tampering with a key file record is refused', async (t) => {
  const path = join(t.context.dir, 'k');
  await createKeyFile(path);
  const sealer = keyFileSealer(path);
  const mk = generateWrappingKey();
  const sealed = await sealer.seal(mk);
  const envelopeLength = Buffer.from(sealed.envelope, 'base64').length;
  // Ciphertext, nonce and tag bytes: the AEAD fails (DecryptionError) -> failed_precondition.
  for (const index of [9, 20, 33, 40, envelopeLength - 1]) {
    await expectDomainError(t, sealer.unseal({ ...sealed, envelope: flipBase64Byte(sealed.envelope, index) }), 'failed_precondition', /damaged or has been tampered with/);
  }
  // The version byte.
  await expectDomainError(t, sealer.unseal({ ...sealed, envelope: flipBase64Byte(sealed.envelope, 0) }), 'failed_precondition');
  // The KEK id in the header: looks like another key file.
  await expectDomainError(t, sealer.unseal({ ...sealed, envelope: flipBase64Byte(sealed.envelope, 3) }), 'unauthenticated');
  // Truncated envelope.
  await expectDomainError(t, sealer.unseal({ ...sealed, envelope: Buffer.from(sealed.envelope, 'base64').subarray(0, 30).toString('base64') }), 'failed_precondition');
  // The public key id no longer matches the sealed one.
  const otherId = Buffer.from(sealed.keyId, 'hex');
  otherId[0] = (otherId[0] ?? 0) ^ 0x80;
  await expectDomainError(t, sealer.unseal({ ...sealed, keyId: otherId.toString('hex') }), 'failed_precondition', /damaged or has been tampered with/);
  // The untouched record still opens.
  sameKey(t, await sealer.unseal(sealed), mk);
});

// --- Passphrase --------------------------------------------------------------------------

test('passphrase sealer: seal then unseal returns the same master key and stores its parameters', async (t) => {
  const sealer = passphraseSealer({ source: { prompt: async () => bytes('correct horse battery staple') }, cost: { opslimit: 2, memlimit: 65536 } });
  t.is(sealer.kind, 'passphrase');
  const mk = generateWrappingKey();
  const sealed = await sealer.seal(mk);
  t.is(sealed.sealer, 'passphrase');
  const params = (sealed as PassphraseSealedMasterKey).params;
  t.is(params.kdf, 'argon2id13');
  t.is(params.opslimit, 2);
  t.is(params.memlimit, 65536);
  t.is(Buffer.from(params.salt, 'base64').length, 16);
  t.is(sealed.keyId, Buffer.from(mk.id).toString('hex'));
  // A sealer configured with another cost still unseals: the record's cost is used.
  const other = passphraseSealer({ source: { prompt: async () => bytes('correct horse battery staple') }, cost: CHEAP });
  sameKey(t, await other.unseal(parseSealedMasterKey(JSON.parse(JSON.stringify(sealed)))), mk);
  // Fresh salt every time.
  const sealed2 = await sealer.seal(mk);
  t.not((sealed2 as PassphraseSealedMasterKey).params.salt, params.salt);
});

test('passphrase sealer defaults to Argon2id OPSLIMIT_MODERATE / MEMLIMIT_MODERATE', async (t) => {
  const sodium = await loadSodium();
  const sealer = passphraseSealer({ source: { prompt: async () => bytes('pw') } });
  const mk = generateWrappingKey();
  const sealed = (await sealer.seal(mk)) as PassphraseSealedMasterKey;
  t.is(sealed.params.opslimit, sodium.crypto_pwhash_OPSLIMIT_MODERATE);
  t.is(sealed.params.memlimit, sodium.crypto_pwhash_MEMLIMIT_MODERATE);
  sameKey(t, await sealer.unseal(sealed), mk);
});

test('a wrong passphrase is refused with unauthenticated "wrong passphrase" and nothing more', async (t) => {
  const mk = generateWrappingKey();
  const sealed = await passphraseSealer({ source: { prompt: async () => bytes('right') }, cost: CHEAP }).seal(mk);
  const e = await expectDomainError(t, passphraseSealer({ source: { prompt: async () => bytes('wrong') } }).unseal(sealed), 'unauthenticated', 'wrong passphrase');
  t.is(e.hint, undefined);
  t.is(e.cause, undefined);
  // Near misses too.
  for (const guess of ['right\n', 'Right', 'righ', 'right ']) {
    await expectDomainError(t, passphraseSealer({ source: { prompt: async () => bytes(guess) } }).unseal(sealed), 'unauthenticated', 'wrong passphrase');
  }
});

test('passphrase buffers are wiped after use (seal, unseal, and a failed unseal)', async (t) => {
  const mk = generateWrappingKey();
  const rec = recordingPrompt('wipe me please');
  const sealer = passphraseSealer({ source: { prompt: rec.prompt }, cost: CHEAP });
  const sealed = await sealer.seal(mk);
  sameKey(t, await sealer.unseal(sealed), mk);
  const wrong = recordingPrompt('not it');
  await expectDomainError(t, passphraseSealer({ source: { prompt: wrong.prompt } }).unseal(sealed), 'unauthenticated');
  const all = [...rec.given, ...wrong.given];
  t.is(all.length, 3);
  for (const b of all) t.true(b.every((x) => x === 0), 'passphrase buffer zeroed');
  // The caller's master key is left alone by seal().
  t.false(mk.bytes.every((x) => x === 0));
});

test('passphrase from a file: one trailing newline stripped, same key as the prompt', async (t) => {
  const mk = generateWrappingKey();
  const sealed = await passphraseSealer({ source: { prompt: async () => bytes('s3cret pass') }, cost: CHEAP }).seal(mk);
  for (const content of ['s3cret pass', 's3cret pass\n', 's3cret pass\r\n']) {
    const file = join(t.context.dir, 'pass');
    await rm(file, { force: true });
    await writeFile(file, content, { mode: 0o600 });
    const read = await readPassphraseFile(file);
    t.is(read.toString('utf8'), 's3cret pass');
    sameKey(t, await passphraseSealer({ source: { file } }).unseal(sealed), mk);
  }
  // Only one newline is removed: "pass\n\n" is the passphrase "pass\n".
  const file2 = join(t.context.dir, 'pass2');
  await writeFile(file2, 's3cret pass\n\n', { mode: 0o600 });
  await expectDomainError(t, passphraseSealer({ source: { file: file2 } }).unseal(sealed), 'unauthenticated', 'wrong passphrase');
});

test('passphrase files: loose mode, empty, too long and missing are refused', async (t) => {
  const mk = generateWrappingKey();
  const loose = join(t.context.dir, 'loose');
  await writeFile(loose, 'pw\n', { mode: 0o644 });
  await chmod(loose, 0o644);
  await expectDomainError(t, passphraseSealer({ source: { file: loose }, cost: CHEAP }).seal(mk), 'failed_precondition', /accessible by group or others/);
  const empty = join(t.context.dir, 'empty');
  await writeFile(empty, '\n', { mode: 0o600 });
  await expectDomainError(t, passphraseSealer({ source: { file: empty }, cost: CHEAP }).seal(mk), 'invalid_argument', 'passphrase is empty');
  const long = join(t.context.dir, 'long');
  await writeFile(long, 'x'.repeat(5000), { mode: 0o600 });
  await expectDomainError(t, passphraseSealer({ source: { file: long }, cost: CHEAP }).seal(mk), 'invalid_argument', /longer than/);
  await expectDomainError(t, passphraseSealer({ source: { file: join(t.context.dir, 'none') }, cost: CHEAP }).seal(mk), 'not_found');
  const emptyPrompt = new Uint8Array(0);
  await expectDomainError(t, passphraseSealer({ source: { prompt: async () => emptyPrompt }, cost: CHEAP }).seal(mk), 'invalid_argument', 'passphrase is empty');
});

test('tampering with a passphrase record is refused', async (t) => {
  const mk = generateWrappingKey();
  const sealer = passphraseSealer({ source: { prompt: async () => bytes('pw') }, cost: CHEAP });
  const sealed = (await sealer.seal(mk)) as PassphraseSealedMasterKey;
  await expectDomainError(t, sealer.unseal({ ...sealed, envelope: flipBase64Byte(sealed.envelope, 40) }), 'failed_precondition', /damaged or has been tampered with/);
  const otherId = Buffer.from(sealed.keyId, 'hex');
  otherId[7] = (otherId[7] ?? 0) ^ 1;
  await expectDomainError(t, sealer.unseal({ ...sealed, keyId: otherId.toString('hex') }), 'failed_precondition', /damaged/);
  // Changing the KDF inputs changes the KEK: indistinguishable from a wrong passphrase.
  await expectDomainError(t, sealer.unseal({ ...sealed, params: { ...sealed.params, salt: flipBase64Byte(sealed.params.salt, 0) } }), 'unauthenticated', 'wrong passphrase');
  await expectDomainError(t, sealer.unseal({ ...sealed, params: { ...sealed.params, opslimit: 2 } }), 'unauthenticated', 'wrong passphrase');
  // Costs outside sane bounds are refused before any work (no denial of service).
  await expectDomainError(t, sealer.unseal({ ...sealed, params: { ...sealed.params, memlimit: 2 ** 40 } }), 'failed_precondition', /malformed/);
  await expectDomainError(t, sealer.unseal({ ...sealed, params: { ...sealed.params, opslimit: 1_000_000 } }), 'failed_precondition', /malformed/);
  // A passphrase sealer does not take key file records.
  await expectDomainError(t, sealer.unseal({ ...sealed, sealer: 'keyfile', params: {} }), 'failed_precondition', /sealed with a key file/);
  sameKey(t, await sealer.unseal(sealed), mk);
});

test('passphrase sealer refuses out-of-range costs at construction', (t) => {
  for (const cost of [{ opslimit: 0, memlimit: 8192 }, { opslimit: 1, memlimit: 1024 }, { opslimit: 1.5, memlimit: 8192 }]) {
    const err = t.throws(() => passphraseSealer({ source: { prompt: async () => bytes('x') }, cost }));
    t.is((err as DomainError).kind, 'invalid_argument');
  }
});

test('parseSealedMasterKey refuses malformed records with failed_precondition', (t) => {
  const good: SealedMasterKey = {
    format: 'virtkm-master-key',
    version: 1,
    sealer: 'passphrase',
    keyId: '0011223344556677',
    params: { kdf: 'argon2id13', salt: Buffer.alloc(16).toString('base64'), opslimit: 3, memlimit: 268435456 },
    envelope: Buffer.alloc(60).toString('base64'),
  };
  t.deepEqual(parseSealedMasterKey(JSON.parse(JSON.stringify(good))), good);
  const bad: unknown[] = [
    null,
    [],
    'x',
    { ...good, format: 'other' },
    { ...good, version: 2 },
    { ...good, sealer: 'tpm' },
    { ...good, keyId: '00112233445566' },
    { ...good, keyId: '00112233445566GG' },
    { ...good, keyId: '0011223344556677'.toUpperCase().replace('0', 'A') + 'x' },
    { ...good, envelope: 'not base64!' },
    { ...good, params: { ...good.params, kdf: 'scrypt' } },
    { ...good, params: { ...good.params, salt: Buffer.alloc(8).toString('base64') } },
    { ...good, params: { ...good.params, opslimit: '3' } },
    { ...good, sealer: 'keyfile' },
    { ...good, params: undefined },
  ];
  for (const value of bad) {
    const err = t.throws(() => parseSealedMasterKey(value), undefined, JSON.stringify(value));
    t.is((err as DomainError).kind, 'failed_precondition');
  }
  // Unknown extra fields are dropped from the clean copy.
  t.false('extra' in parseSealedMasterKey({ ...good, extra: 1 }));
});

// --- master-key.json ---------------------------------------------------------------------

test('master-key.json: atomic write (0600, no temporary left), read back, never overwritten', async (t) => {
  const { dir } = t.context;
  const keyFile = join(dir, 'master.kek');
  await createKeyFile(keyFile);
  const mk = generateWrappingKey();
  const sealed = await keyFileSealer(keyFile).seal(mk);
  t.false(await masterKeyFileExists(dir));
  const path = await writeMasterKeyFile(dir, sealed);
  t.is(path, masterKeyFilePath(dir));
  t.true(await masterKeyFileExists(dir));
  t.is((await stat(path)).mode & 0o777, 0o600);
  t.deepEqual((await readdir(dir)).sort(), ['master-key.json', 'master.kek']);
  const text = await readFile(path, 'utf8');
  t.true(text.endsWith('}\n'));
  t.false(text.includes(Buffer.from(mk.bytes).toString('base64')));
  t.deepEqual(await readMasterKeyFile(dir), sealed);
  sameKey(t, await keyFileSealer(keyFile).unseal(await readMasterKeyFile(dir)), mk);

  const other = await keyFileSealer(keyFile).seal(generateWrappingKey());
  await expectDomainError(t, writeMasterKeyFile(dir, other), 'already_exists');
  t.is(await readFile(path, 'utf8'), text, 'existing record unchanged');
  t.deepEqual((await readdir(dir)).sort(), ['master-key.json', 'master.kek'], 'no temporary file left behind');
});

test('master-key.json: missing, not JSON and invalid records are refused', async (t) => {
  const { dir } = t.context;
  await expectDomainError(t, readMasterKeyFile(dir), 'not_found');
  await writeFile(masterKeyFilePath(dir), '{ not json', { mode: 0o600 });
  await expectDomainError(t, readMasterKeyFile(dir), 'failed_precondition', /not valid JSON/);
  await writeFile(masterKeyFilePath(dir), JSON.stringify({ format: 'virtkm-master-key', version: 9 }), { mode: 0o600 });
  await expectDomainError(t, readMasterKeyFile(dir), 'failed_precondition', /unsupported version/);
  // An invalid record is not written either.
  await rm(masterKeyFilePath(dir));
  await t.throwsAsync(writeMasterKeyFile(dir, { format: 'virtkm-master-key' } as unknown as SealedMasterKey));
  t.false(await masterKeyFileExists(dir));
  t.deepEqual(await readdir(dir), []);
});

test('master-key.json: the directory must exist', async (t) => {
  const sealed = parseSealedMasterKey({
    format: 'virtkm-master-key',
    version: 1,
    sealer: 'keyfile',
    keyId: '0011223344556677',
    params: {},
    envelope: Buffer.alloc(60).toString('base64'),
  });
  await expectDomainError(t, writeMasterKeyFile(join(t.context.dir, 'missing'), sealed), 'failed_precondition');
});
