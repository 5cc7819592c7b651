/**
 * The agent daemon: one long-lived stream to the server, reconnecting with exponential
 * backoff and jitter; every desired state received is reconciled (one at a time, the
 * newest wins) and answered with a report; the newest desired state is re-applied
 * periodically (libvirt forgets ephemeral secrets when libvirtd restarts, and a reconcile
 * that failed is retried that way). At start, the
 * cached desired state brings autostart guests up even if the server is unreachable.
 */
import { Metadata, type ClientDuplexStream } from '@grpc/grpc-js';
import { AgentServiceClient, DesiredState, GuestPhase, type ConnectRequest, type ConnectResponse, type HostReport, type RotationStatus } from '../../../shared/src/api.js';
import { CLIENT_CHANNEL_OPTIONS, channelCredentials, type ClientTlsMaterial } from '../../../shared/src/grpc-client.js';
import { describeError, type Logger } from '../../../shared/src/log.js';
import { reconcile, type ReconcilerDeps } from '../reconcile/reconciler.js';

/** Life-cycle states of the daemon. */
export type DaemonState = 'starting' | 'running' | 'draining' | 'stopped';

/** What the daemon needs. */
export interface DaemonOptions {
  server: string;
  tls: ClientTlsMaterial;
  reconciler: ReconcilerDeps;
  logger: Logger;
  agentVersion: string;
  /** Re-apply interval of the last desired state (default 30 s). */
  resyncMs?: number;
  /** Backoff bounds (default 1 s to 60 s). */
  backoffMinMs?: number;
  backoffMaxMs?: number;
}

/** A running daemon. */
export interface AgentDaemon {
  state(): DaemonState;
  /** Resolves after the first reconcile (offline from the cache, or online). */
  started: Promise<void>;
  /** Applies the newest desired state again soon (a rotation job ended). */
  reapply(): void;
  /** Sends rotation progress to the server (between reports). */
  sendProgress(statuses: RotationStatus[]): void;
  stop(): Promise<void>;
}

/** Delay before reconnect attempt `n` (0-based): exponential, capped, with ±50 % jitter. */
export function backoffDelay(n: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const base = Math.min(maxMs, minMs * 2 ** Math.min(n, 20));
  return Math.round(base * (0.5 + random()));
}

/** Starts the daemon. */
export function startAgentDaemon(o: DaemonOptions): AgentDaemon {
  const { logger } = o;
  let state: DaemonState = 'starting';
  let stream: ClientDuplexStream<ConnectRequest, ConnectResponse> | undefined;
  let latest: DesiredState | undefined;
  let appliedRevision = 0n;
  let pending: DesiredState | undefined;
  let working: Promise<void> = Promise.resolve();
  let attempt = 0;
  let reconnectTimer: NodeJS.Timeout | undefined;
  const client = new AgentServiceClient(o.server, channelCredentials(o.tls), { ...CLIENT_CHANNEL_OPTIONS, 'grpc.keepalive_time_ms': 30_000 });

  const send = (report: HostReport) => {
    if (stream && state === 'running') stream.write({ msg: { $case: 'report', value: report } });
  };

  /** Applies the newest pending desired state; runs one at a time. */
  const kick = () => {
    working = working.then(async () => {
      const next = pending;
      pending = undefined;
      if (!next || state === 'stopped') return;
      // The newest state received is what the periodic resync re-applies, also when this
      // attempt fails (libvirtd down, a tool failing): a failed reconcile is retried.
      latest = next;
      try {
        const report = await reconcile(next, o.reconciler);
        appliedRevision = next.revision;
        send(report);
        logger.info('reconciled', { revision: next.revision, guests: report.guests.length, volumes: report.volumes.length });
      } catch (err) {
        logger.error('reconcile failed', describeError(err));
      }
      if (pending) kick();
    });
  };

  const connect = () => {
    if (state === 'draining' || state === 'stopped') return;
    const s = client.connect(new Metadata());
    stream = s;
    s.write({ msg: { $case: 'hello', value: { agentVersion: o.agentVersion, appliedRevision } } });
    s.on('data', (m: ConnectResponse) => {
      if (m.msg?.$case !== 'desired') return;
      attempt = 0;
      pending = m.msg.value;
      kick();
    });
    const retry = (why: string, refused = false) => {
      if (stream !== s) return;
      stream = undefined;
      if (state === 'draining' || state === 'stopped') return;
      // A refused host (revoked, unknown certificate) keeps trying, slowly: an admin may
      // re-enroll it. Its guests keep what they have until the server says otherwise.
      const delay = refused ? (o.backoffMaxMs ?? 60_000) : backoffDelay(attempt++, o.backoffMinMs ?? 1000, o.backoffMaxMs ?? 60_000);
      if (refused) logger.error('the server refuses this host', { reason: why, hint: 'the host may have been revoked: check `virtkm host show`, re-enroll if needed', delay_ms: delay });
      else logger.warn('server stream closed; reconnecting', { reason: why, delay_ms: delay });
      reconnectTimer = setTimeout(connect, delay);
    };
    s.on('error', (e: Error & { details?: string; code?: number }) => retry(e.details ?? e.message, e.code === 16 || e.code === 7));
    s.on('end', () => retry('ended by server'));
  };

  const resync = setInterval(() => {
    if (latest && !pending) {
      pending = latest;
      kick();
    }
  }, o.resyncMs ?? 30_000);
  resync.unref();

  const started = (async () => {
    // Offline start: the cached desired state (no packets), keys from the cache.
    const cached = o.reconciler.cache.lastDesired();
    if (cached) {
      try {
        const desired = DesiredState.decode(cached);
        const report = await reconcile(desired, o.reconciler, true);
        logger.info('started guests from the cache', { running: report.guests.filter((g) => g.phase === GuestPhase.GUEST_PHASE_RUNNING).length });
      } catch (err) {
        logger.error('offline start from the cache failed', describeError(err));
      }
    }
    state = 'running';
    connect();
  })();

  return {
    state: () => state,
    started,
    reapply() {
      if (latest && !pending && state === 'running') {
        pending = latest;
        kick();
      }
    },
    sendProgress(statuses) {
      if (stream && state === 'running') stream.write({ msg: { $case: 'progress', value: { rotations: statuses } } });
    },
    async stop() {
      if (state === 'stopped') return;
      state = 'draining';
      clearInterval(resync);
      if (reconnectTimer) clearTimeout(reconnectTimer);
      stream?.cancel();
      await working;
      client.close();
      state = 'stopped';
    },
  };
}
