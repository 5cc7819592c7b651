/**
 * Making a create, rename or link in a directory durable: fsync of the directory itself.
 * One implementation for the server's data directory, the agent's cache and images.
 * Also the asynchronous fdatasync of an open file that the SQLite store's group commit
 * waits for (its write-ahead log), so the event loop never blocks on the disk.
 */
import { closeSync, constants, fdatasync, fsyncSync, openSync } from 'node:fs';
import { open } from 'node:fs/promises';

/** fsyncs a directory (blocking). */
export function fsyncDirSync(dir: string): void {
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** fsyncs a directory. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * fdatasync of an open file descriptor on libuv's thread pool: the event loop keeps
 * running while the disk flushes. Rejects with the errno error (EIO...) of the call.
 */
export function fdatasyncFd(fd: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    fdatasync(fd, (err) => (err ? reject(err) : resolve()));
  });
}
