/**
 * Parsers of the machine-readable output of the tools: `qemu-img info --output=json` and
 * `cryptsetup luksDump --dump-json-metadata`. JSON only, never the human-readable text.
 * Anything unexpected is an internal error (the tool changed or the output was cut).
 */
import { errors } from '../../../shared/src/errors.js';

/** What virtkm uses of `qemu-img info --output=json`. */
export interface QemuImageInfo {
  /** QEMU's format name: qcow2, luks, raw, ... */
  format: string;
  virtualSizeBytes: bigint;
  /** The encryption format inside a qcow2 ("luks", "aes"), or "luks" for a raw LUKS image. */
  encryptFormat?: string;
  /** LUKS UUID of the encryption header, when QEMU reports it. */
  uuid?: string;
  /** The backing file named in the image header, if any. */
  backingFilename?: string;
}

/** What virtkm uses of a LUKS2 header's JSON metadata. */
export interface Luks2Metadata {
  segments: { offsetBytes: bigint; sizeBytes: bigint | 'dynamic'; sectorSize: number; encryption: string }[];
  /** Number of keyslots in use. */
  keyslots: number;
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

function isObject(v: Json | undefined): v is { [key: string]: Json } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parse(text: string, tool: string): Json {
  try {
    return JSON.parse(text) as Json;
  } catch (cause) {
    throw errors.internal(new Error(`${tool}: output is not JSON`, { cause }));
  }
}

function bad(tool: string, what: string): never {
  throw errors.internal(new Error(`${tool}: unexpected JSON (${what})`));
}

/** A non-negative integer from a JSON number (exact up to 2^53) or a decimal string. */
function byteCount(v: Json | undefined, tool: string, what: string): bigint {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === 'string' && /^\d{1,19}$/.test(v)) return BigInt(v);
  return bad(tool, what);
}

/** Parses `qemu-img info --output=json` of one image (not --backing-chain). */
export function parseQemuImgInfo(text: string): QemuImageInfo {
  const tool = 'qemu-img info';
  const root = parse(text, tool);
  if (!isObject(root)) return bad(tool, 'not an object');
  const format = root['format'];
  if (typeof format !== 'string') return bad(tool, 'format');
  const info: QemuImageInfo = { format, virtualSizeBytes: byteCount(root['virtual-size'], tool, 'virtual-size') };
  const backing = root['backing-filename'];
  if (typeof backing === 'string') info.backingFilename = backing;

  const specific = root['format-specific'];
  if (specific !== undefined) {
    if (!isObject(specific) || !isObject(specific['data'])) return bad(tool, 'format-specific');
    const data = specific['data'];
    // qcow2 nests the encryption header under data.encrypt; a raw LUKS image is the
    // encryption header itself (type "luks").
    const encrypt = specific['type'] === 'luks' ? { ...data, format: 'luks' } : data['encrypt'];
    if (encrypt !== undefined) {
      if (!isObject(encrypt) || typeof encrypt['format'] !== 'string') return bad(tool, 'encrypt');
      info.encryptFormat = encrypt['format'];
      if (typeof encrypt['uuid'] === 'string') info.uuid = encrypt['uuid'];
    }
  }
  // "encrypted": true without an encryption block would be a QEMU we do not understand.
  if (root['encrypted'] === true && info.encryptFormat === undefined) return bad(tool, 'encrypted without encrypt');
  return info;
}

/** Parses `cryptsetup luksDump --dump-json-metadata` (LUKS2 only). */
export function parseLuks2Metadata(text: string): Luks2Metadata {
  const tool = 'cryptsetup luksDump';
  const root = parse(text, tool);
  if (!isObject(root) || !isObject(root['segments']) || !isObject(root['keyslots'])) return bad(tool, 'segments/keyslots');
  const segments: Luks2Metadata['segments'] = [];
  // Segment keys are decimal strings; keep their numeric order.
  const keys = Object.keys(root['segments']).sort((a, b) => Number(a) - Number(b));
  for (const key of keys) {
    const s = root['segments'][key];
    if (!isObject(s)) return bad(tool, 'segment');
    if (s['type'] !== 'crypt') continue;
    const size = s['size'] === 'dynamic' ? 'dynamic' : byteCount(s['size'], tool, 'segment size');
    const sectorSize = s['sector_size'];
    const encryption = s['encryption'];
    if (typeof sectorSize !== 'number' || typeof encryption !== 'string') return bad(tool, 'segment fields');
    segments.push({ offsetBytes: byteCount(s['offset'], tool, 'segment offset'), sizeBytes: size, sectorSize, encryption });
  }
  return { segments, keyslots: Object.keys(root['keyslots']).length };
}
