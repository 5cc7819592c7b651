/**
 * Bench helpers: a closed-loop load driver (a fixed number of calls in flight, bounded by
 * time and by count), an open-loop one (calls started at a fixed rate), latency statistics, and CPU accounting of this process and of a
 * child process (from /proc), so every rate can be read next to how busy the machine was.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { performance } from 'node:perf_hooks';

/** Latency summary in milliseconds. */
export interface LatencyStats {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

/** Result of one closed-loop run. */
export interface LoadResult {
  /** Calls that completed without error. */
  calls: number;
  errors: number;
  /** First error message, if any. */
  firstError: string | undefined;
  /** Wall-clock seconds from the first call issued to the last call completed. */
  seconds: number;
  /** Completed calls per second. */
  rate: number;
  latency: LatencyStats;
  /** CPU use during the run, in percent of one core. */
  clientCpuPercent: number;
  serverCpuPercent: number | undefined;
  /** Whole machine (all processes, all cores), in percent of one core; from /proc/stat. */
  machineCpuPercent: number | undefined;
  /** Every successful call's latency (ms); left out of JSON reports. */
  latencies: number[];
}

/** Options of runClosedLoop. */
export interface LoadOptions {
  /** Calls kept in flight. */
  concurrency: number;
  /** Stop issuing new calls after this many seconds. */
  seconds: number;
  /** Stop issuing new calls after this many calls in total. */
  maxCalls: number;
  /** Process whose CPU time is reported as the server's (a pid), if any. */
  serverPid?: number | undefined;
}

/** Percentile by nearest rank of a sorted array. */
function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))] ?? Number.NaN;
}

/** Summarises latencies (milliseconds). */
export function latencyStats(values: readonly number[]): LatencyStats {
  const sorted = Float64Array.from(values).sort();
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    count: sorted.length,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted.length ? (sorted[sorted.length - 1] ?? Number.NaN) : Number.NaN,
    mean: sorted.length ? sum / sorted.length : Number.NaN,
  };
}

let clockTicks: number | undefined;

/** Clock ticks per second of /proc/PID/stat times. */
function ticksPerSecond(): number {
  if (clockTicks === undefined) {
    const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
    const n = Number(r.stdout?.trim());
    clockTicks = Number.isFinite(n) && n > 0 ? n : 100;
  }
  return clockTicks;
}

/** User+system CPU seconds a process has used so far (Linux), or undefined. */
export function processCpuSeconds(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may contain spaces; fields restart after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    if (!Number.isFinite(utime) || !Number.isFinite(stime)) return undefined;
    return (utime + stime) / ticksPerSecond();
  } catch {
    return undefined;
  }
}

/** Busy CPU seconds of the whole machine so far (all cores; Linux), or undefined. */
export function machineBusySeconds(): number | undefined {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
    // cpu user nice system idle iowait irq softirq steal ...
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    if (f.length < 8 || f.some((x) => !Number.isFinite(x))) return undefined;
    const [user, nice, system, , , irq, softirq, steal] = f as [number, number, number, number, number, number, number, number];
    return (user + nice + system + irq + softirq + steal) / ticksPerSecond();
  } catch {
    return undefined;
  }
}

/** Measures CPU of this process, optionally of another one, and of the whole machine. */
export function cpuMeter(otherPid?: number): () => { self: number; other: number | undefined; machine: number | undefined } {
  const t0 = performance.now();
  const self0 = process.cpuUsage();
  const other0 = otherPid === undefined ? undefined : processCpuSeconds(otherPid);
  const machine0 = machineBusySeconds();
  return () => {
    const wall = (performance.now() - t0) / 1000;
    const self = process.cpuUsage(self0);
    const other1 = otherPid === undefined ? undefined : processCpuSeconds(otherPid);
    const machine1 = machineBusySeconds();
    return {
      self: (100 * (self.user + self.system)) / 1e6 / wall,
      other: other0 === undefined || other1 === undefined ? undefined : (100 * (other1 - other0)) / wall,
      machine: machine0 === undefined || machine1 === undefined ? undefined : (100 * (machine1 - machine0)) / wall,
    };
  };
}

