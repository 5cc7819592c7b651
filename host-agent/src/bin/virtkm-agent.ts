#!/usr/bin/env node
/**
 * Entry point of `virtkm-agent`, the daemon on each libvirt host. This issue delivers
 * enrollment; `run` (the reconcile stream, libvirt secrets, images, autostart cache) comes
 * with issue 3 and says so instead of pretending.
 */
import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { isDomainError } from '../../../shared/src/errors.js';
import { silenceIpServernameWarning } from '../../../shared/src/warnings.js';
import { enrollCommand } from '../enroll/enroll-command.js';

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
  .action(async (o) => {
    await enrollCommand(o, (f) => readFileSync(f, 'utf8'));
  });

program
  .command('run')
  .description('run the agent (not available yet: issue 3)')
  .requiredOption('--state-dir <dir>', 'state directory made by enroll')
  .action(() => {
    process.stderr.write('virtkm-agent: run is not implemented yet (issue 3: reconcile stream, libvirt, images)\n');
    process.exitCode = 1;
  });

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exitCode = err.exitCode === 0 ? 0 : 2;
  } else if (isDomainError(err)) {
    process.stderr.write(`virtkm-agent: ${err.message}\n`);
    if (err.hint) process.stderr.write(`virtkm-agent: hint: ${err.hint}\n`);
    process.exitCode = err.kind === 'invalid_argument' ? 2 : 1;
  } else {
    process.stderr.write(`virtkm-agent: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  }
}
