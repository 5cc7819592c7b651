/**
 * Test harness for real `virtkm-agent` processes: enrollment with the agent itself, start
 * (optionally inside another host's mount namespace), and polling helpers.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { DIST, type RunResult } from './server-harness.js';

export const AGENT_BIN = join(DIST, 'host-agent', 'src', 'bin', 'virtkm-agent.js');

/** A free TCP port on 127.0.0.1 (for a server that must come back on the same address). */
export function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** A running agent process. */
export interface AgentProcess {
  proc: ChildProcess;
  logs: () => string;
}

/** Starts `virtkm-agent run`; `prefix` (e.g. nsenter ...) runs it on another "host". */
export function startAgent(stateDir: string, imageDir: string, server: string, prefix: string[] = []): AgentProcess {
  const argv = [...prefix, process.execPath, AGENT_BIN, 'run', '--state-dir', stateDir, '--image-dir', imageDir, '--server', server, '--log-level', 'debug'];
  const proc = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let logs = '';
  proc.stdout!.on('data', (d: Buffer) => (logs += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (logs += d.toString()));
  return { proc, logs: () => logs };
}

/** Enrolls a state directory with `virtkm-agent enroll`, the token passed in a 0600 file. */
export async function enrollAgent(admin: (...args: string[]) => Promise<RunResult>, enrollAddress: string, dir: string, host: string): Promise<string> {
  const token = (JSON.parse((await admin('host', 'token', 'create', host, '--json')).stdout) as { token: string }).token;
  const tokenFile = join(dir, `${host}.token`);
  writeFileSync(tokenFile, token, { mode: 0o600 });
  const state = join(dir, `${host}-state`);
  const r = spawnSync(process.execPath, [AGENT_BIN, 'enroll', '--server', enrollAddress, '--token-file', tokenFile, '--state-dir', state], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`enroll failed: ${r.stderr}`);
  return state;
}

/** Polls `fn` until it returns something other than undefined/false. */
export async function until<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 90_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}
