/**
 * Sealing a small secret (a 32-byte key) to a TPM 2.0 with tpm2-tools, optionally bound to
 * PCR values.
 *
 * seal: tpm2_createprimary (owner hierarchy, a fixed ECC P-256 storage key template, so the
 * same TPM recreates the same primary key from its seed every time), [tpm2_createpolicy
 * --policy-pcr over the chosen PCRs' current values], tpm2_create of a sealed-data object
 * under the primary with the secret on stdin (`-i -`). The object's public and private
 * parts are returned (base64) for the caller to store: the private part is encrypted by the
 * primary key, which never leaves the TPM, so the blobs are useless without this TPM (and,
 * with a PCR policy, without those PCR values). seal() then unseals once to check the
 * round trip, so a broken setup fails at init rather than at the next start.
 *
 * unseal: tpm2_createprimary, tpm2_load, tpm2_unseal [-p pcr:...]; the secret comes back
 * on tpm2_unseal's stdout, captured as bytes (runTool's binaryStdout) and wiped by the
 * caller. Another TPM: tpm2_load fails the integrity check (TPM_RC_INTEGRITY): refused as
 * unauthenticated. PCR values changed since sealing: TPM_RC_POLICY_FAIL: refused as
 * failed_precondition. No TPM reachable: unavailable.
 *
 * The tools pass objects between them as context files; those live in a private temporary
 * directory (0700) removed afterwards. They hold nothing secret in the clear (saved
 * contexts are encrypted by the TPM). Without a resource manager (swtpm, /dev/tpm0) every
 * tool leaves its transient objects loaded and the TPM soon has no room for more, so after
 * each command `tpm2_flushcontext -t` flushes transient objects (and -l, sessions). With
 * the kernel's resource manager (/dev/tpmrm0, the default) or tpm2-abrmd that is not
 * needed and skipped: there it would only touch this connection's objects anyway.
 *
 * The TCTI (which TPM, and how to reach it) is passed to each tool with -T; it names a
 * device or a socket, nothing secret. The owner hierarchy must have an empty
 * authorization value (the usual state of a server's TPM).
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DomainError } from '../errors.js';
import { runTool, type RunTool, type ToolResult } from '../run-tool.js';
import { wipe } from '../secret-bytes.js';

/** Default TCTI: the kernel's TPM resource manager. */
export const DEFAULT_TPM_TCTI = 'device:/dev/tpmrm0';
/** The primary key template we create and record (tpm2_createprimary -G). */
export const TPM_PRIMARY_TEMPLATE = 'ecc256:aes128cfb';
const PRIMARY_ATTRIBUTES = 'restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda';
/** Longest secret sealed (TPM2B_SENSITIVE_DATA holds at most 128 bytes). */
export const MAX_TPM_SECRET_LENGTH = 128;
const TOOL_TIMEOUT_MS = 60_000;
const DEBIAN_PACKAGE = 'tpm2-tools';

/** The sealed form of a secret; JSON-serialisable, useless without the TPM. */
export interface TpmSealedSecret {
  /** How to reach the TPM (tpm2-tools TCTI string). */
  tcti: string;
  /** PCR selection the object is bound to ("sha256:0,7"), or null for none. */
  pcrs: string | null;
  /** The primary key template (TPM_PRIMARY_TEMPLATE). */
  primary: string;
  /** Base64 of the sealed object's TPM2B_PUBLIC and TPM2B_PRIVATE (tpm2_create -u / -r). */
  public: string;
  private: string;
}

/** Options of tpmSeal. */
export interface TpmSealOptions {
  tcti?: string;
  /** PCR selection, e.g. "sha256:0,7" or "sha1:0+sha256:7" (see parsePcrSelection). */
  pcrs?: string;
  /** For tests: the tool runner. */
  run?: RunTool;
}

