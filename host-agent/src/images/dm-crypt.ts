/**
 * dm-crypt mappings for luks2 and plain volumes, opened and closed with cryptsetup (key on
 * stdin, never argv). QEMU opens luks and qcow2-luks images itself and needs none of this.
 *
 * State is read from sysfs (/sys/block/dm-N/dm/{name,uuid}, slaves/, loop/backing_file),
 * never from cryptsetup's human-readable `status` text. cryptsetup attaches a loop device
 * by itself when the backing image is a file, and detaches it on close.
 *
 * Fail closed: a plain mapping is opened only over an image that inspects as raw, so a
 * LUKS or qcow2 image is never decrypted (and overwritten) as plain dm-crypt.
 *
 * Kernel keyring: given the description of a logon key that holds the volume key (the
 * agent's keyring, shared/src/keyring.ts), a plain mapping is created with dmsetup and a
 * table that names the key (`:<bytes>:logon:<description>`), so the key never passes
 * through user space again: dmsetup runs in the agent's session keyring and the kernel
 * finds the key there. cryptsetup 2.6 cannot do this itself: `open --type plain` takes key
 * material only, and LUKS2's keyring token reads a *user* key (a passphrase readable from
 * user space), so LUKS2 volumes still get their passphrase on stdin; cryptsetup then hands
 * the derived volume key to dm-crypt through a logon key of its own (its default; the table
 * never shows the key).
 */
