/**
 * Pure helpers of the LUKS2 rotations: parsing the JSON metadata, the room left in the
 * keyslot area, the progress stream of `cryptsetup reencrypt --progress-json`, and the
 * recognition of a re-encryption whose data phase finished (luks2-finalize.ts), on
 * metadata shaped like what cryptsetup 2.6.1 wrote in the integration tests.
 */
import test from 'ava';
import { freeKeyslot, keyslotAreaBytes, largestFreeKeyslotArea, parseLuks2Header, reencryptionInProgress } from '../../host-agent/src/rotate/luks2-cli.js';
import { finishedDataPhase } from '../../host-agent/src/rotate/luks2-finalize.js';
import { progressJsonParser } from '../../host-agent/src/rotate/luks2-reencrypt.js';
import type { RotationProgress } from '../../host-agent/src/rotate/types.js';

const slot = (offset: number) => ({ type: 'luks2', key_size: 64, area: { type: 'raw', offset: String(offset), size: '258048', encryption: 'aes-xts-plain64', key_size: 64 } });
const seg = (flags?: string[], size = 'dynamic') => ({ type: 'crypt', offset: '16777216', size, iv_tweak: '0', encryption: 'aes-xts-plain64', sector_size: 512, ...(flags ? { flags } : {}) });
const digest = (keyslots: string[], segments: string[]) => ({ type: 'pbkdf2', keyslots, segments, hash: 'sha256', iterations: 1000, salt: 'x', digest: 'y' });
const config = (reencrypting: boolean) => ({ json_size: '12288', keyslots_size: '16744448', ...(reencrypting ? { requirements: { mandatory: ['online-reencrypt-v2'] } } : {}) });
const reencryptSlot = { type: 'reencrypt', key_size: 1, mode: 'reencrypt', direction: 'forward', area: { type: 'checksum', offset: '806912', size: '15970304', hash: 'sha256', sector_size: 4096 } };

test('parseLuks2Header: keyslots, segments, requirements, unbound keyslots', (t) => {
  const h = parseLuks2Header(JSON.stringify({ keyslots: { '0': slot(32768), '1': slot(290816) }, tokens: {}, segments: { '0': seg() }, digests: { '0': digest(['0'], ['0']), '1': digest(['1'], []) }, config: config(false) }));
  t.deepEqual(h.keyslots.map((k) => k.id), [0, 1]);
  t.is(h.segments, 1);
  t.deepEqual(h.requirements, []);
  t.deepEqual(h.unboundKeyslots, [1]);
  t.false(reencryptionInProgress(h));
  t.is(freeKeyslot(h), 2);
  t.throws(() => parseLuks2Header('not json'), { message: 'internal error' });
  t.throws(() => parseLuks2Header('{"keyslots":{}}'), { message: 'internal error' });
});

test('keyslot area: a 512-bit key takes 252 KiB; the largest free stretch is found between and after areas', (t) => {
  t.is(keyslotAreaBytes(64), 258048n);
  t.is(keyslotAreaBytes(32), 131072n);
  const h = parseLuks2Header(JSON.stringify({ keyslots: { '0': slot(32768), '3': slot(32768 + 2 * 258048) }, segments: { '0': seg() }, digests: {}, config: { json_size: '12288', keyslots_size: String(4 * 258048) } }));
  // Areas: [32768, +258048) used, one free slot, [.., +258048) used, one free slot at the end.
  t.is(largestFreeKeyslotArea(h), 258048n);
  const full = parseLuks2Header(JSON.stringify({ keyslots: { '0': slot(32768) }, segments: { '0': seg() }, digests: {}, config: { json_size: '12288', keyslots_size: '258048' } }));
  t.is(largestFreeKeyslotArea(full), 0n);
});

test('progressJsonParser: lines split across chunks, garbage ignored', (t) => {
  const seen: RotationProgress[] = [];
  const feed = progressJsonParser('reencrypting', (p) => seen.push(p));
  feed(Buffer.from('{"device":"x","device_bytes":"1048576","device_si'));
  feed(Buffer.from('ze":"33554432","speed":"300000000","eta_ms":"0","time_ms":"3"}\nnot json\n{"device_bytes":"x"}\n'));
  feed(Buffer.from('{"device_bytes":"33554432","device_size":"33554432","speed":"1"}\n'));
  t.deepEqual(seen, [
    { step: 'reencrypting', bytesDone: 1048576n, bytesTotal: 33554432n, bytesPerSecond: 300000000 },
    { step: 'reencrypting', bytesDone: 33554432n, bytesTotal: 33554432n, bytesPerSecond: 1 },
  ]);
});

test('finishedDataPhase: only the state after the last hotzone, not initialisation or a hotzone in flight', (t) => {
  const base = {
    keyslots: { '0': slot(32768), '5': slot(290816), '1': slot(548864), '2': reencryptSlot },
    tokens: {},
    segments: { '0': seg(), '1': seg(['backup-previous']), '2': seg(['backup-final']) },
    config: config(true),
  };
  // Data done, finalisation pending: the data segment is bound to the new digest.
  const finished = { ...base, digests: { '0': digest(['0', '5'], ['1']), '1': digest(['1'], ['0', '2']), '2': digest(['2'], []) } };
  t.true(finishedDataPhase(finished));
  // Half-finalised (old keyslots already removed): still recognised.
  t.true(finishedDataPhase({ ...finished, keyslots: { '1': slot(548864), '2': reencryptSlot }, digests: { '0': digest([], ['1']), '1': digest(['1'], ['0', '2']), '2': digest(['2'], []) } }));
  // Initialised, not started: the data segment is bound to the old digest.
  t.false(finishedDataPhase({ ...base, digests: { '0': digest(['0', '5'], ['0', '1']), '1': digest(['1'], ['2']), '2': digest(['2'], []) } }));
  // A hotzone in flight.
  t.false(finishedDataPhase({ ...finished, segments: { '0': seg(['in-reencryption'], '33554432'), '1': seg(['backup-previous']), '2': seg(['backup-final']) } }));
  // Two data segments (new part, old part): cryptsetup resumes those correctly.
  t.false(finishedDataPhase({ ...finished, segments: { '0': seg(undefined, '1048576'), '1': seg(), '2': seg(['backup-previous']), '3': seg(['backup-final']) } }));
  // No re-encryption at all.
  t.false(finishedDataPhase({ ...finished, config: config(false) }));
});
