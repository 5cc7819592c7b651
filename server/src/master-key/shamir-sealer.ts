/**
 * The Shamir k-of-n sealer: the master key is sealed (sealers.ts: sealUnderKek) under a
 * random 32-byte KEK, and the KEK, not the master key, is split into n shares (shamir.ts)
 * of which any k rebuild it.
 *
 * Why split a KEK rather than the master key itself: the record keeps the one format of
 * every sealer (public key id, authenticated envelope, KEK id telling "wrong key" from
 * "damaged"), and a master key rotation (rotate-master-key) seals the new master key under
 * the same KEK, so share holders keep the shares they have. New shares come only from a
 * reseal (`reseal --to shamir`), which draws a new KEK.
 *
 * A share as a person sees it (text, shown once):
 *
 *   vkms1-xxxx-xxxx-...       base32 (RFC 4648 alphabet, lower case, no padding) of
 *   version (1) || set id (8) || index (1) || value (32) || checksum (4)
 *
 * - the checksum (BLAKE2b of the bytes before it, first 4 bytes) catches a mistyped or
 *   truncated share on its own, before anything is compared with secrets;
 * - the set id (random per split, public, also in the record) tells a share of another
 *   server or of an older split apart;
 * - the record holds a commitment to every share, BLAKE2b-256 keyed with a fixed context
 *   over set id || index || value. A share is high-entropy (32 random-looking bytes), so
 *   its commitment reveals nothing usable; it lets each share be checked alone, so a
 *   wrong share is refused by number and never spoils the shares already received.
 *
 * Share texts are bytes (Buffers) from end to end, never JS strings, and are wiped after
 * use. They never appear in logs or error messages: errors name a share by its index.
 */
import { timingSafeEqual } from 'node:crypto';
import { DomainError } from '../../../shared/src/errors.js';
import type { WrappingKey } from '../../../shared/src/envelope.js';
import { loadSodium, sodium } from '../../../shared/src/sodium.js';
import { ownedCopy, randomSecret, wipe } from '../../../shared/src/secret-bytes.js';
import { combineShares, checkThreshold, splitSecret, type ShamirShare } from './shamir.js';
import { openSecretFile, readBounded } from './secret-files.js';
import {
  KEK_LENGTH,
  SEALED_MASTER_KEY_FORMAT,
  SEALED_MASTER_KEY_VERSION,
  kekWrappingKey,
  parseSealedMasterKey,
  sealUnderKek,
  unsealUnderKek,
  wrongSealer,
  type MasterKeySealer,
  type SealedMasterKey,
  type ShamirSealParams,
  type ShamirSealedMasterKey,
} from './sealers.js';

/** Text prefix of every share (format version 1). */
export const SHARE_PREFIX = 'vkms1';
const SHARE_FORMAT_VERSION = 1;
const SET_ID_LENGTH = 8;
const CHECKSUM_LENGTH = 4;
/** Bytes of a decoded share: version, set id, index, value, checksum. */
const SHARE_BYTES = 1 + SET_ID_LENGTH + 1 + KEK_LENGTH + CHECKSUM_LENGTH;
const BASE32 = 'abcdefghijklmnopqrstuvwxyz234567';
/** Base32 characters of a share's bytes. */
const SHARE_CHARS = Math.ceil((SHARE_BYTES * 8) / 5);
/** Longest share text accepted (prefix, characters, separators, line ends, some slack). */
export const MAX_SHARE_TEXT = 256;
const COMMITMENT_CONTEXT = Buffer.from('virtkm/v1/shamir-share-commitment', 'utf8');
const CHECKSUM_CONTEXT = Buffer.from('virtkm/v1/shamir-share-checksum', 'utf8');

/** A decoded share. `value` is secret: the caller wipes it. */
export interface DecodedShare {
  /** Hex of the set id. */
  setId: string;
  index: number;
  value: Buffer;
}

/** A new share to hand to its holder: index and text (secret bytes, wiped after delivery). */
export interface EncodedShare {
  index: number;
  text: Buffer;
}

/** Public facts of a share set, shown next to the shares. */
export interface ShareSetInfo {
  setId: string;
  threshold: number;
  shares: number;
}

