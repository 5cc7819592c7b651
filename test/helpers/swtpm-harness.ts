/**
 * Test harness for a software TPM 2.0: swtpm (installed with swtpm, swtpm-tools and
 * tpm2-tools when missing) started as a child process on two free loopback ports with a
 * temporary state directory; tpm2-tools reach it through the TCTI
 * `swtpm:host=127.0.0.1,port=P` (the control channel is then P + 1). Each startSwtpm()
 * is a different TPM (its own seeds).
 *
 *   const tpm = await startSwtpm();   // tpm.skipReason when it cannot run
 *   ... tpm.tcti ...
 *   await tpm.stop();                 // kills swtpm, removes its state
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from './agent-harness.js';
import { ensureDebianPackages } from './debian-packages.js';

/** A running swtpm. */
export interface Swtpm {
  /** Set when swtpm cannot be used here; the other fields are then meaningless. */
  skipReason: string | undefined;
  tcti: string;
  port: number;
  /** Runs a tpm2-tools command against this TPM (e.g. tpm2_pcrextend); throws on failure. */
  tool(name: string, args: string[]): string;
  /** Stops swtpm (SIGTERM, then SIGKILL) and removes its state directory. */
  stop(): Promise<void>;
  /** Stops swtpm and starts it again on the same port with the same state (a reboot: PCRs reset). */
  restart(): Promise<void>;
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port }, () => {
      // Closed at once, not end(): swtpm serves one connection at a time, and a graceful
      // end still queued when a caller blocks its event loop (spawnSync) would hold it.
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
    s.setTimeout(1000, () => {
      s.destroy();
      resolve(false);
    });
  });
}

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/** A free port P on 127.0.0.1 whose P + 1 is free too. */
async function freePortPair(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const p = await freePort();
    if (p < 65535 && (await portFree(p + 1))) return p;
  }
  throw new Error('no two consecutive free ports found');
}

/** Starts a fresh swtpm (installing the packages when missing). Never throws. */
export async function startSwtpm(): Promise<Swtpm> {
  const none: Swtpm = {
    skipReason: undefined,
    tcti: '',
    port: 0,
    tool: () => '',
    stop: async () => undefined,
    restart: async () => undefined,
  };
  const missing = ensureDebianPackages(['swtpm', 'swtpm-tools', 'tpm2-tools'], ['swtpm', 'tpm2_createprimary', 'tpm2_unseal']);
  if (missing) return { ...none, skipReason: missing };
  const stateDir = mkdtempSync(join(tmpdir(), 'virtkm-swtpm-'));
  // The swtpm TCTI finds the control channel at port + 1.
  const port = await freePortPair();
  const ctrlPort = port + 1;
  const tcti = `swtpm:host=127.0.0.1,port=${port}`;
  let child: ChildProcess | undefined;
  const logPath = `${stateDir}.log`;
  const logFd = openSync(logPath, 'a', 0o600);

  const launch = async (): Promise<string | undefined> => {
    const proc = spawn(
      'swtpm',
      ['socket', '--tpm2', '--tpmstate', `dir=${stateDir}`, '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`, '--ctrl', `type=tcp,port=${ctrlPort},bindaddr=127.0.0.1`, '--flags', 'not-need-init,startup-clear'],
      // Output to a file, not a pipe: tests block their event loop in spawnSync (the
      // server's init) and a pipe nobody drains would stall swtpm.
      { stdio: ['ignore', logFd, logFd] },
    );
    child = proc;
    const readLog = () => readFileSync(logPath, 'utf8');
    const deadline = Date.now() + 15_000;
    while (!(await canConnect(port))) {
      if (proc.exitCode !== null) return `swtpm exited with ${proc.exitCode}: ${readLog().trim().slice(-300)}`;
      if (Date.now() > deadline) return `swtpm did not listen on port ${port} within 15 s: ${readLog().trim().slice(-300)}`;
      await new Promise((r) => setTimeout(r, 50));
    }
    return undefined;
  };

  const kill = async (): Promise<void> => {
    const proc = child;
    child = undefined;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const gone = new Promise<void>((r) => proc.once('exit', () => r()));
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await gone;
    clearTimeout(timer);
  };

  const failed = await launch();
  if (failed) {
    await kill();
    closeSync(logFd);
    rmSync(stateDir, { recursive: true, force: true });
    rmSync(logPath, { force: true });
    return { ...none, skipReason: failed };
  }
  return {
    skipReason: undefined,
    tcti,
    port,
    tool(name, args) {
      const r = spawnSync(name, [...args, '-T', tcti], { encoding: 'utf8', timeout: 60_000 });
      spawnSync('tpm2_flushcontext', ['-t', '-T', tcti], { timeout: 60_000 });
      if (r.status !== 0) throw new Error(`${name} failed: ${r.stderr}`);
      return r.stdout;
    },
    async stop() {
      await kill();
      closeSync(logFd);
      rmSync(stateDir, { recursive: true, force: true });
      rmSync(logPath, { force: true });
    },
    async restart() {
      await kill();
      const again = await launch();
      if (again) throw new Error(again);
    },
  };
}
