/**
 * Shamir secret sharing (server/src/master-key/shamir.ts) and the Shamir sealer's share
 * encoding and collection (shamir-sealer.ts): GF(2^8) known answers from FIPS-197,
 * hand-computed split vectors, reconstruction properties, and the refusals a share holder
 * meets (mistyped, wrong, foreign, duplicated, too few).
 */
import test from 'ava';
import { generateWrappingKey } from '../../shared/src/envelope.js';
import { DomainError } from '../../shared/src/errors.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { combineShares, gfInv, gfMul, splitSecret, type ShamirShare } from '../../server/src/master-key/shamir.js';
import {
  ShareCollector,
  collectShares,
  decodeShare,
  encodeShare,
  newShamirSealer,
  shamirRecordSealer,
  unsealWithCollector,
  type EncodedShare,
  type ShareSource,
} from '../../server/src/master-key/shamir-sealer.js';
import type { ShamirSealedMasterKey } from '../../server/src/master-key/sealers.js';
import { randomBytes } from 'node:crypto';

test.before(async () => {
  await loadSodium();
});

test('GF(2^8) multiplication and inversion match FIPS-197 known answers', (t) => {
  // FIPS-197 section 4.2: {57} * {83} = {c1}, {57} * {13} = {fe}.
  t.is(gfMul(0x57, 0x83), 0xc1);
  t.is(gfMul(0x57, 0x13), 0xfe);
  // Section 5.1.1: the S-box input {53} has the inverse {ca}.
  t.is(gfInv(0x53), 0xca);
  for (let a = 1; a < 256; a++) t.is(gfMul(a, gfInv(a)), 1, `inverse of ${a}`);
  for (let a = 0; a < 256; a++) t.is(gfMul(a, 1), a);
});

test('split with fixed coefficients gives hand-computed shares', (t) => {
  // k = 2: f(x) = 0x2a + 7x; 7*1 = 07, 7*2 = 0e, 7*3 = 09.
  const two = splitSecret(Buffer.from([0x2a]), 2, 3, () => Buffer.from([0x07]));
  t.deepEqual(two.map((s) => s.value[0]), [0x2d, 0x24, 0x23]);
  // k = 3: f(x) = 1 + 2x + 3x^2: f(1) = 0, f(2) = 1^4^0c = 09, f(3) = 1^06^0f = 08.
  const three = splitSecret(Buffer.from([0x01]), 3, 3, () => Buffer.from([0x02, 0x03]));
  t.deepEqual(three.map((s) => [s.index, s.value[0]]), [[1, 0x00], [2, 0x09], [3, 0x08]]);
  t.deepEqual([...combineShares(three)], [0x01]);
});

function subsets<T>(items: T[], size: number): T[][] {
  if (size === 0) return [[]];
  if (items.length < size) return [];
  const [first, ...rest] = items;
  return [...subsets(rest, size - 1).map((s) => [first!, ...s]), ...subsets(rest, size)];
}

test('any k of n shares rebuild the secret; k-1 do not', (t) => {
  for (const [k, n] of [[1, 1], [2, 2], [2, 3], [3, 5], [4, 7], [5, 5]] as const) {
    const secret = randomBytes(32);
    const shares = splitSecret(secret, k, n);
    t.is(shares.length, n);
    for (const subset of subsets(shares, k)) t.deepEqual(combineShares(subset), secret, `${k}-of-${n}`);
    if (k > 1) for (const subset of subsets(shares, k - 1)) t.notDeepEqual(combineShares(subset), secret, `${k - 1} shares of a ${k}-of-${n} split`);
  }
  const big = splitSecret(randomBytes(32), 2, 255);
  t.is(big[254]!.index, 255);
});

test('one share of a 2-of-n split is consistent with every possible secret byte', (t) => {
  // Perfect secrecy, checked exhaustively for one byte: for share (1, y) and every
  // candidate secret s there is exactly one coefficient c with s + c*1 = y.
  const share = splitSecret(Buffer.from([0x5c]), 2, 2)[0]!;
  const consistent = new Set<number>();
  for (let s = 0; s < 256; s++) {
    for (let c = 0; c < 256; c++) if ((s ^ gfMul(c, share.index)) === share.value[0]) consistent.add(s);
  }
  t.is(consistent.size, 256);
});

test('bad parameters and bad share sets are refused', (t) => {
  const bad = (fn: () => unknown) => t.throws(fn, { instanceOf: DomainError });
  bad(() => splitSecret(Buffer.alloc(32), 0, 3));
  bad(() => splitSecret(Buffer.alloc(32), 4, 3));
  bad(() => splitSecret(Buffer.alloc(32), 2, 256));
  bad(() => splitSecret(Buffer.alloc(0), 2, 3));
  const shares = splitSecret(randomBytes(32), 2, 3);
  bad(() => combineShares([shares[0]!, shares[0]!]));
  bad(() => combineShares([]));
  bad(() => combineShares([shares[0]!, { index: 2, value: Buffer.alloc(31) } as ShamirShare]));
  bad(() => combineShares([{ index: 0, value: Buffer.alloc(32) }]));
});

test('a share text round-trips, ignoring case, dashes and spaces', (t) => {
  const setId = randomBytes(8);
  const value = randomBytes(32);
  const text = encodeShare(setId, 7, value);
  t.regex(text.toString('latin1'), /^vkms1(-[a-z2-7]{1,4})+$/);
  const back = decodeShare(text);
  t.is(back.index, 7);
  t.is(back.setId, setId.toString('hex'));
  t.deepEqual(back.value, value);
  const sloppy = Buffer.from(`  ${text.toString('latin1').toUpperCase().replace(/-/g, ' ')}\r\n`);
  t.deepEqual(decodeShare(sloppy).value, value);
});

