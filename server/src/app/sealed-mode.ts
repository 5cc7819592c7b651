/**
 * Sealed mode: a server whose master key needs people to unseal it (Shamir) starts
 * without it. It listens with mutual TLS as usual, but until enough shares are in it
 * serves only the health service and UnsealService: one server interceptor (the gate)
 * answers every other call FAILED_PRECONDITION "server is sealed". Agents that connect
 * meanwhile get that code and reconnect with their usual backoff.
 *
 * The TLS key problem: DIR/server-key.sealed is under the master key, which a sealed
 * server does not have. So a Shamir-sealed data directory also keeps the server's TLS
 * private key sealed under a key file of its own:
 *   DIR/transport.kek          32 random bytes, 0600 (like the key-file sealer's KEK)
 *   DIR/server-key.transport   the TLS key sealed under it (AAD binds its purpose)
 * At rest that key is thus protected like a key-file-sealed master key. What it exposes is
 * the server's TLS identity, never a volume secret or the CA key (both stay under the
 * master key). Reseal to a non-Shamir sealer removes both files.
 *
 * The vault and the certificate issuer are handed to the services as stand-ins that
 * delegate to the real ones once the gate opens (the interceptor keeps calls away before).
 */
import { readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Metadata, ServerInterceptingCall, status as GrpcStatus, type ServerInterceptor } from '@grpc/grpc-js';
import { fsyncDir } from '../../../shared/src/durable-fs.js';
import { open, seal, type WrappingKey } from '../../../shared/src/envelope.js';
import { errors, HINT_METADATA_KEY } from '../../../shared/src/errors.js';
import { certFingerprint } from '../../../shared/src/pki.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import { createKeyFile, kekWrappingKey } from '../master-key/sealers.js';
import { openSecretFile, readBounded } from '../master-key/secret-files.js';
import type { CertificateIssuer } from '../pki/issuer.js';
import type { KeyVault } from '../vault/key-vault.js';
import { SERVER_SECRET_LABELS, writeFileAtomic, type DataDirPaths } from './data-dir.js';
import { describeError, type Logger } from '../../../shared/src/log.js';
import { readMasterKeyFile } from '../master-key/master-key-file.js';
import { ShareCollector, unsealWithCollector } from '../master-key/shamir-sealer.js';
import { createCaIssuer } from '../pki/ca-issuer.js';
import { createUnsealService } from '../rpc/unseal-service.js';
import type { Store } from '../store/ports.js';
import { createKeyVault } from '../vault/key-vault.js';
import type { GrpcServerDeps } from './grpc-server.js';
import { unsealMasterKey, unsealMasterKeyWith } from './master-key-access.js';
import { recordMasterKeyId, settleMasterKeyFiles } from './master-key-rotation.js';

/** Message of every call refused while sealed. */
export const SEALED_MESSAGE = 'server is sealed';
const SEALED_HINT = 'share holders unseal it with `virtkm unseal`; `virtkm unseal status` shows the progress';
/** Services a sealed server answers. */
const ALWAYS_SERVED = ['/grpc.health.v1.Health/', '/virtkm.v1.UnsealService/'];
const TRANSPORT_AAD = 'virtkm/v1/transport/server-tls-key';

/** Files of the transport key (see module comment). */
export function transportPaths(paths: DataDirPaths): { kek: string; serverKey: string } {
  return { kek: join(paths.dir, 'transport.kek'), serverKey: join(paths.dir, 'server-key.transport') };
}

async function readKek(path: string): Promise<Buffer> {
  const { handle } = await openSecretFile(path, 'transport key file');
  try {
    const read = await readBounded(handle, 32);
    try {
      if (read.tooLong || read.length !== 32) throw errors.precondition('transport key file is not 32 bytes');
      return ownedCopy(read.buf.subarray(0, 32));
    } finally {
      wipe(read.buf);
    }
  } finally {
    await handle.close();
  }
}

/**
 * Makes the TLS key available to sealed mode: opens DIR/server-key.sealed with the master
 * key and seals it under the transport key file (created when missing). Idempotent.
 */
