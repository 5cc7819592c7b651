/**
 * `virtkm-agent enroll` against the real server: keys and certificate in a 0600 state
 * directory, one-time tokens, CA pinning, and a host that shows up in `virtkm host list`.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseEnrollmentToken, formatEnrollmentToken } from '../../shared/src/enrollment-token.js';
import { DIST, cli, initDataDir, startServer, tempDir } from '../helpers/server-harness.js';

const AGENT_BIN = join(DIST, 'host-agent', 'src', 'bin', 'virtkm-agent.js');
const agent = (...args: string[]) => {
  const r = spawnSync(process.execPath, [AGENT_BIN, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
};

test('an agent enrolls once with a token; reuse, a foreign CA pin and a second enroll are refused', async (t) => {
  const dir = tempDir();
  const data = join(dir.path, 'data');
  initDataDir(data);
  const server = await startServer(data);
  const admin = (...args: string[]) => cli(['--server', server.address, '--credentials', join(data, 'admin.pem'), ...args]);
  try {
    const tok = JSON.parse((await admin('host', 'token', 'create', 'hv1', '--json')).stdout) as { token: string; enroll_address: string };
    t.is(tok.enroll_address, server.enrollAddress);
    const tokenFile = join(dir.path, 'token');
    writeFileSync(tokenFile, tok.token + '\n', { mode: 0o600 });

    // A token whose CA pin names another CA is refused before anything is sent.
    const parsed = parseEnrollmentToken(tok.token);
    const forged = formatEnrollmentToken({ ...parsed, caFingerprint: 'ab'.repeat(32) });
    const forgedFile = join(dir.path, 'forged');
    writeFileSync(forgedFile, forged, { mode: 0o600 });
    const pinned = agent('enroll', '--server', server.enrollAddress, '--token-file', forgedFile, '--state-dir', join(dir.path, 'forged-state'));
    t.is(pinned.code, 1);
    t.regex(pinned.stderr, /does not present the CA the token names/);
    t.false(existsSync(join(dir.path, 'forged-state')), 'nothing is written when enrollment fails');

    const state = join(dir.path, 'state');
    const ok = agent('enroll', '--server', server.enrollAddress, '--token-file', tokenFile, '--state-dir', state);
    t.is(ok.code, 0, ok.stderr);
    t.regex(ok.stdout, /enrolled host hv1/);
    t.deepEqual(readdirSync(state).sort(), ['box-key', 'ca.pem', 'cert.pem', 'host.json', 'tls-key.pem']);
    t.is(statSync(state).mode & 0o777, 0o700);
    t.is(statSync(join(state, 'tls-key.pem')).mode & 0o777, 0o600);
    t.is(statSync(join(state, 'box-key')).mode & 0o777, 0o600);
    t.is(readFileSync(join(state, 'box-key')).length, 64);
    const host = JSON.parse(readFileSync(join(state, 'host.json'), 'utf8')) as { host: string; host_id: string };
    t.is(host.host, 'hv1');

    const again = agent('enroll', '--server', server.enrollAddress, '--token-file', tokenFile, '--state-dir', join(dir.path, 'state2'));
    t.is(again.code, 1);
    t.regex(again.stderr, /invalid or expired enrollment token/);
    const twice = agent('enroll', '--server', server.enrollAddress, '--token-file', tokenFile, '--state-dir', state);
    t.is(twice.code, 1);
    t.regex(twice.stderr, /already exists/);

    const hosts = JSON.parse((await admin('host', 'list', '--json')).stdout) as { name: string; id: string; state: string }[];
    t.deepEqual(hosts.map((h) => [h.name, h.id, h.state]), [['hv1', host.host_id, 'enrolled']]);
    const audit = JSON.parse((await admin('audit', 'list', '--action', 'host.enroll', '--json')).stdout) as { outcome: string }[];
    t.deepEqual(audit.map((e) => e.outcome).sort(), ['denied', 'ok']);
    // A second token for an enrolled host is refused until it is revoked.
    t.is((await admin('host', 'token', 'create', 'hv1')).code, 1);
    t.is((await admin('host', 'revoke', 'hv1')).code, 0);
    t.is((await admin('host', 'token', 'create', 'hv1')).code, 0);
  } finally {
    await server.stop();
    dir.remove();
  }
});
