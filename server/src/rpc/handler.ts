/**
 * The one adapter between grpc-js handlers and domain functions: authenticates, runs the
 * handler, maps errors to status codes through shared/src/errors.ts, logs unexpected
 * errors with their detail, and never sends that detail to the caller.
 */
import { Metadata, type sendUnaryData, type ServerUnaryCall } from '@grpc/grpc-js';
import { HINT_METADATA_KEY, isDomainError, toWireError } from '../../../shared/src/errors.js';
import { describeError, type Logger } from '../../../shared/src/log.js';
import type { RoleName } from '../domain/model.js';
import type { Store } from '../store/ports.js';
import { actorOf, authenticate, type Principal } from './auth.js';

/** What every service handler needs from the server. */
export interface RpcContext {
  store: Store;
  logger: Logger;
}

/** A domain-level handler of one unary method. */
export type UnaryHandler<Req, Res> = (req: Req, principal: Principal) => Promise<Res> | Res;

/** Sends an error through a grpc-js callback, logging unexpected ones. */
export function sendError(ctx: RpcContext, method: string, err: unknown, callback: (e: { code: number; details: string; metadata?: Metadata }) => void, actor?: string): void {
  const wire = toWireError(err);
  if (wire.unexpected) ctx.logger.error('rpc failed', { method, actor, ...describeError(isDomainError(err) && err.cause !== undefined ? err.cause : err) });
  else ctx.logger.debug('rpc refused', { method, actor, code: wire.code, details: wire.details });
  const metadata = new Metadata();
  if (wire.hint) metadata.set(HINT_METADATA_KEY, wire.hint);
  callback({ code: wire.code, details: wire.details, metadata });
}

/**
 * Wraps a handler for grpc-js. Role denials and unknown/revoked certificates are written to
 * the audit log (action "auth.refuse") so an auditor sees who tried what.
 */
export function unary<Req, Res>(ctx: RpcContext, method: string, roles: readonly RoleName[], handler: UnaryHandler<Req, Res>) {
  return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>): void => {
    let principal: Principal | undefined;
    const run = async (): Promise<Res> => {
      try {
        principal = authenticate(call, ctx.store, roles);
      } catch (err) {
        if (isDomainError(err) && (err.kind === 'permission_denied' || err.kind === 'unauthenticated')) {
          const cert = call.getAuthContext().sslPeerCertificate;
          const who = cert?.subject ? `${String(cert.subject.OU)}:${String(cert.subject.CN)}` : 'anonymous';
          await ctx.store
            .write((tx) => tx.appendAudit({ actor: who, action: 'auth.refuse', target: method, outcome: 'denied', detail: { reason: err.message } }))
            .catch((e: unknown) => ctx.logger.error('audit append failed', describeError(e)));
        }
        throw err;
      }
      return handler(call.request, principal);
    };
    run().then(
      (res) => callback(null, res),
      (err: unknown) => sendError(ctx, method, err, callback as never, principal ? actorOf(principal) : undefined),
    );
  };
}
