/**
 * Builds and runs the gRPC listeners: the main mutual-TLS listener with every service and
 * the health service, and the optional enrollment listener with EnrollmentService only.
 * A small state machine (starting, running, draining, stopped) governs shutdown.
 */
import { Server, type ServerCredentials } from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import {
  AgentServiceService,
  AuditServiceService,
  CredentialServiceService,
  EnrollmentServiceService,
  GuestServiceService,
  HostServiceService,
  KeyServiceService,
  RotationServiceService,
  VolumeServiceService,
  UnsealServiceService,
  type UnsealServiceServer,
} from '../../../shared/src/api.js';
import type { ServerInterceptor } from '@grpc/grpc-js';
import type { Logger } from '../../../shared/src/log.js';
import type { Clock } from '../domain/clock.js';
import type { CertificateIssuer } from '../pki/issuer.js';
import { createAgentHub } from '../agent/agent-hub.js';
import { createAgentService, createDesiredStateBuilder } from '../agent/agent-service.js';
import { createAuditService } from '../rpc/audit-service.js';
import { createCredentialService } from '../rpc/credential-service.js';
import { createEnrollmentService } from '../rpc/enrollment-service.js';
import { createGuestService } from '../rpc/guest-service.js';
import { createHostService } from '../rpc/host-service.js';
import { createKeyService } from '../rpc/key-service.js';
import { createEphemeralPool } from '../vault/ephemeral-pool.js';
import { createVolumeService } from '../rpc/volume-service.js';
import { createRotationService } from '../rpc/rotation-service.js';
import { createRotationManager, type RotationManager, type RotationSettings } from '../rotation/rotation-manager.js';
import { startRotationScheduler } from '../rotation/scheduler.js';
import type { Store } from '../store/ports.js';
import type { KeyVault } from '../vault/key-vault.js';

/** Largest request accepted on the main listener (a 256 KiB domain XML fits easily). */
export const MAX_REQUEST_BYTES = 1024 * 1024;
/** Largest response sent (a page of 1000 guests with large XML would not fit: pages shrink). */
export const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;
/** Largest request on the enrollment listener. */
export const MAX_ENROLL_REQUEST_BYTES = 16 * 1024;

/** Life-cycle state of the server. */
export type ServerState = 'starting' | 'running' | 'draining' | 'stopped';

/** What the gRPC server needs. */
export interface GrpcServerDeps {
  store: Store;
  vault: KeyVault;
  issuer: CertificateIssuer;
  clock: Clock;
  logger: Logger;
  credentials: ServerCredentials;
  enrollCredentials: ServerCredentials;
  listen: string;
  /** Enrollment listener address, or "" for none. */
  enrollListen: string;
  hostCertDays: number;
  /**
   * Sealed mode (sealed-mode.ts; Shamir): the gate's interceptor goes on every listener,
   * UnsealService is served, and KeyService health and the rotation scheduler wait until
   * the gate opens. Without it the server has no UnsealService (nothing to unseal).
   */
  sealed?: { interceptor?: ServerInterceptor; unsealService: UnsealServiceServer; whenOpen(fn: () => void): void };
  /** Rotation tunables (defaults in rotation-manager.ts) and the scheduler's interval. */
  rotation?: Partial<RotationSettings> & { intervalMs?: number };
}

/** A running server. */
export interface RunningServer {
  /** The bound addresses (ports resolved when 0 was asked). */
  readonly address: string;
  readonly enrollAddress: string;
  state(): ServerState;
  readonly rotations: RotationManager;
  /** Stops accepting calls, lets running ones finish (up to graceMs), then closes. */
  shutdown(graceMs: number): Promise<void>;
}

function bind(server: Server, address: string, creds: ServerCredentials): Promise<string> {
  return new Promise((resolve, reject) => {
    server.bindAsync(address, creds, (err, port) => {
      if (err) reject(err);
      else resolve(address.replace(/:\d+$/, `:${port}`));
    });
  });
}

