/**
 * The registry of master key sealers: one factory per kind, which knows its command-line
 * options and builds a sealer either for a new protection (init, `reseal --to KIND`) or
 * for an existing record (unseal it; seal another master key the same way: reseal's
 * source, rotate-master-key).
 *
 * Adding a sealer: write a SealerFactory next to the sealer and add it to
 * SEALER_FACTORIES below (one import, one array entry). Its record kind must also be
 * known to parseSealedMasterKey (sealers.ts). Option flags must not clash with the flags
 * of other factories: they all sit on the same `reseal` command.
 *
 * Crash safety of a reseal (app/reseal-command.ts) rests on these hooks, in this order:
 *   source = prepareUnseal(record); key = source.sealer.unseal(record)
 *   target = prepareSeal(); new record = target.sealer.seal(key)
 *   write master-key.json (atomic replace)        <- the switch-over point
 *   source.retire()   remove what only the old protection used (old key file)
 *   target.commit()   put the new protection's material in its final place
 * so a crash before the switch leaves the old record and its material intact, and a crash
 * after it leaves a record whose material prepareUnseal can find (see the key file's
 * pending file below).
 */
import { constants as fsConstants } from 'node:fs';
import { access, open as openFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fsyncDir } from '../../../shared/src/durable-fs.js';
import { DomainError, isDomainError } from '../../../shared/src/errors.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import {
  createKeyFile,
  keyFileSealer,
  passphraseSealer,
  readPassphraseFile,
  type Argon2idCost,
  type MasterKeySealer,
  type SealedMasterKey,
} from './sealers.js';
import { pkcs11Factory } from './pkcs11-sealer.js';
import { tpmFactory } from './tpm-sealer.js';
import { newShamirSealer, shamirRecordSealer, shareFilesSource, sharePromptSource, type EncodedShare, type ShareSetInfo } from './shamir-sealer.js';

/** One command-line option of a sealer (commander syntax: '--shares <n>'). */
export interface SealerOption {
  flags: string;
  description: string;
}

/** Option values as commander gives them (camelCase keys). */
export type { SealerOptionValues } from './sealer-options.js';
import { optionString, type SealerOptionValues } from './sealer-options.js';

/** What a factory may use. */
export interface SealerContext {
  /** The data directory (absolute). */
  dir: string;
  /** Writes text for the operator on stdout (new shares are shown here, once, as bytes). */
  out: (text: string | Uint8Array) => void;
  /** Writes a notice on stderr. */
  err: (text: string) => void;
  /** Asks on the terminal without echo (shared/src/passphrase.ts). */
  ask: (prompt: string) => Promise<Buffer>;
}

/** A sealer prepared for one operation, and what must happen around the record write. */
export interface PreparedSealer {
  readonly sealer: MasterKeySealer;
  /** After the new record is durable: put the new protection's material in place. */
  commit?(): Promise<void>;
  /** The new record was not written: remove whatever was prepared. */
  abort?(): Promise<void>;
  /** The record this sealer opened was replaced by another sealer's: remove what only it used. */
  retire?(): Promise<void>;
  /** Wipes any secret held (KEK, cached passphrase). Always called, last. */
  dispose(): void;
}

/** Builds sealers of one kind. */
export interface SealerFactory {
  readonly kind: string;
  readonly description: string;
  /** Options to seal with this kind (`reseal --to KIND`, `init --sealer KIND`). */
  readonly sealOptions: readonly SealerOption[];
  /** Options to unseal a record of this kind offline (reseal, rotate-master-key). */
  readonly unsealOptions: readonly SealerOption[];
  /** True when `run` starts sealed and waits for the unseal over the API (Shamir). */
  readonly unsealsOnline: boolean;
  prepareSeal(ctx: SealerContext, options: SealerOptionValues): Promise<PreparedSealer>;
  prepareUnseal(ctx: SealerContext, record: SealedMasterKey, options: SealerOptionValues): Promise<PreparedSealer>;
}

// --- helpers ---------------------------------------------------------------------------


function strList(options: SealerOptionValues, key: string): string[] {
  const v = options[key];
  if (Array.isArray(v)) return v.filter((x): x is string => typeof x === 'string');
  return typeof v === 'string' ? [v] : [];
}

