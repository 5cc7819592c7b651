/**
 * What a host should have: the guests placed on it (to run), and the guests it is handing
 * over (to keep stopped until the new host confirms). Pure decisions over store records;
 * sealing key packets is left to the caller through `packetFor`.
 */
import type { DesiredGuest, DesiredState, RotationOrder, SealedKeyPacket } from '../../../shared/src/api.js';
import type { GuestRecord, GuestStatusRecord, VolumeFormatName, VolumeRecord } from '../domain/model.js';
import { FORMAT_TO_API } from '../../../shared/src/formats.js';

/** Reads the desired state needs. */
export interface DesiredStateSource {
  guestsForHost(hostId: string): GuestRecord[];
  getVolume(id: string): VolumeRecord | undefined;
  isMaterialized(volumeId: string): boolean;
  imageDeletionsForHost(hostId: string): { volumeId: string; format: VolumeFormatName }[];
}

/**
 * Builds the host's desired state. `packetFor(volume)` returns the sealed key packet for a
 * volume of a guest placed on the host, or undefined when the host already reported the
 * volume ready at that key version (no need to release the key again). `rotationFor(volume)`
 * returns the order of a rotation the host must carry out on the volume, if any.
 */
export function buildDesiredState(
  hostId: string,
  revision: number,
  src: DesiredStateSource,
  packetFor: (volume: VolumeRecord) => SealedKeyPacket | undefined,
  issuedAt: string,
  rotationFor: (volume: VolumeRecord) => RotationOrder | undefined = () => undefined,
): DesiredState {
  const guests: DesiredGuest[] = src.guestsForHost(hostId).map((g) => {
    const placedHere = g.hostId === hostId;
    return {
      guestId: g.id,
      name: g.name,
      domainXml: g.domainXml,
      autostart: g.autostart,
      generation: BigInt(g.generation),
      // A guest being handed over runs nowhere until the move completes.
      run: placedHere && g.handoffFromHostId === null,
      volumes: g.volumeIds.flatMap((id) => {
        const v = src.getVolume(id);
        if (!v) return [];
        return [
          {
            volumeId: v.id,
            name: v.name,
            format: FORMAT_TO_API[v.format],
            cipher: { cipher: v.cipher, keySizeBits: v.keySizeBits, sectorSize: v.sectorSize },
            sizeBytes: v.sizeBytes,
            keyVersion: v.activeVersion,
            // The source of a handoff already holds the key: it gets none again.
            packet: placedHere ? packetFor(v) : undefined,
            mayCreate: placedHere && !src.isMaterialized(v.id),
            rotation: placedHere ? rotationFor(v) : undefined,
          },
        ];
      }),
    };
  });
  const deleteImages = src.imageDeletionsForHost(hostId).map((d) => ({ volumeId: d.volumeId, format: FORMAT_TO_API[d.format] }));
  return { revision: BigInt(revision), guests, issuedAt, deleteImages };
}

/** Phases in which a guest is not running on a host. */
const STOPPED_PHASES = new Set(['defined', 'stopped', 'wiped', 'failed']);

/**
 * A move completes when the destination reports the guest defined (at its current
 * generation) and the source reports it not running or has never reported it. A source
 * that reported the guest running and then went silent (down, or revoked: a revoked host
 * no longer hears anything) holds the move, since the guest might still run there and
 * shared storage must not get two writers; `guest move --force` is the admin's way out.
 */
export function isHandoffComplete(g: GuestRecord, statuses: GuestStatusRecord[]): boolean {
  if (g.handoffFromHostId === null || g.hostId === null) return false;
  const dest = statuses.find((s) => s.hostId === g.hostId);
  const src = statuses.find((s) => s.hostId === g.handoffFromHostId);
  const destReady = dest !== undefined && dest.generation >= g.generation && (dest.phase === 'defined' || dest.phase === 'stopped');
  const srcStopped = src === undefined || STOPPED_PHASES.has(src.phase);
  return destReady && srcStopped;
}
