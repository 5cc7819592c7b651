/**
 * Worker thread of the ephemeral pool (ephemeral-pool.ts): computes the X25519 half of
 * crypto_box_seal ahead of time, off the server's event loop. For each request
 * { id, recipient (raw 32-byte public key), count } it generates `count` fresh ephemeral
 * key pairs with the native libsodium (shared/src/box.ts ephemeralShare), keeps only each
 * one's public key and its box key with the recipient, and posts them back as one slab
 * (count x [public key 32 | box key 32]) whose ArrayBuffer is transferred, not copied:
 * after the post this thread holds no reference to the box keys. Each ephemeral secret key
 * is wiped as soon as its two X25519 operations are done.
 *
 * The recipient key was already checked by boxRecipient on the main thread (32 bytes, not
 * of small order); libsodium refuses a small-order key again here all the same.
 */
import { parentPort } from 'node:worker_threads';
import { ephemeralShare } from '../../../shared/src/box-seal.js';

/** Bytes per share in a slab: ephemeral public key, then box key. */
const SHARE_BYTES = 64;

/** A request from the pool. */
export interface ShareRequest {
  id: number;
  recipient: Uint8Array;
  count: number;
}

/** The answer: a slab of `count` shares, or an error message (never secret). */
export type ShareResponse = { id: number; slab: ArrayBuffer; count: number } | { id: number; error: string };

function fill(req: ShareRequest): ArrayBuffer {
  if (req.recipient.length !== 32) throw new RangeError('X25519 public key must be 32 bytes');
  const recipient = { raw: Uint8Array.from(req.recipient) };
  const slab = new Uint8Array(new ArrayBuffer(req.count * SHARE_BYTES));
  try {
    for (let i = 0; i < req.count; i++) {
      const share = ephemeralShare(recipient);
      slab.set(share.publicKey, i * SHARE_BYTES);
      slab.set(share.sharedKey, i * SHARE_BYTES + 32);
      share.sharedKey.fill(0);
    }
  } catch (err) {
    slab.fill(0);
    throw err;
  }
  return slab.buffer;
}

const port = parentPort;
if (port) {
  // Synchronous, so requests are answered one at a time, in order.
  port.on('message', (req: ShareRequest) => {
    try {
      const slab = fill(req);
      port.postMessage({ id: req.id, slab, count: req.count } satisfies ShareResponse, [slab]);
    } catch (err) {
      port.postMessage({ id: req.id, error: err instanceof Error ? err.message : String(err) } satisfies ShareResponse);
    }
  });
}
