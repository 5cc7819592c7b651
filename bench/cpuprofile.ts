/**
 * Reading V8 .cpuprofile files (node --cpu-prof): self and inclusive time per function and
 * self time per origin (project file, package, Node internals, GC), optionally only for
 * samples inside given time windows. Profile timestamps are CLOCK_MONOTONIC microseconds,
 * as process.hrtime.bigint() / 1000n in any process on the same machine.
 */
import { readFileSync } from 'node:fs';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

/** A time window in CLOCK_MONOTONIC microseconds. */
export interface TimeWindow {
  startUs: number;
  endUs: number;
}

/** One row of a profile summary. */
export interface ProfileRow {
  name: string;
  /** Milliseconds and percent of the sampled time. */
  ms: number;
  percent: number;
}

/** What a profile says about where time went. */
export interface ProfileSummary {
  /** Sampled milliseconds considered (inside the windows, if any). */
  sampledMs: number;
  /** Share of the considered time that was not idle. */
  busyPercent: number;
  selfTop: ProfileRow[];
  inclusiveTop: ProfileRow[];
  byOrigin: ProfileRow[];
  /** True when windows were given but no sample fell inside them (whole profile used). */
  windowMissed: boolean;
}

function shortUrl(url: string): string {
  if (!url) return '';
  const nm = url.lastIndexOf('/node_modules/');
  if (nm >= 0) return url.slice(nm + '/node_modules/'.length);
  const dist = url.lastIndexOf('/dist/');
  if (dist >= 0) return url.slice(dist + '/dist/'.length);
  return url.replace(/^file:\/\//, '');
}

function frameKey(f: CallFrame): string {
  const name = f.functionName || '(anonymous)';
  if (!f.url) return name;
  return `${name} ${shortUrl(f.url)}:${f.lineNumber + 1}`;
}

/** Where a frame's code comes from: a package, a project file, Node itself, or V8. */
function originOf(f: CallFrame): string {
  const url = f.url;
  if (!url) {
    if (f.functionName.startsWith('(')) return f.functionName; // (garbage collector), (program), (idle)
    return '(native)';
  }
  if (url.startsWith('node:')) return 'node internals';
  const nm = url.lastIndexOf('/node_modules/');
  if (nm >= 0) {
    const rest = url.slice(nm + '/node_modules/'.length).split('/');
    return rest[0]?.startsWith('@') ? `${rest[0]}/${rest[1] ?? ''}` : (rest[0] ?? url);
  }
  const dist = url.lastIndexOf('/dist/');
  if (dist >= 0) return url.slice(dist + '/dist/'.length);
  return shortUrl(url);
}

function top(map: Map<string, number>, total: number, n: number): ProfileRow[] {
  return [...map.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([name, us]) => ({ name, ms: us / 1000, percent: total > 0 ? (100 * us) / total : 0 }));
}

/** Summarises a .cpuprofile file. */
export function summarizeCpuProfile(path: string, windows: readonly TimeWindow[] = [], topN = 25): ProfileSummary {
  const profile = JSON.parse(readFileSync(path, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const node of profile.nodes) {
    byId.set(node.id, node);
    for (const c of node.children ?? []) parent.set(c, node.id);
  }
  const inWindow = (t: number): boolean => windows.some((w) => t >= w.startUs && t < w.endUs);
  const collect = (useWindows: boolean) => {
    const self = new Map<string, number>();
    const inclusive = new Map<string, number>();
    const origin = new Map<string, number>();
    let total = 0;
    let idle = 0;
    let t = profile.startTime;
    for (let i = 0; i < profile.samples.length; i++) {
      const delta = profile.timeDeltas[i] ?? 0;
      t += delta;
      if (useWindows && !inWindow(t)) continue;
      // A sample's time is the gap to the next sample, as Chrome DevTools counts it.
      const weight = profile.timeDeltas[i + 1] ?? delta;
      const id = profile.samples[i];
      const node = id === undefined ? undefined : byId.get(id);
      if (!node) continue;
      total += weight;
      if (node.callFrame.functionName === '(idle)') idle += weight;
      const key = frameKey(node.callFrame);
      self.set(key, (self.get(key) ?? 0) + weight);
      const o = originOf(node.callFrame);
      origin.set(o, (origin.get(o) ?? 0) + weight);
      const seen = new Set<string>();
      for (let cur: number | undefined = node.id; cur !== undefined; cur = parent.get(cur)) {
        const n = byId.get(cur);
        if (!n || n.callFrame.functionName === '(root)') continue;
        const k = frameKey(n.callFrame);
        if (seen.has(k)) continue;
        seen.add(k);
        inclusive.set(k, (inclusive.get(k) ?? 0) + weight);
      }
    }
    return { self, inclusive, origin, total, idle };
  };
  let windowMissed = false;
  let r = collect(windows.length > 0);
  if (windows.length > 0 && r.total === 0) {
    windowMissed = true;
    r = collect(false);
  }
  const busy = r.total - r.idle;
  return {
    sampledMs: r.total / 1000,
    busyPercent: r.total > 0 ? (100 * busy) / r.total : 0,
    // Percentages are of busy time: idle is left out of the ranking.
    selfTop: top(new Map([...r.self].filter(([k]) => k !== '(idle)')), busy, topN),
    inclusiveTop: top(r.inclusive, busy, topN),
    byOrigin: top(new Map([...r.origin].filter(([k]) => k !== '(idle)')), busy, topN),
    windowMissed,
  };
}

/** Prints a summary as text. */
export function formatProfileSummary(title: string, s: ProfileSummary): string {
  const lines: string[] = [];
  lines.push(`${title}: ${s.sampledMs.toFixed(0)} ms sampled, ${s.busyPercent.toFixed(0)}% busy${s.windowMissed ? ' (no sample in the phase windows: whole profile)' : ''}`);
  const section = (name: string, rows: ProfileRow[]) => {
    lines.push(`  ${name} (% of busy time)`);
    for (const row of rows) lines.push(`    ${row.percent.toFixed(1).padStart(5)}%  ${row.ms.toFixed(0).padStart(7)} ms  ${row.name}`);
  };
  section('self time by origin', s.byOrigin);
  section('self time by function', s.selfTop);
  section('inclusive time by function', s.inclusiveTop);
  return lines.join('\n');
}
