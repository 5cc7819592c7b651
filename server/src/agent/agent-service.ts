/**
 * AgentService.Connect: the long-lived stream of each host's agent. The server pushes the
 * host's desired state (with key packets sealed to the host, each release audited before
 * it is sent) and stores what the agent reports; a report can complete a move.
 */
import type { ServerDuplexStream } from '@grpc/grpc-js';
import {
  GuestPhase,
  RotationKind,
  RotationPhase,
  VolumePhase,
  type AgentServiceServer,
  type ConnectRequest,
  type ConnectResponse,
  type DesiredState,
  type HostReport,
  type RotationOrder,
  type RotationStatus,
  type SealedKeyPacket,
} from '../../../shared/src/api.js';
import { createRecipientCache, type BoxRecipient } from '../../../shared/src/box.js';
import { errors, toWireError } from '../../../shared/src/errors.js';
import { describeError } from '../../../shared/src/log.js';
import type { Clock } from '../domain/clock.js';
import type { GuestStatusRecord, HostRecord, RotationKindName, VolumeRecord, VolumeStatusRecord } from '../domain/model.js';
import { convertedFormat } from '../domain/volume-spec.js';
import { FORMAT_TO_API } from '../../../shared/src/formats.js';
import { authenticate, type Principal } from '../rpc/auth.js';
import type { RpcContext } from '../rpc/handler.js';
import type { StoreReader } from '../store/ports.js';
import type { KeyVault } from '../vault/key-vault.js';
import type { EphemeralSource } from '../vault/ephemeral-pool.js';
import type { RotationManager, RotationStatusInput } from '../rotation/rotation-manager.js';
import type { AgentHub, AgentSession } from './agent-hub.js';
import { buildDesiredState, isHandoffComplete } from './desired-state.js';

/** Dependencies of the agent service. */
export interface AgentServiceDeps extends RpcContext {
  vault: KeyVault;
  clock: Clock;
  hub: AgentHub;
  rotations: RotationManager;
  /** Precomputed ephemeral X25519 shares (vault/ephemeral-pool.ts); without it packets seal inline. */
  ephemeral?: EphemeralSource;
}

/** Most guests or volumes one report may list. */
const MAX_REPORT_ITEMS = 10_000;
const MAX_REASON = 500;
/** How long a new stream may take to say hello. */
const HELLO_TIMEOUT_MS = 15_000;

const GUEST_PHASE_NAMES: Readonly<Record<number, string>> = {
  [GuestPhase.GUEST_PHASE_PENDING]: 'pending',
  [GuestPhase.GUEST_PHASE_DEFINED]: 'defined',
  [GuestPhase.GUEST_PHASE_RUNNING]: 'running',
  [GuestPhase.GUEST_PHASE_STOPPED]: 'stopped',
  [GuestPhase.GUEST_PHASE_FAILED]: 'failed',
  [GuestPhase.GUEST_PHASE_WIPED]: 'wiped',
};
const VOLUME_PHASE_NAMES: Readonly<Record<number, string>> = {
  [VolumePhase.VOLUME_PHASE_PENDING]: 'pending',
  [VolumePhase.VOLUME_PHASE_READY]: 'ready',
  [VolumePhase.VOLUME_PHASE_MISSING]: 'missing',
  [VolumePhase.VOLUME_PHASE_WRONG_KEY]: 'wrong_key',
  [VolumePhase.VOLUME_PHASE_FAILED]: 'failed',
  [VolumePhase.VOLUME_PHASE_WIPED]: 'wiped',
};

/** Validates a report and turns it into status records. */
export function parseHostReport(hostId: string, r: HostReport, at: string): { guests: GuestStatusRecord[]; volumes: VolumeStatusRecord[] } {
  if (r.guests.length > MAX_REPORT_ITEMS || r.volumes.length > MAX_REPORT_ITEMS) throw errors.tooLarge('report lists too many items');
  const guests = r.guests.map((g) => {
    const phase = GUEST_PHASE_NAMES[g.phase];
    if (!phase) throw errors.invalid('unknown guest phase in report');
    return { guestId: g.guestId, hostId, generation: Number(g.generation), phase, reason: g.reason.slice(0, MAX_REASON), reportedAt: at };
  });
  const volumes = r.volumes.map((v) => {
    const phase = VOLUME_PHASE_NAMES[v.phase];
    if (!phase) throw errors.invalid('unknown volume phase in report');
    return { volumeId: v.volumeId, hostId, keyVersion: v.keyVersion, phase, reason: v.reason.slice(0, MAX_REASON), reportedAt: at };
  });
  return { guests, volumes };
}

const ROTATION_PHASE_NAMES: Readonly<Record<number, RotationStatusInput['phase']>> = {
  [RotationPhase.ROTATION_PHASE_WAITING]: 'waiting',
  [RotationPhase.ROTATION_PHASE_RUNNING]: 'running',
  [RotationPhase.ROTATION_PHASE_DONE]: 'done',
  [RotationPhase.ROTATION_PHASE_FAILED]: 'failed',
};

