/**
 * AuditService (admin): read and verify the hash-chained audit log.
 */
import type { AuditServiceServer } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import { pageSize } from '../domain/volume-spec.js';
import { unary, type RpcContext } from './handler.js';

const ROLES = ['admin'] as const;

/** Creates the grpc-js implementation of AuditService. */
export function createAuditService(deps: RpcContext): AuditServiceServer {
  const { store } = deps;
  return {
    listAuditEvents: unary(deps, 'ListAuditEvents', ROLES, (req) => {
      if (req.afterSeq > BigInt(Number.MAX_SAFE_INTEGER)) throw errors.invalid('after_seq is out of range');
      const page = store.listAuditEvents({
        pageSize: pageSize(req.page?.pageSize ?? 0),
        pageToken: req.page?.pageToken ?? '',
        ...(req.action ? { action: req.action } : {}),
        ...(req.target ? { target: req.target } : {}),
        ...(req.afterSeq ? { afterSeq: Number(req.afterSeq) } : {}),
      });
      return {
        events: page.items.map((e) => ({
          seq: BigInt(e.seq),
          time: e.time,
          actor: e.actor,
          action: e.action,
          target: e.target,
          outcome: e.outcome,
          detailJson: e.detailJson,
          prevHash: e.prevHash,
          hash: e.hash,
        })),
        nextPageToken: page.nextPageToken,
      };
    }),
    verifyAuditLog: unary(deps, 'VerifyAuditLog', ROLES, () => {
      const v = store.verifyAuditLog();
      return { ok: v.ok, eventsChecked: BigInt(v.eventsChecked), firstBadSeq: BigInt(v.firstBadSeq), problem: v.problem, headHash: v.headHash };
    }),
  };
}
