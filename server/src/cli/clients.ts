/**
 * Connecting the CLI to a server: reading the credential bundle and building clients.
 */
import {
  AuditServiceClient,
  CredentialServiceClient,
  GuestServiceClient,
  HostServiceClient,
  RotationServiceClient,
  VolumeServiceClient,
  UnsealServiceClient,
} from '../../../shared/src/api.js';
import { CLIENT_CHANNEL_OPTIONS, channelCredentials } from '../../../shared/src/grpc-client.js';

/** TLS material from a credential bundle. */
export interface Credentials {
  caCertPem: string;
  certPem: string;
  keyPem: string;
}

/** The clients the CLI uses, over one channel each (grpc-js shares the connection). */
export interface ApiClients {
  volumes: VolumeServiceClient;
  guests: GuestServiceClient;
  hosts: HostServiceClient;
  credentials: CredentialServiceClient;
  audit: AuditServiceClient;
  unseal: UnsealServiceClient;
  rotations: RotationServiceClient;
  close(): void;
}

/** Builds the clients for a server address. Connects lazily on the first call. */
export function connectClients(address: string, creds: Credentials): ApiClients {
  const c = channelCredentials(creds);
  const volumes = new VolumeServiceClient(address, c, CLIENT_CHANNEL_OPTIONS);
  // Share the first client's channel so all services use one TLS connection.
  const channelOverride = { channelOverride: volumes.getChannel() };
  const guests = new GuestServiceClient(address, c, channelOverride);
  const hosts = new HostServiceClient(address, c, channelOverride);
  const credentials = new CredentialServiceClient(address, c, channelOverride);
  const audit = new AuditServiceClient(address, c, channelOverride);
  const unseal = new UnsealServiceClient(address, c, channelOverride);
  const rotations = new RotationServiceClient(address, c, channelOverride);
  return {
    volumes,
    guests,
    hosts,
    credentials,
    audit,
    unseal,
    rotations,
    close() {
      volumes.close();
    },
  };
}
