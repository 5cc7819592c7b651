/**
 * Worker thread of the ephemeral pool (ephemeral-pool.ts): computes the X25519 half of
 * crypto_box_seal ahead of time, off the server's event loop. For each request
 * { id, recipient (raw 32-byte public key), count } it generates `count` fresh ephemeral
 * key pairs, keeps only each one's public key and its shared secret with the recipient,
 * and posts them back as one slab (count x [public key 32 | shared secret 32]) whose
 * ArrayBuffer is transferred, not copied: after the post this thread holds no reference
 * to the shared secrets. The ephemeral secret keys live only in OpenSSL key objects that
 * are dropped at once (OpenSSL clears X25519 private keys when it frees them).
 *
 * Only node:crypto here: the worker needs no libsodium. The recipient key was already
 * checked by boxRecipient on the main thread (32 bytes, not of low order); an all-zero
 * shared secret is refused again here all the same.
 */
import { createPublicKey, diffieHellman, generateKeyPair, type KeyObject } from 'node:crypto';
import { promisify } from 'node:util';
import { parentPort } from 'node:worker_threads';

/** DER prefix of an X25519 SubjectPublicKeyInfo (as in shared/src/box.ts). */
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');
/** Bytes per share in a slab: ephemeral public key, then shared secret. */
const SHARE_BYTES = 64;
/** Most recipients whose imported key is kept. */
const MAX_RECIPIENTS = 256;

/** A request from the pool. */
export interface ShareRequest {
  id: number;
  recipient: Uint8Array;
  count: number;
}

/** The answer: a slab of `count` shares, or an error message (never secret). */
export type ShareResponse = { id: number; slab: ArrayBuffer; count: number } | { id: number; error: string };

const recipients = new Map<string, KeyObject>();

function recipientKey(raw: Uint8Array): KeyObject {
  const hex = Buffer.from(raw).toString('hex');
  let key = recipients.get(hex);
  if (!key) {
    if (raw.length !== 32) throw new RangeError('X25519 public key must be 32 bytes');
    key = createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
    if (recipients.size >= MAX_RECIPIENTS) recipients.clear();
    recipients.set(hex, key);
  }
  return key;
}

const generateX25519 = promisify((cb: (err: Error | null, pair: { publicKey: KeyObject; privateKey: KeyObject }) => void) =>
  generateKeyPair('x25519', {}, (err, publicKey, privateKey) => cb(err, { publicKey, privateKey })),
);

/**
 * The key pairs come from the asynchronous generateKeyPair (libuv's thread pool), not
 * generateKeyPairSync: in a worker thread the synchronous one was seen to deadlock (a
 * garbage collection during one key generation destroying an earlier job, node 20.20),
 * which stalled the worker and the server's exit.
 */
async function fill(req: ShareRequest): Promise<ArrayBuffer> {
  const recipient = recipientKey(req.recipient);
  const slab = new Uint8Array(new ArrayBuffer(req.count * SHARE_BYTES));
  try {
    const pairs = await Promise.all(Array.from({ length: req.count }, () => generateX25519()));
    pairs.forEach((eph, i) => {
      // The JWK export is the cheap way to the raw 32 bytes (see box.ts).
      const epk = Buffer.from(eph.publicKey.export({ format: 'jwk' }).x ?? '', 'base64url');
      if (epk.length !== 32) throw new Error('unexpected X25519 public key export');
      const shared = diffieHellman({ privateKey: eph.privateKey, publicKey: recipient });
      try {
        if (shared.every((b) => b === 0)) throw new RangeError('X25519 public key is of low order');
        slab.set(epk, i * SHARE_BYTES);
        slab.set(shared, i * SHARE_BYTES + 32);
      } finally {
        shared.fill(0);
      }
    });
  } catch (err) {
    slab.fill(0);
    throw err;
  }
  return slab.buffer;
}

const port = parentPort;
if (port) {
  // One request at a time, in order: a queue keeps the pool's accounting simple.
  let queue: Promise<void> = Promise.resolve();
  port.on('message', (req: ShareRequest) => {
    queue = queue.then(async () => {
      try {
        const slab = await fill(req);
        port.postMessage({ id: req.id, slab, count: req.count } satisfies ShareResponse, [slab]);
      } catch (err) {
        port.postMessage({ id: req.id, error: err instanceof Error ? err.message : String(err) } satisfies ShareResponse);
      }
    });
  });
}
