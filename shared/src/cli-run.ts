/**
 * How the daemons' command lines end: parse, run, and turn an error into `NAME: message`
 * (and `NAME: hint: ...`) on stderr with a small exit code (2 usage or invalid input, 1
 * anything else).
 */
import { CommanderError, type Command } from 'commander';
import { isDomainError } from './errors.js';

/** Parses argv with `program` and sets process.exitCode from the outcome. */
export async function runProgram(name: string, program: Command, argv: string[] = process.argv): Promise<void> {
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = err.exitCode === 0 ? 0 : 2;
    } else if (isDomainError(err)) {
      process.stderr.write(`${name}: ${err.message}\n`);
      if (err.hint) process.stderr.write(`${name}: hint: ${err.hint}\n`);
      process.exitCode = err.kind === 'invalid_argument' ? 2 : 1;
    } else {
      process.stderr.write(`${name}: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    }
  }
}
