/**
 * libsodium (the sumo build, which has Argon2id) behind one awaited initialisation.
 * Call `loadSodium()` once at start-up; afterwards `sodium()` returns the ready instance.
 */
import sodiumModule from 'libsodium-wrappers-sumo';

type Sodium = typeof sodiumModule;

let ready = false;

/** Waits until libsodium's WebAssembly is initialised. Idempotent. */
export async function loadSodium(): Promise<Sodium> {
  await sodiumModule.ready;
  ready = true;
  return sodiumModule;
}

/** The initialised libsodium; throws when `loadSodium()` has not completed. */
export function sodium(): Sodium {
  if (!ready) throw new Error('libsodium used before loadSodium() completed');
  return sodiumModule;
}