export async function ensureTransportTlsKey(paths: DataDirPaths, masterKey: WrappingKey): Promise<void> {
  const t = transportPaths(paths);
  try {
    await createKeyFile(t.kek);
  } catch (err) {
    if (!(err instanceof Error && 'kind' in err && err.kind === 'already_exists')) throw err;
  }
  const kek = await readKek(t.kek);
  const tlsKey = open(readFileSync(paths.serverKeySealed), masterKey, `virtkm/v1/server-secret/${SERVER_SECRET_LABELS.serverKey}`);
  try {
    writeFileAtomicReplacing(t.serverKey, seal(tlsKey, await kekWrappingKey(kek), TRANSPORT_AAD));
  } finally {
    wipe(tlsKey, kek);
  }
}

function writeFileAtomicReplacing(path: string, data: Uint8Array): void {
  // writeFileAtomic renames over the final name, so it replaces an older copy.
  writeFileAtomic(path, data, 0o600);
}

/** The TLS private key for sealed mode (caller wipes). failed_precondition when missing. */
export async function readTransportTlsKey(paths: DataDirPaths): Promise<Buffer> {
  const t = transportPaths(paths);
  let sealed: Buffer;
  try {
    sealed = readFileSync(t.serverKey);
  } catch {
    throw errors.precondition('this Shamir-sealed data directory has no server-key.transport', { hint: 'reseal it again with `virtkm-server reseal --to shamir`' });
  }
  const kek = await readKek(t.kek);
  try {
    return ownedCopy(open(sealed, await kekWrappingKey(kek), TRANSPORT_AAD));
  } catch {
    throw errors.precondition('server-key.transport does not open with transport.kek', { hint: 'reseal it again with `virtkm-server reseal --to shamir`' });
  } finally {
    wipe(kek);
  }
}

/** Removes the transport key files (after a reseal to a sealer that needs none). */
export async function removeTransportTlsKey(paths: DataDirPaths): Promise<void> {
  const t = transportPaths(paths);
  await rm(t.serverKey, { force: true });
  await rm(t.kek, { force: true });
  await fsyncDir(paths.dir);
}

/** The gate between a sealed server and its services. */
export interface SealGate {
  /** Delegates to the real vault once open; refuses with "server is sealed" before. */
  readonly vault: KeyVault;
  /** Public CA facts always; issue() only once open. */
  readonly issuer: CertificateIssuer;
  /** The interceptor to install on every listener. */
  readonly interceptor: ServerInterceptor;
  isSealed(): boolean;
  /** Opens the gate with the real vault and issuer; runs the whenOpen callbacks. */
  open(vault: KeyVault, issuer: CertificateIssuer): void;
  /** Runs fn when the gate opens (at once if open). */
  whenOpen(fn: () => void): void;
}

function sealedError() {
  return errors.precondition(SEALED_MESSAGE, { hint: SEALED_HINT });
}

/** Creates a closed gate (caCertPem: the public CA certificate). */
export function createSealGate(caCertPem: string): SealGate {
  let vault: KeyVault | undefined;
  let issuer: CertificateIssuer | undefined;
  const callbacks: (() => void)[] = [];
  const realVault = (): KeyVault => vault ?? (() => { throw sealedError(); })();
  const interceptor: ServerInterceptor = (descriptor, call) =>
    new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, mdNext) => {
            if (vault === undefined && !ALWAYS_SERVED.some((p) => descriptor.path.startsWith(p))) {
              const md = new Metadata();
              md.set(HINT_METADATA_KEY, SEALED_HINT);
              call.sendStatus({ code: GrpcStatus.FAILED_PRECONDITION, details: SEALED_MESSAGE, metadata: md });
              return;
            }
            mdNext(metadata);
          },
        }),
    });
  return {
    vault: {
      newSealedSecret: (...a) => realVault().newSealedSecret(...a),
      packetForHost: (...a) => realVault().packetForHost(...a),
      sealServerSecret: (...a) => realVault().sealServerSecret(...a),
      openServerSecret: (...a) => realVault().openServerSecret(...a),
      close: () => vault?.close(),
    },
    issuer: {
      caCertPem,
      caFingerprint: certFingerprint(caCertPem),
      issue: (req) => (issuer ? issuer.issue(req) : Promise.reject(sealedError())),
    },
    interceptor,
    isSealed: () => vault === undefined,
    open(v, i) {
      if (vault) throw errors.precondition('the server is already unsealed');
      issuer = i;
      vault = v;
      for (const fn of callbacks.splice(0)) fn();
    },
    whenOpen(fn) {
      if (vault) fn();
      else callbacks.push(fn);
    },
  };
}

