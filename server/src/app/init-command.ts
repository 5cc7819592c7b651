/**
 * Composition root of `virtkm-server init`: builds a complete data directory in a staging
 * folder and moves it into place with the sealed master key last, so a directory either is
 * initialised or has no master-key.json. Running init on an initialised (or non-empty)
 * directory refuses and changes nothing.
 */
import { chmodSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { isIP } from 'node:net';
import { loadSodium } from '../../../shared/src/sodium.js';
import { errors } from '../../../shared/src/errors.js';
import { certFingerprint, createCa, formatCredentialBundle, generateTlsKeyPair, issueCertificate } from '../../../shared/src/pki.js';
import { destroyWrappingKey, generateWrappingKey } from '../../../shared/src/envelope.js';
import { promptPassphrase } from '../../../shared/src/passphrase.js';
import type { PassphraseSource } from '../master-key/sealers.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { randomUUID } from 'node:crypto';
import { normalizeSerial } from '../domain/serial.js';
import { openSqliteStore } from '../store/sqlite-store.js';
import { createKeyVault } from '../vault/key-vault.js';
import { dataDirPaths, SERVER_SECRET_LABELS, writeFileAtomic } from './data-dir.js';
import { fsyncDirSync } from '../../../shared/src/durable-fs.js';
import { sealNewMasterKey, type MasterKeyProtection } from './master-key-access.js';

/** Options of init. */
export interface InitOptions {
  dataDir: string;
  passphraseFile?: string;
  passphrasePrompt?: boolean;
  adminCredential?: string;
  san?: string[];
  kdfOps?: string;
  kdfMemMib?: string;
}

const STAGING = '.init-staging';
const CA_DAYS = 3650;
const SERVER_DAYS = 825;
const ADMIN_DAYS = 365;

function protectionOf(o: InitOptions): MasterKeyProtection {
  if (o.passphraseFile && o.passphrasePrompt) throw errors.invalid('give either --passphrase-file or --passphrase-prompt');
  if (!o.passphraseFile && !o.passphrasePrompt) {
    if (o.kdfOps || o.kdfMemMib) throw errors.invalid('--kdf-ops and --kdf-mem-mib apply to a passphrase only');
    return { kind: 'keyfile' };
  }
  const cost =
    o.kdfOps || o.kdfMemMib
      ? { opslimit: Number(o.kdfOps ?? 3), memlimit: Number(o.kdfMemMib ?? 256) * 1024 * 1024 }
      : undefined;
  const source: PassphraseSource = o.passphraseFile
    ? { file: o.passphraseFile }
    : {
        prompt: async () => {
          const a = await promptPassphrase('new master key passphrase: ');
          const b = await promptPassphrase('repeat: ');
          const same = a.equals(b);
          wipe(b);
          if (!same) {
            wipe(a);
            throw errors.invalid('the passphrases differ');
          }
          return a;
        },
      };
  return { kind: 'passphrase', source, ...(cost ? { cost } : {}) };
}

/** Runs init; prints a summary on stdout. */
export async function initCommand(o: InitOptions): Promise<void> {
  await loadSodium();
  const dir = resolve(o.dataDir);
  const final = dataDirPaths(dir);
  if (existsSync(final.masterKey)) throw errors.alreadyExists(`data directory ${dir} (initialised)`, { hint: 'nothing was changed' });
  if (existsSync(dir) && readdirSync(dir).some((f) => f !== STAGING)) {
    throw errors.precondition(`${dir} is not empty`, { hint: 'init needs a new or empty directory; nothing was changed' });
  }
  const adminPath = resolve(o.adminCredential ?? final.adminCredential);
  if (existsSync(adminPath)) throw errors.alreadyExists(`admin credential file ${adminPath}`, { hint: 'nothing was changed' });
  if (adminPath !== final.adminCredential && !existsSync(dirname(adminPath))) {
    throw errors.invalid(`directory ${dirname(adminPath)} for the admin credential does not exist`, { hint: 'nothing was changed' });
  }
  const protection = protectionOf(o);

  const createdDir = !existsSync(dir);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
  const stagingDir = join(dir, STAGING);
  rmSync(stagingDir, { recursive: true, force: true });
  mkdirSync(stagingDir, { mode: 0o700 });
  const staged = dataDirPaths(stagingDir);

  const masterKey = generateWrappingKey();
  let vault: ReturnType<typeof createKeyVault> | undefined;
  let done = false;
  const moved: string[] = [];
  try {
    await sealNewMasterKey(staged, masterKey, protection);
    vault = createKeyVault(masterKey);
    const ca = await createCa({ commonName: 'virtkm internal CA', validDays: CA_DAYS });
    writeFileAtomic(staged.caCert, ca.certPem, 0o644);
    writeFileAtomic(staged.caKeySealed, vault.sealServerSecret(SERVER_SECRET_LABELS.caKey, Buffer.from(ca.keyPem)), 0o600);

    const sans = ['localhost', hostname(), ...(o.san ?? [])];
    const serverKp = await generateTlsKeyPair();
    const serverCert = await issueCertificate({
      ca,
      publicKeyDer: serverKp.publicKeyDer,
      commonName: 'virtkm-server',
      role: 'server',
      validDays: SERVER_DAYS,
      dnsNames: [...new Set(sans.filter((s) => !isIP(s)))],
      ipAddresses: [...new Set(['127.0.0.1', '::1', ...sans.filter((s) => isIP(s))])],
    });
    writeFileAtomic(staged.serverCert, serverCert.certPem, 0o644);
    writeFileAtomic(staged.serverKeySealed, vault.sealServerSecret(SERVER_SECRET_LABELS.serverKey, Buffer.from(serverKp.privateKeyPem)), 0o600);

    const adminKp = await generateTlsKeyPair();
    const adminCert = await issueCertificate({ ca, publicKeyDer: adminKp.publicKeyDer, commonName: 'admin', role: 'admin', validDays: ADMIN_DAYS });
    const serverId = randomUUID();
    const store = openSqliteStore({ path: staged.db });
    const now = new Date().toISOString();
    await store.write((tx) => {
      tx.setSetting('server.id', serverId);
      tx.insertCertificate({ serial: normalizeSerial(adminCert.serial), role: 'admin', name: 'admin', issuedAt: now, expiresAt: adminCert.notAfter.toISOString(), revokedAt: null });
      tx.appendAudit({ actor: 'server', action: 'server.init', target: serverId, outcome: 'ok', detail: { sealer: protection.kind, ca_sha256: certFingerprint(ca.certPem) } });
      tx.appendAudit({ actor: 'server', action: 'credential.issue', target: normalizeSerial(adminCert.serial), outcome: 'ok', detail: { name: 'admin', role: 'admin' } });
    });
    await store.close();

    // Move everything into place; the sealed master key last marks the directory ready.
    for (const name of readdirSync(stagingDir)) {
      if (name === 'master-key.json') continue;
      renameSync(join(stagingDir, name), join(dir, name));
      moved.push(join(dir, name));
    }
    writeFileSync(adminPath, formatCredentialBundle({ caCertPem: ca.certPem, certPem: adminCert.certPem, keyPem: adminKp.privateKeyPem }), { mode: 0o600, flag: 'wx' });
    renameSync(staged.masterKey, final.masterKey);
    rmSync(stagingDir, { recursive: true, force: true });
    fsyncDirSync(dir);
    done = true;
    process.stdout.write(
      `initialised ${dir}\n` +
        `  master key sealed by: ${protection.kind === 'keyfile' ? `key file ${final.keyFile}` : 'passphrase (Argon2id)'}\n` +
        `  CA certificate:       ${final.caCert} (sha256 ${certFingerprint(ca.certPem)})\n` +
        `  admin credential:     ${adminPath} (keep it secret)\n`,
    );
  } finally {
    if (vault) vault.close();
    else destroyWrappingKey(masterKey);
    // A failed init leaves nothing behind: no staged key material, no half directory.
    if (!done) {
      rmSync(stagingDir, { recursive: true, force: true });
      for (const f of moved) rmSync(f, { force: true });
      if (createdDir) rmSync(dir, { recursive: true, force: true });
    }
  }
}
