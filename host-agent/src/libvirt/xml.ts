/**
 * Pure helpers for the XML virtkm exchanges with libvirt: the secret definition, the
 * `<virtkm:guest>` marker in a domain's <metadata>, and reading both back. No I/O here.
 *
 * The marker is found by namespace URI (urn:virtkm:1), not by prefix: libvirt keeps the
 * prefix it was given, but another tool may rewrite it.
 */
import { Parser } from 'xml2js';
import { errors } from '../../../shared/src/errors.js';
import type { DomainDisk, SecretDefinition, VirtkmMarker } from './ports.js';

/** Namespace URI of the marker element. */
export const VIRTKM_NAMESPACE = 'urn:virtkm:1';
/** Prefix of the usage volume string of every secret virtkm defines. */
export const VIRTKM_USAGE_PREFIX = 'virtkm:';
/** Largest XML document these helpers parse, in bytes (libvirt's own output is far smaller). */
export const MAX_PARSED_XML_BYTES = 2 * 1024 * 1024;
/** Longest secret description accepted. */
export const MAX_DESCRIPTION_LENGTH = 256;

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
/** Ids virtkm puts into usage strings and markers: short, printable, nothing XML-special. */
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
// Control characters other than tab; XML 1.0 cannot carry most of them at all.
// eslint-disable-next-line no-control-regex
const CONTROL_RE = /[\u0000-\u0008\u000a-\u001f\u007f]/;

/** Whether s is a canonical (lowercase, hyphenated) UUID, the form libvirt prints. */
export function isCanonicalUuid(s: string): boolean {
  return UUID_RE.test(s);
}

/** Whether s is acceptable as a volume or guest id inside libvirt XML. */
export function isValidId(s: string): boolean {
  return ID_RE.test(s);
}

/** The usage volume string of the secret for a volume. */
export function usageIdOfVolume(volumeId: string): string {
  return `${VIRTKM_USAGE_PREFIX}${volumeId}`;
}

/** The volume id of a virtkm usage string, or undefined when the secret is not virtkm's. */
export function volumeIdOfUsage(usageId: string | undefined): string | undefined {
  if (usageId === undefined || !usageId.startsWith(VIRTKM_USAGE_PREFIX)) return undefined;
  const id = usageId.slice(VIRTKM_USAGE_PREFIX.length);
  return isValidId(id) ? id : undefined;
}

/** Escapes text for use in XML content and in single- or double-quoted attributes. */
export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

/**
 * The XML of a virtkm secret: private (libvirt never returns its value), ephemeral (kept in
 * libvirtd's memory only, never written to /etc/libvirt/secrets), usage type volume with
 * the string `virtkm:<volumeId>`. Throws invalid_argument for a malformed definition.
 */
export function secretXml(def: SecretDefinition): string {
  if (!isCanonicalUuid(def.uuid)) throw errors.invalid('secret UUID must be a lowercase canonical UUID');
  if (!isValidId(def.volumeId)) throw errors.invalid('volume id must be 1-128 characters of A-Z a-z 0-9 . _ : -');
  if (def.description.length > MAX_DESCRIPTION_LENGTH || CONTROL_RE.test(def.description)) {
    throw errors.invalid(`secret description must be at most ${MAX_DESCRIPTION_LENGTH} characters without control characters`);
  }
  return (
    `<secret ephemeral='yes' private='yes'>` +
    `<uuid>${def.uuid}</uuid>` +
    `<description>${escapeXml(def.description)}</description>` +
    `<usage type='volume'><volume>${escapeXml(usageIdOfVolume(def.volumeId))}</volume></usage>` +
    `</secret>`
  );
}

/** The marker element for a domain's <metadata>. Throws invalid_argument when malformed. */
export function formatVirtkmMarker(marker: VirtkmMarker): string {
  checkMarker(marker);
  const host = marker.hostId !== undefined ? ` host="${escapeXml(marker.hostId)}"` : '';
  return `<virtkm:guest xmlns:virtkm="${VIRTKM_NAMESPACE}" id="${escapeXml(marker.guestId)}" generation="${marker.generation}"${host}/>`;
}

function checkMarker(marker: VirtkmMarker): void {
  if (!isValidId(marker.guestId)) throw errors.invalid('virtkm marker: guest id must be 1-128 characters of A-Z a-z 0-9 . _ : -');
  if (!Number.isSafeInteger(marker.generation) || marker.generation < 0) throw errors.invalid('virtkm marker: generation must be a non-negative integer');
  if (marker.hostId !== undefined && !isValidId(marker.hostId)) throw errors.invalid('virtkm marker: host id must be 1-128 characters of A-Z a-z 0-9 . _ : -');
}

