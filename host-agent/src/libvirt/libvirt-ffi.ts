/**
 * The real Libvirt port adapter: libvirt's C library through koffi. Secret values go from
 * the caller's buffer into one native copy handed to virSecretSetValue and wiped right
 * after; they never pass through argv, the environment or a file.
 *
 * Threading: calls that talk to libvirtd (lookups, define, start, destroy, lists) run with
 * koffi's .async on its worker threads, so a slow QEMU start does not block the event loop.
 * Accessors that only read the local handle (name, UUID, usage id) and freeing handles
 * run synchronously. libvirt's error for a failed call is read from the connection (see
 * bindings.ts), so each connection runs one call at a time; `connections` lanes (default 2)
 * let a slow start on one lane leave the other free.
 *
 * Connections are opened on first use and reopened when found dead: a call that fails
 * because libvirtd went away is retried once on a fresh connection when it is idempotent
 * (reads, secret define and set-value, domain define); start, destroy, undefine, block copy
 * and block job abort are not retried and report unavailable.
 */
import { DomainError, errors } from '../../../shared/src/errors.js';
import { loadLibvirtBindings, UUID_STRING_BUFLEN, VIR_SECRET_USAGE_TYPE, type LibvirtBindings, type NativeFn } from './bindings.js';
import { LibvirtCallError, toDomainError, VirErr, type LibvirtOperation } from './errors.js';
import type { BlockJobInfo, BlockJobType, DomainDisk, DomainInfo, DomainState, Libvirt, SecretDefinition, SecretInfo } from './ports.js';
import { isPassphraseUtf8, MAX_SECRET_VALUE_BYTES } from './secret-value.js';
import { isCanonicalUuid, parseDomainDisks, parseDomainIdentity, parseSecretXml, parseVirtkmMarker, secretXml, usageIdOfVolume, volumeIdOfUsage } from './xml.js';

/** Options of createLibvirtFfi. */
export interface LibvirtFfiOptions {
  /** libvirt connection URI; default qemu:///system. */
  uri?: string;
  /** Connections used in parallel (each runs one call at a time); default 2, 1 to 8. */
  connections?: number;
}

/** Options after defaults. */
export interface CompiledLibvirtFfiOptions {
  readonly uri: string;
  readonly connections: number;
}

/** Applies defaults and checks ranges. */
export function compileLibvirtFfiOptions(options: LibvirtFfiOptions = {}): CompiledLibvirtFfiOptions {
  const known = new Set(['uri', 'connections']);
  for (const key of Object.keys(options)) if (!known.has(key)) throw errors.invalid(`unknown libvirt option: ${key}`);
  const uri = options.uri ?? 'qemu:///system';
  const connections = options.connections ?? 2;
  if (uri === '' || uri.includes('\0')) throw errors.invalid('libvirt URI must be a non-empty string');
  if (!Number.isInteger(connections) || connections < 1 || connections > 8) throw errors.invalid('libvirt connections must be 1 to 8');
  return Object.freeze({ uri, connections });
}

// Flags and enums from libvirt-domain.h.
const VIR_DOMAIN_DEFINE_VALIDATE = 1 << 0;
const VIR_DOMAIN_UNDEFINE_MANAGED_SAVE = 1 << 0;
const VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA = 1 << 1;
const VIR_DOMAIN_UNDEFINE_NVRAM = 1 << 2;
const VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA = 1 << 4;
/**
 * Undefine removes what only makes sense with the definition: managed save image, snapshot
 * and checkpoint metadata, and the UEFI variable store (without NVRAM libvirt refuses to
 * undefine a UEFI guest). TPM state is kept (libvirt's default): like a disk, it is the
 * guest's data and goes only when the admin deletes volumes.
 */