/** Validates what an agent says about its rotation orders. */
export function parseRotationStatuses(list: RotationStatus[]): RotationStatusInput[] {
  if (list.length > MAX_REPORT_ITEMS) throw errors.tooLarge('report lists too many rotations');
  const num = (v: bigint) => (v < 0n ? 0 : v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v));
  return list.map((s) => {
    const phase = ROTATION_PHASE_NAMES[s.phase];
    if (!phase) throw errors.invalid('unknown rotation phase in report');
    return {
      rotationId: s.rotationId,
      volumeId: s.volumeId,
      phase,
      step: s.step.slice(0, MAX_REASON),
      bytesDone: num(s.bytesDone),
      bytesTotal: num(s.bytesTotal),
      bytesPerSecond: num(s.bytesPerSecond),
      reason: s.reason.slice(0, MAX_REASON),
      mechanism: s.mechanism.slice(0, 100),
      targetVersion: s.targetVersion,
    };
  });
}

const KIND_TO_ORDER: Readonly<Record<RotationKindName, RotationKind>> = {
  rekey: RotationKind.ROTATION_KIND_REKEY,
  reencrypt: RotationKind.ROTATION_KIND_REENCRYPT,
  encrypt: RotationKind.ROTATION_KIND_ENCRYPT,
  decrypt: RotationKind.ROTATION_KIND_DECRYPT,
};

/** Whether the host last reported the volume's image ready at its active key version. */
function isReadyOnHost(store: StoreReader, hostId: string, v: VolumeRecord): boolean {
  const st = store.volumeStatuses(v.id).find((x) => x.hostId === hostId);
  return st?.phase === 'ready' && st.keyVersion === v.activeVersion;
}

/** The desired-state builder the hub uses: seals packets, audits each release first. */
export function createDesiredStateBuilder(deps: Omit<AgentServiceDeps, 'hub' | 'rotations'>, sentPackets: (hostId: string) => Set<string>) {
  const { store, vault, clock } = deps;
  // Parsed X25519 keys per host, so the hot path does not re-import them.
  const recipients = createRecipientCache();
  const recipientOf = (host: HostRecord): BoxRecipient => recipients(host.id, host.boxPublicKey);

  return async (hostId: string): Promise<DesiredState> => {
    const host = store.getHost(hostId);
    if (!host || host.state !== 'enrolled') throw errors.unauthenticated('host is not enrolled');
    const issuedAt = clock.now().toISOString();
    const released: { volumeId: string; version: number }[] = [];
    const sent = sentPackets(hostId);
    const packetFor = (v: VolumeRecord): SealedKeyPacket | undefined => {
      // A volume the host reported ready at its active version needs no packet again.
      if (isReadyOnHost(store, hostId, v)) return undefined;
      const key = store.getActiveKey(v.id);
      if (!key) return undefined;
      released.push({ volumeId: v.id, version: key.version });
      sent.add(`${v.id}:${v.activeVersion}`);
      return vault.packetForHost(v, key, { hostId, recipient: recipientOf(host), shares: deps.ephemeral }, issuedAt);
    };
    // A running rotation's order carries the new version's packet on every push (the host
    // needs it until it reports the rotation done; pushes happen only on changes).
    const running = new Map(store.runningRotationsOnHost(hostId).map((r) => [r.volumeId, r]));
    const rotationFor = (v: VolumeRecord): RotationOrder | undefined => {
      const r = running.get(v.id);
      if (!r) return undefined;
      // Encrypt and decrypt change the format: the order names the one the image ends in
      // (and the new version's packet is made for it). A decryption has no new version.
      const targetFormat = r.kind === 'encrypt' || r.kind === 'decrypt' ? convertedFormat(v.format, r.kind) : v.format;
      let targetPacket: SealedKeyPacket | undefined;
      if (r.toVersion > 0) {
        const key = store.getKeyVersions(v.id).find((k) => k.version === r.toVersion);
        if (!key || key.sealed === null) return undefined;
        released.push({ volumeId: v.id, version: key.version });
        targetPacket = vault.packetForHost({ ...v, format: targetFormat }, key, { hostId, recipient: recipientOf(host), shares: deps.ephemeral }, issuedAt);
      }
      return { rotationId: r.id, kind: KIND_TO_ORDER[r.kind], targetVersion: r.toVersion, targetPacket, targetFormat: FORMAT_TO_API[targetFormat] };
    };
    const desired = buildDesiredState(hostId, host.desiredRevision, store, packetFor, issuedAt, rotationFor);
    if (released.length > 0) {
      await store.write((tx) => {
        for (const r of released) tx.appendAudit({ actor: `host:${host.name}`, action: 'key.release', target: r.volumeId, outcome: 'ok', detail: { key_version: r.version, via: 'desired_state' } });
      });
    }
    return desired;
  };
}

