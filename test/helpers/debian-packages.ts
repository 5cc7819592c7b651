/**
 * Installs missing Debian packages for a test harness (root only; apt-get update once
 * when an install fails for want of package lists). Returns why it could not, or undefined.
 */
import { spawnSync } from 'node:child_process';

function run(file: string, args: string[], timeoutMs: number): { code: number; out: string } {
  const r = spawnSync(file, args, { encoding: 'utf8', timeout: timeoutMs, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }, stdio: ['ignore', 'pipe', 'pipe'] });
  return { code: r.status ?? -1, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

/** True when `cmd` is on PATH. */
export function hasCommand(cmd: string): boolean {
  return run('sh', ['-c', `command -v "$1"`, 'sh', cmd], 10_000).code === 0;
}

/**
 * Makes sure every command in `commands` exists, installing `packages` with apt-get when one
 * is missing. Returns a skip reason when that is not possible.
 */
export function ensureDebianPackages(packages: string[], commands: string[]): string | undefined {
  if (commands.every(hasCommand)) return undefined;
  if (process.getuid?.() !== 0) return `missing ${commands.filter((c) => !hasCommand(c)).join(', ')} and not root: apt-get install ${packages.join(' ')}`;
  let r = run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...packages], 600_000);
  if (r.code !== 0) {
    run('apt-get', ['update', '-q'], 600_000);
    r = run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...packages], 600_000);
  }
  const missing = commands.filter((c) => !hasCommand(c));
  if (missing.length > 0) return `apt-get install ${packages.join(' ')} did not provide ${missing.join(', ')}: ${r.out.trim().slice(-300)}`;
  return undefined;
}
