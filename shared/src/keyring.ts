/**
 * The Linux kernel keyring, through libkeyutils (libkeyutils.so.1, Debian package
 * libkeyutils1) loaded with koffi on first use.
 *
 * The agent keeps the keys of its dm-crypt volumes as `logon` keys: the kernel (dm-crypt)
 * can use them, user space cannot read them back (keyctl_read fails with EOPNOTSUPP, for
 * root too), and a dm-crypt table can name one (`:<bytes>:logon:<description>`) instead of
 * carrying the key itself.
 *
 * Where the keys live: a keyring named "virtkm-agent" in a private, anonymous session
 * keyring that the agent joins at start (what systemd's KeyringMode=private gives a
 * service). Why a session keyring: it is inherited by the agent's children, so the dmsetup
 * and cryptsetup processes it runs possess the keys and the kernel finds them when it loads
 * a table that names one (a process keyring is not inherited, so the kernel would not find
 * them from there). Why a private one: a session keyring inherited from a login shell is
 * shared with every process of that session; the private one is possessed only by the agent
 * and its children, and disappears with them, so a crashed agent leaves no key behind
 * (the user keyring @u would outlive it until reboot). Root can still list the keys in
 * /proc/keys (user view permission) but cannot read them: logon keys have no read method.
 *
 * Joining a session changes the calling thread's credentials: call openVolumeKeyring() from
 * the main thread (where Node spawns children), once, early. Keys are permitted only to
 * their possessor (view, write, search, link, setattr) plus view for their owner.
 */
import { DomainError, errors } from './errors.js';
import { describeError, type Logger } from './log.js';
import { nativeLibrary } from './native-library.js';

/** Special keyring ids (keyutils.h). */
export const KEY_SPEC = Object.freeze({ thread: -1, process: -2, session: -3, user: -4, userSession: -5 });

/** Permission bits (keyutils.h). */
export const KEY_PERM = Object.freeze({
  posView: 0x01000000,
  posRead: 0x02000000,
  posWrite: 0x04000000,
  posSearch: 0x08000000,
  posLink: 0x10000000,
  posSetattr: 0x20000000,
  posAll: 0x3f000000,
  usrView: 0x00010000,
});

/** Permissions of the volume keys: the possessor uses and replaces them; the owner may see them listed. */
export const VOLUME_KEY_PERM = KEY_PERM.posView | KEY_PERM.posWrite | KEY_PERM.posSearch | KEY_PERM.posLink | KEY_PERM.posSetattr | KEY_PERM.usrView;
/** Permissions of the agent's keyring. */
export const AGENT_KEYRING_PERM = KEY_PERM.posAll | KEY_PERM.usrView;
/** Name of the agent's keyring. */
export const AGENT_KEYRING_NAME = 'virtkm-agent';
/** Prefix of every volume key description ("virtkm:<volume-id>:v<version>"). */
export const VOLUME_KEY_PREFIX = 'virtkm:';

const ERRNO_NAMES: Readonly<Record<number, string>> = {
  1: 'EPERM',
  2: 'ENOENT',
  12: 'ENOMEM',
  13: 'EACCES',
  22: 'EINVAL',
  95: 'EOPNOTSUPP',
  122: 'EDQUOT',
  126: 'ENOKEY',
  127: 'EKEYEXPIRED',
  128: 'EKEYREVOKED',
  129: 'EKEYREJECTED',
};
const ENOKEY = 126;

interface KeyUtils {
  addKey: (type: string, description: string, payload: Uint8Array | null, length: number, ring: number) => number;
  unlink: (key: number, ring: number) => number;
  search: (ring: number, type: string, description: string, dest: number) => number;
  read: (key: number, buffer: Uint8Array | null, length: number) => number;
  describe: (key: number, buffer: Uint8Array, length: number) => number;
  setperm: (key: number, perm: number) => number;
  joinSession: (name: string | null) => number;
  errno: () => number;
}

/** libkeyutils through koffi, loaded once (native-library.ts). */
const keyutils = nativeLibrary<KeyUtils>('libkeyutils.so.1', (koffi, l) => {
  const addKey = l.func('int32_t add_key(const char *type, const char *description, const void *payload, size_t plen, int32_t ringid)');
  const unlink = l.func('long keyctl_unlink(int32_t key, int32_t keyring)');
  const search = l.func('long keyctl_search(int32_t ringid, const char *type, const char *description, int32_t destringid)');
  const read = l.func('long keyctl_read(int32_t id, void *buffer, size_t buflen)');
  const describe = l.func('long keyctl_describe(int32_t id, void *buffer, size_t buflen)');
  const setperm = l.func('long keyctl_setperm(int32_t id, uint32_t perm)');
  const joinSession = l.func('int32_t keyctl_join_session_keyring(const char *name)');
  return {
    addKey: (type, description, payload, length, ring) => addKey(type, description, payload, length, ring) as number,
    unlink: (key, ring) => Number(unlink(key, ring)),
    search: (ring, type, description, dest) => Number(search(ring, type, description, dest)),
    read: (key, buffer, length) => Number(read(key, buffer, length)),
    describe: (key, buffer, length) => Number(describe(key, buffer, length)),
    setperm: (key, perm) => Number(setperm(key, perm)),
    joinSession: (name) => joinSession(name) as number,
    errno: () => koffi.errno(),
  };
});