const PCR_BANKS = ['sha1', 'sha256', 'sha384', 'sha512'] as const;
const TCTI = /^(device|swtpm|mssim|tabrmd)(:[A-Za-z0-9_.,=/:-]{1,200})?$/;
const B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Checks a TCTI string: one of device, swtpm, mssim, tabrmd with simple options. */
export function checkTcti(tcti: string): string {
  if (typeof tcti !== 'string' || !TCTI.test(tcti)) {
    throw new DomainError('invalid_argument', 'TPM TCTI must look like device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321 or tabrmd');
  }
  return tcti;
}

/**
 * Parses and normalises a PCR selection: BANK:N[,N...] joined by "+", banks sha1, sha256,
 * sha384 or sha512 (each at most once), PCR indices 0..23 (each at most once per bank),
 * sorted in the result ("sha256:7,0" becomes "sha256:0,7").
 */
export function parsePcrSelection(text: string): string {
  const bad = (what: string) => new DomainError('invalid_argument', `PCR selection: ${what}`, { hint: 'for example sha256:0,7' });
  if (typeof text !== 'string' || text.length === 0 || text.length > 200) throw bad('empty or too long');
  const banks = new Set<string>();
  const parts: string[] = [];
  for (const part of text.split('+')) {
    const m = /^([a-z0-9]+):([0-9,]+)$/.exec(part);
    if (!m) throw bad(`"${part.slice(0, 40)}" is not BANK:N,N`);
    const bank = m[1]!;
    if (!(PCR_BANKS as readonly string[]).includes(bank)) throw bad(`unknown bank ${bank} (use ${PCR_BANKS.join(', ')})`);
    if (banks.has(bank)) throw bad(`bank ${bank} appears twice`);
    banks.add(bank);
    const indices = m[2]!.split(',').map((s) => {
      if (!/^(0|[1-9][0-9]?)$/.test(s) || Number(s) > 23) throw bad(`PCR index "${s}" is not 0 to 23`);
      return Number(s);
    });
    if (new Set(indices).size !== indices.length) throw bad(`a PCR appears twice in bank ${bank}`);
    parts.push(`${bank}:${indices.sort((a, b) => a - b).join(',')}`);
  }
  return parts.join('+');
}

/** Validates a parsed JSON value as a TpmSealedSecret; `onError` makes the error. */
export function parseTpmSealedSecret(value: unknown, onError: (what: string) => Error): TpmSealedSecret {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw onError('not an object');
  const v = value as Record<string, unknown>;
  const tcti = v['tcti'];
  if (typeof tcti !== 'string' || !TCTI.test(tcti)) throw onError('tcti');
  const pcrs = v['pcrs'];
  if (pcrs !== null) {
    if (typeof pcrs !== 'string') throw onError('pcrs');
    try {
      if (parsePcrSelection(pcrs) !== pcrs) throw onError('pcrs');
    } catch {
      throw onError('pcrs');
    }
  }
  if (v['primary'] !== TPM_PRIMARY_TEMPLATE) throw onError('primary');
  const blob = (name: string): string => {
    const b = v[name];
    if (typeof b !== 'string' || b.length === 0 || b.length > 8192 || !B64.test(b)) throw onError(name);
    return b;
  };
  return { tcti, pcrs, primary: TPM_PRIMARY_TEMPLATE, public: blob('public'), private: blob('private') };
}

/** True when the TCTI goes through a resource manager, which flushes for us. */
function hasResourceManager(tcti: string): boolean {
  return tcti.startsWith('device:/dev/tpmrm') || tcti.startsWith('tabrmd');
}

/** The TPM response code in tpm2-tools' stderr ("ERROR: Esys_Load(0x1DF) - ..."), if any. */
export function tpmResponseCode(stderr: string): number | undefined {
  const m = /Esys_\w+\(0x([0-9A-Fa-f]+)\)|Eys_\w+\(0x([0-9A-Fa-f]+)\)|ErrorCode \(0x([0-9A-Fa-f]+)\)/.exec(stderr);
  const hex = m?.[1] ?? m?.[2] ?? m?.[3];
  return hex === undefined ? undefined : parseInt(hex, 16);
}

