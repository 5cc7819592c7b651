/**
 * Desired state and handoff decisions (pure), and the store operations behind them.
 */
import test from 'ava';
import type { SealedKeyPacket } from '../../shared/src/api.js';
import { buildDesiredState, isHandoffComplete } from '../../server/src/agent/desired-state.js';
import type { GuestRecord, GuestStatusRecord, VolumeRecord } from '../../server/src/domain/model.js';
import { openSqliteStore } from '../../server/src/store/sqlite-store.js';

const NOW = '2026-01-01T00:00:00.000Z';
const vol = (id: string): VolumeRecord => ({ id, name: `n-${id}`, sizeBytes: 1n << 30n, format: 'luks', cipher: 'aes-xts-plain64', keySizeBits: 512, sectorSize: 512, activeVersion: 3, createdAt: NOW });
const guest = (over: Partial<GuestRecord>): GuestRecord => ({ id: 'g', name: 'g', domainXml: '<domain/>', hostId: 'B', autostart: true, createdAt: NOW, updatedAt: NOW, generation: 5, volumeIds: ['v1'], handoffFromHostId: null, ...over });
const status = (hostId: string, phase: string, generation = 5): GuestStatusRecord => ({ guestId: 'g', hostId, generation, phase, reason: '', reportedAt: NOW });

test('a placed guest runs and carries packets; a handed-over guest runs nowhere and the source gets no packet', (t) => {
  const packet: SealedKeyPacket = { volumeId: 'v1', keyVersion: 3, sealed: Buffer.from([1]) };
  const src = (gs: GuestRecord[]) => ({ guestsForHost: () => gs, getVolume: (id: string) => (id === 'v1' ? vol('v1') : undefined), isMaterialized: () => false, imageDeletionsForHost: () => [] });
  const placed = buildDesiredState('B', 7, src([guest({})]), () => packet, NOW);
  t.is(placed.revision, 7n);
  t.true(placed.guests[0]!.run);
  t.is(placed.guests[0]!.volumes[0]!.keyVersion, 3);
  t.deepEqual(placed.guests[0]!.volumes[0]!.packet, packet);
  t.true(placed.guests[0]!.volumes[0]!.mayCreate, 'a volume no host has made yet may be created');

  const moving = guest({ hostId: 'B', handoffFromHostId: 'A' });
  const atDest = buildDesiredState('B', 8, src([moving]), () => packet, NOW);
  t.false(atDest.guests[0]!.run);
  t.truthy(atDest.guests[0]!.volumes[0]!.packet);
  const atSource = buildDesiredState('A', 9, src([moving]), () => packet, NOW);
  t.false(atSource.guests[0]!.run);
  t.is(atSource.guests[0]!.volumes[0]!.packet, undefined);
  // A volume deleted meanwhile is left out rather than failing the whole state.
  t.deepEqual(buildDesiredState('B', 1, src([guest({ volumeIds: ['gone'] })]), () => packet, NOW).guests[0]!.volumes, []);
});

test('a move completes only when the destination is defined at the current generation and the source is not running', (t) => {
  const g = guest({ hostId: 'B', handoffFromHostId: 'A' });
  t.false(isHandoffComplete(g, []), 'nothing reported');
  t.false(isHandoffComplete(g, [status('B', 'defined', 4)]), 'destination reported an older generation');
  t.false(isHandoffComplete(g, [status('B', 'defined'), status('A', 'running')]), 'source still runs it (also when it is revoked and silent)');
  t.true(isHandoffComplete(g, [status('B', 'defined'), status('A', 'stopped')]));
  t.true(isHandoffComplete(g, [status('B', 'defined')]), 'the source never reported the guest');
  t.false(isHandoffComplete(guest({}), [status('B', 'defined')]), 'no move in progress');
});

test('store: revisions only grow, reports replace the previous ones and drop unknown ids, guestsForHost includes handoffs', async (t) => {
  const s = openSqliteStore({ path: ':memory:' });
  const host = (id: string) => ({ id, name: id, state: 'enrolled' as const, boxPublicKey: new Uint8Array(32), certSerial: id, enrolledAt: NOW, revokedAt: null, lastSeenAt: null, desiredRevision: 0 });
  await s.write((tx) => {
    tx.insertHost(host('A'));
    tx.insertHost(host('B'));
    tx.insertVolume(vol('v1'));
    tx.upsertGuest(guest({ hostId: 'B', handoffFromHostId: 'A' }));
  });
  t.is(await s.write((tx) => tx.bumpHostRevision('A')), 1);
  t.is(await s.write((tx) => tx.bumpHostRevision('A')), 2);
  await s.write((tx) => tx.updateHost({ ...host('A'), desiredRevision: 0 }));
  t.is(s.getHost('A')?.desiredRevision, 2, 'an update never lowers the revision');
  await t.throwsAsync(s.write((tx) => tx.bumpHostRevision('nope')), { message: /host not found/ });
  t.deepEqual(s.guestsForHost('A').map((g) => g.id), ['g']);
  t.deepEqual(s.guestsForHost('B').map((g) => g.id), ['g']);

  await s.write((tx) => tx.replaceHostReport('A', [status('A', 'running'), { ...status('A', 'running'), guestId: 'made-up' }], [{ volumeId: 'v1', hostId: 'A', keyVersion: 3, phase: 'ready', reason: '', reportedAt: NOW }]));
  t.deepEqual(s.guestStatuses('g').map((x) => [x.hostId, x.phase]), [['A', 'running']]);
  await s.write((tx) => tx.replaceHostReport('A', [status('A', 'stopped')], []));
  t.deepEqual(s.guestStatuses('g').map((x) => [x.hostId, x.phase]), [['A', 'stopped']]);
  t.deepEqual(s.volumeStatuses('v1'), [], 'a new report replaces the old one as a whole');
  await s.close();
});
