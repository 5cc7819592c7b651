/**
 * Key rotation on the server: who rotates what, when, and what a host's confirmation does.
 *
 * Life of a rotation (state in the store, so it survives restarts of server and agent):
 *   queued   created by an admin (`StartRotation`), by a policy (key too old) or after a
 *            move; waits for its host: the host of the guests using the volume, enrolled,
 *            not in a move, with fewer than `maxPerHost` running rotations.
 *   running  a new key version exists in state "pending" (sealed like any other); the
 *            host's desired state carries a RotationOrder with the packet of the new
 *            version; the agent changes the image and reports progress.
 *   done     the agent verified that the image opens with the new version and no longer
 *            with the old one: in ONE transaction the new version becomes active, the old
 *            one retired (destroyed after the grace period; at once for "compromise"), the
 *            guests using the volume get a new generation (their domains are redefined
 *            with the new secret), and the audit log records it.
 *   failed   the agent gave up and says the image still opens with the active version; the
 *            pending version is retired (kept for the grace period, then destroyed).
 * At every moment the store holds every key that might open the image: a pending version
 * is never destroyed before the host reports, and an active one never before its successor
 * is confirmed.
 *
 * A volume whose image was never created (no host reported it ready) needs no host: its
 * rotation completes at once by switching versions.
 *
 * Encrypting and decrypting are rotations too (kinds "encrypt" and "decrypt", one volume
 * at a time). Encrypt: an unencrypted volume (raw, qcow2; no key version) gets version 1
 * (or the next unused number) pending; when the host reports the image converted (raw ->
 * luks, qcow2 -> qcow2-luks), the version becomes active and the volume's format changes,
 * in the same transaction. Decrypt: no new version (to_version 0); when the host reports
 * the image unencrypted, the format changes back and the active version is retired like
 * any replaced key (destroyed after the grace period, at once for "compromise"). A failed
 * decryption leaves everything as it was. Policies and group rotations skip unencrypted
 * volumes (they have no key to age or replace).
 */
import { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';
import { errors } from '../../../shared/src/errors.js';
import { describeError, type Logger } from '../../../shared/src/log.js';
import type { Clock } from '../domain/clock.js';
import type { GuestRecord, RotationKindName, RotationPolicyRecord, RotationRecord, VolumeRecord } from '../domain/model.js';
import { convertedFormat, isUnencryptedFormat, secretLength } from '../domain/volume-spec.js';
import type { HostChangeNotifier } from '../agent/agent-hub.js';
import type { Store, StoreReader, StoreWriter } from '../store/ports.js';
import type { KeyVault } from '../vault/key-vault.js';

/** Tunables (see docs/operations.md). */
export interface RotationSettings {
  /** Rotations one host runs at the same time (default 2). */
  maxPerHost: number;
  /** Seconds a retired key version is kept before it is destroyed (default 7 days). */
  graceSeconds: number;
  /** Most volumes a policy scan queues per tick (default 1000). */
  scanLimit: number;
}

export const DEFAULT_ROTATION_SETTINGS: Readonly<RotationSettings> = Object.freeze({ maxPerHost: 2, graceSeconds: 7 * 24 * 3600, scanLimit: 1000 });

/** Priorities: who goes first among queued rotations. */
export const PRIORITY = Object.freeze({ compromise: 100, manual: 50, move: 20, scheduled: 10 });

/** Which volumes a StartRotation names. */
export type RotationTarget = { volume: string } | { guest: string } | { host: string } | { all: true };

/** What an agent says about one rotation order. */
export interface RotationStatusInput {
  rotationId: string;
  volumeId: string;
  phase: 'waiting' | 'running' | 'done' | 'failed';
  step: string;
  bytesDone: number;
  bytesTotal: number;
  bytesPerSecond: number;
  reason: string;
  mechanism: string;
  targetVersion: number;
}

export interface RotationManagerDeps {
  store: Store;
  vault: KeyVault;
  clock: Clock;
  notifier: Pick<HostChangeNotifier, 'hostsChanged'>;
  logger: Logger;
  settings?: Partial<RotationSettings>;
}

/** The rotation logic; see module comment. */
export interface RotationManager {
  /** Queues rotations of the selected volumes; volumes with an open rotation are skipped. */
  start(target: RotationTarget, kind: RotationKindName, reason: string, actor: string): Promise<{ rotations: RotationRecord[]; skipped: string[] }>;
  /** Starts queued rotations whose host has room. */
  dispatch(): Promise<void>;
  /** Cancels a queued rotation; failed_precondition once it runs or ended. */
  cancel(id: string, actor: string): Promise<RotationRecord>;
  /** Applies what a host reported about its rotation orders. */
  onHostStatuses(hostId: string, statuses: RotationStatusInput[]): Promise<void>;
  /** Queues re-encryptions a policy asks for after a guest's move completed. */
  onMoveComplete(guestId: string): Promise<void>;
  /** One scheduler pass: destroy retired keys that are due, queue aged keys, dispatch. */
  tick(): Promise<void>;
  /** Calls `listener` with every changed rotation; returns the unsubscribe function. */
  subscribe(listener: (r: RotationRecord) => void): () => void;
  readonly settings: Readonly<RotationSettings>;
}

const MAX_REASON = 200;
/** Most candidate pages one policy scan reads. */
const MAX_SCAN_PAGES = 50;
const MAX_STEP = 200;

/** Normalises an admin's reason ("" is "manual"). */
export function checkReason(reason: string): string {
  const r = reason.trim() || 'manual';
  if (r.length > MAX_REASON) throw errors.invalid(`reason is longer than ${MAX_REASON} characters`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(r)) throw errors.invalid('reason contains control characters');
  return r;
}

function priorityOf(reason: string): number {
  if (reason === 'compromise') return PRIORITY.compromise;
  if (reason === 'scheduled') return PRIORITY.scheduled;
  if (reason === 'move') return PRIORITY.move;
  return PRIORITY.manual;
}

/** The audit action of a rotation step: key.rotate.* for key changes, volume.encrypt.* and volume.decrypt.* for conversions. */
export function rotationAction(kind: RotationKindName, stage: 'request' | 'start' | 'done' | 'fail' | 'cancel'): string {
  return kind === 'encrypt' || kind === 'decrypt' ? `volume.${kind}.${stage}` : `key.rotate.${stage}`;
}

/** Whether a rotation changes the volume's format (encrypt, decrypt). */
function converts(kind: RotationKindName): kind is 'encrypt' | 'decrypt' {
  return kind === 'encrypt' || kind === 'decrypt';
}

/** Guests that use a volume. */
function guestsOfVolume(store: StoreReader, volumeId: string): GuestRecord[] {
  return store.guestNamesOfVolume(volumeId).flatMap((n) => {
    const g = store.getGuestByName(n);
    return g ? [g] : [];
  });
}

/**
 * The effective policy of a volume: its own, else the strictest of its guests' (shortest
 * non-zero age), else the global one.
 */
export function effectivePolicy(store: StoreReader, volumeId: string): RotationPolicyRecord | undefined {
  const own = store.getPolicy('volume', volumeId);
  if (own) return own;
  const guestPolicies = guestsOfVolume(store, volumeId).flatMap((g) => store.getPolicy('guest', g.id) ?? []);
  if (guestPolicies.length > 0) {
    return guestPolicies.reduce((a, b) => {
      const age = (p: RotationPolicyRecord) => (p.maxKeyAgeSeconds === 0 ? Infinity : p.maxKeyAgeSeconds);
      const moveWin = (p: RotationPolicyRecord) => (p.reencryptAfterMoveSeconds === 0 ? Infinity : p.reencryptAfterMoveSeconds);
      const maxAge = Math.min(age(a), age(b));
      const win = Math.min(moveWin(a), moveWin(b));
      return {
        ...a,
        kind: a.kind === 'reencrypt' || b.kind === 'reencrypt' ? 'reencrypt' : 'rekey',
        maxKeyAgeSeconds: maxAge === Infinity ? 0 : maxAge,
        reencryptAfterMoveSeconds: win === Infinity ? 0 : win,
      };
    });
  }
  return store.getPolicy('global', '');
}

/** Where a volume's rotation can run now, or why it cannot. */
export function hostForVolume(store: StoreReader, volumeId: string): { hostId: string } | { wait: string } {
  const guests = guestsOfVolume(store, volumeId);
  const placed = guests.filter((g) => g.hostId !== null);
  if (placed.length === 0) return { wait: 'waiting: no guest using the volume is placed on a host' };
  if (placed.some((g) => g.handoffFromHostId !== null)) return { wait: 'waiting: a guest using the volume is being moved' };
  const hosts = new Set(placed.map((g) => g.hostId as string));
  if (hosts.size > 1) return { wait: 'waiting: guests using the volume are placed on different hosts' };
  const hostId = [...hosts][0] as string;
  const host = store.getHost(hostId);
  if (!host || host.state !== 'enrolled') return { wait: 'waiting: the host is revoked' };
  return { hostId };
}

export function createRotationManager(deps: RotationManagerDeps): RotationManager {
  const { store, vault, clock, notifier, logger } = deps;
  const settings: RotationSettings = { ...DEFAULT_ROTATION_SETTINGS, ...deps.settings };
  const events = new EventEmitter();
  events.setMaxListeners(0);
  const emit = (rs: Iterable<RotationRecord>) => {
    for (const r of rs) events.emit('rotation', r);
  };
  const now = () => clock.now().toISOString();
  const plusSeconds = (iso: string, s: number) => new Date(Date.parse(iso) + s * 1000).toISOString();

  const selectVolumes = (target: RotationTarget): VolumeRecord[] => {
    if ('volume' in target) {
      const v = store.getVolume(target.volume) ?? store.getVolumeByName(target.volume);
      if (!v) throw errors.notFound('volume');
      return [v];
    }
    if ('guest' in target) {
      const g = store.getGuest(target.guest) ?? store.getGuestByName(target.guest);
      if (!g) throw errors.notFound('guest');
      return g.volumeIds.flatMap((id) => store.getVolume(id) ?? []);
    }
    if ('host' in target) {
      const h = store.getHost(target.host) ?? store.getHostByName(target.host);
      if (!h) throw errors.notFound('host');
      const ids = new Set(store.guestsForHost(h.id).filter((g) => g.hostId === h.id).flatMap((g) => g.volumeIds));
      return [...ids].flatMap((id) => store.getVolume(id) ?? []);
    }
    const all: VolumeRecord[] = [];
    let token = '';
    do {
      const page = store.listVolumes({ pageSize: 1000, pageToken: token });
      all.push(...page.items);
      token = page.nextPageToken;
    } while (token !== '');
    return all;
  };

  const newRotation = (v: VolumeRecord, kind: RotationKindName, reason: string, actor: string, at: string, dueAt: string | null = null): RotationRecord => ({
    id: randomUUID(),
    volumeId: v.id,
    kind,
    state: 'queued',
    reason,
    priority: priorityOf(reason),
    dueAt,
    fromVersion: v.activeVersion,
    toVersion: 0,
    hostId: null,
    step: 'queued',
    bytesDone: 0,
    bytesTotal: 0,
    bytesPerSecond: 0,
    error: '',
    mechanism: '',
    requestedBy: actor,
    createdAt: at,
    startedAt: null,
    finishedAt: null,
  });

  /** Queues rotations in one transaction; volumes with an open rotation are skipped. */
  const enqueue = async (volumes: VolumeRecord[], kind: RotationKindName, reason: string, actor: string, dueAt: (v: VolumeRecord) => string | null) => {
    const at = now();
    const result = await store.write((tx) => {
      const made: RotationRecord[] = [];
      const skipped: string[] = [];
      for (const v of volumes) {
        if (!tx.getVolume(v.id)) continue;
        const open = tx.openRotationOfVolume(v.id);
        if (open) {
          // A suspected leak overrides what is already planned: a queued rotation becomes a
          // compromise re-encryption, first in line; a running one keeps its mechanism but
          // its old key is destroyed as soon as it completes (a running rekey keeps the
          // data key: the admin is told it was skipped and re-runs after it ends).
          if (reason === 'compromise' && open.reason !== 'compromise') {
            const upgraded: RotationRecord =
              open.state === 'queued' && !converts(open.kind) ? { ...open, reason, priority: PRIORITY.compromise, kind: 'reencrypt' } : { ...open, reason, priority: PRIORITY.compromise };
            tx.updateRotation(upgraded);
            if (open.state === 'queued') {
              made.push(upgraded);
              continue;
            }
          }
          skipped.push(v.name);
          continue;
        }
        const cur = tx.getVolume(v.id) as VolumeRecord;
        const r = newRotation(cur, kind, reason, actor, at, dueAt(cur));
        tx.insertRotation(r);
        made.push(r);
      }
      if (made.length > 0) {
        tx.appendAudit({
          actor,
          action: rotationAction(kind, 'request'),
          target: made.length === 1 ? (made[0] as RotationRecord).volumeId : `${made.length} volumes`,
          outcome: 'ok',
          detail: { kind, reason, rotations: made.length, skipped: skipped.length },
        });
      }
      return { rotations: made, skipped };
    });
    emit(result.rotations);
    return result;
  };

  /** Finishes a rotation as done (inside a unit). Returns the hosts to notify. */
  const complete = (tx: StoreWriter, r: RotationRecord, at: string, actor: string, fields: Partial<RotationRecord>): { rotation: RotationRecord; hosts: (string | null)[] } => {
    const destroyAt = r.reason === 'compromise' ? at : plusSeconds(at, settings.graceSeconds);
    if (converts(r.kind)) {
      // The format changes with the version, in this same transaction: encrypt activates
      // the new version (there is no old one), decrypt retires the old one (no new one).
      const v = tx.getVolume(r.volumeId);
      if (!v) throw errors.notFound('volume');
      tx.setVolumeFormat(r.volumeId, convertedFormat(v.format, r.kind), r.kind === 'encrypt' ? r.toVersion : 0);
      if (r.kind === 'decrypt') tx.retireKeyVersion(r.volumeId, r.fromVersion, at, destroyAt);
    } else {
      tx.setActiveVersion(r.volumeId, r.toVersion);
      tx.retireKeyVersion(r.volumeId, r.fromVersion, at, destroyAt);
    }
    const hosts: (string | null)[] = [];
    // The guests' domains must name the new version's secret: a new generation makes
    // their hosts redefine them.
    for (const g of guestsOfVolume(tx, r.volumeId)) {
      tx.upsertGuest({ ...g, generation: g.generation + 1, updatedAt: at });
      hosts.push(g.hostId, g.handoffFromHostId);
    }
    for (const h of hosts) if (h) tx.bumpHostRevision(h);
    const done: RotationRecord = { ...r, ...fields, state: 'done', step: 'done', error: '', finishedAt: at };
    tx.updateRotation(done);
    tx.appendAudit({ actor, action: rotationAction(r.kind, 'done'), target: r.volumeId, outcome: 'ok', detail: { rotation: r.id, kind: r.kind, from_version: r.fromVersion, to_version: r.toVersion, reason: r.reason, mechanism: done.mechanism } });
    return { rotation: done, hosts };
  };

  const dispatch = async (): Promise<void> => {
    const queued = store.queuedRotations(500);
    if (queued.length === 0) return;
    const at = now();
    const outcome = await store.write((tx) => {
      const changed: RotationRecord[] = [];
      const hosts: (string | null)[] = [];
      const running = new Map<string, number>();
      for (const q of queued) {
        const r = tx.getRotation(q.id);
        if (!r || r.state !== 'queued') continue;
        const v = tx.getVolume(r.volumeId);
        if (!v) continue;
        // The volume may have changed since the request (e.g. a queued rekey of a volume
        // that is unencrypted now): such a rotation ends as failed, nothing changes.
        let targetFormat = v.format;
        try {
          if (converts(r.kind)) targetFormat = convertedFormat(v.format, r.kind);
          else if (isUnencryptedFormat(v.format)) throw errors.precondition(`the volume is not encrypted (${v.format}): nothing to ${r.kind}`);
        } catch (err) {
          const failed: RotationRecord = { ...r, state: 'failed', step: 'refused', error: err instanceof Error ? err.message : 'refused', finishedAt: at };
          tx.updateRotation(failed);
          changed.push(failed);
          continue;
        }
        // A decryption makes no new version (to_version 0); the others the next unused one.
        const toVersion = r.kind === 'decrypt' ? 0 : Math.max(0, ...tx.getKeyVersions(v.id).map((k) => k.version)) + 1;
        const seal = () => vault.newSealedSecret(v.id, toVersion, secretLength(targetFormat, { cipher: v.cipher, keySizeBits: v.keySizeBits, sectorSize: v.sectorSize }));
        const insertPending = () => {
          if (toVersion > 0) tx.insertKeyVersion({ volumeId: v.id, version: toVersion, state: 'pending', sealed: seal(), createdAt: at });
        };
        if (!tx.isMaterialized(v.id)) {
          // No image anywhere yet: nothing to change on disk, switch versions now.
          insertPending();
          const started = { ...r, toVersion, fromVersion: v.activeVersion, startedAt: at };
          const c = complete(tx, started, at, 'server', { mechanism: 'none (no image yet)' });
          changed.push(c.rotation);
          hosts.push(...c.hosts);
          continue;
        }
        const where = hostForVolume(tx, v.id);
        if ('wait' in where) {
          if (r.step !== where.wait) {
            const w = { ...r, step: where.wait };
            tx.updateRotation(w);
            changed.push(w);
          }
          continue;
        }
        const busy = running.get(where.hostId) ?? tx.runningRotationsOnHost(where.hostId).length;
        if (busy >= settings.maxPerHost) {
          const wait = `waiting: host busy (${busy} running)`;
          if (r.step !== wait) {
            const w = { ...r, step: wait };
            tx.updateRotation(w);
            changed.push(w);
          }
          running.set(where.hostId, busy);
          continue;
        }
        running.set(where.hostId, busy + 1);
        insertPending();
        const started: RotationRecord = { ...r, state: 'running', fromVersion: v.activeVersion, toVersion, hostId: where.hostId, step: 'sent to host', startedAt: at, error: '' };
        tx.updateRotation(started);
        tx.bumpHostRevision(where.hostId);
        tx.appendAudit({ actor: 'server', action: rotationAction(r.kind, 'start'), target: v.id, outcome: 'ok', detail: { rotation: r.id, kind: r.kind, from_version: v.activeVersion, to_version: toVersion, host: tx.getHost(where.hostId)?.name ?? where.hostId, reason: r.reason } });
        changed.push(started);
        hosts.push(where.hostId);
      }
      return { changed, hosts };
    });
    emit(outcome.changed);
    notifier.hostsChanged(outcome.hosts);
    // A compromise rotation that completed at once destroys its old key now.
    if (outcome.changed.some((r) => r.state === 'done' && r.reason === 'compromise')) await destroyDue();
  };

  const destroyDue = async (): Promise<void> => {
    const due = store.retiredKeysDue(now(), 1000);
    if (due.length === 0) return;
    await store.write((tx) => {
      for (const k of due) {
        if (tx.destroyKeyVersion(k.volumeId, k.version)) {
          tx.appendAudit({ actor: 'server', action: 'key.destroy', target: k.volumeId, outcome: 'ok', detail: { key_version: k.version } });
        }
      }
    });
    logger.info('retired key versions destroyed', { count: due.length });
  };

  const queueAged = async (): Promise<void> => {
    const policies = store.listPolicies().filter((p) => p.maxKeyAgeSeconds > 0);
    if (policies.length === 0) return;
    const at = now();
    const shortest = Math.min(...policies.map((p) => p.maxKeyAgeSeconds));
    // Candidates are keys older than the shortest policy; each volume's own policy then
    // decides. Pages go on until scanLimit volumes are due or MAX_SCAN_PAGES pages were
    // read, so volumes under longer policies cannot hide due ones behind them.
    const byKind = new Map<RotationKindName, VolumeRecord[]>();
    let due = 0;
    let after: { keyCreatedAt: string; volumeId: string } | undefined;
    for (let page = 0; page < MAX_SCAN_PAGES && due < settings.scanLimit; page++) {
      const candidates = store.agedVolumes(plusSeconds(at, -shortest), settings.scanLimit, after);
      if (candidates.length === 0) break;
      after = candidates[candidates.length - 1];
      for (const c of candidates) {
        const p = effectivePolicy(store, c.volumeId);
        if (!p || p.maxKeyAgeSeconds === 0) continue;
        if (Date.parse(c.keyCreatedAt) + p.maxKeyAgeSeconds * 1000 > Date.parse(at)) continue;
        const v = store.getVolume(c.volumeId);
        if (!v || due >= settings.scanLimit) continue;
        byKind.set(p.kind, [...(byKind.get(p.kind) ?? []), v]);
        due++;
      }
    }
    for (const [kind, vols] of byKind) {
      const { rotations } = await enqueue(vols, kind, 'scheduled', 'server', () => null);
      if (rotations.length > 0) logger.info('rotations scheduled by policy', { kind, count: rotations.length });
    }
  };

  const parsePhase = (s: RotationStatusInput) => s.phase;

  return {
    settings,
    async start(target, kind, reason, actor) {
      const r = checkReason(reason);
      let volumes = selectVolumes(target);
      if (converts(kind)) {
        // Encrypting or decrypting changes what protects a volume's data: one named volume
        // at a time, and only a conversion that exists (convertedFormat says why not).
        if (!('volume' in target)) throw errors.invalid(`${kind} takes a single volume`, { hint: `virtkm volume ${kind} VOLUME` });
        for (const v of volumes) convertedFormat(v.format, kind);
      } else if ('volume' in target) {
        for (const v of volumes) {
          if (isUnencryptedFormat(v.format)) throw errors.precondition(`volume "${v.name}" is not encrypted (${v.format}): it has no key to ${kind}`, { hint: `encrypt it first: virtkm volume encrypt ${v.name}` });
        }
      } else {
        // A guest's, a host's or every volume: those without a key have nothing to replace.
        volumes = volumes.filter((v) => !isUnencryptedFormat(v.format));
      }
      const result = await enqueue(volumes, kind, r, actor, () => null);
      await dispatch();
      // Return the rotations as they are after dispatch (some may have started or finished).
      return { rotations: result.rotations.map((x) => store.getRotation(x.id) ?? x), skipped: result.skipped };
    },
    dispatch,
    async cancel(id, actor) {
      const at = now();
      const cancelled = await store.write((tx) => {
        const r = tx.getRotation(id);
        if (!r) throw errors.notFound('rotation');
        if (r.state !== 'queued') throw errors.precondition(`rotation is ${r.state}: only a queued rotation can be cancelled`);
        const c: RotationRecord = { ...r, state: 'failed', step: 'cancelled', error: `cancelled by ${actor}`, finishedAt: at };
        tx.updateRotation(c);
        tx.appendAudit({ actor, action: rotationAction(r.kind, 'cancel'), target: r.volumeId, outcome: 'ok', detail: { rotation: r.id, kind: r.kind, reason: r.reason } });
        return c;
      });
      emit([cancelled]);
      return cancelled;
    },
    async onHostStatuses(hostId, statuses) {
      const at = now();
      const outcome = await store.write((tx) => {
        const changed: RotationRecord[] = [];
        const hosts: (string | null)[] = [];
        let finished = false;
        for (const s of statuses) {
          const r = tx.getRotation(s.rotationId);
          // Only the host the rotation was given to, only while it runs, only for the
          // version it was given: anything else is stale (an old stream, a replay).
          if (!r || r.state !== 'running' || r.hostId !== hostId || r.volumeId !== s.volumeId || s.targetVersion !== r.toVersion) continue;
          const progress = {
            step: s.step.slice(0, MAX_STEP),
            bytesDone: s.bytesDone,
            bytesTotal: s.bytesTotal,
            bytesPerSecond: s.bytesPerSecond,
            mechanism: s.mechanism.slice(0, 100) || r.mechanism,
          };
          const phase = parsePhase(s);
          const actor = `host:${tx.getHost(hostId)?.name ?? hostId}`;
          if (phase === 'done') {
            const c = complete(tx, r, at, actor, progress);
            changed.push(c.rotation);
            hosts.push(...c.hosts);
            finished = true;
          } else if (phase === 'failed') {
            // The host says the image still opens with the active version. The pending
            // version is kept for the grace period anyway (belt and braces).
            if (r.toVersion > 0) tx.retireKeyVersion(r.volumeId, r.toVersion, at, plusSeconds(at, settings.graceSeconds));
            const failed: RotationRecord = { ...r, ...progress, state: 'failed', error: s.reason.slice(0, 500) || 'failed on the host', finishedAt: at };
            tx.updateRotation(failed);
            tx.bumpHostRevision(hostId);
            tx.appendAudit({ actor, action: rotationAction(r.kind, 'fail'), target: r.volumeId, outcome: 'failed', detail: { rotation: r.id, kind: r.kind, to_version: r.toVersion, reason: failed.error } });
            changed.push(failed);
            hosts.push(hostId);
            finished = true;
          } else {
            const waitReason = phase === 'waiting' ? s.reason.slice(0, MAX_STEP) : '';
            const next: RotationRecord = { ...r, ...progress, step: waitReason ? `waiting: ${waitReason}` : progress.step || r.step };
            if (next.step !== r.step || next.bytesDone !== r.bytesDone || next.bytesTotal !== r.bytesTotal || next.mechanism !== r.mechanism || next.bytesPerSecond !== r.bytesPerSecond) {
              tx.updateRotation(next);
              changed.push(next);
            }
          }
        }
        return { changed, hosts, finished };
      });
      emit(outcome.changed);
      notifier.hostsChanged(outcome.hosts);
      if (outcome.finished) {
        // A slot on the host is free, and compromised keys go at once.
        await destroyDue().catch((err: unknown) => logger.error('destroying retired keys failed', describeError(err)));
        await dispatch();
      }
    },
    async onMoveComplete(guestId) {
      const g = store.getGuest(guestId);
      if (!g) return;
      const vols = g.volumeIds.flatMap((id) => {
        const p = effectivePolicy(store, id);
        const v = store.getVolume(id);
        return p && v && !isUnencryptedFormat(v.format) && p.reencryptAfterMoveSeconds > 0 ? [{ v, window: p.reencryptAfterMoveSeconds }] : [];
      });
      if (vols.length === 0) return;
      const at = now();
      const windows = new Map(vols.map((x) => [x.v.id, x.window]));
      await enqueue(
        vols.map((x) => x.v),
        'reencrypt',
        'move',
        'server',
        (v) => plusSeconds(at, windows.get(v.id) ?? 0),
      );
      await dispatch();
    },
    async tick() {
      await destroyDue();
      await queueAged();
      await dispatch();
    },
    subscribe(listener) {
      events.on('rotation', listener);
      return () => events.off('rotation', listener);
    },
  };
}