/** A run's result from its latencies (ms), errors, duration (s) and CPU use. */
function loadResult(latencies: number[], errors: number, firstError: string | undefined, seconds: number, cpu: ReturnType<ReturnType<typeof cpuMeter>>): LoadResult {
  return {
    calls: latencies.length,
    errors,
    firstError,
    seconds,
    rate: seconds > 0 ? latencies.length / seconds : 0,
    latency: latencyStats(latencies),
    clientCpuPercent: cpu.self,
    serverCpuPercent: cpu.other,
    machineCpuPercent: cpu.machine,
    latencies,
  };
}

/**
 * Keeps `concurrency` calls of `call` in flight until `seconds` have passed or `maxCalls`
 * calls were issued, and measures each call's latency. `call(i)` gets the call's index.
 * A failed call counts as an error (its latency is not recorded) and the loop goes on.
 */
export async function runClosedLoop(opts: LoadOptions, call: (i: number) => Promise<void>): Promise<LoadResult> {
  const latencies: number[] = [];
  let issued = 0;
  let errors = 0;
  let firstError: string | undefined;
  const meter = cpuMeter(opts.serverPid);
  const start = performance.now();
  const deadline = start + opts.seconds * 1000;
  let lastDone = start;
  const worker = async (): Promise<void> => {
    while (issued < opts.maxCalls && performance.now() < deadline) {
      const i = issued++;
      const t0 = performance.now();
      try {
        await call(i);
        const t1 = performance.now();
        latencies.push(t1 - t0);
        lastDone = t1;
      } catch (err) {
        lastDone = performance.now();
        errors++;
        firstError ??= err instanceof Error ? err.message : String(err);
      }
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency }, worker));
  return loadResult(latencies, errors, firstError, (lastDone - start) / 1000, meter());
}

/**
 * The p-th percentile of a set of durations weighted by their length: the length of the
 * one in progress at a moment chosen uniformly at random over their (back-to-back) total.
 * For fdatasyncs measured back to back, it is the sync a write arriving at a random time
 * would wait on, so its p99 is a floor of any durable reply's p99 on that storage: a stall
 * of 100 ms is one sample of the plain percentile but delays every call arriving during it.
 */
export function lengthWeightedPercentile(durations: readonly number[], p: number): number {
  const sorted = Float64Array.from(durations).sort();
  const total = sorted.reduce((a, b) => a + b, 0);
  if (sorted.length === 0 || total <= 0) return Number.NaN;
  let acc = 0;
  for (const d of sorted) {
    acc += d;
    if (acc >= (p / 100) * total) return d;
  }
  return sorted[sorted.length - 1]!;
}

/** Options of runOpenLoop. */
export interface OpenLoopOptions {
  /** Calls started per second, evenly spaced, whether or not earlier ones have finished. */
  rate: number;
  seconds: number;
  /** Calls allowed in flight; a call due while this many are outstanding counts as an error. */
  maxOutstanding: number;
  serverPid?: number | undefined;
}

/**
 * Starts calls at a fixed rate (an open loop, as independent clients would) for `seconds`
 * and measures each call's latency from the moment it was DUE, not from when the loop got
 * round to sending it: a stalled server or client then shows up in the latency instead of
 * silently lowering the offered load (no coordinated omission). Calls that would exceed
 * `maxOutstanding` are not sent and count as errors, so an overloaded server ends the run
 * with errors rather than an unbounded queue.
 */
