/**
 * GuestService: define guests (domain XML + volumes + placement), move and delete them.
 * Placement decides which host may obtain the keys of the guest's volumes.
 */
import { randomUUID } from 'node:crypto';
import type { GuestServiceServer } from '../../../shared/src/api.js';
import { errors } from '../../../shared/src/errors.js';
import type { Clock } from '../domain/clock.js';
import { checkDomainXml } from '../domain/domain-xml.js';
import type { GuestRecord } from '../domain/model.js';
import { checkName, pageSize } from '../domain/volume-spec.js';
import type { HostChangeNotifier } from '../agent/agent-hub.js';
import { actorOf } from './auth.js';
import { guestToApi } from './convert.js';
import { unary, type RpcContext } from './handler.js';
import { hostNameOf, resolveEnrolledHost, resolveGuest, resolveHost, resolveVolume } from './resolve.js';

/** Dependencies of the guest service. */
export interface GuestServiceDeps extends RpcContext {
  clock: Clock;
  /** Told which hosts' desired state changed, after the change is committed. */
  notifier: HostChangeNotifier;
}

const ROLES = ['admin', 'frontend'] as const;
const MAX_VOLUMES = 64;
const MAX_GUEST_PAGE = 100;

/** Creates the grpc-js implementation of GuestService. */
export function createGuestService(deps: GuestServiceDeps): GuestServiceServer {
  const { store, clock, notifier } = deps;
  const show = (g: GuestRecord) => guestToApi(g, store);

  return {
    defineGuest: unary(deps, 'DefineGuest', ROLES, async (req, p) => {
      const name = checkName('guest', req.name);
      if (req.volumes.length > MAX_VOLUMES) throw errors.tooLarge(`a guest may have at most ${MAX_VOLUMES} volumes`);
      const checked = await checkDomainXml(req.domainXml, name);
      // The XML's managed disks and the volumes list must name the same volumes; an empty
      // list means "the volumes the XML names".
      const fromXml = checked.volumeRefs.map((r) => resolveVolume(store, r).id);
      const fromList = req.volumes.map((r) => resolveVolume(store, r).id);
      if (fromList.length > 0 && (new Set(fromList).size !== fromList.length || fromList.length !== fromXml.length || !fromList.every((id) => fromXml.includes(id)))) {
        throw errors.invalid('the volumes given do not match the managed disks of the domain XML');
      }
      const requestedHostId = req.host ? resolveEnrolledHost(store, req.host).id : null;
      const now = clock.now().toISOString();
      const guest = await store.write((tx) => {
        const existing = tx.getGuestByName(name);
        // A redefinition without a host keeps the placement; a different host is a move.
        const hostId = requestedHostId ?? existing?.hostId ?? null;
        if (existing && existing.hostId !== null && existing.hostId !== hostId) {
          throw errors.precondition(`guest "${name}" is placed on another host`, { hint: 'use `virtkm guest move` to change its placement' });
        }
        const g: GuestRecord = {
          id: existing?.id ?? randomUUID(),
          name,
          domainXml: req.domainXml,
          hostId,
          autostart: req.autostart,
          createdAt: existing?.createdAt ?? now,
          updatedAt: now,
          generation: (existing?.generation ?? 0) + 1,
          volumeIds: fromXml,
          handoffFromHostId: existing?.handoffFromHostId ?? null,
        };
        // Volumes may have been deleted since they were resolved above.
        for (const id of fromXml) if (!tx.getVolume(id)) throw errors.notFound('volume');
        tx.upsertGuest(g);
        for (const h of new Set([g.hostId, existing?.hostId, g.handoffFromHostId])) if (h) tx.bumpHostRevision(h);
        tx.appendAudit({ actor: actorOf(p), action: existing ? 'guest.redefine' : 'guest.define', target: g.id, outcome: 'ok', detail: { name, host: req.host || null, volumes: fromXml.join(','), autostart: req.autostart } });
        return g;
      });
      notifier.hostsChanged([guest.hostId, guest.handoffFromHostId]);
      return { guest: show(guest) };
    }),
    getGuest: unary(deps, 'GetGuest', ROLES, (req) => ({ guest: show(resolveGuest(store, req.guest)) })),
    listGuests: unary(deps, 'ListGuests', ROLES, (req) => {
      const page = store.listGuests({
        // At most 100 guests a page: 100 domain XMLs of 256 KiB stay far below the response limit.
        pageSize: Math.min(pageSize(req.page?.pageSize ?? 0), MAX_GUEST_PAGE),
        pageToken: req.page?.pageToken ?? '',
        ...(req.namePrefix ? { namePrefix: req.namePrefix } : {}),
        ...(req.host ? { hostId: resolveHost(store, req.host).id } : {}),
      });
      return { guests: page.items.map(show), nextPageToken: page.nextPageToken };
    }),
    moveGuest: unary(deps, 'MoveGuest', ROLES, async (req, p) => {
      const g = resolveGuest(store, req.guest);
      const to = resolveEnrolledHost(store, req.toHost);
      if (g.hostId === to.id) throw errors.precondition(`guest "${g.name}" is already placed on host "${to.name}"`);
      const from = hostNameOf(store, g.hostId);
      const moved = await store.write((tx) => {
        const current = tx.getGuest(g.id);
        if (!current) throw errors.notFound(`guest "${g.name}"`);
        if (current.handoffFromHostId !== null && !req.force) {
          throw errors.precondition(`guest "${g.name}" is still being moved`, { hint: 'wait until the destination host confirms (see `virtkm guest show`)' });
        }
        // The source keeps the guest (stopped, keys kept) until the destination confirms;
        // an unplaced guest has no source to hand over from.
        const next: GuestRecord = { ...current, hostId: to.id, handoffFromHostId: req.force ? null : current.hostId, updatedAt: clock.now().toISOString(), generation: current.generation + 1 };
        tx.upsertGuest(next);
        for (const h of new Set([current.hostId, current.handoffFromHostId, to.id])) if (h) tx.bumpHostRevision(h);
        tx.appendAudit({ actor: actorOf(p), action: 'guest.move', target: g.id, outcome: 'ok', detail: { name: g.name, from: from || null, to: to.name, force: req.force } });
        return next;
      });
      notifier.hostsChanged([moved.hostId, moved.handoffFromHostId, g.hostId, g.handoffFromHostId]);
      return { guest: show(moved) };
    }),
    deleteGuest: unary(deps, 'DeleteGuest', ROLES, async (req, p) => {
      const g = resolveGuest(store, req.guest);
      await store.write((tx) => {
        tx.deleteGuest(g.id);
        for (const h of new Set([g.hostId, g.handoffFromHostId])) if (h) tx.bumpHostRevision(h);
        const shredded: string[] = [];
        if (req.deleteVolumes) {
          for (const id of g.volumeIds) {
            const v = tx.getVolume(id);
            if (v && tx.guestNamesOfVolume(id).length === 0) {
              tx.deleteVolume(id);
              shredded.push(id);
              // The host the guest was placed on deletes the image file (its key is gone).
              if (g.hostId) tx.requestImageDeletion(id, g.hostId, v.format, clock.now().toISOString());
            }
          }
        }
        tx.appendAudit({ actor: actorOf(p), action: 'guest.delete', target: g.id, outcome: 'ok', detail: { name: g.name, volumes_deleted: shredded.join(',') } });
        for (const id of shredded) tx.appendAudit({ actor: actorOf(p), action: 'volume.delete', target: id, outcome: 'ok', detail: { crypto_shredded: true, with_guest: g.name } });
      });
      notifier.hostsChanged([g.hostId, g.handoffFromHostId]);
      return {};
    }),
  };
}
