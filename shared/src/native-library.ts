/**
 * A system library called through koffi, loaded once, lazily and synchronously (koffi is
 * CommonJS, so `require`, not `import`). The first call of `get()` runs `bind` with koffi
 * and the opened library; its result is kept. A failure is kept too: later calls do not
 * retry, and `error()` says what went wrong (never a secret: library and symbol names).
 */
import { createRequire } from 'node:module';
import type * as Koffi from 'koffi';

export interface NativeLibrary<T> {
  /** The bound functions, or undefined when the library did not load. */
  get(): T | undefined;
  /** Why the library did not load (after a failed `get()`), or undefined. */
  error(): string | undefined;
}

export function nativeLibrary<T>(file: string, bind: (koffi: typeof Koffi, lib: Koffi.LibraryHandle) => T): NativeLibrary<T> {
  let bound: T | undefined;
  let failure: string | undefined;
  return {
    get() {
      if (bound === undefined && failure === undefined) {
        try {
          const koffi = createRequire(import.meta.url)('koffi') as typeof Koffi;
          bound = bind(koffi, koffi.load(file));
        } catch (err) {
          failure = err instanceof Error ? err.message : String(err);
        }
      }
      return bound;
    },
    error: () => failure,
  };
}
