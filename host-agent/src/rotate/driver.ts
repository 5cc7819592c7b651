/**
 * The agent's rotation driver: runs the rotation orders of the desired state in the
 * background, one job per order, with the mechanism that fits the volume's format and the
 * guest's state, and says how far each got.
 *
 * Choice of mechanism (see docs/operations.md, "Key rotation"):
 *   luks, qcow2-luks  guest running: live blockcopy (for a rekey too: QEMU holds the image
 *                     lock, so qemu-img amend cannot run; a new data key is stronger anyway);
 *                     guest stopped: rekey = qemu-img amend, reencrypt = qemu-img convert.
 *   luks2             rekey = cryptsetup luksAddKey + luksKillSlot (works while mapped);
 *                     reencrypt = cryptsetup reencrypt: guest stopped, offline on the image
 *                     file; guest running, online on its open mapping (luks2-online.ts;
 *                     without that mechanism, e.g. no device-mapper, the order waits).
 *   plain             reencrypt through two dm-crypt mappings; rekey is refused (no keyslots).
 *   encrypt, decrypt  raw <-> luks, qcow2 <-> qcow2-luks: qemu-img convert with the guest
 *                     stopped, live blockcopy while it runs (the same mechanisms, one side
 *                     without a key); other formats are refused.
 *
 * Every mechanism is idempotent and resumes after a crash (types.ts), so the driver keeps
 * no journal of its own: after a restart the same order simply runs again. One exception
 * to the choice above: when a live copy of the order left its journal, the live copy runs
 * again even if the guest stopped meanwhile (it finishes a pivoted copy offline, or rolls
 * back), because after a pivot the image at the canonical path is stale. A job that
 * fails is retried on later passes (a tool can fail for passing reasons); after
 * MAX_ATTEMPTS, or at once for a lack of disk space, it is reported failed, but only once
 * the image was checked to open with the old key (if it opens with the new one only, the
 * rotation is reported done instead; if it opens with neither, it keeps waiting, so the
 * server keeps both keys).
 *
 * The driver owns copies of the two keys while a job runs and wipes them when it ends.
 */
import { describeError, type Logger } from '../../../shared/src/log.js';
import { isDomainError } from '../../../shared/src/errors.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import { existsSync } from 'node:fs';
import type { ImageSpec } from '../images/types.js';
import { legacyLiveCopyPaths, liveCopyJournalPath } from './live-copy.js';
import type { RotationKind, RotationMechanism, RotationProgress } from './types.js';

/** After this many failed runs of one order, it is reported failed. */
export const MAX_ATTEMPTS = 3;
/** Retry interval of an order whose image opens with neither key. */
export const NEITHER_KEY_RETRY_MS = 10 * 60 * 1000;

/** The mechanisms the driver may use (built in the composition root). */
export interface RotationMechanisms {
  qemuRekey: RotationMechanism;
  qemuConvert: RotationMechanism;
  liveCopy: RotationMechanism;
  luks2Rekey: RotationMechanism;
  luks2Reencrypt: RotationMechanism;
  /** Online LUKS2 re-encryption of a running guest's mapping; absent: such orders wait for the guest to stop. */
  luks2Online?: RotationMechanism;
  plainReencrypt: RotationMechanism;
}

/** One order as the reconciler sees it. */
export interface OrderContext {
  rotationId: string;
  volumeId: string;
  /** encrypt, decrypt: the image changes format (spec.format is the target's). */
  kind: RotationKind | 'encrypt' | 'decrypt';
  fromVersion: number;
  targetVersion: number;
  spec: ImageSpec;
  /** The image's format before (default spec.format; differs when encrypting or decrypting). */
  fromFormat?: ImageSpec['format'];
  /** Keys of the two versions (the driver copies them); none for an unencrypted side. */
  oldKey: Uint8Array | undefined;
  newKey: Uint8Array | undefined;
  /** Whether the guest using the volume runs now. */
  guestRunning: boolean;
  /** The running guest's libvirt domain and the volume's disk target (for live copies). */
  domain?: { name: string; diskTarget: string; volumeName: string };
}

