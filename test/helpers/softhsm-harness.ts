/**
 * Test harness for SoftHSM2, the software PKCS#11 token: installs the Debian package when
 * missing, and gives each test a private configuration (SOFTHSM2_CONF) whose token
 * directory is a temporary directory, so tests never see or touch a token of the machine.
 *
 *   const hsm = await startSoftHsm();             // hsm.skipReason when it cannot run
 *   const token = hsm.initToken('virtkm', '1234'); // a new token, its serial number
 *   process.env.SOFTHSM2_CONF = hsm.conf;          // the module reads it at C_Initialize
 *   ... hsm.remove();
 *
 * SOFTHSM2_CONF is read by the module in whichever process loads it: tests set it in their
 * own environment (in-process calls) and child processes (server, agent) inherit it. It
 * names a configuration file, nothing secret.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureDebianPackages } from './debian-packages.js';

/** Where Debian's softhsm2 package puts the module. */
export const SOFTHSM_MODULE = '/usr/lib/softhsm/libsofthsm2.so';

/** A private SoftHSM2 configuration. */
export interface SoftHsm {
  /** Set when SoftHSM2 cannot be used here; the other fields are then meaningless. */
  skipReason: string | undefined;
  /** The configuration file (for SOFTHSM2_CONF). */
  conf: string;
  /** The token directory. */
  tokenDir: string;
  /** A scratch directory for PIN files and the like (removed with the rest). */
  dir: string;
  module: string;
  /** Initialises a new token in the first free slot; returns its serial number. */
  initToken(label: string, pin: string, soPin?: string): string;
  /** Deletes every token (a fresh, empty token directory). */
  wipeTokens(): void;
  /** Writes a PIN file (0600) and returns its path. */
  pinFile(name: string, pin: string): string;
  /** A PKCS#11 URI for key `object` in token `token` (module-path and pin-source set). */
  uri(token: string, object: string, pinFile: string): string;
  remove(): void;
}

function softhsmUtil(conf: string, args: string[]): { code: number; out: string } {
  const r = spawnSync('softhsm2-util', args, { encoding: 'utf8', timeout: 60_000, env: { ...process.env, SOFTHSM2_CONF: conf } });
  return { code: r.status ?? -1, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

/** Prepares a private SoftHSM2 (installing softhsm2 when missing). Never throws. */
export async function startSoftHsm(): Promise<SoftHsm> {
  const dir = mkdtempSync(join(tmpdir(), 'virtkm-softhsm-'));
  const tokenDir = join(dir, 'tokens');
  const conf = join(dir, 'softhsm2.conf');
  const remove = () => rmSync(dir, { recursive: true, force: true });
  const hsm: SoftHsm = {
    skipReason: undefined,
    conf,
    tokenDir,
    dir,
    module: SOFTHSM_MODULE,
    initToken(label, pin, soPin = '87654321') {
      const r = softhsmUtil(conf, ['--init-token', '--free', '--label', label, '--pin', pin, '--so-pin', soPin]);
      if (r.code !== 0) throw new Error(`softhsm2-util --init-token failed: ${r.out}`);
      const shown = softhsmUtil(conf, ['--show-slots']).out;
      // The serial of the token with this label (the last one initialised with it).
      const blocks = shown.split(/\nSlot /).filter((b) => new RegExp(`Label:[ \\t]+${label}[ \\t]*$`, 'm').test(b));
      const serial = /Serial number:\s+(\S+)/.exec(blocks[blocks.length - 1] ?? '')?.[1];
      if (!serial) throw new Error(`cannot find the serial of token ${label}: ${shown}`);
      return serial;
    },
    wipeTokens() {
      rmSync(tokenDir, { recursive: true, force: true });
      mkdirSync(tokenDir, { mode: 0o700 });
    },
    pinFile(name, pin) {
      const path = join(dir, name);
      writeFileSync(path, `${pin}\n`, { mode: 0o600 });
      chmodSync(path, 0o600);
      return path;
    },
    uri(token, object, pinFile) {
      return `pkcs11:token=${token};object=${object};type=secret-key?module-path=${SOFTHSM_MODULE}&pin-source=file:${pinFile}`;
    },
    remove,
  };
  const missing = ensureDebianPackages(['softhsm2'], ['softhsm2-util']);
  if (missing) {
    remove();
    return { ...hsm, skipReason: missing };
  }
  if (!existsSync(SOFTHSM_MODULE)) {
    remove();
    return { ...hsm, skipReason: `${SOFTHSM_MODULE} not found (softhsm2 installed elsewhere?)` };
  }
  mkdirSync(tokenDir, { mode: 0o700 });
  writeFileSync(conf, `directories.tokendir = ${tokenDir}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n`, { mode: 0o600 });
  try {
    await import('pkcs11js');
  } catch (err) {
    remove();
    return { ...hsm, skipReason: `the npm package pkcs11js cannot be loaded: ${err instanceof Error ? err.message : String(err)}` };
  }
  return hsm;
}
