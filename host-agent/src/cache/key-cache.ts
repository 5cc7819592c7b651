/**
 * The agent's sealed key cache: the secrets of volumes of guests placed on this host, so
 * guests can start after a reboot while the server is unreachable. One file, sealed as a
 * whole (XChaCha20-Poly1305 envelope, AAD bound to the host id) under the host key.
 *
 * Writes replace the file atomically: the new content goes to a temporary file (fsync), the
 * current file gets a second name (`.old`, a hard link), the temporary file is renamed over
 * the current one (fsync of the directory), and only then are the old file's blocks
 * overwritten with zeros and its last name removed. So the cache file is complete at every
 * moment (a crash or a concurrent reader sees the old or the new content, never zeros),
 * and a removed key leaves no trace in the old file (the filesystem and the disk may still
 * keep copies elsewhere: see docs/threat-model.md). Leftovers of a crash (`.tmp`, `.old`)
 * are zeroed and removed when the cache is next opened.
 */
import { closeSync, existsSync, fsyncSync, linkSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { dirname } from 'node:path';
import { DecryptionError, open, seal, type WrappingKey } from '../../../shared/src/envelope.js';
import { errors } from '../../../shared/src/errors.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import { fsyncDirSync } from '../../../shared/src/durable-fs.js';

/** One cached secret. */
export interface CachedKey {
  volumeId: string;
  keyVersion: number;
  /** Guests on this host that use the volume. */
  guestIds: string[];
  secret: Uint8Array;
  /**
   * The LUKS UUID of the image this key was last checked against. While the image still
   * has that header, the (slow, key-stretched) check is not repeated: at start-up many
   * volumes must be ready fast. QEMU and cryptsetup still refuse a wrong key at open.
   */
  verifiedHeader?: string;
}

/** What the cache offers the reconciler. */
export interface KeyCache {
  get(volumeId: string, keyVersion: number): Uint8Array | undefined;
  /** The header this key was last verified against (see CachedKey.verifiedHeader). */
  verifiedHeader(volumeId: string, keyVersion: number): string | undefined;
  /**
   * Replaces the whole content and persists it; the cache takes ownership of the secrets.
   * `desired` is the last desired state from the server (key packets removed), kept so
   * guests can start after a reboot while the server is unreachable.
   */
  replace(entries: CachedKey[], desired?: Uint8Array): void;
  /** The last desired state stored with replace(), if any. */
  lastDesired(): Uint8Array | undefined;
  entries(): readonly Omit<CachedKey, 'secret'>[];
  /** Wipes the in-memory secrets. */
  close(): void;
}

const FORMAT = 'virtkm-key-cache-v1';

function cacheAad(hostId: string): string {
  return `virtkm/v1/agent-cache/${hostId}`;
}

/** Serialises entries: JSON with base64 secrets, as a Buffer the caller wipes. */
function encode(entries: CachedKey[], desired: Uint8Array | undefined): Buffer {
  const json = JSON.stringify({
    format: FORMAT,
    desired: desired ? Buffer.from(desired).toString('base64') : null,
    entries: entries.map((e) => ({ v: e.volumeId, k: e.keyVersion, g: e.guestIds, h: e.verifiedHeader ?? null, s: Buffer.from(e.secret).toString('base64') })),
  });
  return Buffer.from(json, 'utf8');
}

function decode(plain: Uint8Array): { entries: CachedKey[]; desired: Uint8Array | undefined } {
  let doc: unknown;
  try {
    doc = JSON.parse(Buffer.from(plain).toString('utf8'));
  } catch {
    throw errors.precondition('key cache is damaged');
  }
  const d = doc as { format?: unknown; entries?: unknown; desired?: unknown };
  if (d.format !== FORMAT || !Array.isArray(d.entries)) throw errors.precondition('key cache has an unknown format');
  return {
    entries: (d.entries as { v: string; k: number; g: string[]; h?: string | null; s: string }[]).map((e) => ({
      volumeId: e.v,
      keyVersion: e.k,
      guestIds: e.g,
      secret: ownedCopy(Buffer.from(e.s, 'base64')),
      ...(e.h ? { verifiedHeader: e.h } : {}),
    })),
    desired: typeof d.desired === 'string' ? Buffer.from(d.desired, 'base64') : undefined,
  };
}

/** Overwrites a file's current contents with zeros and syncs (best effort against remnants). */
function zeroFile(path: string): void {
  const size = statSync(path).size;
  const fd = openSync(path, 'r+');
  try {
    const zeros = Buffer.alloc(Math.min(size, 1 << 20));
    for (let off = 0; off < size; off += zeros.length) writeSync(fd, zeros, 0, Math.min(zeros.length, size - off), off);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Zeroes and removes a file if it exists (a leftover of an interrupted write). When it is
 * another name of `live` (a crash between the link and the rename), only the name goes.
 */
function shredIfPresent(path: string, live?: string): void {
  const st = statSync(path, { throwIfNoEntry: false });
  if (!st) return;
  const other = live === undefined ? undefined : statSync(live, { throwIfNoEntry: false });
  if (!(other && other.ino === st.ino && other.dev === st.dev)) zeroFile(path);
  unlinkSync(path);
}

/** Opens (or starts) the cache at `path`, sealed under `hostKey` and bound to `hostId`. */
export function openKeyCache(path: string, hostKey: WrappingKey, hostId: string): KeyCache {
  const tmp = `${path}.tmp`;
  const old = `${path}.old`;
  // A crash during a write leaves at most these; `path` itself is always complete.
  shredIfPresent(tmp, path);
  shredIfPresent(old, path);
  let entries: CachedKey[] = [];
  let desired: Uint8Array | undefined;
  if (existsSync(path)) {
    let plain: Uint8Array | undefined;
    try {
      plain = open(readFileSync(path), hostKey, cacheAad(hostId));
      ({ entries, desired } = decode(plain));
    } catch (err) {
      if (err instanceof DecryptionError) throw errors.precondition('key cache does not open with this host key', { hint: 'the cache is rebuilt from the server once it answers; remove the file to start empty' });
      throw err;
    } finally {
      wipe(plain);
    }
  }
  // A digest of the last content written: a resync that changes nothing writes nothing.
  let lastDigest = '';
  const persist = () => {
    const plain = encode(entries, desired);
    const digest = createHash('sha256').update(plain).digest('hex');
    if (digest === lastDigest && existsSync(path)) {
      wipe(plain);
      return;
    }
    lastDigest = digest;
    const sealed = seal(plain, hostKey, cacheAad(hostId));
    wipe(plain);
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeSync(fd, sealed);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    const hadOld = existsSync(path);
    if (hadOld) {
      shredIfPresent(old, path);
      linkSync(path, old);
    }
    renameSync(tmp, path);
    fsyncDirSync(dirname(path));
    if (hadOld) {
      shredIfPresent(old);
      fsyncDirSync(dirname(path));
    }
  };
  return {
    get(volumeId, keyVersion) {
      return entries.find((e) => e.volumeId === volumeId && e.keyVersion === keyVersion)?.secret;
    },
    replace(next, nextDesired) {
      const keep = new Set(next.map((e) => e.secret));
      for (const e of entries) if (!keep.has(e.secret)) wipe(e.secret);
      entries = next;
      if (nextDesired !== undefined) desired = nextDesired;
      persist();
    },
    lastDesired() {
      return desired;
    },
    verifiedHeader(volumeId, keyVersion) {
      return entries.find((e) => e.volumeId === volumeId && e.keyVersion === keyVersion)?.verifiedHeader;
    },
    entries() {
      return entries.map(({ volumeId, keyVersion, guestIds }) => ({ volumeId, keyVersion, guestIds }));
    },
    close() {
      for (const e of entries) wipe(e.secret);
      entries = [];
    },
  };
}
