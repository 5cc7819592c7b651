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
import { cliSealerContext, sealNewMasterKey, type MasterKeyProtection } from './master-key-access.js';
import { ownedCopy } from '../../../shared/src/secret-bytes.js';
import { deliverShares } from '../master-key/registry.js';
import type { EncodedShare, ShareSetInfo } from '../master-key/shamir-sealer.js';
import { MASTER_KEY_ID_SETTING } from './master-key-rotation.js';
import { ensureTransportTlsKey } from './sealed-mode.js';
import { pkcs11KeyUri } from '../../../shared/src/kek/pkcs11.js';
import { checkTcti, parsePcrSelection } from '../../../shared/src/kek/tpm2.js';

/** Options of init. */
export interface InitOptions {
  dataDir: string;
  passphraseFile?: string;
  passphrasePrompt?: boolean;
  adminCredential?: string;
  san?: string[];
  kdfOps?: string;
  kdfMemMib?: string;
  /** keyfile (default), passphrase, pkcs11 or tpm2. */
  sealer?: string;
  pkcs11Uri?: string;
  pinFile?: string;
  tpmTcti?: string;
  tpmPcrs?: string;
  /** --sealer shamir: shares and threshold (text, as given), optional per-share files. */
  shares?: string;
  threshold?: string;
  sharesOutDir?: string;
}

const STAGING = '.init-staging';
const CA_DAYS = 3650;
const SERVER_DAYS = 825;
const ADMIN_DAYS = 365;

/** The PKCS#11 and TPM sealers (`--sealer pkcs11|tpm2`); undefined for the others. */
function hardwareProtectionOf(o: InitOptions): MasterKeyProtection | undefined {
  const sealer = o.sealer ?? (o.passphraseFile || o.passphrasePrompt ? 'passphrase' : 'keyfile');
  if (!['keyfile', 'passphrase', 'pkcs11', 'tpm2'].includes(sealer)) throw errors.invalid('--sealer must be keyfile, passphrase, pkcs11 or tpm2');
  if (sealer !== 'pkcs11' && (o.pkcs11Uri || o.pinFile)) throw errors.invalid('--pkcs11-uri and --pin-file apply to --sealer pkcs11 only');
  if (sealer !== 'tpm2' && (o.tpmTcti || o.tpmPcrs)) throw errors.invalid('--tpm-tcti and --tpm-pcrs apply to --sealer tpm2 only');
  if (sealer !== 'pkcs11' && sealer !== 'tpm2') {
    if (sealer === 'keyfile' && (o.passphraseFile || o.passphrasePrompt)) throw errors.invalid('--passphrase-file and --passphrase-prompt apply to --sealer passphrase only');
    return undefined;
  }
  if (o.passphraseFile || o.passphrasePrompt || o.kdfOps || o.kdfMemMib) throw errors.invalid(`passphrase options do not apply to --sealer ${sealer}`);
  if (sealer === 'tpm2') {
    if (o.tpmTcti) checkTcti(o.tpmTcti);
    return { kind: 'tpm2', ...(o.tpmTcti ? { tcti: o.tpmTcti } : {}), ...(o.tpmPcrs ? { pcrs: parsePcrSelection(o.tpmPcrs) } : {}) };
  }
  if (!o.pkcs11Uri) throw errors.invalid('--sealer pkcs11 needs --pkcs11-uri URI');
  const pinFile = o.pinFile ? resolve(o.pinFile) : undefined;
  pkcs11KeyUri(o.pkcs11Uri, pinFile);
  return { kind: 'pkcs11', uri: o.pkcs11Uri, ...(pinFile ? { pinFile } : {}) };
}

/**
 * `--sealer shamir --shares N --threshold K [--shares-out-dir DIR]`. The shares are kept
 * (in wipeable buffers) until init has succeeded, then shown or written once: shares of
 * a failed init are never shown.
 */
