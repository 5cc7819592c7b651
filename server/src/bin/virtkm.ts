#!/usr/bin/env node
/** Entry point of the `virtkm` CLI: wires the process to main(). */
import { main } from '../cli/main.js';
import { processTerminal } from '../cli/terminal.js';
import { silenceIpServernameWarning } from '../../../shared/src/warnings.js';

silenceIpServernameWarning();

const code = await main(process.argv.slice(2), {
  stdout: (s) => process.stdout.write(s),
  stderr: (s) => process.stderr.write(s),
  env: process.env,
  terminal: processTerminal(),
});
process.exitCode = code;