// TPM 2.0 response codes (TPM 2.0 Part 2, 6.6), format-one codes without the
// parameter/session/handle number, and TSS layer bits.
const RC_FMT1 = 0x080;
const RC_INTEGRITY = RC_FMT1 + 0x01f;
const RC_POLICY_FAIL = RC_FMT1 + 0x01d;
const RC_AUTH_FAIL = RC_FMT1 + 0x00e;
const RC_BAD_AUTH = RC_FMT1 + 0x022;
const RC_LOCKOUT = 0x921;
const RC_PCR_CHANGED = 0x128;
const RC_LAYER_MASK = 0xff0000;

/** Maps a failed tpm2-tools run to a DomainError (see the module comment). */
function tpmError(tool: string, r: ToolResult): DomainError {
  const cause = new Error(r.stderr.trim().slice(-4096) || '(no stderr)');
  const rc = tpmResponseCode(r.stderr);
  if (rc === undefined || (rc & RC_LAYER_MASK) !== 0) {
    // Not a TPM answer: the TCTI could not reach a TPM, or a TSS layer failed.
    return new DomainError('unavailable', `the TPM cannot be reached (${tool} failed)`, { cause, hint: 'check the TCTI (--tpm-tcti) and that the TPM or swtpm is running' });
  }
  const base = rc & RC_FMT1 ? rc & 0x0bf : rc;
  if (base === RC_INTEGRITY) {
    return new DomainError('unauthenticated', 'this TPM did not seal the key (or the sealed blobs were changed)', { cause, hint: 'use the TPM that sealed it; a cleared TPM cannot unseal old blobs' });
  }
  if (base === RC_POLICY_FAIL || rc === RC_PCR_CHANGED) {
    return new DomainError('failed_precondition', 'the TPM refuses to unseal: PCR values differ from those the key was sealed to', { cause, hint: 'the boot chain or firmware changed; unseal with the old state or reseal' });
  }
  if (rc === RC_LOCKOUT) return new DomainError('permission_denied', 'the TPM is in dictionary-attack lockout', { cause });
  if (base === RC_AUTH_FAIL || base === RC_BAD_AUTH) {
    return new DomainError('permission_denied', 'the TPM refused the authorization (does the owner hierarchy have a password?)', { cause });
  }
  return new DomainError('internal', `${tool} failed (TPM response code 0x${rc.toString(16)})`, { cause });
}

interface Session {
  dir: string;
  tcti: string;
  run: RunTool;
}

/** Runs a tpm2-tools command against the session's TPM; then flushes if needed. */
async function tpm(s: Session, tool: string, args: string[], options: { stdin?: Uint8Array; binaryStdout?: boolean } = {}): Promise<ToolResult> {
  const r = await s.run(tool, [...args, '-T', s.tcti], { timeoutMs: TOOL_TIMEOUT_MS, debianPackage: DEBIAN_PACKAGE, ...options });
  await flush(s);
  if (r.code !== 0) {
    wipe(r.stdoutBytes);
    throw tpmError(tool, r);
  }
  return r;
}

/** Flushes transient objects and loaded sessions where no resource manager does it. */
async function flush(s: Session): Promise<void> {
  if (hasResourceManager(s.tcti)) return;
  for (const what of ['-t', '-l']) {
    // Best effort: a failed flush shows up as an error of the next command.
    await s.run('tpm2_flushcontext', [what, '-T', s.tcti], { timeoutMs: TOOL_TIMEOUT_MS, debianPackage: DEBIAN_PACKAGE }).catch(() => undefined);
  }
}

