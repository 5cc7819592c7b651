/**
 * The agent's port to libvirt: the few secret and domain operations reconcile needs, over
 * plain data. The real adapter (libvirt-ffi.ts) talks to libvirt's C library; tests and
 * reconcile logic can use a fake with the same contract.
 *
 * Ownership rule: virtkm only ever changes what it created. Its secrets carry the usage
 * volume string `virtkm:<volumeId>`, its domains a `<virtkm:guest>` element in their
 * <metadata> (see xml.ts). Adapters refuse to change or remove secrets and domains without
 * that mark (failed_precondition) and never overwrite them (already_exists).
 *
 * Every method rejects with a DomainError (shared/src/errors.ts):
 *   not_found            no such secret or domain
 *   already_exists       the UUID, volume usage or domain name belongs to something else
 *   invalid_argument     malformed input or a definition libvirt rejects
 *   failed_precondition  wrong state (start of a running domain, destroy of a stopped one),
 *                        not created by virtkm, or the guest could not start: a disk image
 *                        missing, a disk secret missing or without value, QEMU refusing
 *                        (for a wrong disk key the message is "cannot unlock the disk: wrong key")
 *   permission_denied    libvirt denied the operation
 *   unavailable          libvirtd cannot be reached (or libvirt is not installed)
 *   internal             anything else
 * libvirt's own message goes into the error's cause only (it may name paths), never into
 * the message. Secret values never appear in either.
 */

/** What a domain is doing, reduced to what reconcile distinguishes. */
export type DomainState = 'running' | 'shutoff' | 'paused' | 'crashed' | 'other';

/** The mark virtkm puts into the <metadata> of each domain it defines. */
export interface VirtkmMarker {
  /** The server's id of the guest. */
  guestId: string;
  /** The generation of the guest's desired state this definition was made from. */
  generation: number;
  /** The host (id) whose agent defined the domain; agents touch only their own. */
  hostId?: string;
}

/** A libvirt secret virtkm is about to define (always private and ephemeral). */
export interface SecretDefinition {
  /** Canonical lowercase UUID of the secret. */
  uuid: string;
  /** The virtkm volume the secret unlocks; the usage becomes `virtkm:<volumeId>`. */
  volumeId: string;
  /** Free text shown by `virsh secret-list`; never a secret. */
  description: string;
}

/** A libvirt secret as listed, whoever created it. */
export interface SecretInfo {
  uuid: string;
  /** libvirt's usage type ('volume', 'ceph', 'iscsi', 'tls', 'vtpm', 'none', ...). */
  usageType: string;
  /** The usage id (for type volume the volume string); undefined for usage type none. */
  usageId: string | undefined;
  /** For secrets virtkm created (usage `virtkm:<id>`): the volume id; otherwise undefined. */
  volumeId: string | undefined;
  description: string;
  private: boolean;
  ephemeral: boolean;
}

/** A libvirt domain as listed, whoever created it. */
export interface DomainInfo {
  name: string;
  uuid: string;
  state: DomainState;
  /** libvirt's own autostart flag (virtkm starts guests itself; reported for diagnosis). */
  autostart: boolean;
  /** False for transient domains (running but not defined). */
  persistent: boolean;
  /** The virtkm mark; undefined for domains virtkm did not define. */
  marker: VirtkmMarker | undefined;
}

/** A disk of a domain as libvirt describes it (live when running, else the definition). */
export interface DomainDisk {
  /** The guest-side target name, e.g. vda. */
  target: string;
  /** The image file of a file-backed disk (<source file=...>); undefined for other kinds. */
  sourcePath: string | undefined;
  /** UUID of the libvirt secret in the disk's <encryption>, when it has one. */
  secretUuid: string | undefined;
  /** The destination of a block copy in progress (the live <mirror>), if any. */
  mirror: { path: string | undefined; secretUuid: string | undefined; ready: boolean } | undefined;
}

/** Kinds of block jobs (virDomainBlockJobType). */
export type BlockJobType = 'pull' | 'copy' | 'commit' | 'active-commit' | 'backup' | 'unknown';

/** A block job on one disk of a running domain. */
export interface BlockJobInfo {
  type: BlockJobType;
  /** Progress cursor and its final value (bytes for copy jobs); cur/end approximates progress. */
  cur: bigint;
  end: bigint;
  /** Bandwidth limit in bytes per second (0: unlimited). */
  bandwidth: number;
  /**
   * For copy jobs: the copy reached the mirroring phase (libvirt's `<mirror ready='yes'>`),
   * so a pivot can complete. False while copying and while a pivot is in progress.
   */
  ready: boolean;
}