export async function runOpenLoop(opts: OpenLoopOptions, call: (i: number) => Promise<void>): Promise<LoadResult> {
  const latencies: number[] = [];
  let errors = 0;
  let firstError: string | undefined;
  const inFlight = new Set<Promise<void>>();
  const meter = cpuMeter(opts.serverPid);
  const start = performance.now();
  const total = Math.floor(opts.rate * opts.seconds);
  const intervalMs = 1000 / opts.rate;
  let next = 0;
  let lastDone = start;
  const fail = (msg: string) => {
    errors++;
    firstError ??= msg;
  };
  const issue = (i: number, due: number) => {
    if (inFlight.size >= opts.maxOutstanding) {
      fail(`more than ${opts.maxOutstanding} calls outstanding`);
      return;
    }
    const p = call(i).then(
      () => {
        const t1 = performance.now();
        latencies.push(t1 - due);
        lastDone = t1;
      },
      (err: unknown) => {
        lastDone = performance.now();
        fail(err instanceof Error ? err.message : String(err));
      },
    );
    const tracked = p.finally(() => inFlight.delete(tracked));
    inFlight.add(tracked);
  };
  while (next < total) {
    const now = performance.now();
    // Every call due by now goes out in this turn; then yield until the next one is due.
    while (next < total && start + next * intervalMs <= now) {
      issue(next, start + next * intervalMs);
      next++;
    }
    // A timer of at least 1 ms, never setImmediate: spinning would take the CPU the server
    // under test needs. Calls due meanwhile go out together at the next tick, and their
    // latency still counts from when they were due (so the timer's delay is counted too,
    // for the echo ceiling as for the server).
    const wait = start + next * intervalMs - performance.now();
    await new Promise<void>((resolve) => setTimeout(resolve, Math.max(1, Math.floor(wait))));
  }
  await Promise.all([...inFlight]);
  return loadResult(latencies, errors, firstError, (lastDone - start) / 1000, meter());
}

/**
 * Combines runs of the same kind (e.g. several rounds interleaved with their ceilings):
 * calls and seconds add up, latencies are pooled, CPU shares are weighted by duration.
 */
export function mergeLoadResults(runs: readonly LoadResult[]): LoadResult {
  const first = runs[0];
  if (!first) throw new Error('nothing to merge');
  if (runs.length === 1) return first;
  const seconds = runs.reduce((a, r) => a + r.seconds, 0);
  const weighted = (f: (r: LoadResult) => number | undefined): number | undefined => {
    let sum = 0;
    for (const r of runs) {
      const v = f(r);
      if (v === undefined) return undefined;
      sum += v * r.seconds;
    }
    return seconds > 0 ? sum / seconds : undefined;
  };
  const latencies = runs.flatMap((r) => r.latencies);
  const calls = runs.reduce((a, r) => a + r.calls, 0);
  return {
    calls,
    errors: runs.reduce((a, r) => a + r.errors, 0),
    firstError: runs.find((r) => r.firstError !== undefined)?.firstError,
    seconds,
    rate: seconds > 0 ? calls / seconds : 0,
    latency: latencyStats(latencies),
    clientCpuPercent: weighted((r) => r.clientCpuPercent) ?? 0,
    serverCpuPercent: weighted((r) => r.serverCpuPercent),
    machineCpuPercent: weighted((r) => r.machineCpuPercent),
    latencies,
  };
}

/** Runs `fn` over items with at most `limit` in flight; returns the results in order. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i] as T, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/** The machine, as it is reported with every figure. */
export interface MachineInfo {
  nproc: number;
  cpuModel: string;
  node: string;
  platform: string;
  kernel: string;
}

/** Describes this machine. */
export function machineInfo(): MachineInfo {
  let cpuModel = cpus()[0]?.model ?? 'unknown';
  try {
    const line = readFileSync('/proc/cpuinfo', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('model name'));
    if (line) cpuModel = line.slice(line.indexOf(':') + 1).trim();
  } catch {
    // not Linux: keep os.cpus()
  }
  const nprocOut = spawnSync('nproc', [], { encoding: 'utf8' }).stdout?.trim();
  const kernel = spawnSync('uname', ['-r'], { encoding: 'utf8' }).stdout?.trim() ?? '';
  return { nproc: Number(nprocOut) || cpus().length, cpuModel, node: process.version, platform: process.platform, kernel };
}

/**
 * Prints a bench's report and writes its optional JSON (bigints as strings; keys named in
 * `omit` left out) and Markdown files.
 */
export function emitResults<R>(results: R, o: { json?: string; markdown?: string }, render: { report: (r: R) => string; markdown: (r: R) => string }, log: (msg: string) => void, omit: readonly string[] = []): void {
  console.log(render.report(results));
  if (o.json) {
    writeFileSync(o.json, JSON.stringify(results, (k, v: unknown) => (omit.includes(k) ? undefined : typeof v === 'bigint' ? v.toString() : v), 2) + '\n');
    log(`wrote ${o.json}`);
  }
  if (o.markdown) {
    writeFileSync(o.markdown, render.markdown(results));
    log(`wrote ${o.markdown}`);
  }
}
