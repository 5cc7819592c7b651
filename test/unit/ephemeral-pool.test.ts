/**
 * Tests of the ephemeral X25519 pool (server/src/vault/ephemeral-pool.ts, real worker
 * thread): packets sealed with its shares are crypto_box_seal packets that libsodium opens,
 * no share is handed out twice, a host's new key never gets shares made for its old one,
 * and close() leaves nothing to hand out.
 */
import test from 'ava';
import { boxRecipient, generateBoxKeyPair, sealWithShare, type BoxRecipient } from '../../shared/src/box.js';
import { loadSodium, sodium } from '../../shared/src/sodium.js';
import { createEphemeralPool, type EphemeralPool } from '../../server/src/vault/ephemeral-pool.js';

test.before(async () => {
  await loadSodium();
});

/** Polls take() until the worker has delivered shares (bounded). */
async function takeWhenReady(pool: EphemeralPool, owner: string, r: BoxRecipient) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const share = pool.take(owner, r);
    if (share) return share;
    if (Date.now() > deadline) throw new Error('the worker delivered no share within 10 s');
    await new Promise((res) => setTimeout(res, 20));
  }
}

test('shares seal packets that libsodium opens, and no share is handed out twice', async (t) => {
  const pool = createEphemeralPool({ batch: 16, perHost: 64 });
  try {
    const host = generateBoxKeyPair();
    const r = boxRecipient(host.publicKey);
    t.is(pool.take('h1', r), undefined, 'nothing is ready before the worker ran');
    const seen = new Set<string>();
    for (let i = 0; i < 100; i++) {
      const share = await takeWhenReady(pool, 'h1', r);
      const epk = Buffer.from(share.publicKey).toString('hex');
      t.false(seen.has(epk), 'an ephemeral key is used once');
      seen.add(epk);
      const m = Uint8Array.from([i, 1, 2, 3]);
      const sealed = sealWithShare(m, r, share);
      share.sharedKey.fill(0);
      t.deepEqual(Uint8Array.from(sodium().crypto_box_seal_open(sealed, host.publicKey, host.secretKey)), m);
    }
    t.true(pool.stats().hits >= 100);
  } finally {
    await pool.close();
  }
});

test('a new key for the same host drops the shares made for the old one', async (t) => {
  const pool = createEphemeralPool({ batch: 8, perHost: 32 });
  try {
    const oldKey = generateBoxKeyPair();
    const newKey = generateBoxKeyPair();
    await takeWhenReady(pool, 'h', boxRecipient(oldKey.publicKey));
    const rNew = boxRecipient(newKey.publicKey);
    t.is(pool.take('h', rNew), undefined, 'no old share is handed out for the new key');
    const share = await takeWhenReady(pool, 'h', rNew);
    const sealed = sealWithShare(Uint8Array.from([9]), rNew, share);
    share.sharedKey.fill(0);
    t.deepEqual(Uint8Array.from(sodium().crypto_box_seal_open(sealed, newKey.publicKey, newKey.secretKey)), Uint8Array.from([9]));
    t.throws(() => sodium().crypto_box_seal_open(sealed, oldKey.publicKey, oldKey.secretKey));
  } finally {
    await pool.close();
  }
});

test('close() wipes what is ready and take() returns nothing afterwards', async (t) => {
  const pool = createEphemeralPool({ batch: 8, perHost: 32 });
  const r = boxRecipient(generateBoxKeyPair().publicKey);
  await takeWhenReady(pool, 'h', r);
  t.true(pool.stats().ready > 0 || pool.stats().hits === 1);
  await pool.close();
  t.is(pool.stats().ready, 0);
  t.is(pool.stats().hosts, 0);
  t.false(pool.stats().workerUp);
  t.is(pool.take('h', r), undefined);
});

test('bad options are refused', (t) => {
  t.throws(() => createEphemeralPool({ batch: 0 }), { instanceOf: RangeError });
  t.throws(() => createEphemeralPool({ batch: 64, perHost: 32 }), { instanceOf: RangeError });
});