/** Flags of a block copy. */
export interface BlockCopyOptions {
  /** The destination already exists and is formatted (VIR_DOMAIN_BLOCK_COPY_REUSE_EXT). */
  reuseExternal: boolean;
  /** Allow the copy on a persistent domain; the job is not kept across a restart (VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB). */
  transientJob: boolean;
  /**
   * Once ready, every guest write reaches the destination before it completes
   * (VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES), so the destination never lags behind the
   * source. Default false (QEMU's background mode).
   */
  synchronousWrites?: boolean;
}

/** libvirt secrets. */
export interface LibvirtSecrets {
  /**
   * Defines (or redefines, idempotently) a private ephemeral secret with usage
   * `virtkm:<volumeId>`. Redefining keeps a value already set. already_exists when the UUID
   * belongs to another usage or the usage to another UUID.
   */
  define(def: SecretDefinition): Promise<void>;
  /**
   * Sets the value of a virtkm secret through the libvirt API. The caller keeps ownership of
   * `value` (and wipes it); the adapter's own copies are zeroed before this resolves. QEMU
   * uses the value as the LUKS passphrase and accepts only UTF-8 text without NUL, so raw
   * key bytes are refused (invalid_argument): encode keys, for example as hex.
   */
  setValue(uuid: string, value: Uint8Array): Promise<void>;
  /** Removes a virtkm secret. not_found when there is none with this UUID. */
  undefine(uuid: string): Promise<void>;
  /** All secrets of the connection, virtkm's and others'. */
  list(): Promise<SecretInfo[]>;
}

/** libvirt domains, addressed by name. */
export interface LibvirtDomains {
  /**
   * Defines (or redefines) a persistent domain. The XML must carry the virtkm marker
   * (invalid_argument otherwise). Redefining an existing domain needs its <uuid> in the XML;
   * already_exists when a domain of that name exists without the marker or with another UUID.
   */
  define(xml: string): Promise<{ uuid: string; name: string }>;
  /** Removes the definition of a virtkm domain (and its NVRAM, managed save, snapshot metadata). */
  undefine(name: string): Promise<void>;
  /** Starts a defined virtkm domain. failed_precondition when it is running or cannot start. */
  start(name: string): Promise<void>;
  /** Stops a virtkm domain immediately (power off). failed_precondition when not running. */
  destroy(name: string): Promise<void>;
  /** The state of a domain, or undefined when there is no domain of that name. */
  state(name: string): Promise<DomainState | undefined>;
  /** All domains of the connection, virtkm's and others'. */
  list(): Promise<DomainInfo[]>;
  /**
   * The current XML of a domain (live when running; never with security-sensitive parts).
   * With `inactive`, the persistent definition used at the next start.
   */
  xml(name: string, options?: { inactive?: boolean }): Promise<string>;
  /**
   * A disk of a domain by target name (live when running), or undefined when the domain has
   * no disk of that target. not_found when there is no such domain.
   */
  disk(name: string, target: string): Promise<DomainDisk | undefined>;
  /**
   * Starts copying a disk of a running virtkm domain into the destination described by
   * `destXml` (a <disk> element: source, driver type, encryption); the job runs in QEMU and
   * outlives the caller. failed_precondition when the domain is not running, not virtkm's,
   * or the disk already has a block job; invalid_argument for an unknown disk or a
   * destination libvirt rejects.
   */
  blockCopy(name: string, target: string, destXml: string, options: BlockCopyOptions): Promise<void>;
  /** The block job of a disk, or undefined when it has none. failed_precondition when the domain is not running. */
  blockJob(name: string, target: string): Promise<BlockJobInfo | undefined>;
  /**
   * Ends the block job of a disk of a virtkm domain and waits until it has ended. With
   * `pivot`, a ready copy switches the guest to the destination; without, the guest stays
   * on its source and the copy is dropped. failed_precondition when there is no job (or a
   * pivot of a copy that is not ready).
   */
  blockJobAbort(name: string, target: string, options: { pivot: boolean }): Promise<void>;
}

/** The agent's view of one libvirt connection. */
export interface Libvirt {
  secrets: LibvirtSecrets;
  domains: LibvirtDomains;
  /** Waits for calls in flight, then closes the connection(s). Later calls fail unavailable. */
  close(): Promise<void>;
}
