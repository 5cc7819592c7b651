/**
 * The rotation scheduler: calls RotationManager.tick() every interval (destroying retired
 * keys whose grace period ended, queueing rotations of keys older than their policy allows,
 * starting queued rotations where hosts have room). Passes never overlap; a failing pass is
 * logged and the next one runs as planned.
 */
import { describeError, type Logger } from '../../../shared/src/log.js';
import type { RotationManager } from './rotation-manager.js';

export interface RotationScheduler {
  /** Runs one pass now (after the running one, if any). */
  runNow(): Promise<void>;
  /** Stops the timer and waits for a running pass. */
  stop(): Promise<void>;
}

export function startRotationScheduler(manager: RotationManager, intervalMs: number, logger: Logger): RotationScheduler {
  let running: Promise<void> = Promise.resolve();
  let stopped = false;
  const pass = () => {
    running = running.then(async () => {
      if (stopped) return;
      try {
        await manager.tick();
      } catch (err) {
        logger.error('rotation scheduler pass failed', describeError(err));
      }
    });
    return running;
  };
  const timer = setInterval(() => void pass(), intervalMs);
  timer.unref();
  // A first pass soon after start: rotations queued before a restart continue.
  const first = setTimeout(() => void pass(), Math.min(intervalMs, 1000));
  first.unref();
  return {
    runNow: pass,
    async stop() {
      stopped = true;
      clearInterval(timer);
      clearTimeout(first);
      await running;
    },
  };
}
