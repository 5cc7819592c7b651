#!/usr/bin/env node
/**
 * Entry point of `virtkm-server`: parses the command line and hands over to the
 * composition roots in app/ (init and run). No logic here.
 */
import { Command } from 'commander';
import { runProgram } from '../../../shared/src/cli-run.js';
import { initCommand } from '../app/init-command.js';
import { runCommand } from '../app/run-command.js';
import { resealCommand } from '../app/reseal-command.js';
import { rotateMasterKeyCommand } from '../app/master-key-rotation.js';
import { SEALER_FACTORIES } from '../master-key/registry.js';

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
  .option('--sealer <kind>', 'how the master key is sealed: keyfile (default), passphrase, pkcs11, tpm2 or shamir')
  .option('--pkcs11-uri <uri>', 'pkcs11: the token key (RFC 7512 URI with module-path; the key is created when missing)')
  .option('--pin-file <file>', "pkcs11: file (0600) holding the token's user PIN (else the URI's pin-source)")
  .option('--tpm-tcti <tcti>', 'tpm2: how to reach the TPM (default device:/dev/tpmrm0)')
  .option('--tpm-pcrs <selection>', 'tpm2: bind to the current values of these PCRs, e.g. sha256:0,7')
  .option('--shares <n>', 'shamir: number of shares (2 to 255), shown once at the end')
  .option('--threshold <k>', 'shamir: shares needed to unseal (2 to --shares)')
  .option('--shares-out-dir <dir>', 'shamir: write each share to its own file there (0600) instead of showing them')
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
  .option('--rotation-interval <duration>', 'how often the rotation scheduler runs (e.g. 30s)', '30s')
  .option('--rotations-per-host <n>', 'rotations one host runs at the same time', '2')
  .option('--key-grace <duration>', 'how long a retired key version is kept before it is destroyed (e.g. 7d)', '7d')
  .option('--durability <mode>', 'how a write is made durable before it is answered: async-wal-sync (default: fdatasync of the WAL off the event loop) or full-sync (SQLite synchronous=FULL)', 'async-wal-sync')
  .option('--memory-lock <mode>', 'lock all memory (mlockall): auto (when permitted), require (refuse to start otherwise) or off', 'auto')
  .action(async (o) => {
    await runCommand(o);
  });

// ---- master key: reseal and rotation (issue 5) ----
{
  const reseal = program
    .command('reseal')
    .description('seal the same master key another way (server stopped): keyfile, passphrase, shamir, ...')
    .requiredOption('--data-dir <dir>', 'data directory made by init')
    .requiredOption('--to <kind>', `new sealer: ${SEALER_FACTORIES.map((f) => f.kind).join(', ')}`);
  // Every sealer's options: how to unseal the current record, and how to seal with the new one.
  for (const f of SEALER_FACTORIES) for (const opt of [...f.unsealOptions, ...f.sealOptions]) reseal.option(opt.flags, opt.description);
  reseal.action(async (o) => {
    await resealCommand(o);
  });

  const rotate = program
    .command('rotate-master-key')
    .description('new master key, every sealed secret rewrapped in one transaction, sealed as before (server stopped)')
    .requiredOption('--data-dir <dir>', 'data directory made by init');
  for (const f of SEALER_FACTORIES) for (const opt of f.unsealOptions) rotate.option(opt.flags, opt.description);
  rotate.action(async (o) => {
    await rotateMasterKeyCommand(o);
  });
}

await runProgram('virtkm-server', program);