function checksumOf(bytes: Uint8Array): Uint8Array {
  return sodium().crypto_generichash(16, bytes, CHECKSUM_CONTEXT).subarray(0, CHECKSUM_LENGTH);
}

function commitmentOf(setId: Uint8Array, index: number, value: Uint8Array): string {
  const input = Buffer.allocUnsafeSlow(SET_ID_LENGTH + 1 + value.length);
  try {
    input.set(setId, 0);
    input[SET_ID_LENGTH] = index;
    input.set(value, SET_ID_LENGTH + 1);
    return Buffer.from(sodium().crypto_generichash(32, input, COMMITMENT_CONTEXT)).toString('hex');
  } finally {
    wipe(input);
  }
}

/** Encodes a share as text bytes (see module comment). The caller wipes the result. */
export function encodeShare(setId: Uint8Array, index: number, value: Uint8Array): Buffer {
  if (setId.length !== SET_ID_LENGTH || value.length !== KEK_LENGTH || index < 1 || index > 255) throw new RangeError('bad share');
  const raw = Buffer.allocUnsafeSlow(SHARE_BYTES);
  const chars = Buffer.allocUnsafeSlow(SHARE_CHARS);
  try {
    raw[0] = SHARE_FORMAT_VERSION;
    raw.set(setId, 1);
    raw[1 + SET_ID_LENGTH] = index;
    raw.set(value, 2 + SET_ID_LENGTH);
    raw.set(checksumOf(raw.subarray(0, SHARE_BYTES - CHECKSUM_LENGTH)), SHARE_BYTES - CHECKSUM_LENGTH);
    // Base32 by hand over bytes, so the secret never becomes a JS string.
    let acc = 0;
    let bits = 0;
    let n = 0;
    for (const byte of raw) {
      acc = ((acc << 8) | byte) & 0xffff;
      bits += 8;
      while (bits >= 5) {
        chars[n++] = BASE32.charCodeAt((acc >> (bits - 5)) & 31);
        bits -= 5;
      }
    }
    if (bits > 0) chars[n++] = BASE32.charCodeAt((acc << (5 - bits)) & 31);
    // "vkms1-" then groups of four characters joined by "-", for reading aloud and typing.
    const groups = Math.ceil(n / 4);
    const out = Buffer.allocUnsafeSlow(SHARE_PREFIX.length + groups + n);
    let o = out.write(SHARE_PREFIX, 0, 'latin1');
    for (let i = 0; i < n; i++) {
      if (i % 4 === 0) out[o++] = 0x2d;
      out[o++] = chars[i]!;
    }
    return out;
  } finally {
    wipe(raw, chars);
  }
}

function mistyped(what: string): DomainError {
  return new DomainError('invalid_argument', `the share is mistyped or damaged: ${what}`, { hint: 'check the share against the copy you were given, character by character' });
}

/**
 * Decodes a share text (upper or lower case; "-", spaces and line ends ignored). A text
 * that is not a share, is truncated or fails its checksum is invalid_argument, with no
 * part of the text in the message.
 */
