/**
 * Finishing a LUKS2 re-encryption whose data phase is complete but whose final metadata
 * update never happened, because cryptsetup 2.6.1 cannot do it without destroying data.
 *
 * The window: `cryptsetup reencrypt` commits the metadata after the last hotzone (one data
 * segment left, bound to the new volume key, size "dynamic"), reports progress, and only
 * then, in further commits, removes the old keyslots, the backup segments, the reencrypt
 * keyslot and the "online-reencrypt-v2" requirement. Killed in between (kill -9, or SIGPIPE
 * while printing that progress line once its reader is gone), the header still demands
 * re-encryption, and `reencrypt --resume-only` computes the resume offset from the number
 * of data segments alone (one segment: offset 0; cryptsetup's _offset_forward) and starts
 * over: it decrypts the already re-encrypted data with the old key and writes it under the
 * new one, which garbles every block (reproduced with 2.6.1 on files and confirmed in its
 * source). `cryptsetup repair` sees no segment "in-reencryption" and changes nothing.
 *
 * So virtkm recognises that state itself (finishedDataPhase) and performs the final
 * metadata update itself, exactly as cryptsetup's finalisation would: keep the one data
 * segment and the new volume key's digest with its passphrase keyslots, drop everything of
 * the old volume key, the backup segments, the reencrypt keyslot and its digest, and the
 * requirement. The header is edited per the LUKS2 on-disk format: both binary header
 * copies (primary at 0, secondary at hdr_size) get the new JSON, seqid + 1 and a fresh
 * checksum (sha256 over the binary header with a zeroed checksum field plus the JSON area).
 * Each copy is written and fsynced in turn: a crash in between leaves one copy with the
 * higher seqid, which cryptsetup takes (and copies over the other) on its next access. The
 * keyslot areas no longer referenced are zeroed afterwards (they held the retired key's
 * keyslots and the hotzone checksums). Before the image is touched, the finished header is
 * tried on a scratch copy of the header area: cryptsetup must parse it and the new
 * passphrase must open it.
 *
 * The same state also arises when cryptsetup's own finalisation is killed half-way (its
 * several commits: e.g. the old keyslots already gone, the requirement still there); then
 * `open --test-passphrase` refuses every key ("No usable keyslot is available", exit 1),
 * although the new passphrase's keyslot holds the volume key of all the data. Finishing
 * the metadata as above makes it open again.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { errors } from '../../../shared/src/errors.js';
import { removeFiles } from './common.js';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

const MAGIC_PRIMARY = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const MAGIC_SECONDARY = Buffer.from([0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe]);
const BINARY_HEADER = 4096;
const OFF_VERSION = 6;
const OFF_HDR_SIZE = 8;
const OFF_SEQID = 16;
const OFF_CSUM_ALG = 72;
const OFF_HDR_OFFSET = 256;
const OFF_CSUM = 448;
const CSUM_LEN = 64;
/** LUKS2 allows these header sizes (binary header + JSON area). */
const HDR_SIZES = new Set([16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304]);

function isObject(v: Json | undefined): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function strings(v: Json | undefined): string[] {
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
}

function flagsOf(segment: Json | undefined): string[] {
  return isObject(segment) ? strings(segment['flags']) : [];
}

function digestOfSegment(meta: JsonObject, segmentId: string): string | undefined {
  const digests = meta['digests'];
  if (!isObject(digests)) return undefined;
  const owners = Object.entries(digests).filter(([, d]) => isObject(d) && strings(d['segments']).includes(segmentId));
  return owners.length === 1 ? owners[0]?.[0] : undefined;
}

/**
 * True when the metadata is that of a re-encryption (mode "reencrypt") whose data phase is
 * complete: the requirement is still set, the only data segment is not in re-encryption and
 * is bound to the new volume key's digest alone (that of the "backup-final" segment), which
 * differs from the old one ("backup-previous"). Right after initialisation the only data
 * segment is bound to the old digest instead; while a hotzone is in flight it carries the
 * "in-reencryption" flag; so neither is mistaken for this state.
 */
