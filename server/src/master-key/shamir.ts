/**
 * Shamir's secret sharing over GF(2^8), byte by byte.
 *
 * The field is GF(2^8) with the AES reduction polynomial x^8 + x^4 + x^3 + x + 1 (0x11b),
 * so FIPS-197's worked examples serve as known answers for the arithmetic. Each byte of
 * the secret is the constant term of its own random polynomial of degree threshold-1;
 * share i (i = 1..count) holds that polynomial evaluated at x = i for every byte. Any
 * `threshold` shares give the secret back by Lagrange interpolation at x = 0; fewer give
 * no information about it (every value of the secret fits them equally well).
 *
 * Multiplication and inversion run without table look-ups or branches on the operands,
 * so their timing does not depend on secret bytes (a log/exp table would).
 *
 * The caller owns every buffer returned and wipes it; coefficients are wiped here.
 */
import { DomainError } from '../../../shared/src/errors.js';
import { randomSecret, wipe } from '../../../shared/src/secret-bytes.js';

/** Most shares a secret can be split into (x = 1..255; x = 0 is the secret). */
export const MAX_SHARES = 255;

/** One share: its x coordinate (1..255) and one field element per secret byte. */
export interface ShamirShare {
  readonly index: number;
  readonly value: Uint8Array;
}

/** Product in GF(2^8) mod 0x11b, constant-time in both operands. */
export function gfMul(a: number, b: number): number {
  let p = 0;
  let x = a & 0xff;
  let y = b & 0xff;
  for (let i = 0; i < 8; i++) {
    p ^= x & -(y & 1);
    // x * 2: shift and reduce by 0x1b when the high bit falls out, without a branch.
    x = ((x << 1) ^ (0x1b & -((x >> 7) & 1))) & 0xff;
    y >>= 1;
  }
  return p;
}

/** Multiplicative inverse in GF(2^8) (a^254); gfInv(0) is 0, which callers never use. */
export function gfInv(a: number): number {
  // a^254 = a^(2+4+8+16+32+64+128): square and multiply over a fixed chain.
  let square = gfMul(a, a); // a^2
  let result = square;
  for (let i = 0; i < 6; i++) {
    square = gfMul(square, square); // a^4, a^8, ..., a^128
    result = gfMul(result, square);
  }
  return result;
}

function invalid(message: string): DomainError {
  return new DomainError('invalid_argument', message);
}

/** Checks 1 <= threshold <= count <= 255 (invalid_argument otherwise). */
export function checkThreshold(threshold: number, count: number): void {
  if (!Number.isInteger(count) || count < 1 || count > MAX_SHARES) throw invalid(`the number of shares must be an integer from 1 to ${MAX_SHARES}`);
  if (!Number.isInteger(threshold) || threshold < 1 || threshold > count) throw invalid('the threshold must be an integer from 1 to the number of shares');
}

/**
 * Splits `secret` into `count` shares of which any `threshold` rebuild it. `random` is a
 * test seam for known-answer tests: production callers leave it out (CSPRNG).
 */
export function splitSecret(secret: Uint8Array, threshold: number, count: number, random: (n: number) => Uint8Array = randomSecret): ShamirShare[] {
  checkThreshold(threshold, count);
  if (secret.length === 0) throw invalid('the secret to split is empty');
  // coefficients[j * len + b]: coefficient of x^(j+1) in byte b's polynomial.
  const coefficients = random((threshold - 1) * secret.length);
  if (coefficients.length !== (threshold - 1) * secret.length) throw new RangeError('random source returned the wrong length');
  try {
    const shares: ShamirShare[] = [];
    for (let x = 1; x <= count; x++) {
      const value = Buffer.allocUnsafeSlow(secret.length);
      for (let b = 0; b < secret.length; b++) {
        // Horner: ((c_{k-1} x + c_{k-2}) x + ... + c_1) x + secret.
        let y = 0;
        for (let j = threshold - 2; j >= 0; j--) y = gfMul(y ^ coefficients[j * secret.length + b]!, x);
        value[b] = y ^ secret[b]!;
      }
      shares.push({ index: x, value });
    }
    return shares;
  } finally {
    wipe(coefficients);
  }
}

/**
 * Rebuilds the secret from shares (at least the threshold, which the caller knows: with
 * fewer the result is simply wrong). Indices must be distinct and 1..255, values of one
 * length; anything else is invalid_argument.
 */
export function combineShares(shares: readonly ShamirShare[]): Buffer {
  if (shares.length === 0) throw invalid('no shares to combine');
  const length = shares[0]!.value.length;
  const seen = new Set<number>();
  for (const s of shares) {
    if (!Number.isInteger(s.index) || s.index < 1 || s.index > MAX_SHARES) throw invalid(`share index ${s.index} is out of range`);
    if (seen.has(s.index)) throw invalid(`share ${s.index} is given twice`);
    if (s.value.length !== length || length === 0) throw invalid('shares differ in length');
    seen.add(s.index);
  }
  // Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); minus is xor here.
  const basis = shares.map((si) => {
    let num = 1;
    let den = 1;
    for (const sj of shares) {
      if (sj === si) continue;
      num = gfMul(num, sj.index);
      den = gfMul(den, sj.index ^ si.index);
    }
    return gfMul(num, gfInv(den));
  });
  const out = Buffer.allocUnsafeSlow(length);
  for (let b = 0; b < length; b++) {
    let acc = 0;
    for (let i = 0; i < shares.length; i++) acc ^= gfMul(shares[i]!.value[b]!, basis[i]!);
    out[b] = acc;
  }
  return out;
}