function positiveInt(options: SealerOptionValues, key: string, flag: string): number | undefined {
  const v = options[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || !/^\d{1,4}$/.test(v)) throw new DomainError('invalid_argument', `${flag} must be a positive integer`);
  return Number(v);
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** Key file of a data directory (app/data-dir.ts: DataDirPaths.keyFile). */
export function keyFilePathOf(dir: string): string {
  return join(dir, 'master.kek');
}

/** A new key file waits here until the record sealed with it is durable. */
export function pendingKeyFilePathOf(dir: string): string {
  return join(dir, 'master.kek.new');
}

// --- key file --------------------------------------------------------------------------

/** Key file: the KEK is DIR/master.kek (0600). */
export const keyFileFactory: SealerFactory = {
  kind: 'keyfile',
  description: 'a random key-encryption key in DIR/master.kek (mode 0600)',
  sealOptions: [],
  unsealOptions: [],
  unsealsOnline: false,
  async prepareSeal(ctx) {
    // Always a fresh file under a pending name: the current key file (if any) must keep
    // working until the record sealed with the new one is durable.
    const main = keyFilePathOf(ctx.dir);
    const pending = pendingKeyFilePathOf(ctx.dir);
    await rm(pending, { force: true });
    await createKeyFile(pending);
    return {
      sealer: keyFileSealer(pending),
      async commit() {
        await rename(pending, main);
        await fsyncDir(ctx.dir);
      },
      async abort() {
        await rm(pending, { force: true });
        await fsyncDir(ctx.dir);
      },
      dispose() {},
    };
  },
  async prepareUnseal(ctx) {
    const main = keyFilePathOf(ctx.dir);
    const pending = pendingKeyFilePathOf(ctx.dir);
    let current = main;
    const sealer: MasterKeySealer = {
      kind: 'keyfile',
      seal: (masterKey) => keyFileSealer(current).seal(masterKey),
      async unseal(record) {
        try {
          return await keyFileSealer(main).unseal(record);
        } catch (err) {
          // A reseal to a new key file that stopped after writing the record and before
          // renaming the file into place: the pending file is the one, finish the rename.
          if (!isDomainError(err) || (err.kind !== 'unauthenticated' && err.kind !== 'not_found') || !(await exists(pending))) throw err;
          const key = await keyFileSealer(pending).unseal(record);
          await rename(pending, main);
          await fsyncDir(ctx.dir);
          current = main;
          ctx.err('finished an interrupted reseal: the new key file is now in place\n');
          return key;
        }
      },
    };
    return {
      sealer,
      async retire() {
        await rm(main, { force: true });
        await fsyncDir(ctx.dir);
      },
      dispose() {},
    };
  },
};

// --- passphrase ------------------------------------------------------------------------

function argon2Cost(options: SealerOptionValues): Argon2idCost | undefined {
  const ops = positiveInt(options, 'kdfOps', '--kdf-ops');
  const mem = positiveInt(options, 'kdfMemMib', '--kdf-mem-mib');
  if (ops === undefined && mem === undefined) return undefined;
  return { opslimit: ops ?? 3, memlimit: (mem ?? 256) * 1024 * 1024 };
}

/** Passphrase: the KEK is Argon2id of a passphrase. */
export const passphraseFactory: SealerFactory = {
  kind: 'passphrase',
  description: 'a passphrase (Argon2id)',
  sealOptions: [
    { flags: '--new-passphrase-file <file>', description: 'passphrase: the new passphrase, from a file (0600)' },
    { flags: '--new-passphrase-prompt', description: 'passphrase: ask the new passphrase on the terminal (twice)' },
    { flags: '--kdf-ops <n>', description: 'passphrase: Argon2id opslimit (default libsodium MODERATE)' },
    { flags: '--kdf-mem-mib <n>', description: 'passphrase: Argon2id memlimit in MiB (default libsodium MODERATE)' },
  ],
  unsealOptions: [{ flags: '--passphrase-file <file>', description: 'passphrase that seals the current master key (else asked on the terminal)' }],
  unsealsOnline: false,
  async prepareSeal(ctx, options) {
    const file = optionString(options, 'newPassphraseFile');
    const prompt = options['newPassphrasePrompt'] === true;
    if (!file === !prompt) throw new DomainError('invalid_argument', 'give the new passphrase with either --new-passphrase-file or --new-passphrase-prompt');
    const cost = argon2Cost(options);
    const source = file
      ? { file }
      : {
          prompt: async () => {
            const a = await ctx.ask('new master key passphrase: ');
            const b = await ctx.ask('repeat: ');
            const same = a.equals(b);
            wipe(b);
            if (!same) {
              wipe(a);
              throw new DomainError('invalid_argument', 'the passphrases differ');
            }
            return a;
          },
        };
    return { sealer: passphraseSealer({ source, ...(cost ? { cost } : {}) }), dispose() {} };
  },
  async prepareUnseal(ctx, record, options) {
    if (record.sealer !== 'passphrase') throw new DomainError('failed_precondition', 'the master key is not sealed with a passphrase');
    // Asked once, kept for the operation, so a rotation can seal the new key with it too.
    const file = optionString(options, 'passphraseFile');
    const cached = file ? await readPassphraseFile(file) : await ctx.ask('master key passphrase: ');
    const { opslimit, memlimit } = record.params;
    return {
      sealer: passphraseSealer({ source: { prompt: () => Promise.resolve(ownedCopy(cached)) }, cost: { opslimit, memlimit } }),
      dispose: () => wipe(cached),
    };
  },
};

// --- Shamir ----------------------------------------------------------------------------

/** How new shares reach their holders: on stdout (default) or one file per share. */
export async function deliverShares(ctx: SealerContext, outDir: string | undefined, shares: readonly EncodedShare[], set: ShareSetInfo): Promise<void> {
  const head = `unseal shares: any ${set.threshold} of these ${set.shares} unseal the master key (share set ${set.setId})\n`;
  if (!outDir) {
    ctx.out(`${head}each share is shown only this once; give each to its holder and do not keep copies together:\n`);
    for (const s of shares) {
      ctx.out(`  share ${s.index}: `);
      // Written from the buffer, never made a string, so the text can be wiped.
      ctx.out(s.text);
      ctx.out('\n');
    }
    return;
  }
  const written: string[] = [];
  try {
    for (const s of shares) {
      const path = join(outDir, `share-${set.setId}-${s.index}.txt`);
      const handle = await openFile(path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOCTTY, 0o600);
      written.push(path);
      try {
        await handle.chmod(0o600);
        await handle.writeFile(Buffer.concat([s.text, Buffer.from('\n')]));
        await handle.sync();
      } finally {
        await handle.close();
      }
    }
    await fsyncDir(outDir);
  } catch (err) {
    for (const p of written) await rm(p, { force: true });
    throw new DomainError('failed_precondition', 'the share files cannot be written', { cause: err, hint: 'the directory must exist and hold no share files of this set' });
  }
  ctx.out(`${head}one file per share (mode 0600), each to be handed to its holder and then deleted:\n${written.map((p) => `  ${p}\n`).join('')}`);
}

/** Shamir k-of-n: the KEK is split among share holders; the server starts sealed. */
export const shamirFactory: SealerFactory = {
  kind: 'shamir',
  description: 'Shamir k-of-n shares held by people; the server starts sealed until k are submitted',
  sealOptions: [
    { flags: '--shares <n>', description: 'shamir: number of shares (2 to 255)' },
    { flags: '--threshold <k>', description: 'shamir: shares needed to unseal (2 to --shares)' },
    { flags: '--shares-out-dir <dir>', description: 'shamir: write each share to its own file there (0600) instead of showing them' },
  ],
  unsealOptions: [{ flags: '--share-file <file...>', description: 'shamir: files holding the current shares, one each (else asked on the terminal)' }],
  unsealsOnline: true,
  async prepareSeal(ctx, options) {
    const shares = positiveInt(options, 'shares', '--shares');
    const threshold = positiveInt(options, 'threshold', '--threshold');
    if (shares === undefined || threshold === undefined) throw new DomainError('invalid_argument', 'a Shamir split needs --shares N and --threshold K');
    if (shares > 255 || threshold > shares) throw new DomainError('invalid_argument', '--threshold K and --shares N must satisfy K <= N <= 255');
    if (threshold < 2) {
      throw new DomainError('invalid_argument', '--threshold must be at least 2: with 1, every share alone is the whole key', { hint: 'use the key file or passphrase sealer for a single holder' });
    }
    const outDir = optionString(options, 'sharesOutDir');
    if (outDir && !(await stat(outDir).then((s) => s.isDirectory(), () => false))) {
      throw new DomainError('invalid_argument', '--shares-out-dir must be an existing directory');
    }
    const sealer = newShamirSealer({ threshold, shares, deliver: (list, set) => deliverShares(ctx, outDir, list, set) });
    return { sealer, dispose: () => sealer.dispose() };
  },
  async prepareUnseal(ctx, _record, options) {
    const files = strList(options, 'shareFile');
    const source = files.length > 0 ? shareFilesSource(files) : sharePromptSource(ctx.ask, (line) => ctx.err(`${line}\n`));
    const sealer = shamirRecordSealer(source);
    return { sealer, dispose: () => sealer.dispose() };
  },
};

// --- the registry ----------------------------------------------------------------------

/**
 * Every sealer kind, by kind. Add a sealer here (pkcs11-sealer.ts, tpm-sealer.ts: export a
 * SealerFactory and list it).
 */
export const SEALER_FACTORIES: readonly SealerFactory[] = [
  keyFileFactory,
  passphraseFactory,
  shamirFactory,
  pkcs11Factory,
  tpmFactory,
];

/** The factory of `kind`; invalid_argument naming the known kinds otherwise. */
export function sealerFactory(kind: string): SealerFactory {
  const f = SEALER_FACTORIES.find((x) => x.kind === kind);
  if (!f) throw new DomainError('invalid_argument', `unknown sealer ${JSON.stringify(kind)}: one of ${SEALER_FACTORIES.map((x) => x.kind).join(', ')}`);
  return f;
}
