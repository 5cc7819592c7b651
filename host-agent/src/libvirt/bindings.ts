/**
 * libvirt's C library (libvirt.so.0) through koffi: the function declarations virtkm uses
 * and the few memory rules around them. Loaded once, lazily, on first use; importing this
 * module loads nothing.
 *
 * Memory rules (libvirt's API documentation):
 * - virConnect/virSecret/virDomain handles are released with virConnectClose/virSecretFree/
 *   virDomainFree; here they are plain pointers (bigint), freed by the adapter in finally
 *   blocks.
 * - char* results of virSecretGetXMLDesc/virDomainGetXMLDesc are the caller's: declared as
 *   void* so the pointer is kept, decoded, then released with libc free().
 * - const char* results (virSecretGetUsageID, virDomainGetName) belong to the handle and are
 *   decoded by koffi, never freed.
 * - The arrays of virConnectListAll* are freed with free() after each element was freed.
 *
 * Errors: libvirt keeps the last error per thread and per connection. koffi runs .async
 * calls on its worker threads, so the thread-local error is out of reach from JavaScript;
 * the adapter reads the connection's copy (virConnCopyLastError) instead and serializes calls
 * per connection so that copy belongs to the call that just failed. libvirt's default error
 * handler would print every error on stderr: a no-op handler replaces it (registered once).
 */
import type koffiModule from 'koffi';
import { DomainError } from '../../../shared/src/errors.js';
import type { LibvirtErrorInfo } from './errors.js';

type Koffi = typeof koffiModule;

/** A native function declared through koffi: callable synchronously or with .async. */
export interface NativeFn {
  (...args: unknown[]): unknown;
  async: (...args: unknown[]) => void;
}

/** The libvirt functions the adapter calls, plus the helpers they need. */
export interface LibvirtBindings {
  koffi: Koffi;
  // connection
  virConnectOpen: NativeFn;
  virConnectClose: NativeFn;
  virConnectIsAlive: NativeFn;
  virConnResetLastError: NativeFn;
  // secrets
  virSecretDefineXML: NativeFn;
  virSecretLookupByUUIDString: NativeFn;
  virSecretLookupByUsage: NativeFn;
  virSecretSetValue: NativeFn;
  virSecretUndefine: NativeFn;
  virConnectListAllSecrets: NativeFn;
  virSecretGetUUIDString: NativeFn;
  virSecretGetUsageType: NativeFn;
  virSecretGetUsageID: NativeFn;
  virSecretGetXMLDesc: NativeFn;
  virSecretFree: NativeFn;
  // domains
  virDomainDefineXMLFlags: NativeFn;
  virDomainLookupByName: NativeFn;
  virDomainCreate: NativeFn;
  virDomainDestroy: NativeFn;
  virDomainUndefineFlags: NativeFn;
  virDomainGetState: NativeFn;
  virDomainGetAutostart: NativeFn;
  virDomainIsPersistent: NativeFn;
  virConnectListAllDomains: NativeFn;
  virDomainGetXMLDesc: NativeFn;
  virDomainGetName: NativeFn;
  virDomainGetUUIDString: NativeFn;
  virDomainFree: NativeFn;
  // block jobs
  virDomainBlockCopy: NativeFn;
  virDomainGetBlockJobInfo: NativeFn;
  virDomainBlockJobAbort: NativeFn;
  /** The connection's copy of its last error (undefined when it holds none). */
  connectionError(conn: bigint): LibvirtErrorInfo | undefined;
  /**
   * The last error libvirt dispatched in this process, then forgets it. Only meaningful
   * right after a failed virConnectOpen, which has no connection to keep its error.
   */
  takeDispatchedError(): LibvirtErrorInfo | undefined;
  /** Decodes a char* libvirt handed over and releases it with libc free(). */
  takeString(ptr: unknown): string;
  /** Decodes an array of `count` pointers (virConnectListAll*). */
  pointerArray(ptr: unknown, count: number): bigint[];
  /** libc free(). */
  free: NativeFn;
  /** Native memory for a secret value: filled from `value`, wiped and released by `release`. */
  secretCopy(value: Uint8Array): { ptr: bigint; release: () => void };
}

