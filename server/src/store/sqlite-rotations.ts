/**
 * The SQLite tables of key rotation: rotations, rotation_policies, and the retirement and
 * destruction of key versions. Used by the SQLite store (sqlite-store.ts), which owns the
 * connection and the transactions; these statements run inside its write units.
 *
 * One open (queued or running) rotation per volume is a database invariant (a partial
 * unique index), so two admins rotating the same volume at once cannot both succeed.
 */
import type Database from 'better-sqlite3';

import { errors } from '../../../shared/src/errors.js';
import type { KeyVersionRecord, Page, PolicyScope, RotationPolicyRecord, RotationRecord, RotationStateName } from '../domain/model.js';
import type { RotationQuery } from './ports.js';
import { clampPageSize, decodePageToken, encodePageToken, run, toPage } from './sqlite-util.js';

const ROTATION_COLS =
  'id, volume_id, kind, state, reason, priority, due_at, from_version, to_version, host_id, step, bytes_done, bytes_total, bytes_per_second, error, mechanism, requested_by, created_at, started_at, finished_at';
const POLICY_COLS = 'scope, target_id, max_key_age_seconds, kind, reencrypt_after_move_seconds, updated_at';

interface RotationRow {
  id: string;
  volume_id: string;
  kind: string;
  state: string;
  reason: string;
  priority: number;
  due_at: string | null;
  from_version: number;
  to_version: number;
  host_id: string | null;
  step: string;
  bytes_done: number;
  bytes_total: number;
  bytes_per_second: number;
  error: string;
  mechanism: string;
  requested_by: string;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
}

interface PolicyRow {
  scope: string;
  target_id: string;
  max_key_age_seconds: number;
  kind: string;
  reencrypt_after_move_seconds: number;
  updated_at: string;
}

function toRotation(r: RotationRow): RotationRecord {
  return {
    id: r.id,
    volumeId: r.volume_id,
    kind: r.kind as RotationRecord['kind'],
    state: r.state as RotationRecord['state'],
    reason: r.reason,
    priority: r.priority,
    dueAt: r.due_at,
    fromVersion: r.from_version,
    toVersion: r.to_version,
    hostId: r.host_id,
    step: r.step,
    bytesDone: r.bytes_done,
    bytesTotal: r.bytes_total,
    bytesPerSecond: r.bytes_per_second,
    error: r.error,
    mechanism: r.mechanism,
    requestedBy: r.requested_by,
    createdAt: r.created_at,
    startedAt: r.started_at,
    finishedAt: r.finished_at,
  };
}

function toPolicy(r: PolicyRow): RotationPolicyRecord {
  return {
    scope: r.scope as PolicyScope,
    targetId: r.target_id,
    maxKeyAgeSeconds: r.max_key_age_seconds,
    kind: r.kind as RotationPolicyRecord['kind'],
    reencryptAfterMoveSeconds: r.reencrypt_after_move_seconds,
    updatedAt: r.updated_at,
  };
}

function rotationValues(r: RotationRecord) {
  return [
    r.id,
    r.volumeId,
    r.kind,
    r.state,
    r.reason,
    r.priority,
    r.dueAt,
    r.fromVersion,
    r.toVersion,
    r.hostId,
    r.step,
    Math.trunc(r.bytesDone),
    Math.trunc(r.bytesTotal),
    Math.trunc(r.bytesPerSecond),
    r.error,
    r.mechanism,
    r.requestedBy,
    r.createdAt,
    r.startedAt,
    r.finishedAt,
  ] as const;
}

type RotationValues = ReturnType<typeof rotationValues>;

