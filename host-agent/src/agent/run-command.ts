/**
 * Composition root of `virtkm-agent run`: reads the state directory, builds the adapters
 * (libvirt through koffi, qemu-img/cryptsetup, the sealed key cache), starts the daemon,
 * stops it on SIGTERM/SIGINT. No logic here.
 */
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { errors } from '../../../shared/src/errors.js';
import { openVolumeKeyring } from '../../../shared/src/keyring.js';
import { createLogger, type LogLevel } from '../../../shared/src/log.js';
import { hardenProcess } from '../../../shared/src/process-hygiene.js';
import { parseMemoryLockMode, relaunchWithMadviseShim } from '../../../shared/src/memory-lock.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { openKeyCache } from '../cache/key-cache.js';
import { agentStatePaths } from '../enroll/state-dir.js';
import { loadHostKey } from '../enroll/host-key.js';
import { createDmCryptMapper, createHostImageStore, removeStaleTemporaries } from '../images/index.js';
import { createLibvirtFfi } from '../libvirt/libvirt-ffi.js';
import { startAgentDaemon, type AgentDaemon } from './daemon.js';
import { mappingName, rotationStatusOf } from '../reconcile/reconciler.js';
import { createRotationDriver, type RotationDriver } from '../rotate/driver.js';
import { createLiveCopy } from '../rotate/live-copy.js';
import { createLuks2Reencrypt } from '../rotate/luks2-reencrypt.js';
import { createLuks2OnlineReencrypt } from '../rotate/luks2-online.js';
import { createLuks2Rekey } from '../rotate/luks2-rekey.js';
import { createPlainReencrypt } from '../rotate/plain-reencrypt.js';
import { createQemuConvert } from '../rotate/qemu-convert.js';
import { createQemuRekey } from '../rotate/qemu-rekey.js';

/** Options of `virtkm-agent run`. */
export interface AgentRunOptions {
  stateDir: string;
  server?: string;
  imageDir: string;
  libvirtUri?: string;
  logLevel?: string;
  /** auto (default), require or off: see shared/src/memory-lock.ts. */
  memoryLock?: string;
}

/** The agent version reported to the server. */
export const AGENT_VERSION = '0.1.0';

/** Runs the agent until a signal. */
export async function runAgentCommand(o: AgentRunOptions): Promise<void> {
  const memoryLock = parseMemoryLockMode(o.memoryLock);
  // First of all: this may replace the process (same pid) to preload the madvise library
  // that makes mlockall safe for V8 (shared/src/memory-lock.ts).
  relaunchWithMadviseShim(memoryLock);
  const logger = createLogger({ component: 'virtkm-agent', level: (o.logLevel ?? 'info') as LogLevel });
  const hygiene = hardenProcess(logger, { memoryLock });
  // dm-crypt keys as logon keys in a private session keyring, joined here on the main thread
  // so that the cryptsetup/dmsetup children inherit it (see shared/src/keyring.ts).
  const keyring = openVolumeKeyring(logger.child('keyring'));
  await loadSodium();
  const paths = agentStatePaths(resolve(o.stateDir));
  if (!existsSync(paths.hostJson)) throw errors.precondition(`${paths.dir} is not an enrolled state directory`, { hint: 'run `virtkm-agent enroll` first' });
  const host = JSON.parse(readFileSync(paths.hostJson, 'utf8')) as { host_id: string; host: string; server: string };
  const server = o.server ?? host.server;
  if (!server) throw errors.invalid('no server address', { hint: 'pass --server HOST:PORT (the main listener)' });
  const boxRaw = readFileSync(paths.boxKey);
  const box = { secretKey: ownedCopy(boxRaw.subarray(0, 32)), publicKey: Uint8Array.from(boxRaw.subarray(32, 64)) };
  wipe(boxRaw);
  const cache = openKeyCache(paths.cache, await loadHostKey(paths), host.host_id);
  const libvirt = createLibvirtFfi(o.libvirtUri ? { uri: o.libvirtUri } : {});
  const images = createHostImageStore({ logger: logger.child('images') });
  const dmcrypt = createDmCryptMapper({ images });
  // QEMU (user libvirt-qemu) must reach the images: the directory is searchable by others.
  const imageDir = resolve(o.imageDir);
  mkdirSync(imageDir, { recursive: true, mode: 0o711 });
  for (const f of await removeStaleTemporaries(imageDir)) logger.info('removed a leftover of an interrupted image create', { file: f });
  logger.info('starting', { host: host.host, server, dumpable: hygiene.dumpable, memory_locked: hygiene.memoryLocked, secrets_locked: hygiene.secretsLocked, keyring: keyring.id !== 0, image_dir: o.imageDir });

  // The rotation driver and the daemon call each other (a finished job asks for a new
  // pass; progress goes on the stream): bound late through `daemon`.
  const late: { daemon?: AgentDaemon } = {};
  const rotationLog = logger.child('rotation');
  const rotations: RotationDriver = createRotationDriver({
    mechanisms: {
      qemuRekey: createQemuRekey({ store: images, logger: rotationLog }),
      qemuConvert: createQemuConvert({ store: images, logger: rotationLog }),
      luks2Rekey: createLuks2Rekey({ images, logger: rotationLog }),
      luks2Reencrypt: createLuks2Reencrypt({ images, logger: rotationLog }),
      luks2Online: createLuks2OnlineReencrypt({ images, mapper: dmcrypt, mappingName: (job) => mappingName(job.volumeId), logger: rotationLog }),
      plainReencrypt: createPlainReencrypt({ mapper: dmcrypt, logger: rotationLog }),
      liveCopy: createLiveCopy({
        libvirt,
        images,
        hostId: host.host_id,
        logger: rotationLog,
        locate: (job) => {
          const o = rotations.order(job.rotationId);
          if (!o?.domain) throw errors.precondition('the guest is not running here');
          return { domain: o.domain.name, disk: o.domain.diskTarget, oldKeyVersion: o.fromVersion, newKeyVersion: o.targetVersion, volumeName: o.domain.volumeName };
        },
      }),
    },
    testKey: (spec, key) => images.testKey(spec.path, spec, key),
    onChange: () => late.daemon?.reapply(),
    onProgress: (statuses) => late.daemon?.sendProgress(statuses.map(rotationStatusOf)),
    logger: rotationLog,
  });
  const daemon = (late.daemon = startAgentDaemon({
    server,
    tls: { caCertPem: readFileSync(paths.ca, 'utf8'), certPem: readFileSync(paths.cert, 'utf8'), keyPem: readFileSync(paths.tlsKey, 'utf8') },
    reconciler: { hostId: host.host_id, box, libvirt, images, dmcrypt, keyring, cache, imageDir, logger: logger.child('reconcile'), rotations },
    logger,
    agentVersion: AGENT_VERSION,
  }));
  await daemon.started;
  process.stdout.write(JSON.stringify({ event: 'ready', host: host.host, server, pid: process.pid }) + '\n');
  await new Promise<void>((done) => {
    const stop = (signal: string) => {
      logger.info('stopping', { signal });
      void daemon
        .stop()
        // Jobs are aborted: every mechanism leaves an image that one of its keys opens.
        .then(() => rotations.stop())
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
