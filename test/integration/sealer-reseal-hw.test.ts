/**
 * `virtkm-server reseal` through the hardware sealers: key file -> PKCS#11 (SoftHSM2) ->
 * TPM 2.0 (swtpm, PCR-bound) -> key file, the real server started after each step with the
 * same master key (what it sealed before the first reseal still opens).
 */
import test from 'ava';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, initDataDir, runServerCommand, startServer, tempDir } from '../helpers/server-harness.js';
import { startSoftHsm } from '../helpers/softhsm-harness.js';
import { startSwtpm } from '../helpers/swtpm-harness.js';

test('reseal from a key file to a PKCS#11 token, to the TPM and back keeps the master key', async (t) => {
  const hsm = await startSoftHsm();
  const tpm = await startSwtpm();
  const dir = tempDir();
  try {
    if (hsm.skipReason || tpm.skipReason) {
      t.log(`skipped: ${hsm.skipReason ?? tpm.skipReason}`);
      t.pass();
      return;
    }
    process.env['SOFTHSM2_CONF'] = hsm.conf;
    hsm.initToken('reseal', '135790');
    const pin = hsm.pinFile('pin', '135790');
    const data = join(dir.path, 'data');
    initDataDir(data);
    const keyId = (JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { keyId: string }).keyId;
    const check = async (sealer: string) => {
      const record = JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { sealer: string; keyId: string };
      t.is(record.sealer, sealer);
      t.is(record.keyId, keyId, 'the same master key');
      // The server opens the CA and server keys sealed at init under that master key.
      const server = await startServer(data);
      try {
        const r = await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'host', 'list', '--json']);
        t.is(r.code, 0, r.stderr);
      } finally {
        await server.stop();
      }
    };
    let r = runServerCommand(['reseal', '--data-dir', data, '--to', 'pkcs11', '--pkcs11-uri', hsm.uri('reseal', 'virtkm-kek', pin)]);
    t.is(r.code, 0, r.stderr);
    t.false(existsSync(join(data, 'master.kek')), 'the old key file is removed');
    await check('pkcs11');
    r = runServerCommand(['reseal', '--data-dir', data, '--to', 'tpm2', '--tpm-tcti', tpm.tcti, '--tpm-pcrs', 'sha256:0,7']);
    t.is(r.code, 0, r.stderr);
    await check('tpm2');
    r = runServerCommand(['reseal', '--data-dir', data, '--to', 'keyfile']);
    t.is(r.code, 0, r.stderr);
    t.true(existsSync(join(data, 'master.kek')));
    await check('keyfile');
  } finally {
    await tpm.stop();
    hsm.remove();
    dir.remove();
  }
});
