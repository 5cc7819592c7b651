/**
 * Loaded into every ava worker (ava `require` in package.json). ava ends a test file's
 * worker only when its event loop drains, so a test that leaks a socket, a timer or a child
 * process (typically on a failure path) would otherwise keep the whole suite waiting until
 * CI's time limit. Once ava has sent all of the file's results, this gives the worker a
 * grace period to exit on its own; after that it names what is still open on stderr and
 * exits with status 1, which ava reports as a failure of that file.
 */
import { registerCompletionHandler } from 'ava';

const GRACE_MS = 30_000;

registerCompletionHandler(() => {
  const timer = setTimeout(() => {
    const open = process.getActiveResourcesInfo().filter((r) => r !== 'Timeout' && r !== 'TTYWrap');
    process.stderr.write(`exit-when-done: the test file's worker was still running ${GRACE_MS / 1000} s after its last test and hook; open: ${open.join(', ') || 'nothing named'}; ending it\n`);
    process.exit(1);
  }, GRACE_MS);
  // Unreferenced: a worker that drains exits at once, without waiting for this timer.
  timer.unref();
});
