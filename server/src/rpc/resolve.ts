/**
 * Looking resources up by "id or name", as every API method that takes a reference does.
 */
import { errors } from '../../../shared/src/errors.js';
import type { GuestRecord, HostRecord, VolumeRecord } from '../domain/model.js';
import { isId } from '../domain/volume-spec.js';
import type { StoreReader } from '../store/ports.js';

/** Longest reference accepted (ids are 36 characters, names 63). */
const MAX_REF = 128;

function checkRef(kind: string, ref: string): void {
  if (!ref) throw errors.invalid(`${kind} is required`);
  if (ref.length > MAX_REF) throw errors.invalid(`${kind} reference is too long`);
}

/** Finds a volume by id or name, or throws not_found. */
export function resolveVolume(store: StoreReader, ref: string): VolumeRecord {
  checkRef('volume', ref);
  const v = isId(ref) ? store.getVolume(ref) : store.getVolumeByName(ref);
  if (!v) throw errors.notFound(`volume "${ref}"`);
  return v;
}

/** Finds a guest by id or name, or throws not_found. */
export function resolveGuest(store: StoreReader, ref: string): GuestRecord {
  checkRef('guest', ref);
  const g = isId(ref) ? store.getGuest(ref) : store.getGuestByName(ref);
  if (!g) throw errors.notFound(`guest "${ref}"`);
  return g;
}

/** Finds a host by id or name, or throws not_found. */
export function resolveHost(store: StoreReader, ref: string): HostRecord {
  checkRef('host', ref);
  const h = isId(ref) ? store.getHost(ref) : store.getHostByName(ref);
  if (!h) throw errors.notFound(`host "${ref}"`);
  return h;
}

/** Finds an enrolled host, or throws (not_found, or failed_precondition when revoked). */
export function resolveEnrolledHost(store: StoreReader, ref: string): HostRecord {
  const h = resolveHost(store, ref);
  if (h.state !== 'enrolled') throw errors.precondition(`host "${h.name}" is revoked`);
  return h;
}

/** The name of the host a guest is placed on, "" when unplaced. */
export function hostNameOf(store: StoreReader, hostId: string | null): string {
  if (hostId === null) return '';
  return store.getHost(hostId)?.name ?? '';
}