export function finishedDataPhase(meta: JsonObject): boolean {
  const segments = meta['segments'];
  const config = meta['config'];
  const keyslots = meta['keyslots'];
  if (!isObject(segments) || !isObject(config) || !isObject(keyslots)) return false;
  const req = isObject(config['requirements']) ? strings(config['requirements']['mandatory']) : [];
  if (!req.some((r) => r.startsWith('online-reencrypt'))) return false;
  const reencryptSlots = Object.values(keyslots).filter((k) => isObject(k) && k['type'] === 'reencrypt');
  if (reencryptSlots.length !== 1 || !isObject(reencryptSlots[0]) || reencryptSlots[0]['mode'] !== 'reencrypt') return false;
  const data = Object.entries(segments).filter(([, s]) => !flagsOf(s).some((f) => f.startsWith('backup-')));
  if (data.length !== 1) return false;
  const [dataId, dataSegment] = data[0] ?? ['', null];
  if (flagsOf(dataSegment).includes('in-reencryption')) return false;
  if (!isObject(dataSegment) || dataSegment['size'] !== 'dynamic') return false;
  const finalId = Object.entries(segments).find(([, s]) => flagsOf(s).includes('backup-final'))?.[0];
  const previousId = Object.entries(segments).find(([, s]) => flagsOf(s).includes('backup-previous'))?.[0];
  if (finalId === undefined || previousId === undefined) return false;
  const newDigest = digestOfSegment(meta, finalId);
  const oldDigest = digestOfSegment(meta, previousId);
  if (newDigest === undefined || oldDigest === undefined || newDigest === oldDigest) return false;
  return digestOfSegment(meta, dataId) === newDigest;
}

/** One parsed header copy. */
interface HeaderCopy {
  binary: Buffer;
  hdrSize: number;
  seqid: bigint;
  meta: JsonObject;
}

function parseCopy(bytes: Buffer, magic: Buffer, expectedOffset: number): HeaderCopy | undefined {
  if (bytes.length < BINARY_HEADER || !bytes.subarray(0, 6).equals(magic) || bytes.readUInt16BE(OFF_VERSION) !== 2) return undefined;
  const hdrSize = Number(bytes.readBigUInt64BE(OFF_HDR_SIZE));
  if (!HDR_SIZES.has(hdrSize) || bytes.length < hdrSize) return undefined;
  if (Number(bytes.readBigUInt64BE(OFF_HDR_OFFSET)) !== expectedOffset) return undefined;
  const alg = bytes.subarray(OFF_CSUM_ALG, OFF_CSUM_ALG + 32).toString('latin1').replace(/\0.*$/s, '');
  if (alg !== 'sha256') return undefined;
  const area = Buffer.from(bytes.subarray(0, hdrSize));
  const stored = Buffer.from(area.subarray(OFF_CSUM, OFF_CSUM + 32));
  area.fill(0, OFF_CSUM, OFF_CSUM + CSUM_LEN);
  if (!createHash('sha256').update(area).digest().equals(stored)) return undefined;
  const jsonText = area.subarray(BINARY_HEADER).toString('utf8').replace(/\0+$/, '');
  let meta: Json;
  try {
    meta = JSON.parse(jsonText) as Json;
  } catch {
    return undefined;
  }
  if (!isObject(meta)) return undefined;
  return { binary: Buffer.from(bytes.subarray(0, BINARY_HEADER)), hdrSize, seqid: bytes.readBigUInt64BE(OFF_SEQID), meta };
}

/** The copy with the highest seqid among the valid ones, and both copies' binary headers. */
async function readHeader(path: string): Promise<{ current: HeaderCopy; primary: HeaderCopy | undefined; secondary: HeaderCopy | undefined }> {
  const fh = await open(path, 'r');
  try {
    // Room for both copies at the largest header size LUKS2 allows (2 x 4 MiB).
    const first = Buffer.alloc(8 << 20);
    const { bytesRead } = await fh.read(first, 0, first.length, 0);
    const head = first.subarray(0, bytesRead);
    const primary = parseCopy(head, MAGIC_PRIMARY, 0);
    const size = primary?.hdrSize ?? 16384;
    const secondary = parseCopy(head.subarray(size), MAGIC_SECONDARY, size);
    const current = primary && secondary ? (secondary.seqid > primary.seqid ? secondary : primary) : (primary ?? secondary);
    if (!current) throw errors.precondition('the image header is damaged', { hint: 'neither LUKS2 header copy is valid' });
    return { current, primary, secondary };
  } finally {
    await fh.close();
  }
}

