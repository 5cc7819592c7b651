/**
 * What the QEMU rotation mechanisms (qemu-rekey.ts, qemu-convert.ts) share: block node
 * descriptions as `json:` filenames, the secret objects (old key on fd 3, new key on fd 4),
 * the question "which of the two keys opens the image" (strict about killed probes), and
 * the check that no running guest holds the image.
 *
 * Why the in-use check opens the file read-write with the raw driver: a QEMU guest holds
 * the image with the WRITE permission and shares no writers (OFD locks on bytes 101 and
 * 201), so any other read-write open fails; qemu-img info and read-only opens take no
 * conflicting lock and succeed beside a running guest (checked here with qemu-system-x86_64
 * 7.2). The raw driver needs no key, and an open followed by `quit` writes nothing. qemu-io
 * itself shares writers, so a qemu-io holding an image does not count as "in use".
 */
import { DomainError, errors } from '../../../shared/src/errors.js';
import { QEMU_EXIT_KINDS, toolError, type RunTool } from '../../../shared/src/run-tool.js';
import { wipe } from '../../../shared/src/secret-bytes.js';
import { luksPassphrase } from '../images/passphrase.js';
import type { AnyImageFormat } from './types.js';

/** Secret object id of the old key (fd 3). */
export const OLD_SECRET_ID = 'sold';
/** Secret object id of the new key (fd 4, or fd 3 when it is the only one). */
export const NEW_SECRET_ID = 'snew';

/** `--object` value of a secret read from /dev/fd/`fd` (the bytes as they are, no newline handling). */
export function secretObject(id: string, fd: number): string {
  return `secret,id=${id},format=raw,file=/dev/fd/${fd}`;
}

/**
 * A block node for `json:` filenames; JSON escaping handles any path. `keyId` names the
 * secret object of an encrypted format. qcow2 nodes never open a backing file (the
 * mechanisms refuse images that have one before they use these nodes).
 */
export function qemuNode(format: AnyImageFormat, path: string, keyId?: string): string {
  const file = { driver: 'file', filename: path };
  let node: Record<string, unknown>;
  switch (format) {
    case 'luks':
      node = { driver: 'luks', ...(keyId ? { 'key-secret': keyId } : {}), file };
      break;
    case 'qcow2-luks':
      node = { driver: 'qcow2', ...(keyId ? { encrypt: { format: 'luks', 'key-secret': keyId } } : {}), file, backing: null };
      break;
    case 'qcow2':
      node = { driver: 'qcow2', file, backing: null };
      break;
    case 'raw':
      node = { driver: 'raw', file };
      break;
    default:
      throw errors.invalid(`format ${format} is not a QEMU image format`);
  }
  return `json:${JSON.stringify(node)}`;
}

/** QEMU's format name (qemu-img -O) of a format. */
export function qemuFormatName(format: AnyImageFormat): string {
  if (format === 'qcow2-luks') return 'qcow2';
  if (format === 'luks' || format === 'qcow2' || format === 'raw') return format;
  throw errors.invalid(`format ${format} is not a QEMU image format`);
}

/** Which of the two keys open an image. */
export type KeyState = 'old' | 'new' | 'both' | 'neither';

/** Says whether `key` opens the image at `path` (see createKeyProbe). */
export type KeyProbe = (format: 'luks' | 'qcow2-luks', path: string, key: Uint8Array, signal?: AbortSignal) => Promise<boolean>;

/**
 * A key check like ImageStore.testKey (a read-only unlock with qemu-io that shares locks,
 * and a keyless qemu-img info to tell a wrong key from an unreadable image), but strict
 * about locks (a failed unlock while another process holds the image exclusively, e.g. a
 * qemu-img amend left running by a killed agent, is unavailable, not "wrong key")
 * and about how qemu-io ended: only its error exit (1) can mean "wrong key". A qemu-io killed
 * by a signal (kill -9, OOM) exits with 128+n and is an error here, never a "no": a
 * rotation that took a killed probe for "the old key no longer opens" would declare itself
 * done too early. A header that QEMU cannot read is failed_precondition.
 */
