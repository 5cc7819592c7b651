/**
 * Event-loop delay monitor for the services: a process whose event loop is blocked answers
 * nothing, so a stall shows up as a latency spike in every call in flight. The monitor logs
 * a warning for each interval in which the loop was held for `stallMs` or more, and a
 * summary of the whole run when stopped; operators chasing slow key releases read it next to
 * the store's "slow WAL fdatasync" lines (docs/operations.md, Troubleshooting).
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import type { Logger } from './log.js';

export interface LoopMonitorOptions {
  /** How often the interval's delays are checked, ms (default 60 s). */
  intervalMs?: number;
  /** An interval whose longest delay reaches this is logged (default 100 ms). */
  stallMs?: number;
}

export interface LoopMonitor {
  /** Stops the monitor and logs the whole run's delays. Idempotent. */
  stop(): void;
}

const ms = (ns: number) => Math.round(ns / 1e4) / 100;

export function startLoopMonitor(logger: Logger, options: LoopMonitorOptions = {}): LoopMonitor {
  const intervalMs = options.intervalMs ?? 60_000;
  const stallMs = options.stallMs ?? 100;
  const interval = monitorEventLoopDelay({ resolution: 10 });
  const whole = monitorEventLoopDelay({ resolution: 10 });
  interval.enable();
  whole.enable();
  let stalledIntervals = 0;
  const timer = setInterval(() => {
    if (ms(interval.max) >= stallMs) {
      stalledIntervals++;
      logger.warn('event loop stalled', { max_ms: ms(interval.max), p99_ms: ms(interval.percentile(99)), interval_s: intervalMs / 1000 });
    }
    interval.reset();
  }, intervalMs);
  timer.unref();
  let stopped = false;
  return {
    stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(timer);
      interval.disable();
      whole.disable();
      logger.info('event loop delay over the run', { p50_ms: ms(whole.percentile(50)), p99_ms: ms(whole.percentile(99)), max_ms: ms(whole.max), stalled_intervals: stalledIntervals });
    },
  };
}