test('a mistyped, truncated or foreign text is refused without echoing it', (t) => {
  const text = encodeShare(randomBytes(8), 2, randomBytes(32));
  const s = text.toString('latin1');
  // Change one base32 character of the body (after "vkms1-").
  const i = 12;
  const typo = Buffer.from(s.slice(0, i) + (s[i] === 'a' ? 'b' : 'a') + s.slice(i + 1));
  const e1 = t.throws(() => decodeShare(typo), { instanceOf: DomainError });
  t.is(e1?.kind, 'invalid_argument');
  t.regex(e1!.message, /mistyped.*checksum/);
  t.false(e1!.message.includes(s.slice(6, 20)));
  t.regex(t.throws(() => decodeShare(Buffer.from(s.slice(0, -3))))!.message, /too few characters/);
  t.regex(t.throws(() => decodeShare(Buffer.from(s.replace(/.$/, '1'))))!.message, /character that is not used/);
  t.regex(t.throws(() => decodeShare(Buffer.from('correct horse battery staple')))!.message, /not a virtkm unseal share/);
});

async function newSet(k: number, n: number): Promise<{ record: ShamirSealedMasterKey; shares: Buffer[]; key: ReturnType<typeof generateWrappingKey> }> {
  const delivered: Buffer[] = [];
  const sealer = newShamirSealer({
    threshold: k,
    shares: n,
    deliver: (list: readonly EncodedShare[]) => {
      for (const s of list) delivered.push(Buffer.from(s.text));
      return Promise.resolve();
    },
  });
  const key = generateWrappingKey();
  const record = (await sealer.seal(key)) as ShamirSealedMasterKey;
  sealer.dispose();
  return { record, shares: delivered, key };
}

test('a 3-of-5 record: any three shares unseal it; refused shares do not spoil the others', async (t) => {
  const { record, shares, key } = await newSet(3, 5);
  t.is(record.sealer, 'shamir');
  t.is(record.params.commitments.length, 5);
  t.false(JSON.stringify(record).includes(shares[0]!.toString('latin1').slice(6, 30)), 'no share text in the record');

  const c = new ShareCollector(record);
  t.like(c.submit(shares[4]!), { index: 5, received: 1, threshold: 3 });
  // Too few.
  t.is(t.throws(() => c.combine(), { instanceOf: DomainError })?.kind, 'failed_precondition');
  // Duplicate (even re-typed in upper case).
  const dup = t.throws(() => c.submit(Buffer.from(shares[4]!.toString('latin1').toUpperCase())), { instanceOf: DomainError });
  t.is(dup?.kind, 'already_exists');
  t.regex(dup!.message, /share 5 has already been submitted/);
  // A share of another set.
  const other = await newSet(3, 5);
  const foreign = t.throws(() => c.submit(other.shares[1]!), { instanceOf: DomainError });
  t.is(foreign?.kind, 'unauthenticated');
  t.regex(foreign!.message, /share 2 belongs to another share set/);
  // A well-formed share (right set, valid checksum) with a wrong value.
  const forged = encodeShare(Buffer.from(record.params.setId, 'hex'), 2, randomBytes(32));
  const wrong = t.throws(() => c.submit(forged), { instanceOf: DomainError });
  t.is(wrong?.kind, 'unauthenticated');
  t.regex(wrong!.message, /share 2 is wrong/);
  t.is(c.progress().received, 1, 'refused shares changed nothing');

  c.submit(shares[1]!);
  t.false(c.complete);
  c.submit(shares[2]!);
  t.true(c.complete);
  const unsealed = await unsealWithCollector(record, c);
  t.deepEqual(Buffer.from(unsealed.bytes), Buffer.from(key.bytes));
  t.deepEqual(Buffer.from(unsealed.id), Buffer.from(key.id));
  t.is(c.progress().received, 0, 'shares are forgotten after combining');
});

test('offline collection names the bad share by position and a record sealer reseals under the same split', async (t) => {
  const { record, shares, key } = await newSet(2, 3);
  const files = (list: Buffer[]): ShareSource => {
    let i = 0;
    return { next: () => Promise.resolve(list[i] ? Buffer.from(list[i++]!) : undefined), refused: () => false };
  };
  const bad = Buffer.from(shares[0]!);
  bad[10] = bad[10] === 0x61 ? 0x62 : 0x61;
  const e = await t.throwsAsync(collectShares(record, files([shares[1]!, bad])), { instanceOf: DomainError });
  t.regex(e!.message, /^share #2 given: the share is mistyped/);
  const few = await t.throwsAsync(collectShares(record, files([shares[1]!])), { instanceOf: DomainError });
  t.regex(few!.message, /1 of the 2 shares needed/);

  const sealer = shamirRecordSealer(files([shares[2]!, shares[0]!]));
  const k1 = await sealer.unseal(record);
  t.deepEqual(Buffer.from(k1.bytes), Buffer.from(key.bytes));
  // Rotation: a new master key under the same split; the same shares open it.
  const next = generateWrappingKey();
  const rec2 = (await sealer.seal(next)) as ShamirSealedMasterKey;
  sealer.dispose();
  t.deepEqual(rec2.params, record.params);
  t.not(rec2.keyId, record.keyId);
  const again = shamirRecordSealer(files([shares[0]!, shares[1]!]));
  t.deepEqual(Buffer.from((await again.unseal(rec2)).bytes), Buffer.from(next.bytes));
});
