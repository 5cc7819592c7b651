/**
 * A scripted agent for tests of the server side of the agent stream: it enrolls like a real
 * agent (one-time token, its own TLS and X25519 keys), keeps the desired states it receives,
 * and sends hand-made reports and rotation progress.
 */
import type { ClientDuplexStream } from '@grpc/grpc-js';
import {
  AgentServiceClient,
  GuestPhase,
  VolumePhase,
  type ConnectRequest,
  type ConnectResponse,
  type DesiredState,
  type RotationOrder,
  type RotationStatus,
} from '../../shared/src/api.js';
import { generateBoxKeyPair, type BoxKeyPair } from '../../shared/src/box.js';
import { enrollHost } from '../../shared/src/enroll-client.js';
import { CLIENT_CHANNEL_OPTIONS, channelCredentials } from '../../shared/src/grpc-client.js';
import { generateTlsKeyPair } from '../../shared/src/pki.js';

/** An enrolled host as the fake agent uses it. */
export interface FakeHost {
  name: string;
  box: BoxKeyPair;
  creds: { caCertPem: string; certPem: string; keyPem: string };
}

/** Enrolls a host with a one-time token (made by the caller, e.g. `virtkm host token create`). */
export async function enrollFakeHost(enrollAddress: string, name: string, token: string): Promise<FakeHost> {
  const tls = await generateTlsKeyPair();
  const box = generateBoxKeyPair();
  const r = await enrollHost(enrollAddress, token, { tlsPublicKey: tls.publicKeyDer, boxPublicKey: box.publicKey });
  return { name, box, creds: { caCertPem: r.caCertificatePem, certPem: r.certificatePem, keyPem: tls.privateKeyPem } };
}

/** One stream, the desired states it received, reports and progress. */
export class FakeAgent {
  readonly states: DesiredState[] = [];
  readonly stream: ClientDuplexStream<ConnectRequest, ConnectResponse>;
  ended: { code: number; details: string } | undefined;
  #waiters: (() => void)[] = [];
  constructor(address: string, host: FakeHost) {
    const client = new AgentServiceClient(address, channelCredentials(host.creds), CLIENT_CHANNEL_OPTIONS);
    this.stream = client.connect();
    this.stream.on('data', (m: ConnectResponse) => {
      if (m.msg?.$case === 'desired') this.states.push(m.msg.value);
      this.#wake();
    });
    this.stream.on('error', (e: { code: number; details: string }) => {
      this.ended = { code: e.code, details: e.details };
      this.#wake();
    });
    this.stream.write({ msg: { $case: 'hello', value: { agentVersion: 'test', appliedRevision: 0n } } });
  }
  #wake() {
    for (const w of this.#waiters.splice(0)) w();
  }
  async until<T>(pred: () => T | undefined | false, what: string, timeoutMs = 10_000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = pred();
      if (v !== undefined && v !== false) return v;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((r) => {
        this.#waiters.push(r);
        setTimeout(r, 200);
      });
    }
  }
  latest(): DesiredState | undefined {
    return this.states.at(-1);
  }
  /** The rotation order for a rotation id in some desired state received. */
  order(rotationId: string): Promise<{ state: DesiredState; order: RotationOrder }> {
    return this.until(() => {
      for (const s of this.states) {
        for (const g of s.guests) for (const v of g.volumes) if (v.rotation?.rotationId === rotationId) return { state: s, order: v.rotation };
      }
      return undefined;
    }, `rotation order ${rotationId}`);
  }
  /** A report; guests default to running and volumes to ready. */
  report(
    revision: bigint,
    guests: { guestId: string; generation: bigint; phase?: GuestPhase }[],
    volumes: { volumeId: string; keyVersion: number; phase?: VolumePhase }[],
    rotations: RotationStatus[] = [],
  ) {
    this.stream.write({
      msg: {
        $case: 'report',
        value: {
          revision,
          guests: guests.map((g) => ({ phase: GuestPhase.GUEST_PHASE_RUNNING, ...g, reason: '' })),
          volumes: volumes.map((v) => ({ phase: VolumePhase.VOLUME_PHASE_READY, ...v, reason: '', created: false })),
          deletedImages: [],
          rotations,
        },
      },
    });
  }
  progress(rotations: RotationStatus[]) {
    this.stream.write({ msg: { $case: 'progress', value: { rotations } } });
  }
  close() {
    this.stream.cancel();
  }
}