/** Builds one header copy: its own binary header (salt, magic, offset) with the new seqid, JSON and checksum. */
function buildCopy(binary: Buffer, hdrSize: number, seqid: bigint, json: Buffer): Buffer {
  const out = Buffer.alloc(hdrSize);
  binary.copy(out, 0, 0, BINARY_HEADER);
  out.writeBigUInt64BE(seqid, OFF_SEQID);
  out.fill(0, OFF_CSUM, OFF_CSUM + CSUM_LEN);
  json.copy(out, BINARY_HEADER);
  createHash('sha256').update(out).digest().copy(out, OFF_CSUM);
  return out;
}

/** A binary header for a copy that was unreadable: the other copy's, with this copy's magic and offset. */
function binaryFor(other: Buffer, magic: Buffer, offset: number): Buffer {
  const b = Buffer.from(other);
  magic.copy(b, 0);
  b.writeBigUInt64BE(BigInt(offset), OFF_HDR_OFFSET);
  return b;
}

/**
 * Performs cryptsetup's final metadata update of a re-encryption whose data phase is
 * complete (see the module comment). Refuses (failed_precondition) unless the header is in
 * exactly that state, and unless `opens` accepts the finished header first: it is written
 * into `scratchPath` (a copy of the image's header area) and `opens(scratchPath)` must
 * answer true (cryptsetup parses it and the new passphrase opens it) before a byte of the
 * image changes. The scratch file is zeroed and removed. Returns the ids of the keyslots
 * kept.
 */
