#!/bin/sh
# Builds virtkm and runs the key-release benchmark with its defaults (100,000 volumes,
# 10 s per run, 32 calls in flight), printing the results table. Extra arguments are
# passed to the benchmark, e.g.:  bench/run.sh --json /tmp/key-release.json
# Needs only node and the installed node_modules (npm ci); no npm script runs the bench.
set -eu
cd "$(dirname "$0")/.."
npm run build
exec node dist/bench/key-release.js "$@"
