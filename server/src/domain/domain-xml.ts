/**
 * Checks a libvirt domain XML before it is stored. The server never interprets more of it
 * than needed: it must be small, well-formed, free of DTDs and entities, a <domain> of type
 * kvm or qemu, and every disk must reference a volume that virtkm manages. Encryption
 * elements are added by the agent, never accepted from the caller.
 *
 * A managed disk is written with libvirt's storage-volume syntax and the pool name
 * "virtkm":  <disk type='volume' device='disk'><source pool='virtkm' volume='NAME'/>...
 * The agent rewrites it to the image path on the host and adds <encryption>.
 */
import { Parser } from 'xml2js';
import { errors } from '../../../shared/src/errors.js';

/** Largest domain XML accepted, in bytes. */
export const MAX_DOMAIN_XML_BYTES = 256 * 1024;
/** Most disks a guest may have. */
export const MAX_DISKS = 64;
/** The storage pool name that marks a disk as virtkm-managed. */
export const MANAGED_POOL = 'virtkm';

/** What the server learned from a valid domain XML. */
export interface CheckedDomainXml {
  /** The <name> in the XML, if any. */
  name: string | undefined;
  /** Volume references (names or ids) of managed disks, in document order. */
  volumeRefs: string[];
}

type XmlNode = { '@'?: Record<string, string>; [child: string]: unknown };

function children(node: XmlNode, name: string): XmlNode[] {
  const c = node[name];
  return Array.isArray(c) ? (c as XmlNode[]) : [];
}

/** Keys xml2js uses for attributes and text: characters no XML element name can hold. */
const ATTR_KEY = '@';
const TEXT_KEY = '#text';

/** The text of the single child `name`; undefined when absent; invalid when repeated or not text. */
function textOf(node: XmlNode, name: string): string | undefined {
  const c = node[name];
  if (c === undefined) return undefined;
  if (!Array.isArray(c) || c.length !== 1) throw errors.invalid(`<${name}> must appear at most once`);
  const first = c[0] as unknown;
  if (typeof first === 'string') return first.trim();
  throw errors.invalid(`<${name}> must hold plain text`);
}

/** Attribute `key` of a node. */
function attr(node: XmlNode | undefined, key: string): string | undefined {
  return node?.[ATTR_KEY]?.[key];
}

/** Parses XML strictly; throws invalid_argument with a short reason when not well-formed. */
async function parseStrict(xml: string): Promise<Record<string, unknown>> {
  const parser = new Parser({ strict: true, explicitArray: true, explicitRoot: true, async: false, attrkey: ATTR_KEY, charkey: TEXT_KEY });
  try {
    return (await parser.parseStringPromise(xml)) as Record<string, unknown>;
  } catch (err) {
    // sax messages are "Unexpected close tag\nLine: 3\nColumn: 9\nChar: >": keep them short.
    const reason = err instanceof Error ? err.message.split('\n').slice(0, 3).join(', ') : 'parse error';
    throw errors.invalid(`domain XML is not well-formed: ${reason.slice(0, 160)}`);
  }
}

/**
 * Validates domain XML for a guest named guestName. Throws DomainError (resource_exhausted
 * for size, invalid_argument otherwise) and returns the managed volume references.
 */
export async function checkDomainXml(xml: string, guestName: string): Promise<CheckedDomainXml> {
  if (Buffer.byteLength(xml, 'utf8') > MAX_DOMAIN_XML_BYTES) {
    throw errors.tooLarge(`domain XML exceeds ${MAX_DOMAIN_XML_BYTES} bytes`);
  }
  if (xml.trim() === '') throw errors.invalid('domain XML is empty');
  // DTDs enable entity expansion (billion laughs) and external entities: refuse them
  // outright before any parser sees the document.
  if (/<!DOCTYPE/i.test(xml) || /<!ENTITY/i.test(xml)) {
    throw errors.invalid('domain XML must not contain a DOCTYPE or entity declarations');
  }
  const doc = await parseStrict(xml);
  if (doc === null || typeof doc !== 'object') throw errors.invalid('domain XML has no root element');
  const rootNames = Object.keys(doc);
  if (rootNames.length !== 1 || rootNames[0] !== 'domain') throw errors.invalid('domain XML root element must be <domain>');
  // xml2js stops at the root's closing tag and ignores what follows, so the shape of the
  // whole text is checked here: one <domain> element with nothing but comments after it.
  const trimmed = xml.trim();
  if ((trimmed.match(/<domain[\s/>]/g) ?? []).length !== 1 || (trimmed.match(/<\/domain\s*>/g) ?? []).length !== 1 || !/^(?:\s|<!--(?:(?!-->)[\s\S])*-->)*$/.test(trimmed.slice(trimmed.search(/<\/domain\s*>/)).replace(/^<\/domain\s*>/, ''))) {
    throw errors.invalid('domain XML must be one <domain>...</domain> element with nothing but comments after it');
  }
  const domain = doc['domain'] as XmlNode | string;
  if (typeof domain !== 'object' || domain === null) throw errors.invalid('domain XML has an empty <domain> element');
  const type = attr(domain, 'type');
  if (type !== 'kvm' && type !== 'qemu') throw errors.invalid("domain type must be 'kvm' or 'qemu'");
  const name = textOf(domain, 'name');
  if (name !== undefined && name !== guestName) throw errors.invalid('domain <name> must equal the guest name');

  const volumeRefs: string[] = [];
  const devices = children(domain, 'devices');
  if (devices.length > 1) throw errors.invalid('domain XML has more than one <devices> element');
  const disks = devices.length === 1 ? children(devices[0] as XmlNode, 'disk') : [];
  if (disks.length > MAX_DISKS) throw errors.tooLarge(`a guest may have at most ${MAX_DISKS} disks`);
  for (const [i, disk] of disks.entries()) {
    const where = `disk ${i + 1}`;
    if (children(disk, 'encryption').length > 0 || children(disk, 'auth').length > 0) {
      throw errors.invalid(`${where}: <encryption> and <auth> are added by virtkm and must not be given`);
    }
    const device = attr(disk, 'device') ?? 'disk';
    const sources = children(disk, 'source');
    if (device === 'cdrom' || device === 'floppy') continue; // read-only install media, not managed
    if (device !== 'disk' && device !== 'lun') throw errors.invalid(`${where}: unsupported device type`);
    const source = sources[0];
    const volume = attr(source, 'volume');
    if (attr(disk, 'type') !== 'volume' || sources.length !== 1 || attr(source, 'pool') !== MANAGED_POOL || !volume) {
      throw errors.invalid(`${where}: every disk must reference a managed volume`, {
        hint: `use <disk type='volume' device='disk'><source pool='${MANAGED_POOL}' volume='VOLUME'/>...</disk>`,
      });
    }
    volumeRefs.push(volume);
  }
  if (new Set(volumeRefs).size !== volumeRefs.length) throw errors.invalid('a volume is referenced by more than one disk');
  return { name, volumeRefs };
}