/** Where an order stands. */
export type JobPhase = 'waiting' | 'running' | 'done' | 'failed';

export interface JobStatus {
  rotationId: string;
  volumeId: string;
  targetVersion: number;
  phase: JobPhase;
  mechanism: string;
  step: string;
  bytesDone: bigint;
  bytesTotal: bigint;
  bytesPerSecond: number;
  reason: string;
  /** The job needs the guest stopped (offline mechanism): the guest must not start. */
  offline: boolean;
}

interface Job {
  status: JobStatus;
  order: Omit<OrderContext, 'oldKey' | 'newKey'> | undefined;
  attempts: number;
  /** A failed attempt is retried no sooner than this (ms since the epoch). */
  notBefore: number;
  running: Promise<void> | undefined;
  abort: AbortController | undefined;
}

export interface RotationDriverDeps {
  mechanisms: RotationMechanisms;
  /** Checks which key opens an image after a failure. */
  testKey(spec: ImageSpec, key: Uint8Array): Promise<boolean>;
  /** A job ended (done or failed) or needs another pass: re-apply the desired state. */
  onChange(): void;
  /** Progress of running jobs, at most about once per second. */
  onProgress(statuses: JobStatus[]): void;
  logger: Logger;
  progressIntervalMs?: number;
  /** Delay before a failed attempt is retried, times the attempt number (default 5 s). */
  retryDelayMs?: number;
}

export interface RotationDriver {
  /** Starts the order's job if it is not running, done or failed; returns its status. */
  ensure(order: OrderContext): JobStatus;
  /** The status of an order the driver knows. */
  status(rotationId: string): JobStatus | undefined;
  /** The order a running job was started with (without its keys), e.g. for a live copy's placement. */
  order(rotationId: string): Omit<OrderContext, 'oldKey' | 'newKey'> | undefined;
  /** Marks an order as waiting (it cannot start yet) with a reason. */
  wait(rotationId: string, volumeId: string, targetVersion: number, reason: string): JobStatus;
  /** Forgets (and aborts) every order not in `keep`. */
  retain(keep: Set<string>): void;
  /** Aborts every job and waits for them. */
  stop(): Promise<void>;
}

/** The mechanism for an order, or why there is none; `jobKind`: the kind the mechanism is run with when it is not the order's. */
export function chooseMechanism(m: RotationMechanisms, o: Pick<OrderContext, 'kind' | 'guestRunning' | 'fromFormat'> & { format: ImageSpec['format'] }): { mechanism: RotationMechanism; offline: boolean; jobKind?: RotationKind } | { refuse: string } | { wait: string } {
  if (o.kind === 'encrypt' || o.kind === 'decrypt') {
    // The copy mechanisms re-encrypt with one side unencrypted (kind reencrypt for them).
    const [plain, encrypted] = o.kind === 'encrypt' ? [o.fromFormat, o.format] : [o.format, o.fromFormat];
    const pair = (plain === 'raw' && encrypted === 'luks') || (plain === 'qcow2' && encrypted === 'qcow2-luks');
    if (!pair) return { refuse: `${o.kind === 'encrypt' ? 'encrypting' : 'decrypting'} converts raw <-> luks and qcow2 <-> qcow2-luks only` };
    if (o.guestRunning) return { mechanism: m.liveCopy, offline: false, jobKind: 'reencrypt' };
    return { mechanism: m.qemuConvert, offline: true, jobKind: 'reencrypt' };
  }
  switch (o.format) {
    case 'luks':
    case 'qcow2-luks':
      // The live copy only re-encrypts: a rekey of a running guest is carried out as one.
      if (o.guestRunning) return { mechanism: m.liveCopy, offline: false, jobKind: 'reencrypt' };
      return { mechanism: o.kind === 'rekey' ? m.qemuRekey : m.qemuConvert, offline: true };
    case 'luks2':
      if (o.kind === 'rekey') return { mechanism: m.luks2Rekey, offline: false };
      // Online: the guest keeps running on its mapping (not offline: it may run, and start).
      if (o.guestRunning) return m.luks2Online ? { mechanism: m.luks2Online, offline: false } : { wait: 'stop the guest: online LUKS2 re-encryption is not available on this host' };
      return { mechanism: m.luks2Reencrypt, offline: true };
    case 'plain':
      if (o.kind === 'rekey') return { refuse: 'plain dm-crypt has no keyslots to rekey: use reencrypt' };
      if (o.guestRunning) return { wait: 'stop the guest: plain dm-crypt is re-encrypted offline' };
      return { mechanism: m.plainReencrypt, offline: true };
    case 'raw':
    case 'qcow2':
      return { refuse: 'an unencrypted volume has no key to replace' };
  }
}

