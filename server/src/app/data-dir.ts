/**
 * The layout of a server data directory and the atomic file writes used in it.
 *
 *   DIR/                   0700
 *   DIR/virtkm.db          SQLite (WAL); only sealed secrets inside
 *   DIR/master-key.json    the master key, sealed (key file or passphrase); written last by
 *                          init, so its presence means "initialised"
 *   DIR/master.kek         the key-file sealer's key-encryption key (0600), when used
 *   DIR/ca.pem             internal CA certificate (public)
 *   DIR/ca-key.sealed      CA private key, sealed under the master key
 *   DIR/server.pem         server certificate (public)
 *   DIR/server-key.sealed  server TLS private key, sealed under the master key
 *   DIR/admin.pem          first admin credential bundle (0600), unless written elsewhere
 *   DIR/transport.kek      Shamir (sealed mode) only: key file sealing server-key.transport
 *   DIR/server-key.transport  the TLS key for sealed mode (sealed-mode.ts)
 *   DIR/master-key.next.json, DIR/*.sealed.next   only during rotate-master-key
 *   DIR/master.kek.new     only during a reseal to a new key file (master-key/registry.ts)
 */
import { closeSync, fsyncSync, openSync, renameSync, writeSync } from 'node:fs';
import { fsyncDirSync } from '../../../shared/src/durable-fs.js';
import { dirname, join } from 'node:path';

/** Paths inside a data directory. */
export interface DataDirPaths {
  dir: string;
  db: string;
  masterKey: string;
  keyFile: string;
  caCert: string;
  caKeySealed: string;
  serverCert: string;
  serverKeySealed: string;
  adminCredential: string;
}

/** The paths of the data directory `dir`. */
export function dataDirPaths(dir: string): DataDirPaths {
  return {
    dir,
    db: join(dir, 'virtkm.db'),
    masterKey: join(dir, 'master-key.json'),
    keyFile: join(dir, 'master.kek'),
    caCert: join(dir, 'ca.pem'),
    caKeySealed: join(dir, 'ca-key.sealed'),
    serverCert: join(dir, 'server.pem'),
    serverKeySealed: join(dir, 'server-key.sealed'),
    adminCredential: join(dir, 'admin.pem'),
  };
}

/** Labels binding sealed server secrets to their purpose (see KeyVault.sealServerSecret). */
export const SERVER_SECRET_LABELS = { caKey: 'ca-key', serverKey: 'server-tls-key' } as const;


/**
 * Writes a file atomically: a temporary file (mode, exclusive), fsync, rename, fsync of the
 * directory. With `exclusive` the final name must not exist (checked by linking semantics:
 * we refuse before renaming).
 */
export function writeFileAtomic(path: string, data: Uint8Array | string, mode: number): void {
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, 'wx', mode);
  try {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    let off = 0;
    while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  fsyncDirSync(dirname(path));
}