// ----- parsing ---------------------------------------------------------------------------

/** An attribute as xml2js reports it with `xmlns: true`. */
interface NsAttr {
  value: string;
  local: string;
  uri: string;
}
/** An element as xml2js reports it with `xmlns: true`, `explicitArray: true`. */
interface NsNode {
  $?: Record<string, NsAttr>;
  $ns?: { uri: string; local: string };
  _?: string;
  [child: string]: unknown;
}

/**
 * Parses XML synchronously (xml2js calls back synchronously with async: false) with
 * namespace information. Refuses DTDs, which could declare entities.
 */
function parseNs(xml: string, what: string): { rootName: string; root: NsNode } {
  if (Buffer.byteLength(xml, 'utf8') > MAX_PARSED_XML_BYTES) throw errors.tooLarge(`${what} XML is too large`);
  if (/<!DOCTYPE/i.test(xml) || /<!ENTITY/i.test(xml)) throw errors.invalid(`${what} XML must not contain a DOCTYPE`);
  const parser = new Parser({ strict: true, async: false, explicitArray: true, explicitRoot: true, xmlns: true, trim: false });
  let result: unknown;
  let failure: unknown;
  let called = false;
  parser.parseString(xml, (err: unknown, doc: unknown) => {
    called = true;
    failure = err;
    result = doc;
  });
  if (!called) throw errors.internal(new Error('xml2js did not parse synchronously'));
  if (failure) {
    // sax messages look like "Unexpected close tag\nLine: 3\nColumn: 9\nChar: >".
    const reason = failure instanceof Error ? failure.message.split('\n')[0] : 'parse error';
    throw errors.invalid(`${what} XML is not well-formed: ${String(reason).slice(0, 120)}`);
  }
  if (result === null || typeof result !== 'object') throw errors.invalid(`${what} XML has no root element`);
  const entries = Object.entries(result as Record<string, unknown>);
  const first = entries[0];
  if (entries.length !== 1 || first === undefined) throw errors.invalid(`${what} XML must have one root element`);
  const [rootName, root] = first;
  // An empty root element comes back as '' rather than an object.
  return { rootName, root: typeof root === 'object' && root !== null ? (root as NsNode) : {} };
}

/** Child elements of node, all names (xml2js keys children by their qualified name). */
function childElements(node: NsNode): { qname: string; node: NsNode | string }[] {
  const out: { qname: string; node: NsNode | string }[] = [];
  for (const [key, value] of Object.entries(node)) {
    if (key === '$' || key === '$ns' || key === '_' || !Array.isArray(value)) continue;
    for (const v of value as unknown[]) out.push({ qname: key, node: v as NsNode | string });
  }
  return out;
}

/** The children called `name` in no namespace. */
function children(node: NsNode, name: string): NsNode[] {
  return childElements(node)
    .filter((c) => c.qname === name)
    .map((c) => (typeof c.node === 'string' ? { _: c.node } : c.node));
}

/** Text of the single child `name`, or undefined. */
function childText(node: NsNode, name: string): string | undefined {
  const c = children(node, name);
  if (c.length === 0) return undefined;
  return (c[0]?._ ?? '').trim();
}

/** Value of an unprefixed attribute. */
function attrValue(node: NsNode, local: string): string | undefined {
  for (const a of Object.values(node.$ ?? {})) {
    if (a.local === local && a.uri === '') return a.value;
  }
  return undefined;
}

/** A secret's XML as libvirt returns it (virSecretGetXMLDesc), reduced to what virtkm reads. */
export interface ParsedSecretXml {
  uuid: string | undefined;
  usageType: string;
  usageId: string | undefined;
  description: string;
  private: boolean;
  ephemeral: boolean;
}

/** Element of the usage id for each usage type libvirt knows. */
const USAGE_ID_ELEMENT: Readonly<Record<string, string>> = { volume: 'volume', ceph: 'name', iscsi: 'target', tls: 'name', vtpm: 'name' };

