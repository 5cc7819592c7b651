#!/usr/bin/env node
// Builds the native helper of `npm run build`: dist/native/libvirtkm-madvise-locked.so from
// shared/native/madvise-locked.c (see shared/src/memory-lock.ts for what it is for).
// Without a C compiler it says so and succeeds: the services then run without locking all
// of their memory and log why (scripts/setup.sh installs one on Debian).
import { spawnSync } from 'node:child_process';
import { mkdirSync, renameSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const source = join(root, 'shared/native/madvise-locked.c');
const outDir = join(root, 'dist/native');
const out = join(outDir, 'libvirtkm-madvise-locked.so');
const cc = process.env.CC || 'cc';

if (process.platform !== 'linux') {
  console.log(`build-native: skipped (${process.platform}: the madvise library is Linux only)`);
  process.exit(0);
}
mkdirSync(outDir, { recursive: true });
const tmp = `${out}.tmp-${process.pid}`;
const r = spawnSync(cc, ['-shared', '-fPIC', '-O2', '-Wall', '-Wextra', '-Werror', '-o', tmp, source], { stdio: 'inherit' });
if (r.error?.code === 'ENOENT') {
  console.log(`build-native: no C compiler (${cc}); ${out} not built: memory will not be locked as a whole`);
  process.exit(0);
}
if (r.status !== 0) {
  console.error(`build-native: ${cc} failed (status ${r.status ?? r.signal})`);
  process.exit(1);
}
// Atomic replace: a running service keeps the old file mapped.
renameSync(tmp, out);
console.log(`build-native: built ${out}`);
