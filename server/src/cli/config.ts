/**
 * Where the CLI finds its server and credentials: flags, then VIRTKM_SERVER /
 * VIRTKM_CREDENTIALS, then a JSON config file ({"server": ..., "credentials": ...}) named by
 * --config, VIRTKM_CONFIG, or ~/.config/virtkm/config.json.
 */
import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { errors } from '../../../shared/src/errors.js';

/** Resolved connection settings. */
export interface CliConnection {
  server: string;
  credentialsPath: string;
}

const KNOWN_KEYS = new Set(['server', 'credentials']);

/** Reads and validates a config file. */
function readConfigFile(path: string): { server?: string; credentials?: string } {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch {
    throw errors.invalid(`cannot read config file ${path}`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw errors.invalid(`config file ${path} must hold a JSON object`);
  for (const [k, v] of Object.entries(parsed)) {
    if (!KNOWN_KEYS.has(k)) throw errors.invalid(`config file ${path}: unknown key "${k}"`);
    if (typeof v !== 'string') throw errors.invalid(`config file ${path}: "${k}" must be a string`);
  }
  return parsed as { server?: string; credentials?: string };
}

/** Resolves the connection from flags, environment and config file, in that order. */
export function resolveConnection(flags: { server?: string; credentials?: string; config?: string }, env: Record<string, string | undefined>): CliConnection {
  const configPath = flags.config ?? env['VIRTKM_CONFIG'] ?? join(env['HOME'] ?? homedir(), '.config', 'virtkm', 'config.json');
  const complete = (flags.server ?? env['VIRTKM_SERVER']) && (flags.credentials ?? env['VIRTKM_CREDENTIALS']);
  // The default config file is read only when flags and environment leave something open.
  const file = flags.config || env['VIRTKM_CONFIG'] || (!complete && existsSync(configPath)) ? readConfigFile(configPath) : {};
  const server = flags.server ?? env['VIRTKM_SERVER'] ?? file.server;
  const credentialsPath = flags.credentials ?? env['VIRTKM_CREDENTIALS'] ?? file.credentials;
  if (!server) throw errors.invalid('no server address', { hint: 'pass --server HOST:PORT or set VIRTKM_SERVER' });
  if (!credentialsPath) throw errors.invalid('no credentials', { hint: 'pass --credentials FILE (for example DATA_DIR/admin.pem) or set VIRTKM_CREDENTIALS' });
  return { server, credentialsPath };
}