/** Reads a secret's XML. Throws invalid_argument when it is not a <secret> document. */
export function parseSecretXml(xml: string): ParsedSecretXml {
  const { rootName, root } = parseNs(xml, 'secret');
  if (rootName !== 'secret') throw errors.invalid('secret XML root element must be <secret>');
  const usage = children(root, 'usage')[0];
  const usageType = usage ? (attrValue(usage, 'type') ?? 'none') : 'none';
  const idElement = USAGE_ID_ELEMENT[usageType];
  return {
    uuid: childText(root, 'uuid'),
    usageType,
    usageId: usage && idElement ? childText(usage, idElement) : undefined,
    description: childText(root, 'description') ?? '',
    private: attrValue(root, 'private') === 'yes',
    ephemeral: attrValue(root, 'ephemeral') === 'yes',
  };
}

/** The <name> and <uuid> of a domain XML (either may be absent). Throws invalid_argument when not a <domain>. */
export function parseDomainIdentity(domainXml: string): { name: string | undefined; uuid: string | undefined } {
  const { rootName, root } = parseNs(domainXml, 'domain');
  if (rootName !== 'domain' || root.$ns?.uri !== '') throw errors.invalid('domain XML root element must be <domain>');
  if (children(root, 'name').length > 1 || children(root, 'uuid').length > 1) throw errors.invalid('domain XML has more than one <name> or <uuid>');
  return { name: childText(root, 'name'), uuid: childText(root, 'uuid') };
}

/**
 * The virtkm marker of a domain XML (full libvirt domain XML, or one with just the
 * <metadata> virtkm writes), or undefined when it has none. Throws invalid_argument when
 * the XML is not a <domain>, or holds more than one marker or a malformed one.
 */
export function parseVirtkmMarker(domainXml: string): VirtkmMarker | undefined {
  const { rootName, root } = parseNs(domainXml, 'domain');
  if (rootName !== 'domain' || root.$ns?.uri !== '') throw errors.invalid('domain XML root element must be <domain>');
  const found: NsNode[] = [];
  for (const metadata of children(root, 'metadata')) {
    for (const c of childElements(metadata)) {
      if (typeof c.node === 'string') continue;
      if (c.node.$ns?.uri === VIRTKM_NAMESPACE && c.node.$ns.local === 'guest') found.push(c.node);
    }
  }
  if (found.length === 0) return undefined;
  if (found.length > 1) throw errors.invalid('domain XML holds more than one virtkm marker');
  const el = found[0] as NsNode;
  const guestId = attrValue(el, 'id') ?? '';
  const generationText = attrValue(el, 'generation') ?? '';
  if (!/^[0-9]{1,15}$/.test(generationText)) throw errors.invalid('virtkm marker: generation must be a non-negative integer');
  const hostId = attrValue(el, 'host');
  const marker: VirtkmMarker = { guestId, generation: Number(generationText), ...(hostId !== undefined ? { hostId } : {}) };
  checkMarker(marker);
  return marker;
}

/** The <encryption><secret uuid> of a disk or mirror element (inside <source> or beside it). */
function encryptionSecretOf(node: NsNode): string | undefined {
  const source = children(node, 'source')[0];
  for (const holder of [source, node]) {
    if (!holder) continue;
    const secret = children(children(holder, 'encryption')[0] ?? {}, 'secret')[0];
    const uuid = secret ? attrValue(secret, 'uuid') : undefined;
    if (uuid !== undefined) return uuid;
  }
  return undefined;
}

/**
 * The disks of a domain XML (live or persistent) with their source file, encryption secret
 * and block-copy mirror. Throws invalid_argument when the XML is not a <domain>.
 */
export function parseDomainDisks(domainXml: string): DomainDisk[] {
  const { rootName, root } = parseNs(domainXml, 'domain');
  if (rootName !== 'domain' || root.$ns?.uri !== '') throw errors.invalid('domain XML root element must be <domain>');
  const out: DomainDisk[] = [];
  for (const devices of children(root, 'devices')) {
    for (const disk of children(devices, 'disk')) {
      const target = children(disk, 'target')[0];
      const dev = target ? attrValue(target, 'dev') : undefined;
      if (dev === undefined) continue;
      const source = children(disk, 'source')[0];
      const mirror = children(disk, 'mirror')[0];
      let mirrorInfo: DomainDisk['mirror'];
      if (mirror) {
        const mirrorSource = children(mirror, 'source')[0];
        mirrorInfo = {
          path: (mirrorSource ? attrValue(mirrorSource, 'file') : undefined) ?? attrValue(mirror, 'file'),
          secretUuid: encryptionSecretOf(mirror),
          ready: attrValue(mirror, 'ready') === 'yes',
        };
      }
      out.push({ target: dev, sourcePath: source ? attrValue(source, 'file') : undefined, secretUuid: encryptionSecretOf(disk), mirror: mirrorInfo });
    }
  }
  return out;
}