export function decodeShare(text: Uint8Array): DecodedShare {
  if (text.length > MAX_SHARE_TEXT) throw mistyped('it is too long');
  const clean = Buffer.allocUnsafeSlow(text.length);
  const raw = Buffer.allocUnsafeSlow(SHARE_BYTES + 1);
  try {
    let m = 0;
    for (const c of text) {
      if (c === 0x2d || c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) continue;
      clean[m++] = c >= 0x41 && c <= 0x5a ? c + 0x20 : c;
    }
    if (m < SHARE_PREFIX.length || clean.toString('latin1', 0, SHARE_PREFIX.length) !== SHARE_PREFIX) {
      throw new DomainError('invalid_argument', `this is not a virtkm unseal share (a share starts with ${SHARE_PREFIX}-)`);
    }
    const body = clean.subarray(SHARE_PREFIX.length, m);
    if (body.length !== SHARE_CHARS) throw mistyped(`it has ${body.length < SHARE_CHARS ? 'too few' : 'too many'} characters`);
    let acc = 0;
    let bits = 0;
    let n = 0;
    for (const c of body) {
      const v = c >= 0x61 && c <= 0x7a ? c - 0x61 : c >= 0x32 && c <= 0x37 ? c - 0x32 + 26 : -1;
      if (v < 0) throw mistyped('it holds a character that is not used in shares');
      acc = ((acc << 5) | v) & 0xffff;
      bits += 5;
      if (bits >= 8) {
        raw[n++] = (acc >> (bits - 8)) & 0xff;
        bits -= 8;
      }
    }
    if (n !== SHARE_BYTES || (acc & ((1 << bits) - 1)) !== 0) throw mistyped('its length is wrong');
    const expected = checksumOf(raw.subarray(0, SHARE_BYTES - CHECKSUM_LENGTH));
    if (!timingSafeEqual(Buffer.from(expected), raw.subarray(SHARE_BYTES - CHECKSUM_LENGTH, SHARE_BYTES))) throw mistyped('its checksum does not match');
    if (raw[0] !== SHARE_FORMAT_VERSION) throw new DomainError('invalid_argument', 'the share has a format this server does not know');
    const index = raw[1 + SET_ID_LENGTH]!;
    if (index === 0) throw mistyped('its index is 0');
    return {
      setId: raw.toString('hex', 1, 1 + SET_ID_LENGTH),
      index,
      value: ownedCopy(raw.subarray(2 + SET_ID_LENGTH, 2 + SET_ID_LENGTH + KEK_LENGTH)),
    };
  } finally {
    wipe(clean, raw);
  }
}

/** Progress of an unseal. */
export interface UnsealProgress {
  threshold: number;
  shares: number;
  received: number;
  /** Indices received so far (public). */
  indices: number[];
}

/**
 * Collects shares for one Shamir record, in memory only. Each share is checked alone
 * (checksum, set, index, commitment); a refused share changes nothing. `combine()` rebuilds
 * the KEK once the threshold is reached and forgets every share.
 */
export class ShareCollector {
  readonly #record: ShamirSealedMasterKey;
  readonly #setId: Buffer;
  #shares = new Map<number, Buffer>();

  constructor(record: ShamirSealedMasterKey) {
    this.#record = record;
    this.#setId = Buffer.from(record.params.setId, 'hex');
  }

