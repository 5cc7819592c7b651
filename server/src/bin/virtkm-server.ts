#!/usr/bin/env node
/**
 * Entry point of `virtkm-server`: parses the command line and hands over to the
 * composition roots in app/ (init and run). No logic here.
 */
import { Command } from 'commander';
import { runProgram } from '../../../shared/src/cli-run.js';
import { initCommand } from '../app/init-command.js';
import { runCommand } from '../app/run-command.js';

const program = new Command('virtkm-server')
  .description('virtkm management server')
  .exitOverride()
  .configureOutput({ outputError: (s, write) => write(s.replace(/^error: /, 'virtkm-server: ')) });

program
  .command('init')
  .description('create a data directory: database, master key, internal CA, server certificate, first admin credential')
  .requiredOption('--data-dir <dir>', 'data directory (created, 0700)')
  .option('--passphrase-file <file>', 'seal the master key with this passphrase (Argon2id) instead of a key file')
  .option('--passphrase-prompt', 'seal the master key with a passphrase asked on the terminal')
  .option('--admin-credential <file>', 'where to write the first admin credential (default DIR/admin.pem)')
  .option('--san <name...>', 'extra DNS names or IP addresses for the server certificate')
  .option('--kdf-ops <n>', 'Argon2id opslimit (default: libsodium MODERATE)')
  .option('--kdf-mem-mib <n>', 'Argon2id memlimit in MiB (default: libsodium MODERATE)')
  .action(async (o) => {
    await initCommand(o);
  });

program
  .command('run')
  .description('serve the gRPC API over mutual TLS')
  .requiredOption('--data-dir <dir>', 'data directory made by init')
  .option('--listen <addr>', 'main listener HOST:PORT (mutual TLS)', '127.0.0.1:7443')
  .option('--enroll-listen <addr>', 'enrollment listener HOST:PORT (TLS, token-authenticated); off when not given')
  .option('--passphrase-file <file>', 'passphrase to unseal the master key (when sealed by passphrase)')
  .option('--log-level <level>', 'debug, info, warn or error', 'info')
  .action(async (o) => {
    await runCommand(o);
  });

await runProgram('virtkm-server', program);
