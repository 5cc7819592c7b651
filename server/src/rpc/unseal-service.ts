/**
 * UnsealService: share holders submit Shamir shares to a sealed server (app/sealed-mode.ts).
 *
 * Who may submit: admin credentials. Each share holder needs an admin credential of their
 * own (so the audit log says who submitted which share index); the share itself is the
 * authority to unseal, the credential only says who is talking. A narrower "operator"
 * role (unseal and status only) would suit holders who should not administer volumes,
 * but roles live in the certificates table's CHECK constraint and in the CLI's
 * credential commands, so it is left for later. Status: any authenticated role (agents
 * and frontends may wait for the unseal).
 *
 * Shares live only in the ShareCollector in memory; a refused share changes nothing; the
 * share bytes of every request are wiped once checked.
 */
import type { SubmitShareResponse, UnsealServiceServer, UnsealStatusResponse } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import { describeError } from '../../../shared/src/log.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import type { ShareCollector } from '../master-key/shamir-sealer.js';
import { actorOf } from './auth.js';
import { unary, type RpcContext } from './handler.js';

/** What the service needs. */
export interface UnsealServiceDeps extends RpcContext {
  /** The sealer kind of the master key record. */
  sealer: string;
  isSealed(): boolean;
  /** The Shamir collector while sealed, else undefined. */
  collector: ShareCollector | undefined;
  /** Combines the collected shares, unseals, opens the gate. Rejects (still sealed) on failure. */
  unseal(collector: ShareCollector): Promise<void>;
}

/** Creates the grpc-js implementation of UnsealService. */
export function createUnsealService(deps: UnsealServiceDeps): UnsealServiceServer {
  let unsealing: Promise<void> | undefined;
  const status = (): UnsealStatusResponse => {
    const p = deps.collector?.progress();
    const sealed = deps.isSealed();
    return {
      sealed,
      sealer: deps.sealer,
      threshold: p?.threshold ?? 0,
      shares: p?.shares ?? 0,
      received: sealed ? (p?.received ?? 0) : 0,
      receivedIndices: sealed ? (p?.indices ?? []) : [],
    };
  };
  return {
    submitShare: unary(deps, 'SubmitShare', ['admin'], async (req, principal): Promise<SubmitShareResponse> => {
      const collector = deps.collector;
      try {
        if (!deps.isSealed() || !collector) throw errors.precondition('the server is not sealed');
        if (unsealing) throw errors.precondition('enough shares are in: the server is unsealing');
        let index: number;
        try {
          index = collector.submit(req.share).index;
        } catch (err) {
          await deps.store
            .write((tx) => tx.appendAudit({ actor: actorOf(principal), action: 'unseal.share', target: 'master-key', outcome: 'denied', detail: { reason: err instanceof Error ? err.message : 'refused' } }))
            .catch((e: unknown) => deps.logger.error('audit append failed', describeError(e)));
          throw err;
        }
        const p = collector.progress();
        await deps.store.write((tx) =>
          tx.appendAudit({ actor: actorOf(principal), action: 'unseal.share', target: 'master-key', outcome: 'ok', detail: { index, received: p.received, threshold: p.threshold } }),
        );
        deps.logger.info('unseal share accepted', { index, received: p.received, threshold: p.threshold, actor: actorOf(principal) });
        if (collector.complete) {
          unsealing = deps.unseal(collector);
          try {
            await unsealing;
          } finally {
            unsealing = undefined;
          }
        }
        return { acceptedIndex: index, status: status() };
      } finally {
        wipe(req.share);
      }
    }),
    unsealStatus: unary(deps, 'UnsealStatus', ['admin', 'frontend', 'host'], () => status()),
  };
}