export async function finaliseReencryption(path: string, scratchPath: string, opens: (headerFile: string) => Promise<boolean>): Promise<string[]> {
  const { current, primary, secondary } = await readHeader(path);
  const meta = current.meta;
  if (!finishedDataPhase(meta)) throw errors.precondition('the LUKS2 header is not a re-encryption with a finished data phase');
  const segments = meta['segments'] as JsonObject;
  const digests = meta['digests'] as JsonObject;
  const keyslots = meta['keyslots'] as JsonObject;
  const config = meta['config'] as JsonObject;
  const [dataId, dataSegment] = Object.entries(segments).find(([, s]) => !flagsOf(s).some((f) => f.startsWith('backup-'))) ?? ['', null];
  const finalId = Object.entries(segments).find(([, s]) => flagsOf(s).includes('backup-final'))?.[0] ?? '';
  const newDigestId = digestOfSegment(meta, finalId) ?? '';
  const newDigest = digests[newDigestId];
  if (!isObject(newDigest) || !isObject(dataSegment)) throw errors.internal(new Error('unexpected LUKS2 metadata'));

  // The kept keyslots: the new volume key's passphrase keyslots.
  const keep = strings(newDigest['keyslots']).filter((id) => isObject(keyslots[id]) && (keyslots[id] as JsonObject)['type'] === 'luks2');
  if (keep.length === 0) throw errors.internal(new Error('no passphrase keyslot holds the new volume key'));
  const dropped = Object.keys(keyslots).filter((id) => !keep.includes(id));
  const droppedAreas: { offset: number; size: number }[] = [];
  for (const id of dropped) {
    const area = (keyslots[id] as JsonObject)['area'];
    if (isObject(area) && typeof area['offset'] === 'string' && typeof area['size'] === 'string') droppedAreas.push({ offset: Number(area['offset']), size: Number(area['size']) });
  }

  const segment: JsonObject = { ...dataSegment };
  delete segment['flags'];
  const newKeyslots: JsonObject = {};
  for (const id of keep) newKeyslots[id] = keyslots[id] ?? null;
  const newConfig: JsonObject = { ...config };
  const mandatory = isObject(config['requirements']) ? strings(config['requirements']['mandatory']).filter((r) => !r.startsWith('online-reencrypt')) : [];
  if (mandatory.length > 0) newConfig['requirements'] = { ...(config['requirements'] as JsonObject), mandatory };
  else delete newConfig['requirements'];
  // Tokens (none in virtkm's images) may only name keyslots that still exist.
  const tokens = isObject(meta['tokens']) ? { ...meta['tokens'] } : {};
  for (const [id, token] of Object.entries(tokens)) {
    if (isObject(token) && Array.isArray(token['keyslots'])) tokens[id] = { ...token, keyslots: strings(token['keyslots']).filter((k) => keep.includes(k)) };
  }
  const next: JsonObject = {
    ...meta,
    tokens,
    keyslots: newKeyslots,
    segments: { '0': segment },
    digests: { [newDigestId]: { ...newDigest, keyslots: keep, segments: ['0'] } },
    config: newConfig,
  };
  // A data segment that was not segment 0 would need renumbering; cryptsetup always puts it first.
  if (dataId !== '0') throw errors.internal(new Error('unexpected LUKS2 segment numbering'));

  const hdrSize = current.hdrSize;
  const json = Buffer.from(JSON.stringify(next), 'utf8');
  if (json.length >= hdrSize - BINARY_HEADER) throw errors.internal(new Error('LUKS2 metadata does not fit its area'));
  const seqid = (primary?.seqid ?? 0n) > (secondary?.seqid ?? 0n) ? (primary?.seqid ?? 0n) + 1n : (secondary?.seqid ?? 0n) + 1n;
  const primaryBinary = primary?.binary ?? binaryFor(current.binary, MAGIC_PRIMARY, 0);
  const secondaryBinary = secondary?.binary ?? binaryFor(current.binary, MAGIC_SECONDARY, hdrSize);

  const primaryCopy = buildCopy(primaryBinary, hdrSize, seqid, json);
  const secondaryCopy = buildCopy(secondaryBinary, hdrSize, seqid, json);

  // Dry run on a copy of the header area: cryptsetup must accept the result.
  const config2 = next['config'] as JsonObject;
  const areaEnd = 2 * hdrSize + Number(typeof config2['keyslots_size'] === 'string' ? config2['keyslots_size'] : 0);
  // A scratch file of an earlier, killed attempt is stale.
  await removeFiles([scratchPath], true);
  try {
    const src = await open(path, 'r');
    const dst = await open(scratchPath, 'wx', 0o600);
    try {
      const buf = Buffer.alloc(1 << 20);
      for (let at = 0; at < areaEnd; at += buf.length) {
        const n = Math.min(buf.length, areaEnd - at);
        const { bytesRead } = await src.read(buf, 0, n, at);
        await dst.write(buf, 0, bytesRead, at);
      }
      await dst.write(primaryCopy, 0, hdrSize, 0);
      await dst.write(secondaryCopy, 0, hdrSize, hdrSize);
      await dst.sync();
      buf.fill(0);
    } finally {
      await dst.close();
      await src.close();
    }
    if (!(await opens(scratchPath))) {
      throw errors.precondition('a LUKS2 re-encryption of the image finished its data phase, but the new key does not open its new volume key', { hint: 'it was not started by this rotation' });
    }
  } finally {
    await removeFiles([scratchPath], true);
  }

  const fh = await open(path, 'r+');
  try {
    await fh.write(primaryCopy, 0, hdrSize, 0);
    await fh.sync();
    await fh.write(secondaryCopy, 0, hdrSize, hdrSize);
    await fh.sync();
    // The areas of the dropped keyslots (retired key, hotzone checksums or journal).
    const keyslotsStart = 2 * hdrSize;
    for (const a of droppedAreas) {
      if (a.offset < keyslotsStart || a.size <= 0) continue;
      const zeros = Buffer.alloc(Math.min(a.size, 1 << 20));
      for (let at = 0; at < a.size; at += zeros.length) await fh.write(zeros, 0, Math.min(zeros.length, a.size - at), a.offset + at);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return keep;
}

/** Reads the current LUKS2 metadata straight from the header (the copy cryptsetup would use). */
export async function readLuks2Metadata(path: string): Promise<JsonObject> {
  return (await readHeader(path)).current.meta;
}
