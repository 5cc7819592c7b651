/**
 * Prints where the time went in a V8 .cpuprofile:
 *
 *   node dist/bench/cpuprofile-top.js FILE.cpuprofile [--top 25] [--window START_US-END_US ...]
 *
 * Windows are CLOCK_MONOTONIC microseconds (key-release.js prints them with --profile-server).
 */
import { parseArgs } from 'node:util';
import { formatProfileSummary, summarizeCpuProfile, type TimeWindow } from './cpuprofile.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { top: { type: 'string', default: '25' }, window: { type: 'string', multiple: true, default: [] } },
});
const file = positionals[0];
if (!file) {
  console.error('usage: cpuprofile-top FILE.cpuprofile [--top N] [--window START_US-END_US ...]');
  process.exit(2);
}
const windows: TimeWindow[] = (values.window ?? []).map((w) => {
  const [a, b] = w.split('-').map(Number);
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b)) throw new Error(`bad window ${w}`);
  return { startUs: a, endUs: b };
});
console.log(formatProfileSummary(file, summarizeCpuProfile(file, windows, Number(values.top))));
