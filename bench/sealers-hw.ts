/**
 * Benchmark of the hardware master key sealers (issue 5): unseal time with a key in a
 * PKCS#11 token (SoftHSM2) and with the TPM 2.0 (swtpm + tpm2-tools), next to the key-file
 * unseal as the ceiling, all on data directories made by a real `virtkm-server init`.
 *
 *   node dist/bench/sealers-hw.js [--unseal-runs 5]
 *
 * pkcs11  load the module, find the token, log in with the PIN file, AES-GCM-decrypt the
 *         wrapped KEK inside the token, finalise; then open the envelope;
 * tpm2    tpm2_createprimary, tpm2_load, tpm2_unseal (with and without a PCR policy),
 *         each a process of its own, plus tpm2_flushcontext after each (no resource
 *         manager in front of swtpm); then open the envelope.
 * ceiling the key-file sealer's unseal (read two files, open the envelope).
 * Median of --unseal-runs each. bench/master-key.ts may import hardwareUnsealRows() to
 * print these rows in its own table. SoftHSM2 and swtpm are set up (and installed when
 * missing) by the test harnesses; a sealer that cannot run here is reported as skipped.
 */
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { destroyWrappingKey } from '../shared/src/envelope.js';
import { loadSodium } from '../shared/src/sodium.js';
import { readMasterKeyFile } from '../server/src/master-key/master-key-file.js';
import { keyFileSealer } from '../server/src/master-key/sealers.js';
import { pkcs11Sealer } from '../server/src/master-key/pkcs11-sealer.js';
import { tpmSealer } from '../server/src/master-key/tpm-sealer.js';
import { initDataDir, tempDir } from '../test/helpers/server-harness.js';
import { startSoftHsm } from '../test/helpers/softhsm-harness.js';
import { startSwtpm } from '../test/helpers/swtpm-harness.js';

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function timeRuns(runs: number, fn: () => Promise<unknown>): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await fn();
    times.push(performance.now() - t0);
  }
  return median(times);
}

/** Rows [measurement, result, ceiling] of the hardware sealers' unseal times. */
export async function hardwareUnsealRows(runs = 5): Promise<string[][]> {
  await loadSodium();
  const dir = tempDir('virtkm-bench-hw-');
  const rows: string[][] = [];
  const hsm = await startSoftHsm();
  const tpm = await startSwtpm();
  try {
    const kf = join(dir.path, 'kf');
    initDataDir(kf);
    const ceiling = await timeRuns(runs, async () => destroyWrappingKey(await keyFileSealer(join(kf, 'master.kek')).unseal(await readMasterKeyFile(kf))));
    const ceilingText = `key file unseal: ${ceiling.toFixed(2)} ms`;

    if (hsm.skipReason) {
      rows.push(['unseal, PKCS#11 (SoftHSM2)', `skipped: ${hsm.skipReason}`, ceilingText]);
    } else {
      process.env['SOFTHSM2_CONF'] = hsm.conf;
      hsm.initToken('bench', '123456');
      const pin = hsm.pinFile('pin', '123456');
      const p11 = join(dir.path, 'p11');
      initDataDir(p11, ['--sealer', 'pkcs11', '--pkcs11-uri', hsm.uri('bench', 'virtkm-kek', pin)]);
      const record = await readMasterKeyFile(p11);
      const t = await timeRuns(runs, async () => destroyWrappingKey(await pkcs11Sealer({}).unseal(record)));
      rows.push(['unseal, PKCS#11 (SoftHSM2 2.6, AES-256-GCM in the token)', `${t.toFixed(2)} ms`, ceilingText]);
    }

    if (tpm.skipReason) {
      rows.push(['unseal, TPM 2.0 (swtpm)', `skipped: ${tpm.skipReason}`, ceilingText]);
    } else {
      for (const pcrs of [undefined, 'sha256:0,7']) {
        const d = join(dir.path, `tpm-${pcrs ? 'pcr' : 'plain'}`);
        initDataDir(d, ['--sealer', 'tpm2', '--tpm-tcti', tpm.tcti, ...(pcrs ? ['--tpm-pcrs', pcrs] : [])]);
        const record = await readMasterKeyFile(d);
        const t = await timeRuns(runs, async () => destroyWrappingKey(await tpmSealer().unseal(record)));
        rows.push([`unseal, TPM 2.0 (swtpm, tpm2-tools${pcrs ? `, PCR policy ${pcrs}` : ''})`, `${t.toFixed(1)} ms`, ceilingText]);
      }
    }
  } finally {
    await tpm.stop();
    hsm.remove();
    dir.remove();
  }
  return rows;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { 'unseal-runs': { type: 'string', default: '5' } } });
  const rows = await hardwareUnsealRows(Number(values['unseal-runs']));
  process.stdout.write(`| measurement | result | ceiling (same run) |\n|---|---|---|\n${rows.map((x) => `| ${x.join(' | ')} |`).join('\n')}\n`);
}