function lib(): KeyUtils {
  const l = keyutils.get();
  if (l) return l;
  throw new DomainError('unavailable', 'the kernel keyring cannot be used: libkeyutils.so.1 does not load', { hint: 'install the Debian package libkeyutils1' });
}

/** Why the keyring cannot be used here, or undefined when it can. */
export function keyringUnavailableReason(): string | undefined {
  if (keyutils.get()) return undefined;
  return `libkeyutils.so.1 does not load (${keyutils.error() ?? 'unknown'}); install libkeyutils1`;
}

/** A failed keyctl call: the errno's name, never a payload. */
export class KeyctlError extends DomainError {
  readonly errno: number;
  readonly code: string;
  constructor(what: string, errno: number) {
    const code = ERRNO_NAMES[errno] ?? `errno ${errno}`;
    super(errno === 13 || errno === 1 ? 'permission_denied' : errno === ENOKEY ? 'not_found' : 'failed_precondition', `${what} failed: ${code}`);
    this.name = 'KeyctlError';
    this.errno = errno;
    this.code = code;
  }
}

function check(rc: number, what: string): number {
  if (rc < 0) throw new KeyctlError(what, lib().errno());
  return rc;
}

/** add_key(2): adds (or updates, same type and description in the same keyring) a key; returns its serial. */
export function addKey(type: string, description: string, payload: Uint8Array | null, ring: number): number {
  return check(lib().addKey(type, description, payload, payload?.length ?? 0, ring), `add_key ${type}`);
}

/** keyctl_search: the serial of a key reachable from `ring`, or undefined when there is none. */
export function searchKey(ring: number, type: string, description: string): number | undefined {
  const rc = lib().search(ring, type, description, 0);
  if (rc >= 0) return rc;
  const errno = lib().errno();
  if (errno === ENOKEY || errno === 127 || errno === 128) return undefined;
  throw new KeyctlError('keyctl_search', errno);
}

/** keyctl_read: a key's payload (for a keyring, its members' serials). Throws for logon keys. */
export function readKey(id: number): Buffer {
  const size = check(lib().read(id, null, 0), 'keyctl_read');
  const out = Buffer.alloc(size);
  const got = check(lib().read(id, out, size), 'keyctl_read');
  return out.subarray(0, Math.min(got, size));
}

/** What keyctl_describe says of a key. */
export interface KeyDescription {
  type: string;
  uid: number;
  gid: number;
  perm: number;
  description: string;
}

/** keyctl_describe: type, owner, permissions and description of a key. */
export function describeKey(id: number): KeyDescription {
  const buf = Buffer.alloc(4096);
  const n = check(lib().describe(id, buf, buf.length), 'keyctl_describe');
  // "type;uid;gid;perm;description" (the description may itself contain ';').
  const text = buf.subarray(0, Math.max(0, Math.min(n, buf.length) - 1)).toString('utf8');
  const [type = '', uid = '', gid = '', perm = '', ...rest] = text.split(';');
  return { type, uid: Number(uid), gid: Number(gid), perm: parseInt(perm, 16), description: rest.join(';') };
}

/** keyctl_unlink: removes `id` from `ring`; false when it was not linked there. */
export function unlinkKey(id: number, ring: number): boolean {
  if (lib().unlink(id, ring) >= 0) return true;
  const errno = lib().errno();
  if (errno === 2 || errno === ENOKEY) return false;
  throw new KeyctlError('keyctl_unlink', errno);
}

/** keyctl_setperm. */
export function setKeyPerm(id: number, perm: number): void {
  check(lib().setperm(id, perm), 'keyctl_setperm');
}

/** Serials of the keys linked directly in a keyring. */
export function keyringMembers(ring: number): number[] {
  const raw = readKey(ring);
  const out: number[] = [];
  for (let i = 0; i + 4 <= raw.length; i += 4) out.push(raw.readInt32LE(i));
  return out;
}

let joinedSession: number | undefined;

/**
 * Joins a new anonymous session keyring, once per process (later calls return the same
 * one): keys linked there are possessed by this process and the children it starts
 * afterwards, and by nobody else.
 */
export function joinPrivateSession(): number {
  joinedSession ??= check(lib().joinSession(null), 'keyctl_join_session_keyring');
  return joinedSession;
}

