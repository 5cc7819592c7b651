/**
 * RotationService: start rotations, list and watch them, set policies. Thin: the logic is
 * in rotation/rotation-manager.ts.
 */
import type { ServerWritableStream } from '@grpc/grpc-js';
import {
  RotationKind,
  RotationState,
  type Rotation,
  type RotationPolicy,
  type RotationServiceServer,
  type WatchRotationsRequest,
  type WatchRotationsResponse,
} from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import type { PolicyScope, RotationKindName, RotationPolicyRecord, RotationRecord, RotationStateName } from '../domain/model.js';
import { pageSize } from '../domain/volume-spec.js';
import type { RotationManager, RotationTarget } from '../rotation/rotation-manager.js';
import type { StoreReader } from '../store/ports.js';
import { actorOf, authenticate } from './auth.js';
import { sendError, unary, type RpcContext } from './handler.js';
import { hostNameOf, resolveGuest, resolveHost, resolveVolume } from './resolve.js';

export interface RotationServiceDeps extends RpcContext {
  rotations: RotationManager;
  clock: Clock;
}

const READ_ROLES = ['admin', 'frontend'] as const;
const ADMIN = ['admin'] as const;
/** Longest a policy may allow a key to live, and the longest move window: 100 years. */
const MAX_SECONDS = 100 * 365 * 24 * 3600;
/** Most rotations one watch follows by id. */
const MAX_WATCH_IDS = 1000;

const KIND_TO_API: Readonly<Record<RotationKindName, RotationKind>> = {
  rekey: RotationKind.ROTATION_KIND_REKEY,
  reencrypt: RotationKind.ROTATION_KIND_REENCRYPT,
  encrypt: RotationKind.ROTATION_KIND_ENCRYPT,
  decrypt: RotationKind.ROTATION_KIND_DECRYPT,
};
const STATE_TO_API: Readonly<Record<RotationStateName, RotationState>> = {
  queued: RotationState.ROTATION_STATE_QUEUED,
  running: RotationState.ROTATION_STATE_RUNNING,
  done: RotationState.ROTATION_STATE_DONE,
  failed: RotationState.ROTATION_STATE_FAILED,
};

export function kindFromApi(k: RotationKind, fallback?: RotationKindName): RotationKindName {
  if (k === RotationKind.ROTATION_KIND_REKEY) return 'rekey';
  if (k === RotationKind.ROTATION_KIND_REENCRYPT) return 'reencrypt';
  if (k === RotationKind.ROTATION_KIND_ENCRYPT) return 'encrypt';
  if (k === RotationKind.ROTATION_KIND_DECRYPT) return 'decrypt';
  if (k === RotationKind.ROTATION_KIND_UNSPECIFIED && fallback) return fallback;
  throw errors.invalid('unknown rotation kind');
}

function stateFromApi(s: RotationState): RotationStateName {
  const found = (Object.entries(STATE_TO_API) as [RotationStateName, RotationState][]).find(([, v]) => v === s);
  if (!found) throw errors.invalid('unknown rotation state');
  return found[0];
}

/** A rotation as the API shows it. */
export function rotationToApi(r: RotationRecord, store: StoreReader): Rotation {
  return {
    id: r.id,
    volumeId: r.volumeId,
    volumeName: store.getVolume(r.volumeId)?.name ?? '',
    kind: KIND_TO_API[r.kind],
    state: STATE_TO_API[r.state],
    reason: r.reason,
    fromVersion: r.fromVersion,
    toVersion: r.toVersion,
    host: hostNameOf(store, r.hostId),
    step: r.step,
    bytesDone: BigInt(r.bytesDone),
    bytesTotal: BigInt(r.bytesTotal),
    bytesPerSecond: BigInt(r.bytesPerSecond),
    error: r.error,
    mechanism: r.mechanism,
    createdAt: r.createdAt,
    startedAt: r.startedAt ?? '',
    finishedAt: r.finishedAt ?? '',
    requestedBy: r.requestedBy,
  };
}

function policyToApi(p: RotationPolicyRecord, store: StoreReader): RotationPolicy {
  const targetName = p.scope === 'volume' ? (store.getVolume(p.targetId)?.name ?? '') : p.scope === 'guest' ? (store.getGuest(p.targetId)?.name ?? '') : '';
  return {
    scope: p.scope,
    target: p.targetId,
    targetName,
    maxKeyAgeSeconds: BigInt(p.maxKeyAgeSeconds),
    kind: KIND_TO_API[p.kind],
    reencryptAfterMoveSeconds: BigInt(p.reencryptAfterMoveSeconds),
    updatedAt: p.updatedAt,
  };
}

function seconds(v: bigint, what: string): number {
  if (v < 0n || v > BigInt(MAX_SECONDS)) throw errors.invalid(`${what} must be between 0 and ${MAX_SECONDS} seconds`);
  return Number(v);
}

/** Scope and target id of a policy reference (names accepted). */
function policyTarget(store: StoreReader, scope: string, target: string): { scope: PolicyScope; targetId: string } {
  if (scope === 'global') {
    if (target !== '') throw errors.invalid('a global policy has no target');
    return { scope, targetId: '' };
  }
  if (scope === 'volume') return { scope, targetId: resolveVolume(store, target).id };
  if (scope === 'guest') return { scope, targetId: resolveGuest(store, target).id };
  throw errors.invalid('scope must be global, guest or volume');
}

