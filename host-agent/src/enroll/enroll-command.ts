/**
 * `virtkm-agent enroll`: creates the host's keys in the state directory, enrolls with a
 * one-time token (the token pins the server's CA), and stores the certificate. Refuses a
 * state directory that is already enrolled and changes nothing then.
 */
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { generateBoxKeyPair } from '../../../shared/src/box.js';
import { enrollHost } from '../../../shared/src/enroll-client.js';
import { errors } from '../../../shared/src/errors.js';
import { generateTlsKeyPair } from '../../../shared/src/pki.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { loadSodium } from '../../../shared/src/sodium.js';
import { agentStatePaths } from './state-dir.js';
import { hostKeySealerSpec, sealNewHostKey, writeHostKeyRecord, type HostKeySealerOptions } from './host-key.js';

/** Options of enroll. */
export interface EnrollOptions extends HostKeySealerOptions {
  server: string;
  /** File holding the token (the token is a credential: not in argv when avoidable). */
  tokenFile?: string;
  /** The token itself (convenient, but visible in `ps` while enrolling; it is one-time). */
  token?: string;
  stateDir: string;
}

/** Runs enroll; prints the host identity. */
export async function enrollCommand(o: EnrollOptions, readToken: (file: string) => string): Promise<void> {
  await loadSodium();
  const token = o.tokenFile ? readToken(o.tokenFile).trim() : (o.token ?? '');
  if (!token) throw errors.invalid('an enrollment token is required', { hint: 'pass --token-file FILE (or --token TOKEN)' });
  const paths = agentStatePaths(resolve(o.stateDir));
  if (existsSync(paths.hostJson)) throw errors.alreadyExists(`state directory ${paths.dir} (enrolled)`, { hint: 'nothing was changed' });
  if (existsSync(paths.dir) && readdirSync(paths.dir).length > 0) throw errors.precondition(`${paths.dir} is not empty`, { hint: 'use a new or empty directory' });
  // A TPM or token host key is sealed before the one-time token is spent: if the TPM or
  // the token refuses, nothing has happened yet.
  const sealerSpec = hostKeySealerSpec(o);
  const sealedHostKey = sealerSpec ? await sealNewHostKey(sealerSpec) : undefined;

  const tls = await generateTlsKeyPair();
  const box = generateBoxKeyPair();
  try {
    const res = await enrollHost(o.server, token, { tlsPublicKey: tls.publicKeyDer, boxPublicKey: box.publicKey });
    mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
    writeFileSync(paths.tlsKey, tls.privateKeyPem, { mode: 0o600, flag: 'wx' });
    const boxFile = Buffer.concat([box.secretKey, box.publicKey]);
    writeFileSync(paths.boxKey, boxFile, { mode: 0o600, flag: 'wx' });
    wipe(boxFile);
    writeFileSync(paths.cert, res.certificatePem, { mode: 0o644, flag: 'wx' });
    writeFileSync(paths.ca, res.caCertificatePem, { mode: 0o644, flag: 'wx' });
    if (sealedHostKey) writeHostKeyRecord(paths, sealedHostKey);
    // host.json last: its presence means "enrolled".
    // `server` is the main listener the agent streams from (`run --server` overrides it).
    writeFileSync(paths.hostJson, JSON.stringify({ host_id: res.hostId, host: res.host, server: res.apiAddress, enroll_server: o.server }, null, 2) + '\n', { mode: 0o644, flag: 'wx' });
    process.stdout.write(`enrolled host ${res.host} (${res.hostId}); state in ${paths.dir}\n`);
  } finally {
    wipe(box.secretKey);
  }
}
