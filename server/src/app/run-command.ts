/**
 * Composition root of `virtkm-server run`: unseal, open, wire, serve, shut down on signals.
 */
import { readFileSync } from 'node:fs';
import { startLoopMonitor } from '../../../shared/src/loop-monitor.js';
import { nativeSodium } from '../../../shared/src/native-sodium.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { createLogger, describeError } from '../../../shared/src/log.js';
import { hardenProcess } from '../../../shared/src/process-hygiene.js';
import { relaunchWithMadviseShim } from '../../../shared/src/memory-lock.js';
import { systemClock } from '../domain/clock.js';
import { openSqliteStore } from '../store/sqlite-store.js';
import { compileServerRunOptions, type ServerRunOptions } from './config.js';
import { dataDirPaths } from './data-dir.js';
import { startGrpcServer } from './grpc-server.js';
import { openMasterKeyForRun } from './sealed-mode.js';
import { mutualTlsCredentials, serverOnlyTlsCredentials } from './tls.js';
import { errors } from '../../../shared/src/errors.js';
import { existsSync } from 'node:fs';

/** Time the shutdown may take beyond the gRPC grace period (closing the store, the vault). */
const SHUTDOWN_MARGIN_MS = 5_000;

/** Runs the server until SIGTERM/SIGINT. */
export async function runCommand(raw: ServerRunOptions): Promise<void> {
  const opts = compileServerRunOptions(raw);
  // First of all: this may replace the process (same pid) to preload the madvise library
  // that makes mlockall safe for V8 (shared/src/memory-lock.ts).
  relaunchWithMadviseShim(opts.memoryLock);
  const logger = createLogger({ component: 'virtkm-server', level: opts.logLevel });
  const hygiene = hardenProcess(logger, { memoryLock: opts.memoryLock });
  logger.info('starting', { data_dir: opts.dataDir, dumpable: hygiene.dumpable, memory_locked: hygiene.memoryLocked, secrets_locked: hygiene.secretsLocked, locked_bytes: hygiene.lockedBytes, durability: opts.durability });
  await loadSodium();
  // Key packets are sealed with the native libsodium: fail now, not at the first release.
  nativeSodium();
  const paths = dataDirPaths(opts.dataDir);
  if (!existsSync(paths.masterKey)) throw errors.precondition(`${opts.dataDir} is not an initialised data directory`, { hint: 'run `virtkm-server init --data-dir DIR` first' });

  // The lock first: finishing an interrupted master key rotation and unsealing happen
  // with no other server on this directory. A Shamir-sealed master key starts sealed
  // (sealed-mode.ts): vault and issuer are stand-ins until UnsealService opens the gate.
  const store = openSqliteStore({ path: paths.db, logger: logger.child('store'), exclusive: true, durability: opts.durability });
  const announce = (event: Record<string, unknown>) => process.stdout.write(JSON.stringify(event) + '\n');
  const access = await openMasterKeyForRun(paths, store, logger, opts.passphraseFile, announce);
  const { vault, issuer, serverKey } = access;
  const caCertPem = readFileSync(paths.caCert, 'utf8');
  const serverCertPem = readFileSync(paths.serverCert, 'utf8');

  const server = await startGrpcServer({
    store,
    vault,
    issuer,
    clock: systemClock,
    logger,
    // The chain includes the CA so enrolling agents can match it against their pin.
    credentials: mutualTlsCredentials(caCertPem, serverCertPem + caCertPem, serverKey),
    enrollCredentials: serverOnlyTlsCredentials(caCertPem, serverCertPem + caCertPem, serverKey),
    listen: opts.listen,
    enrollListen: opts.enrollListen,
    hostCertDays: opts.hostCertDays,
    rotation: opts.rotation,
    sealed: access.grpc,
  });
  const loop = startLoopMonitor(logger.child('loop'));
  // One machine-readable line on stdout for supervisors and tests.
  process.stdout.write(JSON.stringify({ event: 'ready', listen: server.address, enroll: server.enrollAddress || null, pid: process.pid, ...(access.isSealed() ? { sealed: true } : {}) }) + '\n');

  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      logger.info('shutting down', { signal });
      loop.stop();
      // A bound on the whole shutdown: whatever hangs (a scheduler pass, a stuck write),
      // a stop request ends the process, as a service manager expects.
      const watchdog = setTimeout(() => {
        logger.error('shutdown did not finish in time; exiting', { after_ms: opts.shutdownGraceMs + SHUTDOWN_MARGIN_MS });
        process.exit(1);
      }, opts.shutdownGraceMs + SHUTDOWN_MARGIN_MS);
      server
        .shutdown(opts.shutdownGraceMs)
        .then(() => store.close())
        .catch((err: unknown) => logger.error('shutdown failed', describeError(err)))
        .finally(() => {
          clearTimeout(watchdog);
          vault.close();
          logger.info('stopped');
          resolve();
        });
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}