function prepare(db: Database.Database) {
  const open = "state IN ('queued', 'running')";
  return {
    get: db.prepare<[string], RotationRow>(`SELECT ${ROTATION_COLS} FROM rotations WHERE id = ?`),
    openOfVolume: db.prepare<[string], RotationRow>(`SELECT ${ROTATION_COLS} FROM rotations WHERE volume_id = ? AND ${open}`),
    latestOfVolume: db.prepare<[string], RotationRow>(
      `SELECT ${ROTATION_COLS} FROM rotations WHERE volume_id = ? ORDER BY created_at DESC, id DESC LIMIT 1`,
    ),
    // Newest first; keyset on (created_at, id).
    list: db.prepare<[string, string, string, string, string, number], RotationRow>(
      `SELECT ${ROTATION_COLS} FROM rotations
        WHERE (? = '' OR volume_id = ?) AND (created_at < ? OR (created_at = ? AND id < ?))
        ORDER BY created_at DESC, id DESC LIMIT ?`,
    ),
    runningOnHost: db.prepare<[string], RotationRow>(`SELECT ${ROTATION_COLS} FROM rotations WHERE host_id = ? AND state = 'running'`),
    queued: db.prepare<[number], RotationRow>(
      `SELECT ${ROTATION_COLS} FROM rotations WHERE state = 'queued' ORDER BY priority DESC, due_at IS NULL, due_at, created_at LIMIT ?`,
    ),
    insert: db.prepare<[...RotationValues]>(`INSERT INTO rotations (${ROTATION_COLS}) VALUES (${ROTATION_COLS.split(',').map(() => '?').join(', ')})`),
    update: db.prepare<unknown[]>(
      `UPDATE rotations SET ${ROTATION_COLS.split(', ').slice(1).map((c) => `${c} = ?`).join(', ')} WHERE id = ?`,
    ),
    // Volumes whose active key is older than the cutoff and that have no open rotation,
    // oldest key first.
    // Keyset paging on (key created_at, volume id).
    agedVolumes: db.prepare<[string, string, string, string, number], { volume_id: string; created_at: string }>(
      `SELECT v.id AS volume_id, k.created_at FROM volumes v
         JOIN key_versions k ON k.volume_id = v.id AND k.version = v.active_version
        WHERE k.created_at < ? AND (k.created_at > ? OR (k.created_at = ? AND v.id > ?))
          AND NOT EXISTS (SELECT 1 FROM rotations r WHERE r.volume_id = v.id AND r.${open})
        ORDER BY k.created_at, v.id LIMIT ?`,
    ),
    retireVersion: db.prepare<[string, string | null, string, number]>(
      "UPDATE key_versions SET state = 'retired', retired_at = ?, destroy_after = ? WHERE volume_id = ? AND version = ? AND state IN ('active', 'retired', 'pending')",
    ),
    destroyVersion: db.prepare<[string, number]>(
      "UPDATE key_versions SET state = 'destroyed', sealed = NULL WHERE volume_id = ? AND version = ? AND state <> 'active'",
    ),
    retiredDue: db.prepare<[string, number], { volume_id: string; version: number }>(
      "SELECT volume_id, version FROM key_versions WHERE state = 'retired' AND destroy_after IS NOT NULL AND destroy_after <= ? ORDER BY destroy_after LIMIT ?",
    ),
    getPolicy: db.prepare<[string, string], PolicyRow>(`SELECT ${POLICY_COLS} FROM rotation_policies WHERE scope = ? AND target_id = ?`),
    listPolicies: db.prepare<[], PolicyRow>(`SELECT ${POLICY_COLS} FROM rotation_policies ORDER BY scope, target_id`),
    upsertPolicy: db.prepare<[string, string, number, string, number, string]>(
      `INSERT INTO rotation_policies (${POLICY_COLS}) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (scope, target_id) DO UPDATE SET max_key_age_seconds = excluded.max_key_age_seconds, kind = excluded.kind,
         reencrypt_after_move_seconds = excluded.reencrypt_after_move_seconds, updated_at = excluded.updated_at`,
    ),
    deletePolicy: db.prepare<[string, string]>('DELETE FROM rotation_policies WHERE scope = ? AND target_id = ?'),
  };
}

const FAR_FUTURE = '\uffff';

/** The rotation tables over one connection. Write methods assume a running transaction. */
export class SqliteRotationTables {
  readonly #s: ReturnType<typeof prepare>;

  constructor(db: Database.Database) {
    this.#s = prepare(db);
  }

  getRotation(id: string): RotationRecord | undefined {
    const r = this.#s.get.get(id);
    return r && toRotation(r);
  }

  openRotationOfVolume(volumeId: string): RotationRecord | undefined {
    const r = this.#s.openOfVolume.get(volumeId);
    return r && toRotation(r);
  }

  latestRotationOfVolume(volumeId: string): RotationRecord | undefined {
    const r = this.#s.latestOfVolume.get(volumeId);
    return r && toRotation(r);
  }