export function createKeyProbe(run: RunTool, qemuIo: string, qemuImg: string, timeoutMs: number): KeyProbe {
  return async (format, path, key, signal) => {
    const passphrase = luksPassphrase(key);
    const opts = { timeoutMs, ...(signal ? { signal } : {}) };
    try {
      const r = await run(qemuIo, ['-r', '-U', '--object', secretObject('skey', 3), qemuNode(format, path, 'skey'), '-c', 'quit'], { ...opts, fds: [passphrase] });
      if (r.code === 0) return true;
      if (r.code !== 1) throw toolError('qemu-io', r, QEMU_EXIT_KINDS);
      // -U skips only the locks of what we share; a process that does not share
      // consistent reads (qemu-img amend changing keyslots, create, a convert target) still
      // makes the open fail. A keyless read-only open without -U fails exactly then (a
      // running guest shares reads), and then the answer is "busy", not "wrong key".
      const reader = await run(qemuIo, ['-r', '-c', 'quit', qemuNode('raw', path)], opts);
      if (reader.code === 1) {
        // unavailable (try again later), never failed_precondition: the rekey takes the
        // latter for a damaged header and would restore its backup under a running amend.
        throw new DomainError('unavailable', 'another process is changing the image', { hint: 'a key change or copy may still be running; try again', cause: new Error(reader.stderr.trim().slice(-500)) });
      }
      if (reader.code !== 0) throw toolError('qemu-io', reader, QEMU_EXIT_KINDS);
      const probe = await run(qemuImg, ['info', '-U', '--output=json', qemuNode(format, path)], opts);
      if (probe.code === 0) return false;
      if (probe.code === 1) throw errors.precondition('the image header cannot be read', { cause: new Error(probe.stderr.trim().slice(-500)) });
      throw toolError('qemu-img', probe, QEMU_EXIT_KINDS);
    } finally {
      wipe(passphrase);
    }
  };
}

/** Asks the image which of the two keys open it. */
export async function keyState(probe: KeyProbe, format: 'luks' | 'qcow2-luks', path: string, oldKey: Uint8Array, newKey: Uint8Array, signal?: AbortSignal): Promise<KeyState> {
  const oldOpens = await probe(format, path, oldKey, signal);
  const newOpens = await probe(format, path, newKey, signal);
  if (oldOpens && newOpens) return 'both';
  if (oldOpens) return 'old';
  if (newOpens) return 'new';
  return 'neither';
}

/**
 * Throws failed_precondition when another process (a running guest) holds the image for
 * writing, or when it cannot be opened for writing at all (see the module comment).
 */
export async function assertNotInUse(run: RunTool, qemuIo: string, path: string, timeoutMs: number, signal?: AbortSignal): Promise<void> {
  const opts = { timeoutMs, ...(signal ? { signal } : {}) };
  const rw = await run(qemuIo, ['-c', 'quit', qemuNode('raw', path)], opts);
  if (rw.code === 0) return;
  // Exit 1 is qemu-io's error exit; anything else (a signal) says nothing about locks.
  if (rw.code !== 1) throw toolError('qemu-io', rw, QEMU_EXIT_KINDS);
  // A read-only open takes no conflicting lock: if that works, the read-write one failed
  // for a lock (or for write permission), which both mean "not now".
  const ro = await run(qemuIo, ['-r', '-c', 'quit', qemuNode('raw', path)], opts);
  if (ro.code === 0) {
    throw errors.precondition('the image is in use (a running guest holds it) or not writable', {
      hint: 'stop the guest for an offline rotation, or use the live mechanism',
      cause: new Error(rw.stderr.trim().slice(-500)),
    });
  }
  // Not even readable: someone holds it exclusively (an amend, create or convert running).
  if (ro.code === 1) {
    throw new DomainError('unavailable', 'another process is changing the image', { hint: 'a key change or copy may still be running; try again', cause: new Error(ro.stderr.trim().slice(-500)) });
  }
  throw toolError('qemu-io', ro, QEMU_EXIT_KINDS);
}
