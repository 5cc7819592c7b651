/**
 * HostService (admin): enrollment tokens, host listing and revocation.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { HostServiceServer } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import type { HostRecord } from '../domain/model.js';
import { checkName, pageSize } from '../domain/volume-spec.js';
import type { CertificateIssuer } from '../pki/issuer.js';
import { actorOf } from './auth.js';
import { hostToApi } from './convert.js';
import { unary, type RpcContext } from './handler.js';
import { resolveHost } from './resolve.js';
import type { AgentHub } from '../agent/agent-hub.js';
import { formatEnrollmentToken } from '../../../shared/src/enrollment-token.js';

/** Dependencies of the host service. */
export interface HostServiceDeps extends RpcContext {
  clock: Clock;
  issuer: CertificateIssuer;
  /** Address agents enroll at, reported with new tokens ("" when unknown). */
  enrollAddress: string;
  /** Connection state of agents, and the hub to close a revoked host's stream. */
  hub: AgentHub;
}

const ROLES = ['admin'] as const;
const DEFAULT_TOKEN_TTL_S = 3600;
const MAX_TOKEN_TTL_S = 7 * 24 * 3600;

/** Creates the grpc-js implementation of HostService. */
export function createHostService(deps: HostServiceDeps): HostServiceServer {
  const { store, clock, issuer } = deps;
  const show = (h: HostRecord) => hostToApi(h, store.countGuestsOnHost(h.id), deps.hub.connection(h.id));
  return {
    createEnrollmentToken: unary(deps, 'CreateEnrollmentToken', ROLES, async (req, p) => {
      const hostName = checkName('host', req.host);
      if (req.ttlSeconds > MAX_TOKEN_TTL_S) throw errors.invalid(`token lifetime is at most ${MAX_TOKEN_TTL_S} seconds`);
      const existing = store.getHostByName(hostName);
      if (existing && existing.state === 'enrolled') {
        throw errors.alreadyExists(`host "${hostName}"`, { hint: 'revoke it first to enroll it again' });
      }
      const now = clock.now();
      const expiresAt = new Date(now.getTime() + (req.ttlSeconds || DEFAULT_TOKEN_TTL_S) * 1000).toISOString();
      const id = randomBytes(9).toString('base64url');
      const secret = randomBytes(32);
      try {
        await store.write((tx) => {
          tx.insertEnrollmentToken({ id, hostName, secretHash: createHash('sha256').update(secret).digest(), createdAt: now.toISOString(), expiresAt, usedAt: null, createdBy: actorOf(p) });
          tx.appendAudit({ actor: actorOf(p), action: 'host.token.create', target: hostName, outcome: 'ok', detail: { token_id: id, expires_at: expiresAt } });
        });
        return { token: formatEnrollmentToken({ id, secret, caFingerprint: issuer.caFingerprint }), expiresAt, enrollAddress: deps.enrollAddress };
      } finally {
        secret.fill(0);
      }
    }),
    getHost: unary(deps, 'GetHost', ROLES, (req) => ({ host: show(resolveHost(store, req.host)) })),
    listHosts: unary(deps, 'ListHosts', ROLES, (req) => {
      const page = store.listHosts(pageSize(req.page?.pageSize ?? 0), req.page?.pageToken ?? '');
      return { hosts: page.items.map(show), nextPageToken: page.nextPageToken };
    }),
    revokeHost: unary(deps, 'RevokeHost', ROLES, async (req, p) => {
      const h = resolveHost(store, req.host);
      if (h.state === 'revoked') throw errors.precondition(`host "${h.name}" is already revoked`);
      const revokedAt = clock.now().toISOString();
      const revoked: HostRecord = { ...h, state: 'revoked', revokedAt };
      await store.write((tx) => {
        tx.updateHost(revoked);
        tx.revokeCertificate(h.certSerial, revokedAt);
        tx.appendAudit({ actor: actorOf(p), action: 'host.revoke', target: h.id, outcome: 'ok', detail: { name: h.name, serial: h.certSerial } });
      });
      deps.hub.hostRevoked(h.id);
      return { host: show(revoked) };
    }),
  };
}
