/**
 * Tests of volume parameter validation and cipher defaults (server/src/domain/volume-spec.ts).
 */
import test, { type ExecutionContext } from 'ava';
import { loadSodium } from '../../shared/src/sodium.js';
import { DomainError } from '../../shared/src/errors.js';
import {
  ALLOWED_CIPHERS,
  DEFAULT_CIPHER,
  DEFAULT_KEY_SIZE_BITS,
  DEFAULT_SECTOR_SIZE,
  MAX_VOLUME_BYTES,
  MIN_VOLUME_BYTES,
  PASSPHRASE_BYTES,
  checkName,
  checkSize,
  compileCipherSpec,
  isId,
  pageSize,
  secretLength,
} from '../../server/src/domain/volume-spec.js';
import type { VolumeFormatName } from '../../server/src/domain/model.js';

test.before(async () => {
  await loadSodium();
});

const FORMATS: VolumeFormatName[] = ['luks', 'qcow2-luks', 'luks2', 'plain'];
const invalid = { instanceOf: DomainError } as const;

function invalidArgument(t: ExecutionContext, fn: () => unknown, message: RegExp, label?: string): DomainError | undefined {
  const err = t.throws(fn, invalid, label);
  t.is(err?.kind, 'invalid_argument', label);
  t.regex(err?.message ?? '', message, label);
  return err;
}

// --- checkName

test('checkName accepts ordinary names and returns them unchanged', (t) => {
  for (const name of ['a', 'A', '0', 'web-1', 'db_primary.disk-0', 'x'.repeat(63), '9lives', 'a.b.c', 'A-']) {
    t.is(checkName('volume', name), name, name);
  }
});

test('checkName rejects bad names with invalid_argument naming the kind, and a hint', (t) => {
  const bad = [
    '',
    'x'.repeat(64),
    'x'.repeat(1000),
    '-leading-dash',
    '.hidden',
    '_under',
    'a/b',
    '../etc',
    'with space',
    'tab\tname',
    'trailing\n',
    'naïve',
    'диск',
    '名前',
    'emoji😀',
    'semi;colon',
    "quote'",
    'a\u0000b',
  ];
  for (const name of bad) {
    const err = invalidArgument(t, () => checkName('volume', name), /^invalid volume name/, JSON.stringify(name));
    t.regex(err?.hint ?? '', /1-63 characters/, JSON.stringify(name));
  }
  invalidArgument(t, () => checkName('guest', 'a/b'), /^invalid guest name/);
});

test('checkName rejects names that look like an id (lower-case UUID)', (t) => {
  const uuid = '123e4567-e89b-42d3-a456-426614174000';
  t.true(isId(uuid));
  invalidArgument(t, () => checkName('volume', uuid), /must not look like an id/);
  // Not id-shaped: one character short, or extra text.
  t.is(checkName('volume', uuid.slice(0, -1)), uuid.slice(0, -1));
  t.is(checkName('volume', uuid + 'x'), uuid + 'x');
});

test('isId accepts only the lower-case UUID shape', (t) => {
  t.true(isId('00000000-0000-0000-0000-000000000000'));
  t.false(isId('123E4567-E89B-42D3-A456-426614174000'));
  t.false(isId('123e4567e89b42d3a456426614174000'));
  t.false(isId('{123e4567-e89b-42d3-a456-426614174000}'));
  t.false(isId('123e4567-e89b-42d3-a456-426614174000\n'));
  t.false(isId(''));
});

// --- checkSize

test('checkSize accepts the limits and multiples of the sector size', (t) => {
  t.is(MIN_VOLUME_BYTES, 1n << 20n);
  t.is(MAX_VOLUME_BYTES, 1n << 46n);
  t.is(checkSize(MIN_VOLUME_BYTES, 512), MIN_VOLUME_BYTES);
  t.is(checkSize(MAX_VOLUME_BYTES, 4096), MAX_VOLUME_BYTES);
  t.is(checkSize(MIN_VOLUME_BYTES + 512n, 512), MIN_VOLUME_BYTES + 512n);
  t.is(checkSize(10n << 30n, 4096), 10n << 30n);
});

test('checkSize rejects sizes outside the limits', (t) => {
  for (const size of [0n, -1n, -(1n << 30n), 512n, MIN_VOLUME_BYTES - 512n, MAX_VOLUME_BYTES + 512n, MAX_VOLUME_BYTES + 4096n, 1n << 64n]) {
    invalidArgument(t, () => checkSize(size, 512), /between 1048576 and 70368744177664 bytes/, String(size));
  }
});

test('checkSize requires a multiple of the sector size', (t) => {
  invalidArgument(t, () => checkSize(MIN_VOLUME_BYTES + 512n, 4096), /multiple of the sector size \(4096\)/);
  invalidArgument(t, () => checkSize(MIN_VOLUME_BYTES + 1n, 512), /multiple of the sector size \(512\)/);
  invalidArgument(t, () => checkSize(MIN_VOLUME_BYTES + 4095n, 4096), /multiple/);
  t.is(checkSize(MIN_VOLUME_BYTES + 4096n, 4096), MIN_VOLUME_BYTES + 4096n);
});