export function createRotationService(deps: RotationServiceDeps): RotationServiceServer {
  const { store, rotations, clock, logger } = deps;
  const show = (r: RotationRecord) => rotationToApi(r, store);
  return {
    startRotation: unary(deps, 'StartRotation', ADMIN, async (req, p) => {
      const sel = req.selector?.target;
      if (!sel) throw errors.invalid('selector is required: a volume, a guest, a host or all');
      let target: RotationTarget;
      if (sel.$case === 'volume') target = { volume: resolveVolume(store, sel.value).id };
      else if (sel.$case === 'guest') target = { guest: resolveGuest(store, sel.value).id };
      else if (sel.$case === 'host') target = { host: resolveHost(store, sel.value).id };
      else if (sel.value) target = { all: true };
      else throw errors.invalid('selector "all" must be true');
      // After a suspected leak the data key itself may be known: re-encrypt by default.
      const kind = kindFromApi(req.kind, req.reason.trim() === 'compromise' ? 'reencrypt' : 'rekey');
      const result = await rotations.start(target, kind, req.reason, actorOf(p));
      return { rotations: result.rotations.map(show), skipped: result.skipped };
    }),
    cancelRotation: unary(deps, 'CancelRotation', ADMIN, async (req, p) => ({ rotation: show(await rotations.cancel(req.id, actorOf(p))) })),
    getRotation: unary(deps, 'GetRotation', READ_ROLES, (req) => {
      const r = store.getRotation(req.id);
      if (!r) throw errors.notFound('rotation');
      return { rotation: show(r) };
    }),
    listRotations: unary(deps, 'ListRotations', READ_ROLES, (req) => {
      const volumeId = req.volume ? resolveVolume(store, req.volume).id : undefined;
      const page = store.listRotations({ pageSize: pageSize(req.page?.pageSize ?? 0), pageToken: req.page?.pageToken ?? '', states: req.states.map(stateFromApi), ...(volumeId ? { volumeId } : {}) });
      return { rotations: page.items.map(show), nextPageToken: page.nextPageToken };
    }),
    watchRotations(call: ServerWritableStream<WatchRotationsRequest, WatchRotationsResponse>) {
      let unsubscribe = () => {};
      try {
        authenticate(call, store, READ_ROLES);
        if (call.request.ids.length > MAX_WATCH_IDS) throw errors.tooLarge(`at most ${MAX_WATCH_IDS} rotation ids per watch`);
        const ids = new Set(call.request.ids);
        for (const id of ids) if (!store.getRotation(id)) throw errors.notFound(`rotation ${id.slice(0, 40)}`);
        const wanted = (r: RotationRecord) => (ids.size > 0 ? ids.has(r.id) : true);
        const send = (r: RotationRecord) => {
          if (!call.cancelled && !call.destroyed) call.write({ rotation: show(r) });
        };
        // Subscribe first, then send the current state: no change falls in between.
        unsubscribe = rotations.subscribe((r) => {
          if (wanted(r)) send(r);
        });
        call.on('cancelled', () => unsubscribe());
        call.on('close', () => unsubscribe());
        const current = ids.size > 0 ? [...ids].flatMap((id) => store.getRotation(id) ?? []) : store.listRotations({ pageSize: 1000, pageToken: '', states: ['queued', 'running'] }).items;
        for (const r of current) send(r);
      } catch (err) {
        unsubscribe();
        sendError(deps, 'WatchRotations', err, (e) => call.emit('error', e));
      }
    },
    setRotationPolicy: unary(deps, 'SetRotationPolicy', ADMIN, async (req, p) => {
      const pol = req.policy;
      if (!pol) throw errors.invalid('policy is required');
      const { scope, targetId } = policyTarget(store, pol.scope, pol.target);
      const kind = kindFromApi(pol.kind, 'rekey');
      // A schedule replaces keys; it never encrypts or decrypts a volume.
      if (kind !== 'rekey' && kind !== 'reencrypt') throw errors.invalid('a policy kind is rekey or reencrypt');
      const record: RotationPolicyRecord = {
        scope,
        targetId,
        maxKeyAgeSeconds: seconds(pol.maxKeyAgeSeconds, 'max key age'),
        kind,
        reencryptAfterMoveSeconds: seconds(pol.reencryptAfterMoveSeconds, 're-encryption window after a move'),
        updatedAt: clock.now().toISOString(),
      };
      await store.write((tx) => {
        tx.upsertPolicy(record);
        tx.appendAudit({ actor: actorOf(p), action: 'rotation.policy.set', target: targetId || 'global', outcome: 'ok', detail: { scope, max_key_age_seconds: record.maxKeyAgeSeconds, kind: record.kind, reencrypt_after_move_seconds: record.reencryptAfterMoveSeconds } });
      });
      logger.info('rotation policy set', { scope, target: targetId });
      return { policy: policyToApi(record, store) };
    }),
    listRotationPolicies: unary(deps, 'ListRotationPolicies', READ_ROLES, () => ({ policies: store.listPolicies().map((x) => policyToApi(x, store)) })),
    deleteRotationPolicy: unary(deps, 'DeleteRotationPolicy', ADMIN, async (req, p) => {
      const { scope, targetId } = policyTarget(store, req.scope, req.target);
      await store.write((tx) => {
        if (!tx.deletePolicy(scope, targetId)) throw errors.notFound('rotation policy');
        tx.appendAudit({ actor: actorOf(p), action: 'rotation.policy.delete', target: targetId || 'global', outcome: 'ok', detail: { scope } });
      });
      return {};
    }),
  };
}
