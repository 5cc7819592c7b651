/**
 * Composition root of `virtkm-agent run`: reads the state directory, builds the adapters
 * (libvirt through koffi, qemu-img/cryptsetup, the sealed key cache), starts the daemon,
 * stops it on SIGTERM/SIGINT. No logic here.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { errors } from '../../../shared/src/errors.js';
import { KEY_ID_LENGTH, generateWrappingKey, type WrappingKey } from '../../../shared/src/envelope.js';
import { createLogger, type LogLevel } from '../../../shared/src/log.js';
import { hardenProcess } from '../../../shared/src/process-hygiene.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { openKeyCache } from '../cache/key-cache.js';
import { agentStatePaths } from '../enroll/state-dir.js';
import { createDmCryptMapper, createHostImageStore, removeStaleTemporaries } from '../images/index.js';
import { createLibvirtFfi } from '../libvirt/libvirt-ffi.js';
import { startAgentDaemon } from './daemon.js';

/** Options of `virtkm-agent run`. */
export interface AgentRunOptions {
  stateDir: string;
  server?: string;
  imageDir: string;
  libvirtUri?: string;
  logLevel?: string;
}

/** The agent version reported to the server. */
export const AGENT_VERSION = '0.1.0';

/** Reads the host key, creating it (0600) on first use. */
function hostKey(path: string): WrappingKey {
  if (!existsSync(path)) {
    const k = generateWrappingKey();
    const raw = Buffer.concat([k.id, k.bytes]);
    writeFileSync(path, raw, { mode: 0o600, flag: 'wx' });
    wipe(raw, k.bytes);
  }
  const raw = readFileSync(path);
  if (raw.length !== KEY_ID_LENGTH + 32) throw errors.precondition(`host key ${path} is damaged`);
  const key = { id: raw.subarray(0, KEY_ID_LENGTH), bytes: ownedCopy(raw.subarray(KEY_ID_LENGTH)) };
  raw.subarray(KEY_ID_LENGTH).fill(0);
  return key;
}

/** Runs the agent until a signal. */
export async function runAgentCommand(o: AgentRunOptions): Promise<void> {
  const logger = createLogger({ component: 'virtkm-agent', level: (o.logLevel ?? 'info') as LogLevel });
  const hygiene = hardenProcess(logger);
  await loadSodium();
  const paths = agentStatePaths(resolve(o.stateDir));
  if (!existsSync(paths.hostJson)) throw errors.precondition(`${paths.dir} is not an enrolled state directory`, { hint: 'run `virtkm-agent enroll` first' });
  const host = JSON.parse(readFileSync(paths.hostJson, 'utf8')) as { host_id: string; host: string; server: string };
  const server = o.server ?? host.server;
  if (!server) throw errors.invalid('no server address', { hint: 'pass --server HOST:PORT (the main listener)' });
  const boxRaw = readFileSync(paths.boxKey);
  const box = { secretKey: ownedCopy(boxRaw.subarray(0, 32)), publicKey: Uint8Array.from(boxRaw.subarray(32, 64)) };
  wipe(boxRaw);
  const cache = openKeyCache(paths.cache, hostKey(paths.cacheKey), host.host_id);
  const libvirt = createLibvirtFfi(o.libvirtUri ? { uri: o.libvirtUri } : {});
  const images = createHostImageStore({ logger: logger.child('images') });
  const dmcrypt = createDmCryptMapper({ images });
  // QEMU (user libvirt-qemu) must reach the images: the directory is searchable by others.
  const imageDir = resolve(o.imageDir);
  mkdirSync(imageDir, { recursive: true, mode: 0o711 });
  for (const f of await removeStaleTemporaries(imageDir)) logger.info('removed a leftover of an interrupted image create', { file: f });
  logger.info('starting', { host: host.host, server, dumpable: hygiene.dumpable, image_dir: o.imageDir });

  const daemon = startAgentDaemon({
    server,
    tls: { caCertPem: readFileSync(paths.ca, 'utf8'), certPem: readFileSync(paths.cert, 'utf8'), keyPem: readFileSync(paths.tlsKey, 'utf8') },
    reconciler: { hostId: host.host_id, box, libvirt, images, dmcrypt, cache, imageDir, logger: logger.child('reconcile') },
    logger,
    agentVersion: AGENT_VERSION,
  });
  await daemon.started;
  process.stdout.write(JSON.stringify({ event: 'ready', host: host.host, server, pid: process.pid }) + '\n');
  await new Promise<void>((done) => {
    const stop = (signal: string) => {
      logger.info('stopping', { signal });
      void daemon
        .stop()
        .then(() => libvirt.close())
        .finally(() => {
          cache.close();
          wipe(box.secretKey);
          logger.info('stopped');
          done();
        });
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}