/** Whether a live copy of this order left its journal next to the image (today's name or an earlier version's). */
export function hasLiveCopyJournal(order: Pick<OrderContext, 'rotationId' | 'spec'>): boolean {
  try {
    return existsSync(liveCopyJournalPath(order.spec.path, order.rotationId)) || existsSync(legacyLiveCopyPaths(order.spec.path, order.rotationId).journal);
  } catch {
    return false; // a name no live copy could have used
  }
}

export function createRotationDriver(deps: RotationDriverDeps): RotationDriver {
  const { logger } = deps;
  const jobs = new Map<string, Job>();
  let lastProgress = 0;
  let progressTimer: NodeJS.Timeout | undefined;
  const interval = deps.progressIntervalMs ?? 1000;

  const flushProgress = () => {
    progressTimer = undefined;
    lastProgress = Date.now();
    const running = [...jobs.values()].filter((j) => j.status.phase === 'running').map((j) => ({ ...j.status }));
    if (running.length > 0) deps.onProgress(running);
  };
  const progressChanged = () => {
    if (progressTimer) return;
    const due = Math.max(0, lastProgress + interval - Date.now());
    progressTimer = setTimeout(flushProgress, due);
    progressTimer.unref();
  };

  const fresh = (rotationId: string, volumeId: string, targetVersion: number): Job => ({
    status: { rotationId, volumeId, targetVersion, phase: 'waiting', mechanism: '', step: '', bytesDone: 0n, bytesTotal: 0n, bytesPerSecond: 0, reason: '', offline: false },
    order: undefined,
    attempts: 0,
    notBefore: 0,
    running: undefined,
    abort: undefined,
  });

  const run = (job: Job, order: OrderContext, mechanism: RotationMechanism, kind: RotationKind) => {
    const oldKey = order.oldKey && ownedCopy(order.oldKey);
    const newKey = order.newKey && ownedCopy(order.newKey);
    const fromFormat = order.fromFormat ?? order.spec.format;
    const abort = new AbortController();
    job.abort = abort;
    job.attempts += 1;
    Object.assign(job.status, { phase: 'running', mechanism: mechanism.name, step: 'starting', reason: '' });
    job.running = (async () => {
      try {
        const result = await mechanism.run(
          { rotationId: order.rotationId, volumeId: order.volumeId, kind, target: order.spec, fromFormat, oldKey, newKey },
          {
            signal: abort.signal,
            onProgress: (p: RotationProgress) => {
              Object.assign(job.status, { step: p.step, bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, bytesPerSecond: p.bytesPerSecond });
              progressChanged();
            },
          },
        );
        Object.assign(job.status, { phase: 'done', step: result.verified ? 'done (verified)' : 'done', bytesDone: result.bytesRewritten > job.status.bytesDone ? result.bytesRewritten : job.status.bytesDone });
        logger.info('rotation done', { rotation_id: order.rotationId, volume_id: order.volumeId, mechanism: mechanism.name, bytes: result.bytesRewritten });
      } catch (err) {
        if (abort.signal.aborted) {
          Object.assign(job.status, { phase: 'waiting', step: 'aborted', reason: 'aborted' });
          return;
        }
        const reason = isDomainError(err) ? err.message : 'internal error (see the agent log)';
        logger.warn('rotation attempt failed', { rotation_id: order.rotationId, volume_id: order.volumeId, attempt: job.attempts, ...describeError(err) });
        const final = job.attempts >= MAX_ATTEMPTS || (isDomainError(err) && (err.kind === 'resource_exhausted' || err.kind === 'invalid_argument'));
        if (!final) {
          job.notBefore = Date.now() + (deps.retryDelayMs ?? 5000) * job.attempts;
          Object.assign(job.status, { phase: 'waiting', step: `retrying after: ${reason}`, reason });
          return;
        }
        // Before saying "failed" (the server then keeps the active version), make sure the
        // image really opens with it; if it opens with the new one only, it is done.
        // (An unencrypted side "opens" when the image is of that kind: testKey ignores the key.)
        const opensOld = await deps.testKey({ ...order.spec, format: fromFormat }, oldKey ?? new Uint8Array(0)).catch(() => false);
        const opensNew = opensOld ? false : await deps.testKey(order.spec, newKey ?? new Uint8Array(0)).catch(() => false);
        if (opensOld) Object.assign(job.status, { phase: 'failed', step: 'failed', reason });
        else if (opensNew) Object.assign(job.status, { phase: 'done', step: 'done (found finished)', reason: '' });
        else {
          // Neither key opens it (e.g. a LUKS2 re-encryption that cryptsetup must finish
          // first): never "failed", which would let the server retire the new key. The
          // rotation stays running, so the server keeps both keys, and is retried slowly.
          job.notBefore = Date.now() + NEITHER_KEY_RETRY_MS;
          Object.assign(job.status, { phase: 'waiting', step: 'needs attention', reason: `${reason}; the image opens with neither key: both keys are kept, retrying` });
        }
      } finally {
        wipe(oldKey, newKey);
        job.running = undefined;
        job.abort = undefined;
        deps.onChange();
      }
    })();
  };

  return {
    ensure(order) {
      let job = jobs.get(order.rotationId);
      if (!job) {
        job = fresh(order.rotationId, order.volumeId, order.targetVersion);
        jobs.set(order.rotationId, job);
      }
      if (job.running || job.status.phase === 'done' || job.status.phase === 'failed' || Date.now() < job.notBefore) return job.status;
      // An unfinished live copy of this order (the agent died during it, and the guest has
      // stopped since) is finished or rolled back by the live copy itself, whatever the
      // guest's state: after its pivot the copy holds the guest's newest data and the image
      // at the canonical path is stale, so an offline mechanism must not touch that image.
      const choice = hasLiveCopyJournal(order)
        ? ({ mechanism: deps.mechanisms.liveCopy, offline: !order.guestRunning, jobKind: 'reencrypt' } as const)
        : chooseMechanism(deps.mechanisms, { kind: order.kind, guestRunning: order.guestRunning, format: order.spec.format, ...(order.fromFormat ? { fromFormat: order.fromFormat } : {}) });
      if ('refuse' in choice) {
        Object.assign(job.status, { phase: 'failed', step: 'refused', reason: choice.refuse });
        return job.status;
      }
      if ('wait' in choice) {
        Object.assign(job.status, { phase: 'waiting', step: 'waiting', reason: choice.wait, offline: false });
        return job.status;
      }
      job.status.offline = choice.offline;
      const { oldKey: _o, newKey: _n, ...withoutKeys } = order;
      job.order = withoutKeys;
      run(job, order, choice.mechanism, choice.jobKind ?? (order.kind === 'rekey' ? 'rekey' : 'reencrypt'));
      return job.status;
    },
    status(rotationId) {
      return jobs.get(rotationId)?.status;
    },
    order(rotationId) {
      return jobs.get(rotationId)?.order;
    },
    wait(rotationId, volumeId, targetVersion, reason) {
      let job = jobs.get(rotationId);
      if (!job) {
        job = fresh(rotationId, volumeId, targetVersion);
        jobs.set(rotationId, job);
      }
      if (!job.running && job.status.phase === 'waiting') Object.assign(job.status, { step: 'waiting', reason });
      return job.status;
    },
    retain(keep) {
      for (const [id, job] of jobs) {
        if (keep.has(id)) continue;
        job.abort?.abort();
        jobs.delete(id);
      }
    },
    async stop() {
      if (progressTimer) clearTimeout(progressTimer);
      for (const job of jobs.values()) job.abort?.abort();
      await Promise.all([...jobs.values()].map((j) => j.running));
    },
  };
}
