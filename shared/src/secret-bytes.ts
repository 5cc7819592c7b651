/**
 * Helpers for secret byte buffers. Secrets are Uint8Array/Buffer, never strings, and are
 * zeroed as soon as they are no longer needed.
 *
 * randomSecret() and ownedCopy() take their bytes from locked memory outside the V8 heap
 * (shared/src/locked-memory.ts) once the process has enabled it (hardenProcess does), and
 * from the ordinary heap otherwise or when the locked arena cannot serve the request.
 */
import { randomFillSync } from 'node:crypto';
import { lockedAlloc } from './locked-memory.js';

/** Overwrites the bytes with zeros. Accepts undefined/null for convenience in finally blocks. */
export function wipe(...buffers: (Uint8Array | null | undefined)[]): void {
  for (const b of buffers) if (b) b.fill(0);
}

/** Fresh random bytes in a buffer of their own (never a slice of Node's shared pool). */
export function randomSecret(length: number): Buffer {
  const out = lockedAlloc(length) ?? Buffer.allocUnsafeSlow(length);
  randomFillSync(out);
  return out;
}

/** Copies bytes into a buffer of their own (not pooled), so wiping it wipes only it. */
export function ownedCopy(bytes: Uint8Array): Buffer {
  const out = lockedAlloc(bytes.length) ?? Buffer.allocUnsafeSlow(bytes.length);
  out.set(bytes);
  return out;
}

/** Runs fn with the secret and wipes the secret afterwards, whatever happens. */
export async function withSecret<T>(secret: Uint8Array, fn: (s: Uint8Array) => Promise<T> | T): Promise<T> {
  try {
    return await fn(secret);
  } finally {
    wipe(secret);
  }
}