function shamirProtectionOf(o: InitOptions, held: EncodedShare[], setInfo: { value?: ShareSetInfo }): MasterKeyProtection | undefined {
  if (o.sealer !== 'shamir') {
    if (o.shares || o.threshold || o.sharesOutDir) throw errors.invalid('--shares, --threshold and --shares-out-dir apply to --sealer shamir only');
    return undefined;
  }
  if (o.passphraseFile || o.passphrasePrompt || o.kdfOps || o.kdfMemMib || o.pkcs11Uri || o.pinFile || o.tpmTcti || o.tpmPcrs) {
    throw errors.invalid('options of other sealers do not apply to --sealer shamir');
  }
  const n = /^\d{1,4}$/.test(o.shares ?? '') ? Number(o.shares) : NaN;
  const k = /^\d{1,4}$/.test(o.threshold ?? '') ? Number(o.threshold) : NaN;
  if (Number.isNaN(n) || Number.isNaN(k)) throw errors.invalid('--sealer shamir needs --shares N and --threshold K (integers)');
  if (n > 255 || k > n) throw errors.invalid('--threshold K and --shares N must satisfy K <= N <= 255');
  if (k < 2) throw errors.invalid('--threshold must be at least 2: with 1, every share alone is the whole key', { hint: 'use the key file or passphrase sealer for a single holder' });
  if (o.sharesOutDir && !existsSync(o.sharesOutDir)) throw errors.invalid('--shares-out-dir must be an existing directory');
  return {
    kind: 'shamir',
    threshold: k,
    shares: n,
    deliver: (shares, set) => {
      for (const s of shares) held.push({ index: s.index, text: ownedCopy(s.text) });
      setInfo.value = set;
      return Promise.resolve();
    },
  };
}

function protectionOf(o: InitOptions, held: EncodedShare[] = [], setInfo: { value?: ShareSetInfo } = {}): MasterKeyProtection {
  const shamir = shamirProtectionOf(o, held, setInfo);
  if (shamir) return shamir;
  const hardware = hardwareProtectionOf(o);
  if (hardware) return hardware;
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

function describeProtection(p: MasterKeyProtection, keyFile: string): string {
  switch (p.kind) {
    case 'keyfile':
      return `key file ${keyFile}`;
    case 'passphrase':
      return 'passphrase (Argon2id)';
    case 'pkcs11':
      return 'PKCS#11 token key';
    case 'tpm2':
      return `TPM 2.0${p.pcrs ? ` bound to PCRs ${p.pcrs}` : ''}`;
    case 'shamir':
      return `Shamir shares, ${p.threshold} of ${p.shares} (the server starts sealed: \`virtkm unseal\`)`;
  }
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
  const heldShares: EncodedShare[] = [];
  const shareSet: { value?: ShareSetInfo } = {};
  const protection = protectionOf(o, heldShares, shareSet);

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
    // A sealed (Shamir) server needs its TLS key before it has the master key.
    if (protection.kind === 'shamir') await ensureTransportTlsKey(staged, masterKey);

    const adminKp = await generateTlsKeyPair();
    const adminCert = await issueCertificate({ ca, publicKeyDer: adminKp.publicKeyDer, commonName: 'admin', role: 'admin', validDays: ADMIN_DAYS });
    const serverId = randomUUID();
    const store = openSqliteStore({ path: staged.db });
    const now = new Date().toISOString();
    await store.write((tx) => {
      tx.setSetting('server.id', serverId);
      tx.setSetting(MASTER_KEY_ID_SETTING, Buffer.from(masterKey.id).toString('hex'));
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
        `  master key sealed by: ${describeProtection(protection, final.keyFile)}\n` +
        `  CA certificate:       ${final.caCert} (sha256 ${certFingerprint(ca.certPem)})\n` +
        `  admin credential:     ${adminPath} (keep it secret)\n`,
    );
    if (protection.kind === 'shamir' && shareSet.value) {
      await deliverShares(cliSealerContext(dir), o.sharesOutDir, heldShares, shareSet.value);
    }
  } finally {
    for (const s of heldShares) wipe(s.text);
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