/** virSecretUsageType values. */
export const VIR_SECRET_USAGE_TYPE = { none: 0, volume: 1, ceph: 2, iscsi: 3, tls: 4, vtpm: 5 } as const;
/** VIR_UUID_STRING_BUFLEN: 36 characters and the terminating NUL. */
export const UUID_STRING_BUFLEN = 37;

let loading: Promise<LibvirtBindings> | undefined;

/**
 * Loads koffi and libvirt.so.0 once. Rejects with DomainError unavailable (and a hint) when
 * either cannot be loaded; a later call tries again.
 */
export function loadLibvirtBindings(): Promise<LibvirtBindings> {
  if (!loading) {
    loading = load();
    loading.catch(() => {
      loading = undefined;
    });
  }
  return loading;
}

async function load(): Promise<LibvirtBindings> {
  let koffi: Koffi;
  try {
    koffi = (await import('koffi')).default;
  } catch (err) {
    throw new DomainError('unavailable', 'cannot load koffi, the FFI module needed to talk to libvirt', { cause: err, hint: 'reinstall the agent (npm ci)' });
  }
  let lib: ReturnType<Koffi['load']>;
  let libc: ReturnType<Koffi['load']>;
  try {
    lib = koffi.load('libvirt.so.0');
    libc = koffi.load('libc.so.6');
  } catch (err) {
    throw new DomainError('unavailable', "cannot load libvirt's library (libvirt.so.0)", {
      cause: err,
      hint: 'install it: apt-get install libvirt0 (and libvirt-daemon-driver-qemu on the host)',
    });
  }
  const fn = (decl: string): NativeFn => lib.func(decl) as unknown as NativeFn;

  // The virError struct (libvirt/virterror.h). Anonymous, so no name clashes in koffi's
  // global type registry.
  const virError = koffi.struct({
    code: 'int',
    domain: 'int',
    message: 'char *',
    level: 'int',
    conn: 'void *',
    dom: 'void *',
    str1: 'char *',
    str2: 'char *',
    str3: 'char *',
    int1: 'int',
    int2: 'int',
    net: 'void *',
  });
  const virInitialize = fn('int virInitialize()');
  const virSetErrorFunc = fn('void virSetErrorFunc(void *userData, void *handler)');
  const virConnCopyLastError = fn('int virConnCopyLastError(void *conn, void *to)');
  const virResetError = fn('void virResetError(void *err)');
  const free = libc.func('void free(void *ptr)') as unknown as NativeFn;

  const decodeError = (ptr: unknown): LibvirtErrorInfo => {
    const e = koffi.decode(ptr, virError) as { code: number; domain: number; message: string | null };
    return { code: e.code, domain: e.domain, message: e.message ?? '' };
  };

  // libvirt calls the handler on the thread that raised the error; koffi runs it on the
  // main thread (the worker waits meanwhile). It keeps a copy of the last error, used only
  // for virConnectOpen failures; errors of calls on a connection are read from it.
  let dispatched: LibvirtErrorInfo | undefined;
  const ErrorFunc = koffi.proto('void virtkm_libvirt_error_func(void *userData, void *err)');
  const handler = koffi.register((_user: unknown, err: unknown) => {
    try {
      if (err !== null && err !== undefined) dispatched = decodeError(err);
    } catch {
      // Never let an exception cross back into libvirt.
    }
  }, koffi.pointer(ErrorFunc));
  if ((virInitialize() as number) < 0) {
    throw new DomainError('unavailable', 'libvirt failed to initialise');
  }
  virSetErrorFunc(null, handler);

  return {
    koffi,
    virConnectOpen: fn('void *virConnectOpen(const char *name)'),
    virConnectClose: fn('int virConnectClose(void *conn)'),
    virConnectIsAlive: fn('int virConnectIsAlive(void *conn)'),
    virConnResetLastError: fn('void virConnResetLastError(void *conn)'),

    virSecretDefineXML: fn('void *virSecretDefineXML(void *conn, const char *xml, unsigned int flags)'),
    virSecretLookupByUUIDString: fn('void *virSecretLookupByUUIDString(void *conn, const char *uuid)'),
    virSecretLookupByUsage: fn('void *virSecretLookupByUsage(void *conn, int usageType, const char *usageID)'),
    virSecretSetValue: fn('int virSecretSetValue(void *secret, void *value, size_t value_size, unsigned int flags)'),
    virSecretUndefine: fn('int virSecretUndefine(void *secret)'),
    virConnectListAllSecrets: fn('int virConnectListAllSecrets(void *conn, _Out_ void **secrets, unsigned int flags)'),
    virSecretGetUUIDString: fn('int virSecretGetUUIDString(void *secret, _Out_ uint8_t *buf)'),
    virSecretGetUsageType: fn('int virSecretGetUsageType(void *secret)'),
    virSecretGetUsageID: fn('const char *virSecretGetUsageID(void *secret)'),
    virSecretGetXMLDesc: fn('void *virSecretGetXMLDesc(void *secret, unsigned int flags)'),
    virSecretFree: fn('int virSecretFree(void *secret)'),

    virDomainDefineXMLFlags: fn('void *virDomainDefineXMLFlags(void *conn, const char *xml, unsigned int flags)'),
    virDomainLookupByName: fn('void *virDomainLookupByName(void *conn, const char *name)'),
    virDomainCreate: fn('int virDomainCreate(void *domain)'),
    virDomainDestroy: fn('int virDomainDestroy(void *domain)'),
    virDomainUndefineFlags: fn('int virDomainUndefineFlags(void *domain, unsigned int flags)'),
    virDomainGetState: fn('int virDomainGetState(void *domain, _Out_ int *state, _Out_ int *reason, unsigned int flags)'),
    virDomainGetAutostart: fn('int virDomainGetAutostart(void *domain, _Out_ int *autostart)'),
    virDomainIsPersistent: fn('int virDomainIsPersistent(void *domain)'),
    virConnectListAllDomains: fn('int virConnectListAllDomains(void *conn, _Out_ void **domains, unsigned int flags)'),
    virDomainGetXMLDesc: fn('void *virDomainGetXMLDesc(void *domain, unsigned int flags)'),
    virDomainGetName: fn('const char *virDomainGetName(void *domain)'),
    virDomainGetUUIDString: fn('int virDomainGetUUIDString(void *domain, _Out_ uint8_t *buf)'),
    virDomainFree: fn('int virDomainFree(void *domain)'),

    // The info struct (virDomainBlockJobInfo): int type; unsigned long bandwidth;
    // unsigned long long cur, end. Anonymous, as virError above.
    virDomainBlockCopy: fn('int virDomainBlockCopy(void *domain, const char *disk, const char *destxml, void *params, int nparams, unsigned int flags)'),
    virDomainGetBlockJobInfo: lib.func('virDomainGetBlockJobInfo', 'int', [
      'void *',
      'const char *',
      koffi.out(koffi.pointer(koffi.struct({ type: 'int', bandwidth: 'unsigned long', cur: 'unsigned long long', end: 'unsigned long long' }))),
      'unsigned int',
    ]) as unknown as NativeFn,
    virDomainBlockJobAbort: fn('int virDomainBlockJobAbort(void *domain, const char *disk, unsigned int flags)'),

    connectionError(conn: bigint): LibvirtErrorInfo | undefined {
      const to = koffi.alloc(virError, 1) as bigint;
      try {
        new Uint8Array(koffi.view(to, koffi.sizeof(virError))).fill(0);
        const code = virConnCopyLastError(conn, to) as number;
        if (code <= 0) return undefined;
        return decodeError(to);
      } finally {
        // virResetError frees the strings virConnCopyLastError duplicated into `to`.
        virResetError(to);
        koffi.free(to);
      }
    },
    takeDispatchedError(): LibvirtErrorInfo | undefined {
      const e = dispatched;
      dispatched = undefined;
      return e;
    },
    takeString(ptr: unknown): string {
      try {
        return koffi.decode.string(ptr);
      } finally {
        free(ptr);
      }
    },
    pointerArray(ptr: unknown, count: number): bigint[] {
      if (count === 0) return [];
      return koffi.decode(ptr, 'void *', count) as bigint[];
    },
    free,
    secretCopy(value: Uint8Array): { ptr: bigint; release: () => void } {
      const ptr = koffi.alloc('uint8_t', Math.max(1, value.length)) as bigint;
      const view = new Uint8Array(koffi.view(ptr, Math.max(1, value.length)));
      view.set(value);
      return {
        ptr,
        release: () => {
          view.fill(0);
          koffi.free(ptr);
        },
      };
    },
  };
}
