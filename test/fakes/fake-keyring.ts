/**
 * An in-memory stand-in for the agent's kernel keyring (shared/src/keyring.ts) for unit
 * tests of the reconciler: it keeps copies of the loaded keys by description and records
 * every call, so tests can check which keys are loaded and when they are unlinked.
 */
import { volumeKeyDescription } from '../../shared/src/keyring.js';
import type { KeyringPort } from '../../host-agent/src/reconcile/ports.js';

/** The fake and what it recorded. */
export interface FakeKeyring extends KeyringPort {
  /** Loaded keys by description (copies). */
  keys: Map<string, Buffer>;
  /** "load DESC" and "unlink DESC", in order. */
  calls: string[];
}

/** A fake keyring; `failLoad` makes load() behave like a keyring that cannot take keys. */
export function createFakeKeyring(options: { failLoad?: boolean } = {}): FakeKeyring {
  const keys = new Map<string, Buffer>();
  const calls: string[] = [];
  return {
    keys,
    calls,
    load(volumeId, keyVersion, secret) {
      if (options.failLoad) return undefined;
      const description = volumeKeyDescription(volumeId, keyVersion);
      keys.set(description, Buffer.from(secret));
      calls.push(`load ${description}`);
      return description;
    },
    retain(keep) {
      const dropped: string[] = [];
      for (const [description, key] of keys) {
        if (keep.has(description)) continue;
        key.fill(0);
        keys.delete(description);
        calls.push(`unlink ${description}`);
        dropped.push(description);
      }
      return dropped.sort();
    },
  };
}
