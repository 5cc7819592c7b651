/**
 * Benchmark of the master key (issue 5): unseal time per sealer, and master key rotation
 * time over many volumes, each next to a ceiling measured in the same run.
 *
 *   node dist/bench/master-key.js [--volumes 100000] [--unseal-runs 5]
 *
 * Unseal (in this process, data directories made by a real `virtkm-server init`):
 *   keyfile     read master-key.json + the key file, open the envelope;
 *   passphrase  the same with Argon2id at init's default cost (libsodium MODERATE:
 *               3 passes, 256 MiB);
 *   shamir      3-of-5: read three share files, check each against its commitment,
 *               combine, open the envelope.
 *   ceiling     reading master-key.json and the key file alone (the I/O every sealer does).
 * Median of --unseal-runs each.
 *
 * Rotation: --volumes volumes inserted straight through the store (in units of 500 per
 * transaction; far faster than the API, and the insert is not what is measured), then a
 * real `virtkm-server rotate-master-key` process, timed from spawn to exit (so it includes
 * node's start-up, the unseal, the one rewrap transaction with its fsync, the renames).
 * Ceilings: a bare loop of as many XChaCha20-Poly1305 open+seal of 64-byte secrets with
 * the same AAD shape in this process, and `node -e 0` (process start).
 * Everything lives in a temporary directory removed at the end.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { generateWrappingKey, open, seal, volumeSecretAad } from '../shared/src/envelope.js';
import { loadSodium } from '../shared/src/sodium.js';
import { randomSecret, wipe } from '../shared/src/secret-bytes.js';
import { readMasterKeyFile } from '../server/src/master-key/master-key-file.js';
import { keyFileSealer, passphraseSealer } from '../server/src/master-key/sealers.js';
import { shamirRecordSealer, shareFilesSource } from '../server/src/master-key/shamir-sealer.js';
import { SERVER_BIN, initDataDir, tempDir } from '../test/helpers/server-harness.js';
import { destroyWrappingKey, insertVolumes, unsealDataDir } from '../test/helpers/master-key-helpers.js';

const { values } = parseArgs({ options: { volumes: { type: 'string', default: '100000' }, 'unseal-runs': { type: 'string', default: '5' } } });
const VOLUMES = Number(values.volumes);
const RUNS = Number(values['unseal-runs']);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function timeRuns(fn: () => Promise<unknown>): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t0 = performance.now();
    await fn();
    times.push(performance.now() - t0);
  }
  return median(times);
}

await loadSodium();
const dir = tempDir('virtkm-bench-mk-');
try {
  // --- unseal ---
  const kf = join(dir.path, 'kf');
  initDataDir(kf);
  const pp = join(dir.path, 'pp');
  const passFile = join(dir.path, 'pass');
  writeFileSync(passFile, 'benchmark passphrase\n', { mode: 0o600 });
  initDataDir(pp, ['--passphrase-file', passFile]);
  const sh = join(dir.path, 'sh');
  const init = initDataDir(sh, ['--sealer', 'shamir', '--shares', '5', '--threshold', '3']);
  const shareFiles = [...init.stdout.matchAll(/share (\d): (vkms1[-a-z2-7]+)/g)].slice(0, 3).map((m) => {
    const f = join(dir.path, `share-${m[1]}`);
    writeFileSync(f, m[2]!, { mode: 0o600 });
    return f;
  });

  const ceiling = await timeRuns(async () => {
    readFileSync(join(kf, 'master-key.json'));
    wipe(readFileSync(join(kf, 'master.kek')));
  });
  const keyfile = await timeRuns(async () => destroyWrappingKey(await keyFileSealer(join(kf, 'master.kek')).unseal(await readMasterKeyFile(kf))));
  const passphrase = await timeRuns(async () => destroyWrappingKey(await passphraseSealer({ source: { file: passFile } }).unseal(await readMasterKeyFile(pp))));
  const shamir = await timeRuns(async () => {
    const s = shamirRecordSealer(shareFilesSource(shareFiles));
    destroyWrappingKey(await s.unseal(await readMasterKeyFile(sh)));
    s.dispose();
  });

  // --- rotation ---
  const rot = join(dir.path, 'rot');
  initDataDir(rot);
  const key = await unsealDataDir(rot);
  const tIns = performance.now();
  await insertVolumes(join(rot, 'virtkm.db'), key, VOLUMES);
  const insertS = (performance.now() - tIns) / 1000;
  destroyWrappingKey(key);

  const t0 = performance.now();
  const r = spawnSync(process.execPath, [SERVER_BIN, 'rotate-master-key', '--data-dir', rot], { encoding: 'utf8', timeout: 600_000 });
  const rotateS = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`rotation failed: ${r.stderr}`);
  const t1 = performance.now();
  spawnSync(process.execPath, ['-e', '0']);
  const nodeStartS = (performance.now() - t1) / 1000;

  const a = generateWrappingKey();
  const b = generateWrappingKey();
  const ids = Array.from({ length: VOLUMES }, () => crypto.randomUUID());
  const sealed = ids.map((id) => {
    const s = randomSecret(64);
    const out = seal(s, a, volumeSecretAad(id, 1));
    wipe(s);
    return out;
  });
  const t2 = performance.now();
  for (let i = 0; i < VOLUMES; i++) {
    const aad = volumeSecretAad(ids[i]!, 1);
    const p = open(sealed[i]!, a, aad);
    sealed[i] = seal(p, b, aad);
    wipe(p);
  }
  const loopS = (performance.now() - t2) / 1000;

  const rows = [
    ['unseal, key file', `${keyfile.toFixed(2)} ms`, `read master-key.json + key file: ${ceiling.toFixed(2)} ms`],
    ['unseal, passphrase (Argon2id 3 passes, 256 MiB)', `${passphrase.toFixed(0)} ms`, `read files: ${ceiling.toFixed(2)} ms`],
    ['unseal, Shamir 3-of-5 (3 share files)', `${shamir.toFixed(2)} ms`, `read files: ${ceiling.toFixed(2)} ms`],
    [`rotate-master-key, ${VOLUMES} volumes (process spawn to exit)`, `${rotateS.toFixed(2)} s`, `${VOLUMES} open+seal loop: ${loopS.toFixed(2)} s; node start: ${nodeStartS.toFixed(2)} s`],
  ];
  process.stdout.write(`| measurement | result | ceiling (same run) |\n|---|---|---|\n${rows.map((x) => `| ${x.join(' | ')} |`).join('\n')}\n`);
  process.stdout.write(`(volumes inserted through the store in ${insertS.toFixed(1)} s; not part of the measurement; unseal figures are medians of ${RUNS} runs)\n`);
} finally {
  dir.remove();
}
