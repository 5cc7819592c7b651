/**
 * Test harness: real `virtkm-server` processes in temporary data directories, the CLI run
 * in-process, and gRPC clients with real certificates.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { main as cliMain } from '../../server/src/cli/main.js';
import { connectClients, type ApiClients } from '../../server/src/cli/clients.js';
import { parseCredentialBundle } from '../../shared/src/pki.js';
import { silenceIpServernameWarning } from '../../shared/src/warnings.js';

// The in-process CLI talks to 127.0.0.1: keep the test output free of DEP0123 noise.
silenceIpServernameWarning();

const here = dirname(fileURLToPath(import.meta.url));
/** dist/ root (this file runs from dist/test/helpers). */
export const DIST = resolve(here, '..', '..');
export const SERVER_BIN = join(DIST, 'server', 'src', 'bin', 'virtkm-server.js');
export const CLI_BIN = join(DIST, 'server', 'src', 'bin', 'virtkm.js');

/** A temporary directory removed by the returned function. */
export function tempDir(prefix = 'virtkm-test-'): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** Result of a finished process or CLI run. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `virtkm-server ARGS` to completion. */
export function runServerCommand(args: string[], input?: string): RunResult {
  const r = spawnSync(process.execPath, [SERVER_BIN, ...args], { encoding: 'utf8', input: input ?? '', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Initialises a data directory (key-file sealer unless args say otherwise). */
export function initDataDir(dir: string, extraArgs: string[] = []): RunResult {
  const r = runServerCommand(['init', '--data-dir', dir, ...extraArgs]);
  if (r.code !== 0) throw new Error(`init failed (${r.code}): ${r.stderr}`);
  return r;
}

/** A running server process. */
export interface ServerProcess {
  address: string;
  enrollAddress: string;
  dataDir: string;
  proc: ChildProcess;
  /** JSON log lines printed so far (stderr). */
  logs(): string;
  /** SIGTERM and wait for exit; resolves to the exit code. */
  stop(): Promise<number | null>;
}

/**
 * Starts `virtkm-server run` on 127.0.0.1:0 (and an enrollment listener) and waits until
 * ready. `nodeFlags` go to node itself (e.g. --cpu-prof for benchmarks).
 */
export async function startServer(dataDir: string, extraArgs: string[] = [], nodeFlags: string[] = []): Promise<ServerProcess> {
  const proc = spawn(process.execPath, [...nodeFlags, SERVER_BIN, 'run', '--data-dir', dataDir, '--listen', '127.0.0.1:0', '--enroll-listen', '127.0.0.1:0', ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let stdout = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const ready = await new Promise<{ listen: string; enroll: string | null }>((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not ready after 60 s: ${stderr}`)), 60_000);
    proc.stdout!.on('data', (d: Buffer) => {
      stdout += d.toString();
      const line = stdout.split('\n').find((l) => l.includes('"event":"ready"'));
      if (line) {
        clearTimeout(timer);
        resolvePromise(JSON.parse(line) as { listen: string; enroll: string | null });
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code}: ${stderr}`));
    });
  });
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return {
    address: ready.listen,
    enrollAddress: ready.enroll ?? '',
    dataDir,
    proc,
    logs: () => stderr,
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      return exited;
    },
  };
}

/**
 * Waits until the server's log matches `re` (stderr and stdout are separate pipes: a log
 * line written before the ready line may arrive after it).
 */
export async function waitForLog(server: ServerProcess, re: RegExp, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(server.logs())) {
    if (Date.now() > deadline) throw new Error(`log never matched ${re}: ${server.logs()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return server.logs();
}

/** Runs the CLI in-process. */
export async function cli(args: string[], env: Record<string, string | undefined> = {}): Promise<RunResult> {
  let stdout = '';
  let stderr = '';
  const code = await cliMain(args, { stdout: (s) => (stdout += s), stderr: (s) => (stderr += s), env: { HOME: '/nonexistent', ...env } });
  return { code, stdout, stderr };
}

/** gRPC clients authenticated with a credential bundle file. */
export function clientsFor(address: string, credentialFile: string): ApiClients {
  return connectClients(address, parseCredentialBundle(readFileSync(credentialFile, 'utf8')));
}