function shutdownServer(server: Server, graceMs: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** Starts the listeners. */
export async function startGrpcServer(deps: GrpcServerDeps): Promise<RunningServer> {
  let state: ServerState = 'starting';
  const opts = {
    'grpc.max_receive_message_length': MAX_REQUEST_BYTES,
    'grpc.max_send_message_length': MAX_RESPONSE_BYTES,
    'grpc.max_concurrent_streams': 256,
    'grpc.keepalive_time_ms': 60_000,
    'grpc.keepalive_permit_without_calls': 1,
    ...(deps.sealed?.interceptor ? { interceptors: [deps.sealed.interceptor] } : {}),
  };
  const main = new Server(opts);
  const ctx = { store: deps.store, logger: deps.logger.child('rpc') };
  // Key packets carried on each host's current stream, so a report can ask for the rest.
  const sentPackets = new Map<string, Set<string>>();
  const sentFor = (hostId: string) => sentPackets.get(hostId) ?? sentPackets.set(hostId, new Set()).get(hostId)!;
  const agentDeps = { ...ctx, vault: deps.vault, clock: deps.clock };
  // Key release seals with ephemeral X25519 shares a worker thread computed beforehand.
  const ephemeral = createEphemeralPool({ logger: deps.logger.child('ephemeral') });
  const hub = createAgentHub(createDesiredStateBuilder({ ...agentDeps, ephemeral }, sentFor), deps.logger.child('agents'));
  const rotations = createRotationManager({ store: deps.store, vault: deps.vault, clock: deps.clock, notifier: hub, logger: deps.logger.child('rotation'), settings: deps.rotation ?? {} });
  main.addService(AgentServiceService, createAgentService({ ...agentDeps, hub, rotations }, sentFor));
  main.addService(RotationServiceService, createRotationService({ ...ctx, rotations, clock: deps.clock }));
  main.addService(VolumeServiceService, createVolumeService({ ...ctx, vault: deps.vault, clock: deps.clock }));
  main.addService(GuestServiceService, createGuestService({ ...ctx, clock: deps.clock, notifier: hub }));
  // enrollAddress is filled in below, once the enrollment listener is bound.
  const hostDeps = { ...ctx, clock: deps.clock, issuer: deps.issuer, enrollAddress: '', hub };
  main.addService(HostServiceService, createHostService(hostDeps));
  main.addService(CredentialServiceService, createCredentialService({ ...ctx, clock: deps.clock, issuer: deps.issuer }));
  main.addService(KeyServiceService, createKeyService({ ...ctx, vault: deps.vault, clock: deps.clock, ephemeral }));
  main.addService(AuditServiceService, createAuditService(ctx));
  const health = new HealthImplementation({ '': 'NOT_SERVING', 'virtkm.v1.KeyService': 'NOT_SERVING' });
  health.addToServer(main);
  if (deps.sealed) main.addService(UnsealServiceService, deps.sealed.unsealService);

  const address = await bind(main, deps.listen, deps.credentials);
  let enrollServer: Server | undefined;
  if (deps.enrollListen) {
    enrollServer = new Server({ ...opts, 'grpc.max_receive_message_length': MAX_ENROLL_REQUEST_BYTES });
    const apiAddress = /^(0\.0\.0\.0|\[::\]):/.test(address) ? '' : address;
    enrollServer.addService(EnrollmentServiceService, createEnrollmentService({ ...ctx, clock: deps.clock, issuer: deps.issuer, hostCertDays: deps.hostCertDays, apiAddress: () => apiAddress }));
    hostDeps.enrollAddress = await bind(enrollServer, deps.enrollListen, deps.enrollCredentials);
  }
  health.setStatus('', 'SERVING');
  let scheduler: ReturnType<typeof startRotationScheduler> | undefined;
  const serveKeys = () => {
    if (state === 'draining' || state === 'stopped') return;
    health.setStatus('virtkm.v1.KeyService', 'SERVING');
    scheduler = startRotationScheduler(rotations, deps.rotation?.intervalMs ?? 30_000, deps.logger.child('rotation'));
  };
  if (deps.sealed) deps.sealed.whenOpen(serveKeys);
  else serveKeys();
  state = 'running';
  deps.logger.info('listening', { address, enroll_address: hostDeps.enrollAddress || undefined });

  return {
    address,
    enrollAddress: hostDeps.enrollAddress,
    state: () => state,
    rotations,
    async shutdown(graceMs) {
      if (state === 'draining' || state === 'stopped') return;
      state = 'draining';
      // A scheduler pass in flight is waited for, but not beyond the grace period.
      if (scheduler) {
        let timer: NodeJS.Timeout | undefined;
        const late = await Promise.race([scheduler.stop().then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), graceMs)))]);
        clearTimeout(timer);
        if (late) deps.logger.warn('a rotation scheduler pass did not end within the grace period; shutting down anyway');
      }
      // Agents reconnect with backoff to whichever server comes back.
      hub.closeAll(14 /* UNAVAILABLE */, 'server is shutting down');
      health.setStatus('', 'NOT_SERVING');
      health.setStatus('virtkm.v1.KeyService', 'NOT_SERVING');
      await Promise.all([shutdownServer(main, graceMs), enrollServer ? shutdownServer(enrollServer, graceMs) : Promise.resolve()]);
      await ephemeral.close();
      state = 'stopped';
    },
  };
}
