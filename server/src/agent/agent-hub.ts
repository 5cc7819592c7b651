/**
 * The registry of connected agents. Each host has at most one stream; a newer stream
 * replaces an older one. Services call `hostsChanged` after a committed change, and the
 * hub pushes a fresh desired state to each affected host that is connected.
 */
import type { ConnectResponse, DesiredState } from '../../../shared/src/api.js';
import { describeError, type Logger } from '../../../shared/src/log.js';

/** One connected agent stream. */
export interface AgentSession {
  readonly hostId: string;
  agentVersion: string;
  appliedRevision: number;
  /** Revision last pushed on this stream. */
  sentRevision: number;
  connectedAt: string;
  send(msg: ConnectResponse): void;
  /** Ends the stream with an error code (e.g. the host was revoked). */
  close(code: number, details: string): void;
}

/** Connection state of a host, for `host list/show`. */
export interface HostConnection {
  connected: boolean;
  agentVersion: string;
  appliedRevision: number;
  sentRevision: number;
}

/** Notified by services after a change that affects hosts' desired state. */
export interface HostChangeNotifier {
  hostsChanged(hostIds: Iterable<string | null | undefined>): void;
  hostRevoked(hostId: string): void;
}

/** The hub. */
export interface AgentHub extends HostChangeNotifier {
  attach(session: AgentSession): void;
  detach(session: AgentSession): void;
  connection(hostId: string): HostConnection;
  /** Pushes the host's desired state now (if connected). */
  push(hostId: string): Promise<void>;
  closeAll(code: number, details: string): void;
}

/** Creates the hub; `build` makes a host's desired state (sealing key packets). */
export function createAgentHub(build: (hostId: string) => Promise<DesiredState>, logger: Logger): AgentHub {
  const sessions = new Map<string, AgentSession>();
  // Pushes to one host are serialised, and a burst of changes coalesces into one push.
  const pending = new Map<string, Promise<void>>();
  const dirty = new Set<string>();

  const pushNow = async (hostId: string): Promise<void> => {
    const s = sessions.get(hostId);
    if (!s) return;
    const desired = await build(hostId);
    if (sessions.get(hostId) !== s) return; // replaced or gone meanwhile
    s.send({ msg: { $case: 'desired', value: desired } });
    s.sentRevision = Number(desired.revision);
  };
  const schedule = (hostId: string): Promise<void> => {
    dirty.add(hostId);
    const running = pending.get(hostId);
    if (running) return running;
    const p = (async () => {
      while (dirty.delete(hostId)) {
        try {
          await pushNow(hostId);
        } catch (err) {
          logger.error('desired state push failed', { host_id: hostId, ...describeError(err) });
        }
      }
    })().finally(() => pending.delete(hostId));
    pending.set(hostId, p);
    return p;
  };

  return {
    attach(session) {
      const old = sessions.get(session.hostId);
      sessions.set(session.hostId, session);
      if (old) old.close(10 /* ABORTED */, 'replaced by a newer stream from the same host');
      logger.info('agent connected', { host_id: session.hostId, agent_version: session.agentVersion });
    },
    detach(session) {
      if (sessions.get(session.hostId) === session) {
        sessions.delete(session.hostId);
        logger.info('agent disconnected', { host_id: session.hostId });
      }
    },
    connection(hostId) {
      const s = sessions.get(hostId);
      return s
        ? { connected: true, agentVersion: s.agentVersion, appliedRevision: s.appliedRevision, sentRevision: s.sentRevision }
        : { connected: false, agentVersion: '', appliedRevision: 0, sentRevision: 0 };
    },
    push: schedule,
    hostsChanged(hostIds) {
      for (const id of new Set(hostIds)) if (id) void schedule(id);
    },
    hostRevoked(hostId) {
      const s = sessions.get(hostId);
      if (s) {
        sessions.delete(hostId);
        s.close(16 /* UNAUTHENTICATED */, 'host has been revoked');
      }
    },
    closeAll(code, details) {
      for (const s of sessions.values()) s.close(code, details);
      sessions.clear();
    },
  };
}
