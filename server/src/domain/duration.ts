/**
 * Durations as operators type them: "90" or "90s", "15m", "12h", "7d", "2w", "1y" (365 d),
 * and combinations such as "1d12h". Used by the server's flags and the CLI's policies.
 */
import { errors } from '../../../shared/src/errors.js';

const UNIT_SECONDS: Readonly<Record<string, number>> = { s: 1, m: 60, h: 3600, d: 86400, w: 604800, y: 31536000 };

/** Parses a duration into whole seconds; invalid_argument on anything else. */
export function parseDurationSeconds(text: string, what = 'duration'): number {
  const t = text.trim();
  if (/^\d{1,12}$/.test(t)) return Number(t);
  if (!/^(\d{1,9}[smhdwy])+$/.test(t)) throw errors.invalid(`${what} must look like 90s, 15m, 12h, 7d, 2w or 1y (got "${t.slice(0, 20)}")`);
  let total = 0;
  for (const m of t.matchAll(/(\d+)([smhdwy])/g)) total += Number(m[1]) * (UNIT_SECONDS[m[2] as string] as number);
  if (!Number.isSafeInteger(total)) throw errors.invalid(`${what} is too long`);
  return total;
}

/** The largest exact unit form of a number of seconds, e.g. 86400 → "1d", 5400 → "90m"; 0 → "0". */
export function formatDurationSeconds(seconds: number): string {
  if (seconds === 0) return '0';
  for (const u of ['y', 'w', 'd', 'h', 'm'] as const) {
    const n = UNIT_SECONDS[u] as number;
    if (seconds % n === 0) return `${seconds / n}${u}`;
  }
  return `${seconds}s`;
}
