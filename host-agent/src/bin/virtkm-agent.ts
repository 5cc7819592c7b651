#!/usr/bin/env node
/**
 * Entry point of `virtkm-agent`, the daemon on each libvirt host: `enroll` once, then
 * `run`. Parses the command line and hands over to the composition roots.
 */
import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { runProgram } from '../../../shared/src/cli-run.js';
import { silenceIpServernameWarning } from '../../../shared/src/warnings.js';
import { enrollCommand } from '../enroll/enroll-command.js';
import { runAgentCommand } from '../agent/run-command.js';

silenceIpServernameWarning();

const program = new Command('virtkm-agent')
  .description('virtkm host agent')
  .exitOverride()
  .configureOutput({ outputError: (s, write) => write(s.replace(/^error: /, 'virtkm-agent: ')) });

program
  .command('enroll')
  .description("create this host's keys and enroll with a one-time token")
  .requiredOption('--server <addr>', "the server's enrollment listener HOST:PORT")
  .option('--token-file <file>', 'file holding the token')
  .option('--token <token>', 'the token (visible in ps while enrolling; prefer --token-file)')
  .requiredOption('--state-dir <dir>', 'state directory (created, 0700)')
  .option('--host-key-sealer <kind>', 'how the host key (it seals the key cache) is protected: file (default), tpm2 or pkcs11')
  .option('--pkcs11-uri <uri>', 'pkcs11: the token key (RFC 7512 URI with module-path; created when missing)')
  .option('--pin-file <file>', "pkcs11: absolute path of a file (0600) holding the token's user PIN")
  .option('--tpm-tcti <tcti>', 'tpm2: how to reach the TPM (default device:/dev/tpmrm0)')
  .option('--tpm-pcrs <selection>', 'tpm2: bind the host key to the current values of these PCRs, e.g. sha256:0,7')
  .action(async (o) => {
    await enrollCommand(o, (f) => readFileSync(f, 'utf8'));
  });

program
  .command('run')
  .description('keep this host converged to what the server says: images, libvirt secrets and domains')
  .requiredOption('--state-dir <dir>', 'state directory made by enroll')
  .option('--server <addr>', "the server's main listener HOST:PORT (default: from enrollment)")
  .option('--image-dir <dir>', 'directory of the encrypted images (shared storage for moves; created if missing)', '/var/lib/libvirt/images/virtkm')
  .option('--libvirt-uri <uri>', 'libvirt connection URI', 'qemu:///system')
  .option('--log-level <level>', 'debug, info, warn or error', 'info')
  .option('--memory-lock <mode>', 'lock all memory (mlockall): auto (when permitted), require (refuse to start otherwise) or off', 'auto')
  .action(async (o) => {
    await runAgentCommand(o);
  });

await runProgram('virtkm-agent', program);