/** Creates the grpc-js implementation of AgentService. */
export function createAgentService(deps: AgentServiceDeps, sentPackets: (hostId: string) => Set<string>): AgentServiceServer {
  const { store, clock, hub, logger, rotations } = deps;

  /** After a report: complete moves whose both ends are ready, push missing packets. */
  const afterReport = async (hostId: string): Promise<void> => {
    const changed = new Set<string>();
    const sent = sentPackets(hostId);
    for (const g of store.guestsForHost(hostId)) {
      // A placed volume the host lacks (not ready) whose packet this stream has not carried.
      if (g.hostId === hostId) {
        for (const id of g.volumeIds) {
          const v = store.getVolume(id);
          // (An unencrypted volume has no packet to send.)
          if (v && v.activeVersion > 0 && !isReadyOnHost(store, hostId, v) && !sent.has(`${id}:${v.activeVersion}`)) changed.add(hostId);
        }
      }
      if (g.handoffFromHostId === null || g.hostId === null) continue;
      const source = store.getHost(g.handoffFromHostId);
      if (!isHandoffComplete(g, store.guestStatuses(g.id))) continue;
      const from = g.handoffFromHostId;
      const to = g.hostId;
      await store.write((tx) => {
        const cur = tx.getGuest(g.id);
        if (!cur || cur.handoffFromHostId !== from || cur.hostId !== to) return;
        tx.upsertGuest({ ...cur, handoffFromHostId: null, updatedAt: clock.now().toISOString() });
        tx.bumpHostRevision(from);
        tx.bumpHostRevision(to);
        tx.appendAudit({ actor: 'server', action: 'guest.move.complete', target: g.id, outcome: 'ok', detail: { name: g.name, from: source?.name ?? from, to: store.getHost(to)?.name ?? to } });
      });
      changed.add(from).add(to);
      await rotations.onMoveComplete(g.id).catch((err: unknown) => logger.error('queueing re-encryption after a move failed', describeError(err)));
    }
    hub.hostsChanged(changed);
  };

  return {
    connect(call: ServerDuplexStream<ConnectRequest, ConnectResponse>) {
      const fail = (err: unknown) => {
        const wire = toWireError(err);
        if (wire.unexpected) logger.error('agent stream failed', describeError(err));
        call.emit('error', { code: wire.code, details: wire.details });
      };
      let principal: Principal;
      try {
        principal = authenticate(call, store, ['host']);
      } catch (err) {
        fail(err);
        return;
      }
      const hostId = principal.hostId as string;
      let session: AgentSession | undefined;
      let closed = false;
      const helloTimer = setTimeout(() => fail(errors.invalid('no hello on the agent stream')), HELLO_TIMEOUT_MS);
      // Reports are processed one at a time, in order.
      let queue = Promise.resolve();
      const cleanup = () => {
        clearTimeout(helloTimer);
        if (session) hub.detach(session);
        closed = true;
      };
      call.on('data', (req: ConnectRequest) => {
        queue = queue.then(async () => {
          if (closed) return;
          try {
            const msg = req.msg;
            if (!msg) throw errors.invalid('empty agent message');
            if (msg.$case === 'hello') {
              if (session) throw errors.invalid('hello sent twice');
              clearTimeout(helloTimer);
              session = {
                hostId,
                agentVersion: msg.value.agentVersion.slice(0, 64),
                appliedRevision: Number(msg.value.appliedRevision),
                sentRevision: 0,
                connectedAt: clock.now().toISOString(),
                send: (m) => {
                  if (!closed) call.write(m);
                },
                close: (code, details) => {
                  if (!closed) call.emit('error', { code, details });
                },
              };
              sentPackets(hostId).clear();
              hub.attach(session);
              await store.write((tx) => tx.touchHost(hostId, clock.now().toISOString()));
              await hub.push(hostId);
              return;
            }
            if (!session) throw errors.invalid('the first agent message must be hello');
            if (msg.$case === 'progress') {
              await rotations.onHostStatuses(hostId, parseRotationStatuses(msg.value.rotations));
              return;
            }
            const at = clock.now().toISOString();
            const report = parseHostReport(hostId, msg.value, at);
            const rotationStatuses = parseRotationStatuses(msg.value.rotations);
            session.appliedRevision = Number(msg.value.revision);
            await store.write((tx) => {
              tx.replaceHostReport(hostId, report.guests, report.volumes);
              tx.markMaterialized(report.volumes.filter((v) => v.phase === 'ready').map((v) => v.volumeId), at);
              tx.completeImageDeletions(hostId, msg.value.deletedImages.slice(0, MAX_REPORT_ITEMS));
              tx.touchHost(hostId, at);
            });
            await rotations.onHostStatuses(hostId, rotationStatuses);
            await afterReport(hostId);
          } catch (err) {
            cleanup();
            fail(err);
          }
        });
      });
      call.on('end', () => {
        cleanup();
        call.end();
      });
      call.on('error', cleanup);
      call.on('cancelled', cleanup);
    },
  };
}
