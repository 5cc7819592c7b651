/**
 * The PKCS#11 sealer with a real SoftHSM2 token (private configuration, temporary token
 * directory: test/helpers/softhsm-harness.ts): the server's master key sealed by a key in
 * the token (init, restart of the real process, use), a wrong PIN and another token refused
 * clearly with nothing changed, and the agent's host key sealed by the token (enroll, the
 * agent opens its sealed cache at start; a wrong PIN stops it).
 */
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, initDataDir, runServerCommand, startServer, tempDir, type ServerProcess } from '../helpers/server-harness.js';
import { startSoftHsm, type SoftHsm } from '../helpers/softhsm-harness.js';
import { agentCommand, agentStarts, seedCache, tokenFile } from '../helpers/host-key-check.js';

const test = anyTest as TestFn<{ hsm: SoftHsm }>;
const PIN = '246810';

test.before(async (t) => {
  t.context.hsm = await startSoftHsm();
  // The module reads SOFTHSM2_CONF in every process that loads it; children inherit it.
  if (!t.context.hsm.skipReason) process.env['SOFTHSM2_CONF'] = t.context.hsm.conf;
});

test.after.always((t) => {
  t.context.hsm?.remove();
});

/** Registers a serial test, or a visibly skipped one when SoftHSM2 cannot run here. */
function hsmTest(title: string, fn: (t: ExecutionContext<{ hsm: SoftHsm }>, hsm: SoftHsm) => Promise<void>): void {
  test.serial(title, async (t) => {
    const hsm = t.context.hsm;
    if (hsm.skipReason) {
      t.log(`skipped: ${hsm.skipReason}`);
      t.pass();
      return;
    }
    await fn(t, hsm);
  });
}

/** Hosts named in token.create audit entries: written before a restart, read after it. */
async function adminHosts(address: string, data: string): Promise<string[]> {
  const r = await cli(['--server', address, '--credentials', join(data, 'admin.pem'), 'audit', 'list', '--action', 'host.token.create', '--json']);
  if (r.code !== 0) throw new Error(r.stderr);
  return (JSON.parse(r.stdout) as { target: string }[]).map((e) => e.target);
}