// --- The master key at `run` ---------------------------------------------------------------

/** What `run` gets: the vault and issuer (stand-ins while sealed), the TLS key, the gRPC hooks. */
export interface RunMasterKeyAccess {
  vault: KeyVault;
  issuer: CertificateIssuer;
  /** The server's TLS private key (PEM bytes); the caller wipes it once handed to TLS. */
  serverKey: Buffer;
  /** For startGrpcServer's `sealed` dependency. */
  grpc: NonNullable<GrpcServerDeps['sealed']>;
  isSealed(): boolean;
}

/**
 * Under the lock (store opened exclusive): settles an interrupted master key rotation,
 * then either unseals now (key file, passphrase, other offline sealers) or, for a Shamir
 * record, returns a sealed gate that UnsealService opens once enough shares are in.
 */
export async function openMasterKeyForRun(
  paths: DataDirPaths,
  store: Store,
  logger: Logger,
  passphraseFile: string | undefined,
  announce: (event: Record<string, unknown>) => void,
): Promise<RunMasterKeyAccess> {
  await settleMasterKeyFiles(paths, store, logger);
  const record = await readMasterKeyFile(paths.dir);
  const caCertPem = readFileSync(paths.caCert, 'utf8');
  const gate = createSealGate(caCertPem);
  const openWith = async (masterKey: WrappingKey): Promise<{ vault: KeyVault; issuer: CertificateIssuer }> => {
    const vault = createKeyVault(masterKey);
    try {
      await recordMasterKeyId(store, masterKey);
      const caKeyPem = vault.openServerSecret(SERVER_SECRET_LABELS.caKey, readFileSync(paths.caKeySealed));
      // PEM strings cannot be wiped; the CA key lives as long as the process anyway.
      const issuer = createCaIssuer({ certPem: caCertPem, keyPem: Buffer.from(caKeyPem).toString('utf8') });
      wipe(caKeyPem);
      return { vault, issuer };
    } catch (err) {
      vault.close();
      throw err;
    }
  };

  if (record.sealer === 'shamir') {
    const serverKey = await readTransportTlsKey(paths);
    const collector = new ShareCollector(record);
    const rpcLogger = logger.child('rpc');
    const unsealService = createUnsealService({
      store,
      logger: rpcLogger,
      sealer: record.sealer,
      isSealed: () => gate.isSealed(),
      collector,
      async unseal(c) {
        try {
          const { vault, issuer } = await openWith(await unsealWithCollector(record, c));
          gate.open(vault, issuer);
        } catch (err) {
          logger.error('unseal failed; still sealed', describeError(err));
          await store.write((tx) => tx.appendAudit({ actor: 'server', action: 'server.unseal', target: record.keyId, outcome: 'failed', detail: {} })).catch(() => undefined);
          throw err;
        }
        await store.write((tx) => tx.appendAudit({ actor: 'server', action: 'server.unseal', target: record.keyId, outcome: 'ok', detail: { sealer: 'shamir' } }));
        logger.info('unsealed');
        announce({ event: 'unsealed' });
      },
    });
    logger.warn('sealed: waiting for unseal shares', { threshold: record.params.threshold, shares: record.params.shares });
    return { vault: gate.vault, issuer: gate.issuer, serverKey, grpc: { interceptor: gate.interceptor, unsealService, whenOpen: (fn) => gate.whenOpen(fn) }, isSealed: () => gate.isSealed() };
  }

  // Key files go through the registry (it finishes an interrupted key file reseal).
  const masterKey = record.sealer === 'keyfile' ? await unsealMasterKeyWith(paths, record, {}) : await unsealMasterKey(paths, passphraseFile);
  const { vault, issuer } = await openWith(masterKey);
  const serverKeyPem = vault.openServerSecret(SERVER_SECRET_LABELS.serverKey, readFileSync(paths.serverKeySealed));
  const serverKey = Buffer.from(serverKeyPem);
  wipe(serverKeyPem);
  gate.open(vault, issuer);
  const unsealService = createUnsealService({ store, logger: logger.child('rpc'), sealer: record.sealer, isSealed: () => false, collector: undefined, unseal: () => Promise.reject(errors.precondition('the server is not sealed')) });
  return { vault, issuer, serverKey, grpc: { unsealService, whenOpen: (fn) => gate.whenOpen(fn) }, isSealed: () => false };
}
