/**
 * The agent's state directory:
 *
 *   DIR/                0700
 *   DIR/tls-key.pem     the host's TLS private key (PKCS#8, 0600)
 *   DIR/box-key         the host's X25519 key pair: 32-byte secret || 32-byte public (0600)
 *   DIR/cert.pem        the host certificate issued at enrollment
 *   DIR/ca.pem          the server's CA certificate (pinned by the enrollment token)
 *   DIR/host.json       {"host_id", "host", "server", "enroll_server"}: identity, where to connect
 *   DIR/cache.key       the host key sealing the key cache: 8-byte id || 32 bytes (0600)
 *   DIR/host-key.json   instead of cache.key: the host key sealed by a TPM or a PKCS#11
 *                       token (enroll --host-key-sealer; see host-key.ts)
 *   DIR/key-cache       the sealed key cache (0600), see cache/key-cache.ts
 */
import { join } from 'node:path';

/** Paths of a state directory. */
export interface AgentStatePaths {
  dir: string;
  tlsKey: string;
  boxKey: string;
  cert: string;
  ca: string;
  hostJson: string;
  cacheKey: string;
  cache: string;
  hostKeyRecord: string;
}

/** The paths inside `dir`. */
export function agentStatePaths(dir: string): AgentStatePaths {
  return {
    dir,
    tlsKey: join(dir, 'tls-key.pem'),
    boxKey: join(dir, 'box-key'),
    cert: join(dir, 'cert.pem'),
    ca: join(dir, 'ca.pem'),
    hostJson: join(dir, 'host.json'),
    cacheKey: join(dir, 'cache.key'),
    cache: join(dir, 'key-cache'),
    hostKeyRecord: join(dir, 'host-key.json'),
  };
}