hsmTest('the master key sealed by a key in a PKCS#11 token: init, restart, wrong PIN and other token refused', async (t, hsm) => {
  hsm.wipeTokens();
  const serial = hsm.initToken('virtkm', PIN);
  const pinFile = hsm.pinFile('pin', PIN);
  const dir = tempDir();
  const data = join(dir.path, 'data');
  let server: ServerProcess | undefined;
  try {
    // The URI without pin-source: --pin-file puts it in the record.
    const uri = `pkcs11:token=virtkm;object=virtkm-master-kek?module-path=${hsm.module}`;
    const init = initDataDir(data, ['--sealer', 'pkcs11', '--pkcs11-uri', uri, '--pin-file', pinFile]);
    t.regex(init.stdout, /master key sealed by: PKCS#11 token key/);
    t.regex(init.stderr, /created the AES key in the PKCS#11 token/);
    t.false(existsSync(join(data, 'master.kek')), 'no key file');
    const record = JSON.parse(readFileSync(join(data, 'master-key.json'), 'utf8')) as { sealer: string; params: Record<string, string> };
    t.is(record.sealer, 'pkcs11');
    t.is(record.params['uri'], `pkcs11:token=virtkm;object=virtkm-master-kek;type=secret-key?module-path=${hsm.module}&pin-source=file:${pinFile}`);
    t.is(record.params['tokenSerial'], serial);
    t.false(JSON.stringify(record).includes(PIN), 'the PIN is nowhere in the record');

    // The real server unseals with the token, serves, and does so again after a restart.
    server = await startServer(data);
    t.is((await cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), 'host', 'token', 'create', 'hv1'])).code, 0);
    t.is(await server.stop(), 0);
    server = await startServer(data);
    t.deepEqual(await adminHosts(server.address, data), ['hv1']);
    t.is(await server.stop(), 0);

    const before = readFileSync(join(data, 'master-key.json'));
    const filesBefore = readdirSync(data).sort();
    // A wrong PIN: refused clearly, nothing changed.
    writeFileSync(pinFile, '999999\n', { mode: 0o600 });
    let run = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
    t.not(run.code, 0);
    t.regex(run.stderr, /wrong PIN for the PKCS#11 token/);
    t.false(run.stderr.includes('999999'));
    writeFileSync(pinFile, `${PIN}\n`, { mode: 0o600 });
    // Another token under the same label (an HSM replaced): refused by its serial number.
    const saved = join(dir.path, 'tokens-saved');
    cpSync(hsm.tokenDir, saved, { recursive: true });
    hsm.wipeTokens();
    hsm.initToken('virtkm', PIN);
    run = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
    t.not(run.code, 0);
    t.regex(run.stderr, /not the one that sealed this key/);
    // The token without the key (another key created under that label would not open it either).
    rmSync(hsm.tokenDir, { recursive: true, force: true });
    mkdirSync(hsm.tokenDir, { mode: 0o700 });
    run = runServerCommand(['run', '--data-dir', data, '--listen', '127.0.0.1:0']);
    t.not(run.code, 0);
    t.regex(run.stderr, /no PKCS#11 token matches the URI/);
    t.true(readFileSync(join(data, 'master-key.json')).equals(before), 'master-key.json unchanged');
    t.deepEqual(readdirSync(data).sort(), filesBefore, 'no file added or removed');
    // The original token back: the server starts again.
    rmSync(hsm.tokenDir, { recursive: true, force: true });
    cpSync(saved, hsm.tokenDir, { recursive: true });
    server = await startServer(data);
    t.deepEqual(await adminHosts(server.address, data), ['hv1']);
    t.is(await server.stop(), 0);
  } finally {
    await server?.stop();
    dir.remove();
  }
});

hsmTest('init with a bad PKCS#11 URI, a loose PIN file or a wrong PIN refuses and leaves nothing', async (t, hsm) => {
  hsm.wipeTokens();
  hsm.initToken('virtkm', PIN);
  const dir = tempDir();
  try {
    const pinFile = hsm.pinFile('pin2', PIN);
    const cases: [string[], RegExp][] = [
      [['--pkcs11-uri', `pkcs11:token=virtkm;object=k?module-path=${hsm.module}&pin-value=${PIN}`], /pin-value is not accepted/],
      [['--pkcs11-uri', 'pkcs11:token=virtkm;object=k', '--pin-file', pinFile], /module-path is required/],
      [['--pkcs11-uri', `pkcs11:token=nosuch;object=k?module-path=${hsm.module}`, '--pin-file', pinFile], /no PKCS#11 token matches the URI/],
      [['--pkcs11-uri', `pkcs11:token=virtkm;object=k?module-path=${hsm.module}`, '--pin-file', hsm.pinFile('bad-pin', '000000')], /wrong PIN for the PKCS#11 token/],
      [['--pkcs11-uri', `pkcs11:token=virtkm;object=k?module-path=/nonexistent/module.so`, '--pin-file', pinFile], /module named by module-path does not exist/],
      [['--pkcs11-uri', `pkcs11:token=virtkm;object=k?module-path=${hsm.module}`], /a PIN file is required/],
    ];
    for (const [i, [args, re]] of cases.entries()) {
      const data = join(dir.path, `data-${i}`);
      const r = runServerCommand(['init', '--data-dir', data, '--sealer', 'pkcs11', ...args]);
      t.not(r.code, 0, args.join(' '));
      t.regex(r.stderr, re);
      t.false(r.stderr.includes(PIN), 'no PIN in messages');
      t.false(existsSync(data), 'nothing created');
    }
    const loose = hsm.pinFile('loose-pin', PIN);
    const { chmodSync } = await import('node:fs');
    chmodSync(loose, 0o644);
    const r = runServerCommand(['init', '--data-dir', join(dir.path, 'data-loose'), '--sealer', 'pkcs11', '--pkcs11-uri', `pkcs11:token=virtkm;object=k?module-path=${hsm.module}`, '--pin-file', loose]);
    t.not(r.code, 0);
    t.regex(r.stderr, /PIN file is accessible by group or others/);
  } finally {
    dir.remove();
  }
});

hsmTest('the agent host key sealed by the token: enroll, the agent opens its sealed cache, a wrong PIN stops it', async (t, hsm) => {
  hsm.wipeTokens();
  hsm.initToken('hostkeys', PIN);
  const pinFile = hsm.pinFile('agent-pin', PIN);
  const dir = tempDir();
  const data = join(dir.path, 'data');
  initDataDir(data);
  const server = await startServer(data);
  try {
    const state = join(dir.path, 'state');
    const uri = `pkcs11:token=hostkeys;object=virtkm-host-key?module-path=${hsm.module}`;
    // Bad sealer options are refused before the one-time token is spent.
    const token = await tokenFile(server, data, dir.path, 'hv1');
    const bad = agentCommand(['enroll', '--server', server.enrollAddress, '--token-file', token, '--state-dir', state, '--host-key-sealer', 'pkcs11', '--pkcs11-uri', uri, '--pin-file', hsm.pinFile('wrong', '111111')]);
    t.not(bad.code, 0);
    t.regex(bad.stderr, /wrong PIN for the PKCS#11 token/);
    t.false(existsSync(state));
    const ok = agentCommand(['enroll', '--server', server.enrollAddress, '--token-file', token, '--state-dir', state, '--host-key-sealer', 'pkcs11', '--pkcs11-uri', uri, '--pin-file', pinFile]);
    t.is(ok.code, 0, ok.stderr);
    t.deepEqual(readdirSync(state).sort(), ['box-key', 'ca.pem', 'cert.pem', 'host-key.json', 'host.json', 'tls-key.pem']);
    const record = JSON.parse(readFileSync(join(state, 'host-key.json'), 'utf8')) as { sealer: string; purpose: string };
    t.is(record.sealer, 'pkcs11');
    t.is(record.purpose, 'agent-host-key');

    await seedCache(state);
    const images = join(dir.path, 'images');
    const started = await agentStarts(state, images, server.address);
    t.true(started.ready, started.logs);
    t.false(existsSync(join(state, 'cache.key')), 'no host key file');

    writeFileSync(pinFile, '123123\n', { mode: 0o600 });
    const refused = await agentStarts(state, images, server.address);
    t.false(refused.ready);
    t.regex(refused.logs, /wrong PIN for the PKCS#11 token/);
    writeFileSync(pinFile, `${PIN}\n`, { mode: 0o600 });
    // A cache sealed under another key is not opened with this host key.
    await seedCache(state, true);
    const foreign = await agentStarts(state, images, server.address);
    t.false(foreign.ready);
    t.regex(foreign.logs, /key cache does not open with this host key/);
  } finally {
    await server.stop();
    dir.remove();
  }
});
