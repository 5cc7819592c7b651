/**
 * Shared steps of the hardware sealer tests for the agent's host key: enroll with a
 * sealer, fill the sealed key cache through the unsealed host key, and start the real
 * agent to see whether it opens its cache.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { destroyWrappingKey, generateWrappingKey } from '../../shared/src/envelope.js';
import { unsealKey } from '../../shared/src/kek/sealed-secret.js';
import { randomSecret } from '../../shared/src/secret-bytes.js';
import { loadSodium } from '../../shared/src/sodium.js';
import { openKeyCache } from '../../host-agent/src/cache/key-cache.js';
import { HOST_KEY_PURPOSE } from '../../host-agent/src/enroll/host-key.js';
import { AGENT_BIN, startAgent } from './agent-harness.js';
import { cli, type RunResult, type ServerProcess } from './server-harness.js';

/** Runs `virtkm-agent ARGS` to completion. */
export function agentCommand(args: string[]): RunResult {
  const r = spawnSync(process.execPath, [AGENT_BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** A one-time enrollment token for `host`, in a 0600 file. */
export async function tokenFile(server: ServerProcess, dataDir: string, dir: string, host: string): Promise<string> {
  const r = await cli(['--server', server.address, '--credentials', join(dataDir, 'admin.pem'), 'host', 'token', 'create', host, '--json']);
  if (r.code !== 0) throw new Error(`token create failed: ${r.stderr}`);
  const path = join(dir, `${host}.token`);
  writeFileSync(path, (JSON.parse(r.stdout) as { token: string }).token, { mode: 0o600 });
  return path;
}

/**
 * Writes a key cache with one entry, sealed under the host key unsealed from host-key.json
 * (or under a random key when `foreign`), as the agent would have written it.
 */
export async function seedCache(state: string, foreign = false): Promise<void> {
  await loadSodium();
  const host = JSON.parse(readFileSync(join(state, 'host.json'), 'utf8')) as { host_id: string };
  const key = foreign ? generateWrappingKey() : await unsealKey(JSON.parse(readFileSync(join(state, 'host-key.json'), 'utf8')), HOST_KEY_PURPOSE);
  rmSync(join(state, 'key-cache'), { force: true });
  const cache = openKeyCache(join(state, 'key-cache'), key, host.host_id);
  cache.replace([{ volumeId: 'vol-1', keyVersion: 1, guestIds: ['guest-1'], secret: randomSecret(32) }]);
  cache.close();
  destroyWrappingKey(key);
}

/** Starts the agent and waits until it is ready or has exited (then stops it). */
export async function agentStarts(state: string, imageDir: string, server: string, env: Record<string, string> = {}): Promise<{ ready: boolean; logs: string }> {
  const saved = { ...process.env };
  Object.assign(process.env, env);
  const agent = startAgent(state, imageDir, server);
  process.env = saved;
  const exited = new Promise<void>((r) => agent.proc.once('exit', () => r()));
  const deadline = Date.now() + 60_000;
  let ready = false;
  while (Date.now() < deadline) {
    if (agent.logs().includes('"event":"ready"')) {
      ready = true;
      break;
    }
    if (agent.proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (agent.proc.exitCode === null) {
    agent.proc.kill('SIGTERM');
    const timer = setTimeout(() => agent.proc.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
  return { ready, logs: agent.logs() };
}