  /** Current progress. */
  progress(): UnsealProgress {
    const { threshold, shares } = this.#record.params;
    return { threshold, shares, received: this.#shares.size, indices: [...this.#shares.keys()].sort((a, b) => a - b) };
  }

  /** True once `threshold` valid shares are in. */
  get complete(): boolean {
    return this.#shares.size >= this.#record.params.threshold;
  }

  /**
   * Checks and keeps one share (the caller keeps ownership of `text` and wipes it).
   * Mistyped: invalid_argument. Another set, index out of range, or not matching its
   * commitment: unauthenticated, naming the index. Already received: already_exists.
   */
  submit(text: Uint8Array): UnsealProgress & { index: number } {
    const share = decodeShare(text);
    try {
      const { shares, commitments } = this.#record.params;
      if (share.setId !== this.#record.params.setId) {
        throw new DomainError('unauthenticated', `share ${share.index} belongs to another share set, not to this master key`, {
          hint: 'shares from before the last reseal, or of another server, do not count',
        });
      }
      if (share.index > shares) throw new DomainError('unauthenticated', `share ${share.index} does not exist: this set has ${shares} shares`);
      const expected = Buffer.from(commitments[share.index - 1]!, 'hex');
      if (!timingSafeEqual(expected, Buffer.from(commitmentOf(this.#setId, share.index, share.value), 'hex'))) {
        throw new DomainError('unauthenticated', `share ${share.index} is wrong: it does not match this master key`);
      }
      if (this.#shares.has(share.index)) {
        throw new DomainError('already_exists', `share ${share.index} has already been submitted`, { hint: 'each share counts once; another holder must submit theirs' });
      }
      if (this.complete) throw new DomainError('failed_precondition', 'enough shares have already been submitted');
      this.#shares.set(share.index, share.value);
      return { ...this.progress(), index: share.index };
    } catch (err) {
      wipe(share.value);
      throw err;
    }
  }

  /**
   * Rebuilds the KEK from the shares received (failed_precondition when fewer than the
   * threshold) and forgets the shares. The caller wipes the KEK.
   */
  combine(): Buffer {
    const { threshold, shares } = this.#record.params;
    if (!this.complete) {
      throw new DomainError('failed_precondition', `${this.#shares.size} of the ${threshold} shares needed have been given (a ${threshold}-of-${shares} set)`, {
        hint: `${threshold - this.#shares.size} more share holder(s) must submit their share`,
      });
    }
    const list: ShamirShare[] = [...this.#shares].map(([index, value]) => ({ index, value }));
    try {
      return combineShares(list);
    } finally {
      this.clear();
    }
  }

  /** Wipes and forgets every share received. */
  clear(): void {
    for (const v of this.#shares.values()) wipe(v);
    this.#shares.clear();
  }
}

/** Opens a Shamir record with a rebuilt KEK (owned by the caller). Returns an owned master key. */
export async function unsealShamirRecord(record: ShamirSealedMasterKey, kek: Uint8Array): Promise<WrappingKey> {
  const wk = await kekWrappingKey(kek);
  // The commitments matched, so a KEK that is not the record's means the record was edited.
  return unsealUnderKek(record, wk, () => new DomainError('failed_precondition', 'the shares do not rebuild the key that sealed this master key', { hint: 'master-key.json may have been altered: restore it from a backup' }));
}

/** Where shares come from when unsealing offline (reseal, rotate-master-key). */
export interface ShareSource {
  /**
   * The next share text, or undefined when there are no more. The collector takes
   * ownership of the bytes and wipes them.
   */
  next(progress: UnsealProgress): Promise<Uint8Array | undefined>;
  /** A share was refused: true to go on (a person typing), false to stop (files). */
  refused(err: DomainError, position: number): boolean;
}

/** Reads shares from files (owner-only mode, like every secret file); stops at the first bad one. */
export function shareFilesSource(paths: readonly string[]): ShareSource {
  let i = 0;
  return {
    async next() {
      const path = paths[i++];
      if (path === undefined) return undefined;
      const { handle } = await openSecretFile(path, `share file ${i}`);
      try {
        const read = await readBounded(handle, MAX_SHARE_TEXT);
        if (read.tooLong) {
          wipe(read.buf);
          throw mistyped(`share file ${i} is too long to hold one share`);
        }
        const text = ownedCopy(read.buf.subarray(0, read.length));
        wipe(read.buf);
        return text;
      } finally {
        await handle.close();
      }
    },
    refused: () => false,
  };
}

/**
 * Asks for shares on the terminal without echo (`ask` is shared/src/passphrase.ts's
 * promptPassphrase), saying how many are in; a refused share is reported and asked again,
 * at most `maxRefusals` times in all.
 */
export function sharePromptSource(ask: (prompt: string) => Promise<Buffer>, report: (line: string) => void, maxRefusals = 3): ShareSource {
  let refusals = 0;
  return {
    next: (p) => ask(`unseal share (${p.received} of ${p.threshold} given): `),
    refused(err) {
      report(`share refused: ${err.message}`);
      return ++refusals < maxRefusals;
    },
  };
}

/**
 * Collects shares from `source` until the record's threshold is reached and rebuilds the
 * KEK (owned by the caller). A refused share names its position among those given.
 */
export async function collectShares(record: ShamirSealedMasterKey, source: ShareSource): Promise<Buffer> {
  const collector = new ShareCollector(record);
  let position = 0;
  try {
    while (!collector.complete) {
      const text = await source.next(collector.progress());
      if (text === undefined) return collector.combine(); // fails with "k of n given"
      position++;
      try {
        collector.submit(text);
      } catch (err) {
        if (!(err instanceof DomainError)) throw err;
        if (source.refused(err, position)) continue;
        throw new DomainError(err.kind, `share ${ordinal(position)} given: ${err.message}`, err.hint ? { hint: err.hint } : {});
      } finally {
        wipe(text);
      }
    }
    return collector.combine();
  } finally {
    collector.clear();
  }
}

function ordinal(n: number): string {
  return `#${n}`;
}

/** A sealer that can also be told to forget the secret it holds. */
export interface DisposableSealer extends MasterKeySealer {
  /** Wipes any KEK held; the sealer is unusable afterwards. */
  dispose(): void;
}

function recordOf(params: ShamirSealParams, sealed: { keyId: string; envelope: string }): ShamirSealedMasterKey {
  return { format: SEALED_MASTER_KEY_FORMAT, version: SEALED_MASTER_KEY_VERSION, sealer: 'shamir', keyId: sealed.keyId, params, envelope: sealed.envelope };
}

/** Options of a new Shamir split. */
export interface NewShamirOptions {
  threshold: number;
  shares: number;
  /**
   * Receives the new shares once, to show or write them. Their text is wiped when it
   * returns. Called by the first seal() only; later seals reuse the same split.
   */
  deliver: (shares: readonly EncodedShare[], set: ShareSetInfo) => Promise<void>;
}

/**
 * A sealer that draws a new KEK, splits it k-of-n and seals the master key under it. It
 * cannot unseal (shares are needed: shamirRecordSealer).
 */
export function newShamirSealer(o: NewShamirOptions): DisposableSealer {
  checkThreshold(o.threshold, o.shares);
  let kek: Buffer | undefined;
  let params: ShamirSealParams | undefined;
  let disposed = false;
  return {
    kind: 'shamir',
    async seal(masterKey) {
      if (disposed) throw new Error('sealer used after dispose');
      await loadSodium();
      if (!kek || !params) {
        const fresh = randomSecret(KEK_LENGTH);
        const setId = randomSecret(SET_ID_LENGTH);
        const shares = splitSecret(fresh, o.threshold, o.shares);
        const encoded: EncodedShare[] = [];
        try {
          const commitments = shares.map((s) => commitmentOf(setId, s.index, s.value));
          for (const s of shares) encoded.push({ index: s.index, text: encodeShare(setId, s.index, s.value) });
          const nextParams: ShamirSealParams = { scheme: 'shamir-gf256', threshold: o.threshold, shares: o.shares, setId: setId.toString('hex'), commitments };
          // Seal before delivering: shares are never shown for a record that failed.
          const sealed = recordOf(nextParams, sealUnderKek(masterKey, await kekWrappingKey(fresh)));
          await o.deliver(encoded, { setId: nextParams.setId, threshold: o.threshold, shares: o.shares });
          kek = fresh;
          params = nextParams;
          return sealed;
        } catch (err) {
          wipe(fresh);
          throw err;
        } finally {
          for (const s of shares) wipe(s.value);
          for (const e of encoded) wipe(e.text);
        }
      }
      return recordOf(params, sealUnderKek(masterKey, await kekWrappingKey(kek)));
    },
    unseal(sealed: SealedMasterKey): Promise<WrappingKey> {
      return Promise.reject(new DomainError('failed_precondition', sealed.sealer === 'shamir' ? 'unsealing needs the shares' : wrongSealer('shamir', sealed).message));
    },
    dispose() {
      disposed = true;
      wipe(kek);
    },
  };
}

/**
 * A sealer bound to an existing Shamir record: unseal() collects shares from `source` and
 * rebuilds the KEK, which it then keeps, so seal() can seal another master key under the
 * same split (master key rotation: share holders keep their shares). dispose() wipes it.
 */
export function shamirRecordSealer(source: ShareSource): DisposableSealer {
  let kek: Buffer | undefined;
  let params: ShamirSealParams | undefined;
  return {
    kind: 'shamir',
    async seal(masterKey) {
      if (!kek || !params) throw new DomainError('failed_precondition', 'the shares must be given (unseal) before sealing under the same split');
      return recordOf(params, sealUnderKek(masterKey, await kekWrappingKey(kek)));
    },
    async unseal(sealed) {
      if (sealed.sealer !== 'shamir') throw wrongSealer('shamir', sealed);
      const checked = parseSealedMasterKey(sealed);
      if (checked.sealer !== 'shamir') throw wrongSealer('shamir', sealed);
      await loadSodium();
      if (!kek) kek = await collectShares(checked, source);
      const key = await unsealShamirRecord(checked, kek);
      params = checked.params;
      return key;
    },
    dispose() {
      wipe(kek);
      kek = undefined;
    },
  };
}

/** Unseals a record straight from shares already collected online (run's sealed mode). */
export async function unsealWithCollector(record: ShamirSealedMasterKey, collector: ShareCollector): Promise<WrappingKey> {
  const kek = collector.combine();
  try {
    return await unsealShamirRecord(record, kek);
  } finally {
    wipe(kek);
  }
}