import { readFile, readdir, realpath, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { CRYPTSETUP_EXIT_KINDS, runTool, toolError, type RunTool } from '../../../shared/src/run-tool.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { fsCode } from './files.js';
import { createHostImageStore } from './image-store.js';
import { checkPlainKey, luksPassphrase } from './passphrase.js';
import { checkImageSpec } from './spec.js';
import type { DmCryptMapper, ImageSpec, ImageStore } from './types.js';

/** Options of createDmCryptMapper, with their defaults. */
export interface DmCryptMapperOptions {
  /** Runs the tools (default runTool). */
  run?: RunTool;
  /** Path of cryptsetup (default: looked up in runTool's fixed PATH). */
  cryptsetup?: string;
  /** Used to check an image's kind before opening it (default: the real store with `run`). */
  images?: ImageStore;
  /** sysfs and procfs paths, for tests (defaults /sys/block, /sys/module, /proc/misc). */
  sysBlockDir?: string;
  sysModuleDir?: string;
  procMisc?: string;
  /** Time limit of each cryptsetup run (default 60 s). */
  toolTimeoutMs?: number;
  /** Paths of dmsetup and losetup (default: looked up in runTool's fixed PATH). */
  dmsetup?: string;
  losetup?: string;
}

/** Every mapping virtkm opens is named with this prefix, and only those are listed. */
export const MAPPING_PREFIX = 'virtkm-';
const NAME_RE = /^virtkm-[A-Za-z0-9._-]{1,120}$/;
/** A logon key description ("service:rest") of characters that are safe in a dm table. */
const KEY_DESCRIPTION_RE = /^[A-Za-z0-9._-]{1,64}:[A-Za-z0-9._:-]{1,200}$/;

/** The reason dm-crypt cannot be used, for messages and test skips. */
export const NO_DEVICE_MAPPER = 'no device-mapper in this kernel (dm_mod is not loaded or not built; try modprobe dm_mod)';

async function readText(path: string): Promise<string | undefined> {
  try {
    return (await readFile(path, 'utf8')).trim();
  } catch (err) {
    if (fsCode(err) === 'ENOENT' || fsCode(err) === 'ENOTDIR') return undefined;
    throw err;
  }
}

/** Checks a mapping name: the virtkm- prefix and dm's safe characters. */
export function checkMappingName(name: string): string {
  if (!NAME_RE.test(name)) throw errors.invalid('invalid dm-crypt mapping name', { hint: 'names are "virtkm-" followed by letters, digits, ".", "_" or "-"' });
  return name;
}

/** Creates the real dm-crypt mapper. */
export function createDmCryptMapper(options: DmCryptMapperOptions = {}): DmCryptMapper {
  const run = options.run ?? runTool;
  const cryptsetup = options.cryptsetup ?? 'cryptsetup';
  const images = options.images ?? createHostImageStore({ run });
  const sysBlock = options.sysBlockDir ?? '/sys/block';
  const procMisc = options.procMisc ?? '/proc/misc';
  const sysModuleDir = options.sysModuleDir ?? '/sys/module';
  const timeoutMs = options.toolTimeoutMs ?? 60_000;
  const dmsetup = options.dmsetup ?? 'dmsetup';
  const losetup = options.losetup ?? 'losetup';

  async function unavailableReason(): Promise<string | undefined> {
    // The kernel lists its misc device once dm-mod is loaded or built in. Not
    // /dev/mapper/control: libdevmapper creates that node itself, with or without a kernel
    // behind it (seen here: the node existed, every open failed).
    const misc = await readText(procMisc);
    if (misc?.split('\n').some((line) => line.trim().split(/\s+/)[1] === 'device-mapper')) return undefined;
    if (await readText(join(sysModuleDir, 'dm_mod', 'initstate'))) return undefined;
    return NO_DEVICE_MAPPER;
  }

  /** dm-N directory names of the open dm-crypt mappings, by mapping name. */
  async function cryptMappings(): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    let entries: string[];
    try {
      entries = await readdir(sysBlock);
    } catch {
      return out;
    }
    for (const entry of entries) {
      if (!entry.startsWith('dm-')) continue;
      const name = await readText(join(sysBlock, entry, 'dm', 'name'));
      const uuid = await readText(join(sysBlock, entry, 'dm', 'uuid'));
      // Not cryptsetup's helper devices (CRYPT-SUBDEV-..., e.g. NAME-overlay and
      // NAME-hotzone-forward of an online LUKS2 re-encryption): they are no mappings of ours.
      if (name !== undefined && uuid?.startsWith('CRYPT-') && !uuid.startsWith('CRYPT-SUBDEV-')) out.set(name, entry);
    }
    return out;
  }

  /** True when the mapping's only underlying device is `path` (a file through a loop device, or the block device itself). */
  async function backedBy(dmEntry: string, path: string): Promise<boolean> {
    const slaves = await readdir(join(sysBlock, dmEntry, 'slaves')).catch(() => [] as string[]);
    if (slaves.length !== 1 || slaves[0] === undefined) return false;
    const slave = slaves[0];
    const target = await realpath(path);
    const backingFile = await readText(join(sysBlock, slave, 'loop', 'backing_file'));
    if (backingFile !== undefined) return backingFile === target;
    const dev = await readText(join(sysBlock, slave, 'dev'));
    const st = await stat(target);
    if (!st.isBlockDevice() || dev === undefined) return false;
    // st.rdev packs major and minor the glibc way (gnu_dev_major/minor); sysfs says "major:minor".
    const major = (Math.floor(st.rdev / 0x100) & 0xfff) | (Math.floor(st.rdev / 0x100000000) & ~0xfff);
    const minor = (st.rdev & 0xff) | (Math.floor(st.rdev / 0x1000) & ~0xff);
    return dev === `${major}:${minor}`;
  }

  async function requireDeviceMapper(): Promise<void> {
    const reason = await unavailableReason();
    if (reason) throw new DomainError('unavailable', 'dm-crypt is not available on this host', { hint: reason });
  }

  /**
   * A plain mapping whose table names the logon key `keyDescription` instead of holding the
   * key. Same table as `cryptsetup open --type plain` with no offset and no IV skip makes.
   */
  async function openPlainByKeyring(spec: ImageSpec, name: string, keyDescription: string): Promise<void> {
    const st = await stat(spec.path);
    let bytes = st.size;
    let device: string | undefined;
    let loop: string | undefined;
    if (st.isBlockDevice()) {
      const r = await run('blockdev', ['--getsize64', spec.path], { timeoutMs });
      if (r.code !== 0) throw toolError('blockdev', r);
      bytes = Number(r.stdout.trim());
      // major:minor, so that no path ever has to be quoted inside the table.
      const major = (Math.floor(st.rdev / 0x100) & 0xfff) | (Math.floor(st.rdev / 0x100000000) & ~0xfff);
      const minor = (st.rdev & 0xff) | (Math.floor(st.rdev / 0x1000) & ~0xff);
      device = `${major}:${minor}`;
    }
    // Whole logical sectors only, counted in the 512-byte units of dm tables.
    const sectors = Math.floor(bytes / spec.sectorSize) * (spec.sectorSize / 512);
    if (!(sectors > 0)) throw errors.precondition('the image is too small for a dm-crypt mapping');
    if (device === undefined) {
      const r = await run(losetup, ['--find', '--show', '--', spec.path], { timeoutMs });
      if (r.code !== 0) throw toolError('losetup', r);
      loop = r.stdout.trim();
      if (!/^\/dev\/loop\d+$/.test(loop)) throw errors.internal(new Error(`losetup printed ${loop}`));
      device = loop;
    }
    try {
      const sectorOption = spec.sectorSize === 512 ? '' : ` 1 sector_size:${spec.sectorSize}`;
      const table = `0 ${sectors} crypt ${spec.cipher} :${spec.keySizeBits / 8}:logon:${keyDescription} 0 ${device} 0${sectorOption}`;
      // The uuid prefix is cryptsetup's for plain mappings: cryptMappings() and
      // `cryptsetup close` treat the mapping like any other.
      const r = await run(dmsetup, ['create', name, '--uuid', `CRYPT-PLAIN-${name}`, '--table', table], { timeoutMs });
      if (r.code !== 0) throw toolError('dmsetup', r);
    } finally {
      // Detaching a loop device that the mapping holds only marks it autoclear: it goes
      // away with the mapping, as cryptsetup's own loop devices do. Unused, it goes now.
      if (loop) await run(losetup, ['--detach', loop], { timeoutMs }).catch(() => undefined);
    }
  }

  async function open(spec: ImageSpec, name: string, secret: Uint8Array, keyDescription?: string): Promise<string> {
    checkImageSpec(spec);
    checkMappingName(name);
    if (keyDescription !== undefined && !KEY_DESCRIPTION_RE.test(keyDescription)) throw errors.invalid('invalid kernel key description');
    if (spec.format !== 'luks2' && spec.format !== 'plain') {
      throw errors.invalid(`format ${spec.format} is opened by QEMU, not by dm-crypt`);
    }
    if (spec.format === 'plain') checkPlainKey(secret, spec.keySizeBits);
    // The image's kind first (fail closed), whether or not dm-crypt is there.
    const info = await images.inspect(spec.path);
    if (!info.exists) throw errors.notFound('image');
    const expected = spec.format === 'luks2' ? 'luks2' : 'raw';
    if (info.kind !== expected) throw errors.precondition(`the image is ${info.kind}, not ${expected}: refusing to open it as ${spec.format}`);
    if (info.damaged) throw errors.precondition('the image header is damaged');

    await requireDeviceMapper();
    const device = `/dev/mapper/${name}`;
    const existing = (await cryptMappings()).get(name);
    if (existing !== undefined) {
      if (await backedBy(existing, spec.path)) return device;
      throw errors.alreadyExists('a different dm-crypt mapping of that name');
    }

    if (spec.format === 'luks2') {
      const passphrase = luksPassphrase(secret);
      try {
        const r = await run(cryptsetup, ['open', '--type', 'luks2', '--key-file', '-', spec.path, name], { stdin: passphrase, timeoutMs });
        if (r.code === 2) throw errors.denied('the key does not open the volume');
        if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
      } finally {
        wipe(passphrase);
      }
      return device;
    }
    if (keyDescription !== undefined) {
      await openPlainByKeyring(spec, name, keyDescription);
      return device;
    }
    // plain: a key file is the binary data key itself (no hashing in plain mode), exactly
    // keySizeBits / 8 bytes; no offset, no IV skip, the whole file is the volume.
    const args = [
      'open', '--type', 'plain',
      '--cipher', spec.cipher,
      '--key-size', String(spec.keySizeBits),
      '--sector-size', String(spec.sectorSize),
      '--offset', '0',
      '--skip', '0',
      '--key-file', '-',
      '--keyfile-size', String(spec.keySizeBits / 8),
      spec.path,
      name,
    ];
    const r = await run(cryptsetup, args, { stdin: secret, timeoutMs });
    if (r.code !== 0) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
    return device;
  }

  async function close(name: string): Promise<void> {
    checkMappingName(name);
    if (await unavailableReason()) return; // nothing can be open
    if (!(await cryptMappings()).has(name)) return;
    const r = await run(cryptsetup, ['close', name], { timeoutMs });
    // 4: no such device, i.e. closed meanwhile.
    if (r.code !== 0 && r.code !== 4) throw toolError('cryptsetup', r, CRYPTSETUP_EXIT_KINDS);
  }

  async function list(): Promise<string[]> {
    if (await unavailableReason()) return [];
    return [...(await cryptMappings()).keys()].filter((n) => n.startsWith(MAPPING_PREFIX)).sort();
  }

  return { unavailableReason, open, close, list };
}