/** The agent's keyring of dm-crypt volume keys. */
export interface VolumeKeyring {
  /** Serial of the keyring. */
  readonly id: number;
  /**
   * Loads a volume key as the logon key "virtkm:<volume-id>:v<version>" (replacing one of
   * that description) and returns the description; undefined when the keyring is disabled.
   */
  load(volumeId: string, keyVersion: number, secret: Uint8Array): string | undefined;
  /** Descriptions of the volume keys in the keyring, sorted. */
  list(): string[];
  /** Unlinks the key of that description; false when there is none. */
  unlink(description: string): boolean;
  /** Unlinks every volume key whose description is not in `keep`; returns what it unlinked. */
  retain(keep: ReadonlySet<string>): string[];
}

const VOLUME_ID_RE = /^[A-Za-z0-9._-]{1,120}$/;

/** The description of a volume key. */
export function volumeKeyDescription(volumeId: string, keyVersion: number): string {
  if (!VOLUME_ID_RE.test(volumeId)) throw errors.invalid('invalid volume id for the kernel keyring');
  if (!Number.isInteger(keyVersion) || keyVersion < 0) throw errors.invalid('invalid key version for the kernel keyring');
  return `${VOLUME_KEY_PREFIX}${volumeId}:v${keyVersion}`;
}

/** Options of createVolumeKeyring. */
export interface VolumeKeyringOptions {
  /** Join a private session keyring first (default true; see the module comment). */
  privateSession?: boolean;
  /** Name of the keyring (default "virtkm-agent"). */
  name?: string;
}

/**
 * Finds or creates the agent's keyring in the session keyring and returns it. Throws a
 * DomainError when the kernel keyring cannot be used.
 */
export function createVolumeKeyring(options: VolumeKeyringOptions = {}): VolumeKeyring {
  const name = options.name ?? AGENT_KEYRING_NAME;
  if (options.privateSession ?? true) joinPrivateSession();
  const id = searchKey(KEY_SPEC.session, 'keyring', name) ?? addKey('keyring', name, null, KEY_SPEC.session);
  setKeyPerm(id, AGENT_KEYRING_PERM);

  function volumeKeys(): Map<string, number> {
    const out = new Map<string, number>();
    for (const member of keyringMembers(id)) {
      let d: KeyDescription;
      try {
        d = describeKey(member);
      } catch {
        continue; // revoked or gone meanwhile
      }
      if (d.type === 'logon' && d.description.startsWith(VOLUME_KEY_PREFIX)) out.set(d.description, member);
    }
    return out;
  }

  function unlink(description: string): boolean {
    const key = volumeKeys().get(description);
    return key === undefined ? false : unlinkKey(key, id);
  }

  return {
    id,
    load(volumeId, keyVersion, secret) {
      const description = volumeKeyDescription(volumeId, keyVersion);
      if (secret.length === 0) throw errors.invalid('an empty key cannot be loaded into the kernel keyring');
      const key = addKey('logon', description, secret, id);
      setKeyPerm(key, VOLUME_KEY_PERM);
      return description;
    },
    list: () => [...volumeKeys().keys()].sort(),
    unlink,
    retain(keep) {
      const dropped: string[] = [];
      for (const [description, key] of volumeKeys()) {
        if (!keep.has(description) && unlinkKey(key, id)) dropped.push(description);
      }
      return dropped.sort();
    },
  };
}

/**
 * The agent's keyring, or a disabled stand-in when the kernel keyring cannot be used (then
 * load() returns undefined and keys go to cryptsetup on stdin as before); either way the
 * outcome is logged. Never throws.
 */
export function openVolumeKeyring(logger: Logger, options: VolumeKeyringOptions = {}): VolumeKeyring {
  try {
    const ring = createVolumeKeyring(options);
    // Keys left by an earlier run in this session (an agent restarted in the same session).
    const stale = ring.retain(new Set());
    logger.debug('kernel keyring ready', { keyring: ring.id, removed_stale: stale.length });
    return {
      id: ring.id,
      load(volumeId, keyVersion, secret) {
        try {
          return ring.load(volumeId, keyVersion, secret);
        } catch (err) {
          logger.warn('loading a key into the kernel keyring failed; it goes to cryptsetup on stdin', { volume_id: volumeId, ...describeError(err) });
          return undefined;
        }
      },
      list: () => ring.list(),
      unlink: (description) => ring.unlink(description),
      retain: (keep) => ring.retain(keep),
    };
  } catch (err) {
    logger.warn('the kernel keyring cannot be used; dm-crypt keys go to cryptsetup on stdin', describeError(err));
    return { id: 0, load: () => undefined, list: () => [], unlink: () => false, retain: () => [] };
  }
}