  listRotations(q: RotationQuery): Page<RotationRecord> {
    const limit = clampPageSize(q.pageSize);
    const after = decodePageToken(q.pageToken, 'rotation');
    let createdAt = FAR_FUTURE;
    let id = FAR_FUTURE;
    if (after !== undefined) {
      if (!Array.isArray(after) || after.length !== 2 || typeof after[0] !== 'string' || typeof after[1] !== 'string') throw errors.invalid('invalid page token');
      [createdAt, id] = after as [string, string];
    }
    const states = q.states && q.states.length > 0 ? new Set<RotationStateName>(q.states) : undefined;
    const volume = q.volumeId ?? '';
    // State filtering happens here, not in SQL: pages may then hold fewer rows than asked,
    // which the token handles (it names the last row looked at).
    const rows = this.#s.list.all(volume, volume, createdAt, createdAt, id, limit + 1).map(toRotation);
    const page = toPage(rows, limit, (last) => encodePageToken('rotation', [last.createdAt, last.id]));
    return { items: states ? page.items.filter((r) => states.has(r.state)) : page.items, nextPageToken: page.nextPageToken };
  }

  runningRotationsOnHost(hostId: string): RotationRecord[] {
    return this.#s.runningOnHost.all(hostId).map(toRotation);
  }

  queuedRotations(limit: number): RotationRecord[] {
    return this.#s.queued.all(limit).map(toRotation);
  }

  agedVolumes(cutoff: string, limit: number, after?: { keyCreatedAt: string; volumeId: string }): { volumeId: string; keyCreatedAt: string }[] {
    const at = after?.keyCreatedAt ?? '';
    const id = after?.volumeId ?? '';
    return this.#s.agedVolumes.all(cutoff, at, at, id, limit).map((r) => ({ volumeId: r.volume_id, keyCreatedAt: r.created_at }));
  }

  retiredKeysDue(now: string, limit: number): { volumeId: string; version: number }[] {
    return this.#s.retiredDue.all(now, limit).map((r) => ({ volumeId: r.volume_id, version: r.version }));
  }

  getPolicy(scope: PolicyScope, targetId: string): RotationPolicyRecord | undefined {
    const r = this.#s.getPolicy.get(scope, targetId);
    return r && toPolicy(r);
  }

  listPolicies(): RotationPolicyRecord[] {
    return this.#s.listPolicies.all().map(toPolicy);
  }

  insertRotation(r: RotationRecord): void {
    run(() => this.#s.insert.run(...rotationValues(r)), { unique: 'open rotation of the volume', primary: 'rotation', foreign: 'volume or host' });
  }

  updateRotation(r: RotationRecord): void {
    let changes = 0;
    run(() => {
      const [id, ...rest] = rotationValues(r);
      changes = this.#s.update.run(...rest, id).changes;
    }, { unique: 'open rotation of the volume', foreign: 'volume or host' });
    if (changes === 0) throw errors.notFound('rotation');
  }

  retireKeyVersion(volumeId: string, version: number, retiredAt: string, destroyAfter: string | null): void {
    if (this.#s.retireVersion.run(retiredAt, destroyAfter, volumeId, version).changes === 0) throw errors.notFound('key version');
  }

  /** Returns true when a sealed secret was erased (the caller checkpoints the WAL). */
  destroyKeyVersion(volumeId: string, version: number): boolean {
    return this.#s.destroyVersion.run(volumeId, version).changes > 0;
  }

  upsertPolicy(p: RotationPolicyRecord): void {
    this.#s.upsertPolicy.run(p.scope, p.targetId, p.maxKeyAgeSeconds, p.kind, p.reencryptAfterMoveSeconds, p.updatedAt);
  }

  deletePolicy(scope: PolicyScope, targetId: string): boolean {
    return this.#s.deletePolicy.run(scope, targetId).changes > 0;
  }
}

/** Key version columns added by schema v3, for the key version mapping of the store. */
export function retirementOf(r: { retired_at?: string | null; destroy_after?: string | null }): Pick<KeyVersionRecord, 'retiredAt' | 'destroyAfter'> {
  return { retiredAt: r.retired_at ?? null, destroyAfter: r.destroy_after ?? null };
}
