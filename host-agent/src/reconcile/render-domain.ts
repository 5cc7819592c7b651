/**
 * Turns a guest's stored domain XML into what this host defines in libvirt: managed disks
 * (`<disk type='volume'><source pool='virtkm' volume='…'/>`) become the host's image file
 * with `<encryption format='luks'>` naming the volume's libvirt secret (luks, qcow2-luks),
 * or the opened dm-crypt device (luks2, plain), or the plain image file without any
 * <encryption> (the unencrypted raw and qcow2 volumes); a metadata marker names the guest and its
 * generation so the agent recognises domains it created. Pure: no I/O.
 */
import { Builder, Parser } from 'xml2js';
import { errors } from '../../../shared/src/errors.js';

/** The libvirt metadata namespace of virtkm's marker. */
export const MARKER_NS = 'urn:virtkm:1';

/** How one volume appears on this host. */
export interface HostVolume {
  volumeId: string;
  name: string;
  format: 'luks' | 'qcow2-luks' | 'luks2' | 'plain' | 'raw' | 'qcow2';
  /** Image file (luks, qcow2-luks, raw, qcow2) or block device (luks2, plain: the dm-crypt mapping). */
  path: string;
  /** libvirt secret UUID (luks, qcow2-luks); unused for the other formats. */
  secretUuid: string;
}

type Node = Record<string, unknown> & { $?: Record<string, string> };

const parser = () => new Parser({ explicitArray: true, explicitRoot: true, strict: true });

function list(node: Node, key: string): Node[] {
  const v = node[key];
  return Array.isArray(v) ? (v as Node[]) : [];
}

/** Renders the host-side domain XML for a guest. */
export async function renderDomainXml(opts: { xml: string; guestId: string; hostId: string; name: string; generation: bigint; volumes: HostVolume[]; uuid?: string }): Promise<string> {
  const doc = (await parser().parseStringPromise(opts.xml)) as { domain?: Node } | null;
  const domain = doc?.domain;
  if (!domain || typeof domain !== 'object') throw errors.invalid('stored domain XML has no <domain>');
  domain['name'] = [opts.name];
  // libvirt redefines a domain only when the XML names its existing UUID.
  if (opts.uuid) domain['uuid'] = [opts.uuid];
  const byRef = new Map<string, HostVolume>();
  for (const v of opts.volumes) {
    byRef.set(v.volumeId, v);
    byRef.set(v.name, v);
  }
  for (const devices of list(domain, 'devices')) {
    for (const disk of list(devices, 'disk')) {
      const source = list(disk, 'source')[0];
      if (disk.$?.['type'] !== 'volume' || source?.$?.['pool'] !== 'virtkm') continue;
      const v = byRef.get(source.$['volume'] ?? '');
      if (!v) throw errors.invalid(`domain XML names volume "${source.$['volume'] ?? ''}" which is not in the guest's volumes`);
      const driverAttrs = { ...(list(disk, 'driver')[0]?.$ ?? {}), name: 'qemu' };
      if (v.format === 'luks' || v.format === 'qcow2-luks') {
        disk.$ = { ...disk.$, type: 'file' };
        disk['driver'] = [{ $: { ...driverAttrs, type: v.format === 'luks' ? 'raw' : 'qcow2' } }];
        disk['source'] = [{ $: { file: v.path } }];
        disk['encryption'] = [{ $: { format: 'luks' }, secret: [{ $: { type: 'passphrase', uuid: v.secretUuid } }] }];
      } else if (v.format === 'raw' || v.format === 'qcow2') {
        // Unencrypted: the image file as it is, and no secret (whatever the stored XML said).
        disk.$ = { ...disk.$, type: 'file' };
        disk['driver'] = [{ $: { ...driverAttrs, type: v.format } }];
        disk['source'] = [{ $: { file: v.path } }];
        delete disk['encryption'];
      } else {
        // dm-crypt: the host opened the mapping; QEMU sees plaintext blocks.
        disk.$ = { ...disk.$, type: 'block' };
        disk['driver'] = [{ $: { ...driverAttrs, type: 'raw' } }];
        disk['source'] = [{ $: { dev: v.path } }];
      }
    }
  }
  // Replace any metadata virtkm put there before; keep everything else.
  const metadata = (list(domain, 'metadata')[0] ?? {}) as Node;
  for (const k of Object.keys(metadata)) if (k.startsWith('virtkm:')) delete metadata[k];
  metadata['virtkm:guest'] = [{ $: { 'xmlns:virtkm': MARKER_NS, id: opts.guestId, generation: opts.generation.toString(), host: opts.hostId } }];
  domain['metadata'] = [metadata];
  return new Builder({ headless: true, renderOpts: { pretty: true, indent: '  ', newline: '\n' } }).buildObject({ domain });
}

/** The guest-side target (e.g. vda) of the managed disk that uses a volume, by id or name. */
export async function diskTargetOf(xml: string, volumeId: string, volumeName: string): Promise<string | undefined> {
  const doc = (await parser().parseStringPromise(xml)) as { domain?: Node } | null;
  const domain = doc?.domain;
  if (!domain || typeof domain !== 'object') return undefined;
  for (const devices of list(domain, 'devices')) {
    for (const disk of list(devices, 'disk')) {
      const source = list(disk, 'source')[0];
      const ref = source?.$?.['volume'];
      if (disk.$?.['type'] !== 'volume' || source?.$?.['pool'] !== 'virtkm' || (ref !== volumeId && ref !== volumeName)) continue;
      const dev = list(disk, 'target')[0]?.$?.['dev'];
      if (dev) return dev;
    }
  }
  return undefined;
}

/** The libvirt secret UUID of a volume's key version on this host (stable, derived). */
export function secretUuidFor(volumeId: string, keyVersion: number, hash: (s: string) => Buffer): string {
  const h = hash(`virtkm/secret/${volumeId}/${keyVersion}`);
  h[6] = (h[6]! & 0x0f) | 0x50; // version 5-style (name-based)
  h[8] = (h[8]! & 0x3f) | 0x80; // RFC 4122 variant
  const x = h.subarray(0, 16).toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20, 32)}`;
}
