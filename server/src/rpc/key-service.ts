/**
 * KeyService: releases volume secrets to hosts, as key packets sealed to the host's own
 * X25519 key. A host obtains a volume's secret only while a guest that uses the volume is
 * placed on it. Every release and every refusal is audited, and the reply is sent only
 * once those audit entries are durable.
 */
import type { KeyServiceServer, SealedKeyPacket } from '../../../shared/src/api.js';
import { createRecipientCache, type BoxRecipient } from '../../../shared/src/box.js';
import { errors } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import type { HostRecord } from '../domain/model.js';
import { isId } from '../domain/volume-spec.js';
import type { EphemeralSource } from '../vault/ephemeral-pool.js';
import type { KeyVault } from '../vault/key-vault.js';
import { actorOf } from './auth.js';
import { unary, type RpcContext } from './handler.js';

/** Dependencies of the key service. */
export interface KeyServiceDeps extends RpcContext {
  vault: KeyVault;
  clock: Clock;
  /** Precomputed ephemeral X25519 shares (ephemeral-pool.ts); without it packets seal inline. */
  ephemeral?: EphemeralSource;
}

/** Most volumes one ReleaseKeys call may ask for. */
export const MAX_RELEASE_BATCH = 1000;
/** last_seen is written at most this often per host. */
const TOUCH_INTERVAL_MS = 1000;

/** Creates the grpc-js implementation of KeyService. */
export function createKeyService(deps: KeyServiceDeps): KeyServiceServer {
  const { store, vault, clock } = deps;
  const lastTouch = new Map<string, number>();
  // Parsed X25519 keys per host, so the hot path does not re-import them.
  const recipients = createRecipientCache();
  const recipientOf = (host: Pick<HostRecord, 'id' | 'boxPublicKey'>): BoxRecipient => recipients(host.id, host.boxPublicKey);


  return {
    releaseKeys: unary(deps, 'ReleaseKeys', ['host'], async (req, p) => {
      const ids = [...new Set(req.volumeIds)];
      if (ids.length === 0) throw errors.invalid('no volume ids given');
      if (ids.length > MAX_RELEASE_BATCH) throw errors.tooLarge(`at most ${MAX_RELEASE_BATCH} volumes per request`);
      for (const id of ids) if (!isId(id)) throw errors.invalid('volume ids must be ids, not names');
      // authenticate() read the host record for this call (enrolled, this certificate).
      const host = p.host;
      if (!host) throw errors.unauthenticated('host is not enrolled');
      // Authorise every volume before releasing any (one query each: placement, volume and
      // active key). An unknown volume and a volume placed elsewhere get the same answer, so
      // a host cannot probe which volumes exist.
      const all = ids.map((id) => ({ id, r: store.getReleasable(id, host.id) }));
      // An unencrypted volume placed on the host has no key: nothing to release, nothing to
      // refuse (it is not in the answer and not audited).
      const keyless = (id: string) => store.isVolumePlacedOnHost(id, host.id) && store.getVolume(id)?.activeVersion === 0;
      const found = all.filter((f) => f.r !== undefined || !keyless(f.id));
      const refused = found.filter((f) => f.r === undefined).map((f) => f.id);
      if (refused.length > 0) {
        await store.write((tx) => {
          for (const id of refused) tx.appendAudit({ actor: actorOf(p), action: 'key.refuse', target: id, outcome: 'denied', detail: { reason: 'not placed on host' } });
        });
        throw errors.denied(`${refused.length} of the requested volumes are not placed on this host`);
      }
      const now = clock.now();
      const issuedAt = now.toISOString();
      const recipient = { hostId: host.id, recipient: recipientOf(host), shares: deps.ephemeral };
      const packets: SealedKeyPacket[] = found.map(({ r }) => vault.packetForHost(r!.volume, r!.key, recipient, issuedAt));
      const released = found.map(({ id, r }) => ({ id, version: r!.key.version }));
      const touch = now.getTime() - (lastTouch.get(host.id) ?? 0) >= TOUCH_INTERVAL_MS;
      if (released.length === 0 && !touch) return { packets };
      await store.write((tx) => {
        for (const r of released) tx.appendAudit({ actor: actorOf(p), action: 'key.release', target: r.id, outcome: 'ok', detail: { key_version: r.version } });
        if (touch) tx.touchHost(host.id, issuedAt);
      });
      if (touch) lastTouch.set(host.id, now.getTime());
      return { packets };
    }),
  };
}