const UNDEFINE_FLAGS = VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | VIR_DOMAIN_UNDEFINE_NVRAM | VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
const VIR_DOMAIN_XML_INACTIVE = 1 << 1;
const VIR_DOMAIN_BLOCK_COPY_REUSE_EXT = 1 << 1;
const VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB = 1 << 2;
const VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES = 1 << 3;
const VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT = 1 << 1;
const VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES = 1 << 0;
/** virDomainBlockJobType values. */
const BLOCK_JOB_TYPES: Readonly<Record<number, BlockJobType>> = { 1: 'pull', 2: 'copy', 3: 'commit', 4: 'active-commit', 5: 'backup' };
/** virDomainState values to DomainState. */
const DOMAIN_STATES: Readonly<Record<number, DomainState>> = { 1: 'running', 2: 'running', 3: 'paused', 5: 'shutoff', 6: 'crashed' };

/** Runs libvirt calls on one connection, one at a time. */
class Lane {
  conn: bigint | null = null;
  pending = 0;
  private tail: Promise<void> = Promise.resolve();

  enqueue<T>(task: () => Promise<T>): Promise<T> {
    this.pending++;
    const result = this.tail.then(task);
    const done = (): void => {
      this.pending--;
    };
    this.tail = result.then(done, done);
    return result;
  }

  /** Resolves when every queued task has finished. */
  drained(): Promise<void> {
    return this.tail;
  }
}

/** What an operation body gets: the connection and helpers bound to it. */
interface Session {
  b: LibvirtBindings;
  conn: bigint;
  /** Calls fn asynchronously; a NULL or negative result throws LibvirtCallError. */
  call<T>(name: string, fn: NativeFn, ...args: unknown[]): Promise<T>;
  /** Like call, but resolves undefined instead of throwing when libvirt says `notFoundCode`. */
  lookup(name: string, fn: NativeFn, notFoundCode: number, ...args: unknown[]): Promise<bigint | undefined>;
}

function failed(result: unknown): boolean {
  return result === null || result === undefined || result === 0n || (typeof result === 'number' && result < 0);
}

/**
 * Creates the adapter. Nothing is loaded or opened until the first call; a missing
 * libvirt.so.0 surfaces then as DomainError unavailable.
 */
