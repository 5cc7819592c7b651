/**
 * What the CLI may ask of a terminal: whether stdin and stdout are one, a yes/no question,
 * and Ctrl-C. The real process passes `processTerminal()` (bin/virtkm.ts); tests run the
 * CLI without one, which behaves like a pipe (no questions asked, no live redrawing), or
 * with a scripted double.
 */
import { createInterface } from 'node:readline';

/** The stream live progress is drawn on (cursor movements need a terminal). */
export interface TerminalStream {
  write(s: string): boolean;
  isTTY?: boolean;
  columns?: number;
}

export interface CliTerminal {
  readonly stdinIsTty: boolean;
  readonly stdoutIsTty: boolean;
  /** Where progress bars are drawn: stdout, when it is a terminal. */
  readonly stdoutStream: TerminalStream;
  /** Asks on the terminal; true only for "y" or "yes". */
  confirm(question: string): Promise<boolean>;
  /** Calls `handler` on Ctrl-C instead of ending the process; returns the remover. */
  onInterrupt(handler: () => void): () => void;
}

/** No terminal: a pipe on both ends. */
export const NO_TERMINAL: CliTerminal = Object.freeze({
  stdinIsTty: false,
  stdoutIsTty: false,
  stdoutStream: { write: () => true },
  confirm: () => Promise.resolve(false),
  onInterrupt: () => () => {},
});

/** The terminal of this process. */
export function processTerminal(): CliTerminal {
  return {
    stdinIsTty: process.stdin.isTTY === true,
    stdoutIsTty: process.stdout.isTTY === true,
    stdoutStream: process.stdout,
    async confirm(question) {
      // The question goes to stderr so that stdout stays the command's output.
      const rl = createInterface({ input: process.stdin, output: process.stderr, terminal: true });
      try {
        const answer = await new Promise<string>((resolve) => {
          rl.question(question, resolve);
          // Ctrl-C or Ctrl-D at the prompt is a "no".
          rl.once('SIGINT', () => resolve(''));
          rl.once('close', () => resolve(''));
        });
        return /^(y|yes)$/i.test(answer.trim());
      } finally {
        rl.close();
      }
    },
    onInterrupt(handler) {
      process.on('SIGINT', handler);
      return () => process.off('SIGINT', handler);
    },
  };
}
