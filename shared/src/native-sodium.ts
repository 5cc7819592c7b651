/**
 * The few libsodium functions of the key-packet hot path, called in the system's native
 * libsodium (Debian package libsodium23) through koffi.
 *
 * Why not only libsodium-wrappers-sumo (WebAssembly), which the rest of virtkm uses:
 * - speed: one X25519 operation costs ~28 µs natively on the reference machine against
 *   ~55 µs through OpenSSL's key objects (node:crypto) and more in WebAssembly, and a
 *   crypto_box_seal needs two of them per key release (docs/benchmarks.md, run G);
 * - hygiene: the WebAssembly build copies every argument into its own heap and frees it
 *   without zeroing, so a sealing key would linger there; here libsodium works directly on
 *   our Buffers, which we wipe.
 * Buffers are passed as pointers (koffi passes a TypedArray's memory, no copy), so every
 * output buffer must be allocated by the caller at its exact size.
 *
 * Loaded once, lazily and synchronously; `nativeSodium()` throws a clear error when the
 * library is missing. Works in worker threads too (each thread loads its own handle).
 */
import type * as Koffi from 'koffi';
import { nativeLibrary } from './native-library.js';

/** The library file of Debian 12's libsodium23 (ABI 23). */
const LIBRARY = 'libsodium.so.23';

/** Typed native calls. Return values are libsodium's (0 = success, -1 = refused). */
export interface NativeSodium {
  randomBytes(out: Uint8Array): void;
  /** q = X25519(n, base point). */
  scalarmultBase(q: Uint8Array, n: Uint8Array): number;
  /** k = HSalsa20(X25519(sk, pk), 0); -1 when pk is of small order (shared secret all zeros). */
  boxBeforenm(k: Uint8Array, pk: Uint8Array, sk: Uint8Array): number;
  /** out = BLAKE2b(input) with out.length bytes of output, no key. */
  generichash(out: Uint8Array, input: Uint8Array): number;
  /** c = XSalsa20-Poly1305(m) under k and nonce n (crypto_box_easy_afternm); c.length = m.length + 16. */
  boxEasyAfternm(c: Uint8Array, m: Uint8Array, n: Uint8Array, k: Uint8Array): number;
  /** c = crypto_box_seal(m, pk); c.length = m.length + 48; -1 when pk is of small order. */
  boxSeal(c: Uint8Array, m: Uint8Array, pk: Uint8Array): number;
}

/** The library, loaded once (native-library.ts). */
const library = nativeLibrary<NativeSodium>(LIBRARY, (_koffi, lib) => bind(lib));

/** The native functions; throws Error naming the missing package when libsodium cannot be loaded. */
export function nativeSodium(): NativeSodium {
  const n = library.get();
  if (n) return n;
  throw new Error(`native libsodium (${LIBRARY}) is not usable: ${library.error() ?? 'unknown'}; install the Debian package libsodium23`);
}

function bind(lib: Koffi.LibraryHandle): NativeSodium {
  const init = lib.func('int sodium_init(void)');
  // 0 = initialised now, 1 = already initialised; -1 = failure.
  if ((init() as number) < 0) throw new Error('sodium_init failed');
  const randombytes = lib.func('void randombytes_buf(void *buf, size_t size)');
  const scalarmultBase = lib.func('int crypto_scalarmult_base(void *q, const void *n)');
  const beforenm = lib.func('int crypto_box_beforenm(void *k, const void *pk, const void *sk)');
  const generichash = lib.func('int crypto_generichash(void *out, size_t outlen, const void *in, unsigned long long inlen, const void *key, size_t keylen)');
  const easyAfternm = lib.func('int crypto_box_easy_afternm(void *c, const void *m, unsigned long long mlen, const void *n, const void *k)');
  const seal = lib.func('int crypto_box_seal(void *c, const void *m, unsigned long long mlen, const void *pk)');
  const exact = (what: string, b: Uint8Array, n: number) => {
    if (b.length !== n) throw new RangeError(`${what} must be ${n} bytes`);
  };
  return {
    randomBytes(out) {
      randombytes(out, out.length);
    },
    scalarmultBase(q, n) {
      exact('X25519 output', q, 32);
      exact('X25519 scalar', n, 32);
      return scalarmultBase(q, n) as number;
    },
    boxBeforenm(k, pk, sk) {
      exact('box key', k, 32);
      exact('X25519 public key', pk, 32);
      exact('X25519 secret key', sk, 32);
      return beforenm(k, pk, sk) as number;
    },
    generichash(out, input) {
      if (out.length < 16 || out.length > 64) throw new RangeError('BLAKE2b output must be 16 to 64 bytes');
      return generichash(out, out.length, input, input.length, null, 0) as number;
    },
    boxEasyAfternm(c, m, n, k) {
      exact('box output', c, m.length + 16);
      exact('box nonce', n, 24);
      exact('box key', k, 32);
      return easyAfternm(c, m, m.length, n, k) as number;
    },
    boxSeal(c, m, pk) {
      exact('sealed output', c, m.length + 48);
      exact('X25519 public key', pk, 32);
      return seal(c, m, m.length, pk) as number;
    },
  };
}
