/**
 * The event-loop delay monitor (shared/src/loop-monitor.ts): a blocked loop is reported
 * with its length, a quiet one is not, and stop() summarises the run.
 */
import test from 'ava';
import { createLogger } from '../../shared/src/log.js';
import { startLoopMonitor } from '../../shared/src/loop-monitor.js';

function capture() {
  const out: string[] = [];
  const logger = createLogger({ component: 'test', level: 'debug', write: (l) => out.push(l) });
  return { logger, lines: () => out.map((l) => JSON.parse(l) as Record<string, unknown>) };
}
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

test('a loop blocked for 120 ms is logged as stalled with about that length; quiet intervals are not', async (t) => {
  const log = capture();
  const monitor = startLoopMonitor(log.logger, { intervalMs: 100, stallMs: 60 });
  await sleep(250); // quiet intervals
  const stalledBefore = log.lines().filter((l) => l.msg === 'event loop stalled').length;
  const end = Date.now() + 120;
  while (Date.now() < end) {
    // block the event loop
  }
  await sleep(250);
  monitor.stop();
  monitor.stop();
  const stalled = log.lines().filter((l) => l.msg === 'event loop stalled');
  t.is(stalledBefore, 0, 'nothing logged while the loop was free');
  t.is(stalled.length, 1);
  t.true(Number(stalled[0]!['max_ms']) >= 100, `max ${String(stalled[0]!['max_ms'])} ms`);
  const summary = log.lines().filter((l) => l.msg === 'event loop delay over the run');
  t.is(summary.length, 1, 'one summary, however often stop() is called');
  t.true(Number(summary[0]!['max_ms']) >= 100);
  t.is(summary[0]!['stalled_intervals'], 1);
});