// --- compileCipherSpec

test('compileCipherSpec defaults to aes-xts-plain64, 512-bit key, 512-byte sectors for every format', (t) => {
  t.is(DEFAULT_CIPHER, 'aes-xts-plain64');
  t.is(DEFAULT_KEY_SIZE_BITS, 512);
  t.is(DEFAULT_SECTOR_SIZE, 512);
  for (const format of FORMATS) {
    t.deepEqual(compileCipherSpec(format, {}), { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 }, format);
    // Zero values and the empty string (proto3 defaults) mean "use the default".
    t.deepEqual(compileCipherSpec(format, { cipher: '', keySizeBits: 0, sectorSize: 0 }), { cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512 }, format);
  }
});

test('compileCipherSpec keeps explicit allowed values', (t) => {
  t.deepEqual(ALLOWED_CIPHERS, ['aes-xts-plain64', 'serpent-xts-plain64', 'twofish-xts-plain64']);
  for (const cipher of ALLOWED_CIPHERS) {
    t.deepEqual(compileCipherSpec('luks2', { cipher, keySizeBits: 256, sectorSize: 4096 }), { cipher, keySizeBits: 256, sectorSize: 4096 });
  }
});

test('compileCipherSpec rejects unsupported ciphers, with the list in the hint and a truncated name', (t) => {
  for (const cipher of ['aes-cbc-essiv:sha256', 'AES-XTS-PLAIN64', 'aes-xts-plain64 ', 'des', 'null', 'cipher_null-ecb']) {
    const err = invalidArgument(t, () => compileCipherSpec('luks', { cipher }), /^unsupported cipher/, cipher);
    t.regex(err?.hint ?? '', /aes-xts-plain64, serpent-xts-plain64, twofish-xts-plain64/);
  }
  const long = 'z'.repeat(5000);
  const err = invalidArgument(t, () => compileCipherSpec('luks', { cipher: long }), /^unsupported cipher/);
  t.true((err?.message.length ?? Infinity) < 100, 'a long cipher name is not echoed in full');
});

test('compileCipherSpec rejects key sizes other than 256 and 512 bits', (t) => {
  for (const keySizeBits of [128, 192, 384, 511, 1024, -256, 256.5]) {
    invalidArgument(t, () => compileCipherSpec('luks2', { keySizeBits }), /key size must be 256 or 512/, String(keySizeBits));
  }
});

test('compileCipherSpec rejects sector sizes other than 512 and 4096', (t) => {
  for (const sectorSize of [1, 1024, 2048, 8192, -512]) {
    invalidArgument(t, () => compileCipherSpec('luks2', { sectorSize }), /sector size must be 512 or 4096/, String(sectorSize));
  }
});

test('sector size 4096 is rejected for luks and qcow2-luks but allowed for luks2 and plain', (t) => {
  invalidArgument(t, () => compileCipherSpec('luks', { sectorSize: 4096 }), /sector size is fixed at 512 for format luks/);
  invalidArgument(t, () => compileCipherSpec('qcow2-luks', { sectorSize: 4096 }), /sector size is fixed at 512 for format qcow2-luks/);
  t.is(compileCipherSpec('luks2', { sectorSize: 4096 }).sectorSize, 4096);
  t.is(compileCipherSpec('plain', { sectorSize: 4096 }).sectorSize, 4096);
  t.is(compileCipherSpec('luks', { sectorSize: 512 }).sectorSize, 512);
});

// --- secretLength

test('secretLength is 32 for LUKS-type formats and keySizeBits/8 for plain', (t) => {
  t.is(PASSPHRASE_BYTES, 32);
  for (const format of ['luks', 'qcow2-luks', 'luks2'] as const) {
    t.is(secretLength(format, compileCipherSpec(format, { keySizeBits: 512 })), 32, format);
    t.is(secretLength(format, compileCipherSpec(format, { keySizeBits: 256 })), 32, format);
  }
  t.is(secretLength('plain', compileCipherSpec('plain', { keySizeBits: 512 })), 64);
  t.is(secretLength('plain', compileCipherSpec('plain', { keySizeBits: 256 })), 32);
  t.is(secretLength('plain', compileCipherSpec('plain', {})), 64);
});

// --- pageSize

test('pageSize: 0 means 100; values are clamped to [1, 1000]', (t) => {
  t.is(pageSize(0), 100);
  t.is(pageSize(1), 1);
  t.is(pageSize(50), 50);
  t.is(pageSize(100), 100);
  t.is(pageSize(1000), 1000);
  t.is(pageSize(1001), 1000);
  t.is(pageSize(4_294_967_295), 1000);
  t.is(pageSize(-5), 1);
});