export function createLibvirtFfi(options: LibvirtFfiOptions = {}): Libvirt {
  const opts = compileLibvirtFfiOptions(options);
  const lanes = Array.from({ length: opts.connections }, () => new Lane());
  let closed = false;
  // Opening is serialized: a failed open reports its error through the global handler.
  let opening: Promise<unknown> = Promise.resolve();

  const asyncCall = (fn: NativeFn, args: unknown[]): Promise<unknown> =>
    new Promise((resolve, reject) => {
      fn.async(...args, (err: unknown, res: unknown) => (err ? reject(err instanceof Error ? err : new Error(String(err))) : resolve(res)));
    });

  async function open(b: LibvirtBindings): Promise<bigint> {
    const attempt = opening.then(async () => {
      b.takeDispatchedError();
      const conn = await asyncCall(b.virConnectOpen, [opts.uri]);
      if (failed(conn)) {
        const info = b.takeDispatchedError() ?? { code: 0, domain: 0, message: 'virConnectOpen failed' };
        throw new DomainError('unavailable', 'cannot connect to libvirt', {
          cause: new LibvirtCallError('virConnectOpen', info),
          hint: 'is libvirtd running? (check with: virsh version)',
        });
      }
      return conn as bigint;
    });
    opening = attempt.catch(() => undefined);
    return attempt;
  }

  async function dropConnection(b: LibvirtBindings, lane: Lane): Promise<void> {
    const conn = lane.conn;
    lane.conn = null;
    if (conn !== null) {
      // Closing a dead connection only releases it; its result does not matter.
      await asyncCall(b.virConnectClose, [conn]).catch(() => undefined);
    }
  }

  function session(b: LibvirtBindings, conn: bigint): Session {
    const call = async <T>(name: string, fn: NativeFn, ...args: unknown[]): Promise<T> => {
      b.virConnResetLastError(conn);
      const result = await asyncCall(fn, args);
      if (failed(result)) {
        throw new LibvirtCallError(name, b.connectionError(conn) ?? { code: 0, domain: 0, message: '' });
      }
      return result as T;
    };
    const lookup = async (name: string, fn: NativeFn, notFoundCode: number, ...args: unknown[]): Promise<bigint | undefined> => {
      try {
        return await call<bigint>(name, fn, ...args);
      } catch (err) {
        if (err instanceof LibvirtCallError && err.code === notFoundCode) return undefined;
        throw err;
      }
    };
    return { b, conn, call, lookup };
  }

  /** Runs body on the least busy lane, with a live connection; maps errors to DomainError. */
  async function run<T>(operation: LibvirtOperation, idempotent: boolean, body: (s: Session) => Promise<T>): Promise<T> {
    const b = await loadLibvirtBindings();
    // Checked after the await and right before enqueueing: close() waits for every task
    // enqueued before it set `closed`, and no task enqueued later opens a connection.
    if (closed) throw new DomainError('unavailable', 'libvirt connection closed');
    const lane = lanes.reduce((best, l) => (l.pending < best.pending ? l : best));
    return lane.enqueue(async () => {
      for (let attempt = 0; ; attempt++) {
        if (lane.conn !== null && (b.virConnectIsAlive(lane.conn) as number) !== 1) await dropConnection(b, lane);
        if (lane.conn === null) lane.conn = await open(b);
        const conn = lane.conn;
        try {
          return await body(session(b, conn));
        } catch (err) {
          if (err instanceof DomainError) throw err;
          if (!(err instanceof LibvirtCallError)) throw errors.internal(err);
          const lost = (b.virConnectIsAlive(conn) as number) !== 1;
          if (lost) await dropConnection(b, lane);
          if (lost && idempotent && attempt === 0) continue;
          throw toDomainError(err, operation, lost);
        }
      }
    });
  }

  // ----- helpers on handles --------------------------------------------------------------

  function uuidString(fn: NativeFn, handle: bigint): string {
    const buf = Buffer.alloc(UUID_STRING_BUFLEN);
    if ((fn(handle, buf) as number) < 0) throw errors.internal(new Error('cannot read a UUID from a libvirt handle'));
    const end = buf.indexOf(0);
    return buf.toString('latin1', 0, end < 0 ? UUID_STRING_BUFLEN - 1 : end);
  }

  /** The volume id of a secret handle when virtkm created it, else undefined. */
  function virtkmVolumeOf(b: LibvirtBindings, secret: bigint): string | undefined {
    if ((b.virSecretGetUsageType(secret) as number) !== VIR_SECRET_USAGE_TYPE.volume) return undefined;
    return volumeIdOfUsage((b.virSecretGetUsageID(secret) as string | null) ?? undefined);
  }

  async function withSecret<T>(s: Session, uuid: string, body: (secret: bigint) => Promise<T>): Promise<T> {
    const secret = await s.lookup('virSecretLookupByUUIDString', s.b.virSecretLookupByUUIDString, VirErr.NO_SECRET, s.conn, uuid);
    if (secret === undefined) throw errors.notFound(`secret ${uuid}`);
    try {
      if (virtkmVolumeOf(s.b, secret) === undefined) throw errors.precondition(`secret ${uuid} was not created by virtkm`);
      return await body(secret);
    } finally {
      s.b.virSecretFree(secret);
    }
  }

  /** The marker of a domain handle's current XML; undefined when absent or unreadable. */
  async function markerOf(s: Session, dom: bigint): Promise<ReturnType<typeof parseVirtkmMarker>> {
    const xml = s.b.takeString(await s.call<bigint>('virDomainGetXMLDesc', s.b.virDomainGetXMLDesc, dom, 0));
    try {
      return parseVirtkmMarker(xml);
    } catch {
      return undefined; // a malformed marker is not virtkm's: never touch that domain
    }
  }

  async function withDomain<T>(s: Session, name: string, virtkmOnly: boolean, body: (dom: bigint) => Promise<T>): Promise<T> {
    const dom = await s.lookup('virDomainLookupByName', s.b.virDomainLookupByName, VirErr.NO_DOMAIN, s.conn, name);
    if (dom === undefined) throw errors.notFound(`domain "${name}"`);
    try {
      if (virtkmOnly && (await markerOf(s, dom)) === undefined) throw errors.precondition(`domain "${name}" was not defined by virtkm`);
      return await body(dom);
    } finally {
      s.b.virDomainFree(dom);
    }
  }

  async function stateOf(s: Session, dom: bigint): Promise<DomainState> {
    const state: [number | null] = [null];
    const reason: [number | null] = [null];
    await s.call<number>('virDomainGetState', s.b.virDomainGetState, dom, state, reason, 0);
    return DOMAIN_STATES[state[0] ?? -1] ?? 'other';
  }

  const checkName = (name: string): void => {
    if (name === '' || name.length > 256 || name.includes('\0')) throw errors.invalid('domain name must be 1-256 characters');
  };
  const checkTarget = (target: string): void => {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(target)) throw errors.invalid('disk target must be 1-64 characters of A-Z a-z 0-9 . _ -');
  };
  const checkUuid = (uuid: string): void => {
    if (!isCanonicalUuid(uuid)) throw errors.invalid('secret UUID must be a lowercase canonical UUID');
  };

  // ----- secrets -------------------------------------------------------------------------

  const secrets: Libvirt['secrets'] = {
    async define(def: SecretDefinition): Promise<void> {
      const xml = secretXml(def);
      const usage = usageIdOfVolume(def.volumeId);
      await run({ op: 'secret.define', subject: `secret ${def.uuid}` }, true, async (s) => {
        // libvirt would silently redefine a foreign secret with this UUID, or fail with a
        // generic error when the usage is taken: check both first.
        const byUuid = await s.lookup('virSecretLookupByUUIDString', s.b.virSecretLookupByUUIDString, VirErr.NO_SECRET, s.conn, def.uuid);
        if (byUuid !== undefined) {
          try {
            const volume = virtkmVolumeOf(s.b, byUuid);
            if (volume !== def.volumeId) {
              throw errors.alreadyExists(volume === undefined ? `secret ${def.uuid} (not created by virtkm)` : `secret ${def.uuid} (for another volume)`);
            }
          } finally {
            s.b.virSecretFree(byUuid);
          }
        }
        const byUsage = await s.lookup('virSecretLookupByUsage', s.b.virSecretLookupByUsage, VirErr.NO_SECRET, s.conn, VIR_SECRET_USAGE_TYPE.volume, usage);
        if (byUsage !== undefined) {
          try {
            if (uuidString(s.b.virSecretGetUUIDString, byUsage) !== def.uuid) throw errors.alreadyExists(`a secret for volume ${def.volumeId} (with another UUID)`);
          } finally {
            s.b.virSecretFree(byUsage);
          }
        }
        const secret = await s.call<bigint>('virSecretDefineXML', s.b.virSecretDefineXML, s.conn, xml, 0);
        s.b.virSecretFree(secret);
      });
    },

    async setValue(uuid: string, value: Uint8Array): Promise<void> {
      checkUuid(uuid);
      if (value.length === 0 || value.length > MAX_SECRET_VALUE_BYTES) throw errors.invalid(`secret value must be 1 to ${MAX_SECRET_VALUE_BYTES} bytes`);
      // Refused here rather than by QEMU at the next start, where it would look like a broken guest.
      if (!isPassphraseUtf8(value)) throw errors.invalid('secret value must be UTF-8 text without NUL (QEMU reads it as a LUKS passphrase): encode the key, e.g. as hex');
      await run({ op: 'secret.setValue', subject: `secret ${uuid}` }, true, (s) =>
        withSecret(s, uuid, async (secret) => {
          // One native copy of the value, wiped whatever happens. libvirt copies it into its
          // RPC message and libvirtd keeps it in memory only (the secret is ephemeral).
          const copy = s.b.secretCopy(value);
          try {
            await s.call<number>('virSecretSetValue', s.b.virSecretSetValue, secret, copy.ptr, value.length, 0);
          } finally {
            copy.release();
          }
        }),
      );
    },

    async undefine(uuid: string): Promise<void> {
      checkUuid(uuid);
      await run({ op: 'secret.undefine', subject: `secret ${uuid}` }, false, (s) =>
        withSecret(s, uuid, async (secret) => {
          await s.call<number>('virSecretUndefine', s.b.virSecretUndefine, secret);
        }),
      );
    },

    list(): Promise<SecretInfo[]> {
      return run({ op: 'secret.list', subject: 'secrets' }, true, async (s) => {
        const out: [unknown] = [null];
        const count = await s.call<number>('virConnectListAllSecrets', s.b.virConnectListAllSecrets, s.conn, out, 0);
        const handles = s.b.pointerArray(out[0], count);
        const infos: SecretInfo[] = [];
        try {
          for (const h of handles) {
            const uuid = uuidString(s.b.virSecretGetUUIDString, h);
            const usageId = (s.b.virSecretGetUsageID(h) as string | null) ?? undefined;
            let parsed: ReturnType<typeof parseSecretXml> | undefined;
            try {
              const xml = s.b.takeString(await s.call<bigint>('virSecretGetXMLDesc', s.b.virSecretGetXMLDesc, h, 0));
              parsed = parseSecretXml(xml);
            } catch (err) {
              // Removed between listing and reading: skip it.
              if (err instanceof LibvirtCallError && err.code === VirErr.NO_SECRET) continue;
              throw err;
            }
            infos.push({
              uuid,
              usageType: parsed.usageType,
              usageId: usageId === '' ? undefined : usageId,
              volumeId: virtkmVolumeOf(s.b, h),
              description: parsed.description,
              private: parsed.private,
              ephemeral: parsed.ephemeral,
            });
          }
        } finally {
          for (const h of handles) s.b.virSecretFree(h);
          if (out[0] !== null) s.b.free(out[0]);
        }
        return infos;
      });
    },
  };

  // ----- domains -------------------------------------------------------------------------

  const domains: Libvirt['domains'] = {
    async define(xml: string): Promise<{ uuid: string; name: string }> {
      const { name, uuid } = parseDomainIdentity(xml);
      if (name === undefined) throw errors.invalid('domain XML has no <name>');
      checkName(name);
      if (parseVirtkmMarker(xml) === undefined) throw errors.invalid('domain XML lacks the virtkm marker in <metadata>');
      return run({ op: 'domain.define', subject: `domain "${name}"` }, true, async (s) => {
        const existing = await s.lookup('virDomainLookupByName', s.b.virDomainLookupByName, VirErr.NO_DOMAIN, s.conn, name);
        if (existing !== undefined) {
          try {
            if ((await markerOf(s, existing)) === undefined) throw errors.alreadyExists(`domain "${name}" (not defined by virtkm)`);
            // libvirt refuses a redefinition under another UUID with a generic error code.
            if (uuid?.toLowerCase() !== uuidString(s.b.virDomainGetUUIDString, existing)) {
              throw errors.alreadyExists(`domain "${name}" (with another UUID)`, { hint: 'to redefine a domain, give its <uuid> in the XML' });
            }
          } finally {
            s.b.virDomainFree(existing);
          }
        }
        const dom = await s.call<bigint>('virDomainDefineXMLFlags', s.b.virDomainDefineXMLFlags, s.conn, xml, VIR_DOMAIN_DEFINE_VALIDATE);
        try {
          return { uuid: uuidString(s.b.virDomainGetUUIDString, dom), name: s.b.virDomainGetName(dom) as string };
        } finally {
          s.b.virDomainFree(dom);
        }
      });
    },

    async undefine(name: string): Promise<void> {
      checkName(name);
      await run({ op: 'domain.undefine', subject: `domain "${name}"` }, false, (s) =>
        withDomain(s, name, true, async (dom) => {
          await s.call<number>('virDomainUndefineFlags', s.b.virDomainUndefineFlags, dom, UNDEFINE_FLAGS);
        }),
      );
    },

    async start(name: string): Promise<void> {
      checkName(name);
      await run({ op: 'domain.start', subject: `domain "${name}"` }, false, (s) =>
        withDomain(s, name, true, async (dom) => {
          await s.call<number>('virDomainCreate', s.b.virDomainCreate, dom);
        }),
      );
    },

    async destroy(name: string): Promise<void> {
      checkName(name);
      await run({ op: 'domain.destroy', subject: `domain "${name}"` }, false, (s) =>
        withDomain(s, name, true, async (dom) => {
          await s.call<number>('virDomainDestroy', s.b.virDomainDestroy, dom);
        }),
      );
    },

    async state(name: string): Promise<DomainState | undefined> {
      checkName(name);
      return run({ op: 'domain.state', subject: `domain "${name}"` }, true, async (s) => {
        const dom = await s.lookup('virDomainLookupByName', s.b.virDomainLookupByName, VirErr.NO_DOMAIN, s.conn, name);
        if (dom === undefined) return undefined;
        try {
          return await stateOf(s, dom);
        } finally {
          s.b.virDomainFree(dom);
        }
      });
    },

    list(): Promise<DomainInfo[]> {
      return run({ op: 'domain.list', subject: 'domains' }, true, async (s) => {
        const out: [unknown] = [null];
        const count = await s.call<number>('virConnectListAllDomains', s.b.virConnectListAllDomains, s.conn, out, 0);
        const handles = s.b.pointerArray(out[0], count);
        const infos: DomainInfo[] = [];
        try {
          for (const h of handles) {
            try {
              const autostart: [number | null] = [null];
              const state = await stateOf(s, h);
              await s.call<number>('virDomainGetAutostart', s.b.virDomainGetAutostart, h, autostart);
              const persistent = (await s.call<number>('virDomainIsPersistent', s.b.virDomainIsPersistent, h)) === 1;
              infos.push({
                name: s.b.virDomainGetName(h) as string,
                uuid: uuidString(s.b.virDomainGetUUIDString, h),
                state,
                autostart: autostart[0] === 1,
                persistent,
                marker: await markerOf(s, h),
              });
            } catch (err) {
              // Undefined (or a transient domain stopped) between listing and reading: skip it.
              if (err instanceof LibvirtCallError && err.code === VirErr.NO_DOMAIN) continue;
              throw err;
            }
          }
        } finally {
          for (const h of handles) s.b.virDomainFree(h);
          if (out[0] !== null) s.b.free(out[0]);
        }
        return infos;
      });
    },

    async xml(name: string, options: { inactive?: boolean } = {}): Promise<string> {
      checkName(name);
      const flags = options.inactive ? VIR_DOMAIN_XML_INACTIVE : 0;
      return run({ op: 'domain.xml', subject: `domain "${name}"` }, true, (s) =>
        withDomain(s, name, false, async (dom) => s.b.takeString(await s.call<bigint>('virDomainGetXMLDesc', s.b.virDomainGetXMLDesc, dom, flags))),
      );
    },

    async disk(name: string, target: string): Promise<DomainDisk | undefined> {
      checkName(name);
      checkTarget(target);
      return run({ op: 'domain.disk', subject: `domain "${name}"` }, true, (s) =>
        withDomain(s, name, false, async (dom) => {
          const xml = s.b.takeString(await s.call<bigint>('virDomainGetXMLDesc', s.b.virDomainGetXMLDesc, dom, 0));
          return parseDomainDisks(xml).find((d) => d.target === target);
        }),
      );
    },

    async blockCopy(name, target, destXml, options): Promise<void> {
      checkName(name);
      checkTarget(target);
      if (destXml === '' || destXml.includes('\0')) throw errors.invalid('block copy destination XML must be a non-empty string');
      const flags =
        (options.reuseExternal ? VIR_DOMAIN_BLOCK_COPY_REUSE_EXT : 0) |
        (options.transientJob ? VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB : 0) |
        (options.synchronousWrites ? VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES : 0);
      await run({ op: 'domain.blockCopy', subject: `domain "${name}"` }, false, (s) =>
        withDomain(s, name, true, async (dom) => {
          // libvirt's own error for this (VIR_ERR_BLOCK_COPY_ACTIVE) has no kind of its own.
          const busy = await s.call<number>('virDomainGetBlockJobInfo', s.b.virDomainGetBlockJobInfo, dom, target, {}, 0);
          if (busy === 1) throw errors.precondition(`domain "${name}": disk ${target} already has a block job`);
          await s.call<number>('virDomainBlockCopy', s.b.virDomainBlockCopy, dom, target, destXml, null, 0, flags);
        }),
      );
    },

    async blockJob(name: string, target: string): Promise<BlockJobInfo | undefined> {
      checkName(name);
      checkTarget(target);
      return run({ op: 'domain.blockJob', subject: `domain "${name}"` }, true, (s) =>
        withDomain(s, name, false, async (dom) => {
          const info: { type?: number; bandwidth?: number | bigint; cur?: number | bigint; end?: number | bigint } = {};
          // 0: no job on this disk, 1: info filled in.
          const found = await s.call<number>('virDomainGetBlockJobInfo', s.b.virDomainGetBlockJobInfo, dom, target, info, VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES);
          if (found === 0) return undefined;
          // Readiness is what libvirt recorded from QEMU's BLOCK_JOB_READY event in the live
          // <mirror>; cur == end alone does not say it (libvirt adjusts the figures).
          const xml = s.b.takeString(await s.call<bigint>('virDomainGetXMLDesc', s.b.virDomainGetXMLDesc, dom, 0));
          const disk = parseDomainDisks(xml).find((d) => d.target === target);
          return {
            type: BLOCK_JOB_TYPES[info.type ?? 0] ?? 'unknown',
            cur: BigInt(info.cur ?? 0),
            end: BigInt(info.end ?? 0),
            bandwidth: Number(info.bandwidth ?? 0),
            ready: disk?.mirror?.ready === true,
          };
        }),
      );
    },

    async blockJobAbort(name: string, target: string, options: { pivot: boolean }): Promise<void> {
      checkName(name);
      checkTarget(target);
      // Without VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC libvirt returns once the job has ended
      // (and, for a pivot, once the guest uses the destination).
      await run({ op: 'domain.blockJobAbort', subject: `domain "${name}"` }, false, (s) =>
        withDomain(s, name, true, async (dom) => {
          // libvirt reports a missing job as an invalid argument; for virtkm it is a state.
          const found = await s.call<number>('virDomainGetBlockJobInfo', s.b.virDomainGetBlockJobInfo, dom, target, {}, 0);
          if (found === 0) throw errors.precondition(`domain "${name}": disk ${target} has no block job`);
          await s.call<number>('virDomainBlockJobAbort', s.b.virDomainBlockJobAbort, dom, target, options.pivot ? VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT : 0);
        }),
      );
    },
  };

  return {
    secrets,
    domains,
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      await Promise.all(lanes.map((l) => l.drained()));
      // Nothing to close when no call ever connected (and no reason to load libvirt then).
      if (lanes.every((l) => l.conn === null)) return;
      const b = await loadLibvirtBindings();
      await Promise.all(lanes.map((l) => dropConnection(b, l)));
    },
  };
}
