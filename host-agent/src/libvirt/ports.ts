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
  /** The current XML of a domain (live when running; never with security-sensitive parts). */
  xml(name: string): Promise<string>;
}

/** The agent's view of one libvirt connection. */
export interface Libvirt {
  secrets: LibvirtSecrets;
  domains: LibvirtDomains;
  /** Waits for calls in flight, then closes the connection(s). Later calls fail unavailable. */
  close(): Promise<void>;
}