async function withSession<T>(tcti: string, run: RunTool, fn: (s: Session) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'virtkm-tpm-'));
  const s: Session = { dir, tcti, run };
  try {
    return await fn(s);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function createPrimary(s: Session): Promise<string> {
  const ctx = join(s.dir, 'primary.ctx');
  await tpm(s, 'tpm2_createprimary', ['-Q', '-C', 'o', '-g', 'sha256', '-G', TPM_PRIMARY_TEMPLATE, '-a', PRIMARY_ATTRIBUTES, '-c', ctx]);
  return ctx;
}

async function unsealIn(s: Session, sealed: TpmSealedSecret): Promise<Buffer> {
  const pub = join(s.dir, 'object.pub');
  const priv = join(s.dir, 'object.priv');
  const obj = join(s.dir, 'object.ctx');
  await writeFile(pub, Buffer.from(sealed.public, 'base64'), { mode: 0o600 });
  await writeFile(priv, Buffer.from(sealed.private, 'base64'), { mode: 0o600 });
  const primary = await createPrimary(s);
  await tpm(s, 'tpm2_load', ['-Q', '-C', primary, '-u', pub, '-r', priv, '-c', obj]);
  const r = await tpm(s, 'tpm2_unseal', ['-c', obj, ...(sealed.pcrs ? ['-p', `pcr:${sealed.pcrs}`] : [])], { binaryStdout: true });
  const out = r.stdoutBytes;
  if (!out) throw new DomainError('internal', 'tpm2_unseal produced no output');
  return out;
}

/**
 * Seals `secret` (1 to 128 bytes; the caller keeps and wipes it) to the TPM, optionally
 * bound to the current values of the PCRs in `pcrs`. Checks the round trip before
 * returning.
 */
export async function tpmSeal(secret: Uint8Array, options: TpmSealOptions = {}): Promise<TpmSealedSecret> {
  if (secret.length === 0 || secret.length > MAX_TPM_SECRET_LENGTH) {
    throw new DomainError('invalid_argument', `the secret to seal must be 1 to ${MAX_TPM_SECRET_LENGTH} bytes`);
  }
  const tcti = checkTcti(options.tcti ?? DEFAULT_TPM_TCTI);
  const pcrs = options.pcrs === undefined ? null : parsePcrSelection(options.pcrs);
  const run = options.run ?? runTool;
  return withSession(tcti, run, async (s) => {
    await flush(s);
    const primary = await createPrimary(s);
    const pub = join(s.dir, 'object.pub');
    const priv = join(s.dir, 'object.priv');
    const policyArgs: string[] = [];
    if (pcrs) {
      const policy = join(s.dir, 'pcr.policy');
      await tpm(s, 'tpm2_createpolicy', ['-Q', '--policy-pcr', '-l', pcrs, '-L', policy]);
      policyArgs.push('-L', policy);
    }
    // A sealed-data object: no sign/decrypt use; with a policy tpm2_create leaves out
    // userwithauth, so only the PCR policy can unseal it.
    await tpm(s, 'tpm2_create', ['-Q', '-C', primary, '-g', 'sha256', ...policyArgs, '-i', '-', '-u', pub, '-r', priv], { stdin: secret });
    const sealed: TpmSealedSecret = {
      tcti,
      pcrs,
      primary: TPM_PRIMARY_TEMPLATE,
      public: (await readFile(pub)).toString('base64'),
      private: (await readFile(priv)).toString('base64'),
    };
    const back = await unsealIn(s, sealed);
    try {
      if (!back.equals(Buffer.from(secret.buffer, secret.byteOffset, secret.length))) {
        throw new DomainError('internal', 'the TPM did not give back the sealed secret');
      }
    } finally {
      wipe(back);
    }
    return sealed;
  });
}

/**
 * Unseals a secret sealed by tpmSeal with the TPM its record names (`tcti` overrides the
 * recorded TCTI: the same TPM may be reached differently). The caller owns and wipes the
 * result.
 */
export async function tpmUnseal(sealed: TpmSealedSecret, options: { tcti?: string; run?: RunTool } = {}): Promise<Buffer> {
  const checked = parseTpmSealedSecret(sealed, (what) => new DomainError('failed_precondition', `TPM-sealed record is malformed: ${what}`));
  const tcti = checkTcti(options.tcti ?? checked.tcti);
  return withSession(tcti, options.run ?? runTool, async (s) => {
    await flush(s);
    return unsealIn(s, checked);
  });
}
