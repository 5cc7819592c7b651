/**
 * The ceiling service of the benchmarks: one unary method that returns the request bytes
 * unchanged, with no protobuf work, no authentication and no storage. Whatever the real
 * server achieves is compared with what grpc-js and TLS alone achieve on this machine.
 */
import { Client, type ChannelCredentials, type ChannelOptions, type ServiceDefinition } from '@grpc/grpc-js';

/** Full method path of the echo method. */
export const ECHO_PATH = '/virtkm.bench.Echo/Echo';

const identity = (b: Buffer): Buffer => b;

/** Service definition with raw-bytes (de)serialisers. */
export const EchoServiceDefinition: ServiceDefinition = {
  echo: {
    path: ECHO_PATH,
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
    originalName: 'echo',
  },
};

/** Ready line the echo server prints on stdout. */
export interface EchoReady {
  event: 'ready';
  port: number;
  pid: number;
}

/** TLS material handed to the echo server process on stdin (JSON). */
export interface EchoServerConfig {
  caCertPem: string;
  /** Server certificate followed by the CA certificate, as the real server presents them. */
  certChainPem: string;
  keyPem: string;
}

/** A client of the echo method on its own channel. */
export class EchoClient {
  private readonly client: Client;
  constructor(address: string, credentials: ChannelCredentials, options: ChannelOptions) {
    this.client = new Client(address, credentials, options);
  }

  /** One echo call with a deadline; resolves to the echoed bytes. */
  echo(payload: Buffer, timeoutMs = 30_000): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest<Buffer, Buffer>(ECHO_PATH, identity, identity, payload, { deadline: new Date(Date.now() + timeoutMs) }, (err, res) => {
        if (err) reject(err);
        else if (!res) reject(new Error('echo: empty response'));
        else resolve(res);
      });
    });
  }

  close(): void {
    this.client.close();
  }
}
