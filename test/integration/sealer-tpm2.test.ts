/**
 * The TPM 2.0 sealer with a real software TPM (swtpm + tpm2-tools, started by
 * test/helpers/swtpm-harness.ts): the server's master key sealed to the TPM and bound to
 * PCRs (init, restart of the real process, use), a changed PCR and another TPM refused
 * clearly with nothing changed, and the agent's host key sealed to the TPM (enroll, the
 * agent opens its sealed cache at start; a changed PCR stops it).
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, initDataDir, runServerCommand, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';
import { startSwtpm, type Swtpm } from '../helpers/swtpm-harness.js';
import { agentCommand, agentStarts, seedCache, tokenFile } from '../helpers/host-key-check.js';

const test = anyTest as TestFn;

/** Registers a serial test with a fresh swtpm, or a visibly skipped one when swtpm cannot run. */
function tpmTest(title: string, fn: (t: ExecutionContext, tpm: Swtpm) => Promise<void>): void {
  test.serial(title, async (t) => {
    const tpm = await startSwtpm();
    if (tpm.skipReason) {
      t.log(`skipped: ${tpm.skipReason}`);
      t.pass();
      return;
    }
    try {
      await fn(t, tpm);
    } finally {
      await tpm.stop();
    }
  });
}

const extendPcr7 = (tpm: Swtpm) => tpm.tool('tpm2_pcrextend', [`7:sha256=${'ab'.repeat(32)}`]);

/** Hosts named in token.create audit entries: written before a restart, read after it. */
async function hostNames(address: string, data: string): Promise<string[]> {
  const r = await cli(['--server', address, '--credentials', join(data, 'admin.pem'), 'audit', 'list', '--action', 'host.token.create', '--json']);
  if (r.code !== 0) throw new Error(r.stderr);
  return (JSON.parse(r.stdout) as { target: string }[]).map((e) => e.target);
}

tpmTest('the master key sealed to the TPM and PCRs: init, restart, changed PCR and another TPM refused', async (t, tpm) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  let server: ServerProcess | undefined;
  try {
    const init = initDataDir(data, ['--sealer', 'tpm2', '--tpm-tcti', tpm.tcti, '--tpm-pcrs', 'sha256:7,0']);
    t.regex(init.stdout, /master key sealed by: TPM 2\.0 bound to PCRs sha256:0,7/);
    t.false(existsSync(join(data, 'master.kek')), 'no key file');
    const record = JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { sealer: string; params: Record<string, string> };
    t.is(record.sealer, 'tpm2');
    t.is(record.params['tcti'], tpm.tcti);
    t.is(record.params['pcrs'], 'sha256:0,7');

    server = await startServer(data);
    t.is((await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'host', 'token', 'create', 'hv1'])).code, 0);
    t.is(await server.stop(), 0);
    server = await startServer(data);
    t.deepEqual(await hostNames(server.address, data), ['hv1']);
    t.is(await server.stop(), 0);

    const before = readFileSync(join(data, 'master-key.json'));
    const files = readdirSync(data).sort();
    // A PCR the key is bound to changes (another boot chain): refused, nothing changed.
    extendPcr7(tpm);
    let run = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
    t.not(run.code, 0);
    t.regex(run.stderr, /PCR values differ from those the key was sealed to/);
    t.true(readFileSync(join(data, 'master-key.json')).equals(before));
    // A reboot resets the PCRs to what they were at sealing: the server starts again.
    await tpm.restart();
    server = await startServer(data);
    t.deepEqual(await hostNames(server.address, data), ['hv1']);
    t.is(await server.stop(), 0);

    // Another TPM on the same address (a fresh swtpm: other seeds): refused.
    const other = await startSwtpm();
    try {
      const moved = JSON.parse(before.toString('utf8')) as { params: Record<string, string> };
      moved.params['tcti'] = other.tcti;
      writeFileSync(join(data, 'master-key.json'), JSON.stringify(moved, null, 2) + '\n', { mode: 0o600 });
      const movedBytes = readFileSync(join(data, 'master-key.json'));
      run = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
      t.not(run.code, 0);
      t.regex(run.stderr, /this TPM did not seal the key/);
      t.true(readFileSync(join(data, 'master-key.json')).equals(movedBytes), 'nothing rewritten');
    } finally {
      await other.stop();
    }
    // No TPM at all: unavailable, clearly.
    run = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
    t.not(run.code, 0);
    t.regex(run.stderr, /the TPM cannot be reached/);
    t.deepEqual(readdirSync(data).sort(), files, 'no file added or removed');
  } finally {
    await server?.stop();
    dir.remove();
  }
});

tpmTest('init with bad TPM options, or without a reachable TPM, refuses and leaves nothing', async (t, tpm) => {
  const dir = tempDir();
  try {
    const cases: [string[], RegExp][] = [
      [['--tpm-tcti', tpm.tcti, '--tpm-pcrs', 'sha256:24'], /PCR index "24" is not 0 to 23/],
      [['--tpm-tcti', 'device:/dev/tpm0;x'], /TPM TCTI must look like/],
      [['--tpm-tcti', 'swtpm:host=127.0.0.1,port=1'], /the TPM cannot be reached/],
      [['--tpm-tcti', tpm.tcti, '--pin-file', '/x'], /apply to --sealer pkcs11 only/],
    ];
    for (const [i, [args, re]] of cases.entries()) {
      const data = join(dir.path, `data-${i}`);
      const r = runServerCommand(['init', '--data-dir', data, '--sealer', 'tpm2', ...args]);
      t.not(r.code, 0, args.join(' '));
      t.regex(r.stderr, re);
      t.false(existsSync(data), 'nothing created');
    }
  } finally {
    dir.remove();
  }
});

tpmTest('the agent host key sealed to the TPM: enroll, the agent opens its sealed cache, a changed PCR stops it', async (t, tpm) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  initDataDir(data);
  const server = await startServer(data);
  try {
    const state = join(dir.path, 'state');
    const token = await tokenFile(server, data, dir.path, 'hv1');
    const ok = agentCommand(['enroll', '--server', server.enrollAddress, '--token-file', token, '--state-dir', state, '--host-key-sealer', 'tpm2', '--tpm-tcti', tpm.tcti, '--tpm-pcrs', 'sha256:7']);
    t.is(ok.code, 0, ok.stderr);
    t.deepEqual(readdirSync(state).sort(), ['box-key', 'ca.pem', 'cert.pem', 'host-key.json', 'host.json', 'tls-key.pem']);
    const record = JSON.parse(readFileSync(join(state, 'host-key.json'), 'utf8')) as { sealer: string; params: { pcrs: string } };
    t.is(record.sealer, 'tpm2');
    t.is(record.params.pcrs, 'sha256:7');

    await seedCache(state);
    const images = join(dir.path, 'images');
    const started = await agentStarts(state, images, server.address);
    t.true(started.ready, started.logs);
    t.false(existsSync(join(state, 'cache.key')), 'no host key file');

    extendPcr7(tpm);
    const refused = await agentStarts(state, images, server.address);
    t.false(refused.ready);
    t.regex(refused.logs, /PCR values differ from those the key was sealed to/);
  } finally {
    await server.stop();
    dir.remove();
  }
});
