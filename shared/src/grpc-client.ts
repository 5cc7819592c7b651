/**
 * Client side of the mutual-TLS gRPC connection, shared by the CLI, the agent and tests.
 */
import { createSecureContext } from 'node:tls';
import { ChannelCredentials, Metadata, type ChannelOptions, type ServiceError } from '@grpc/grpc-js';
import { DomainError, HINT_METADATA_KEY, kindOfGrpcStatus } from './errors.js';

/** Client credentials: CA to trust and the client's certificate and key (PEM). */
export interface ClientTlsMaterial {
  caCertPem: string;
  certPem?: string;
  keyPem?: string;
}

/** Largest response a client accepts. */
export const CLIENT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024;

/** Channel credentials pinned to TLS 1.3 and to the given CA. */
export function channelCredentials(m: ClientTlsMaterial): ChannelCredentials {
  const ctx = createSecureContext({
    ca: m.caCertPem,
    ...(m.certPem ? { cert: m.certPem } : {}),
    ...(m.keyPem ? { key: m.keyPem } : {}),
    minVersion: 'TLSv1.3',
    maxVersion: 'TLSv1.3',
  });
  return ChannelCredentials.createFromSecureContext(ctx);
}

/** Channel options used by every virtkm client. */
export const CLIENT_CHANNEL_OPTIONS: ChannelOptions = {
  'grpc.max_receive_message_length': CLIENT_MAX_RECEIVE_BYTES,
  'grpc.max_send_message_length': 4 * 1024 * 1024,
};

/** Turns a grpc-js ServiceError into a DomainError with the server's message and hint. */
export function fromServiceError(err: ServiceError): DomainError {
  const hintValue = err.metadata instanceof Metadata ? err.metadata.get(HINT_METADATA_KEY)[0] : undefined;
  const hint = typeof hintValue === 'string' ? hintValue : undefined;
  const kind = kindOfGrpcStatus(err.code);
  return new DomainError(kind, err.details || err.message, hint ? { hint } : {});
}

/** Per-call options with a deadline. */
export function callOptions(timeoutMs = 30_000): { deadline: Date } {
  return { deadline: new Date(Date.now() + timeoutMs) };
}

/**
 * Runs a unary call as a promise, mapping errors to DomainError:
 * `await unaryCall<Res>((cb) => client.method(req, new Metadata(), callOptions(), cb))`.
 */
export function unaryCall<Res>(invoke: (cb: (err: ServiceError | null, res?: Res) => void) => unknown): Promise<Res> {
  return new Promise((resolve, reject) => {
    invoke((err, res) => {
      if (err) reject(fromServiceError(err));
      else resolve(res as Res);
    });
  });
}
