#!/usr/bin/env bash
# The main job on the embedded default (SQLite, one server): set up, initialise a server in
# a fresh data directory, start it, create encrypted volume keys through the CLI over
# mutual TLS, show them and the audit trail, then stop the server.
#
# Usage: bash scripts/demo.sh            (data directory in a new temporary folder)
#        VIRTKM_DEMO_DIR=/path bash scripts/demo.sh   (must not exist or be empty)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh </dev/null

dir=${VIRTKM_DEMO_DIR:-$(mktemp -d /tmp/virtkm-demo.XXXXXX)}
data="$dir/data"
server_pid=
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" || true
  fi
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
virtkm() { echo "\$ virtkm $*"; node dist/server/src/bin/virtkm.js "$@"; }

step "initialise a server in $data (master key sealed by a 0600 key file)"
node dist/server/src/bin/virtkm-server.js init --data-dir "$data"

step "start the server: mutual TLS 1.3 on 127.0.0.1, enrollment listener beside it"
node dist/server/src/bin/virtkm-server.js run --data-dir "$data" --listen 127.0.0.1:0 --enroll-listen 127.0.0.1:0 \
  >"$dir/server.out" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q '"event":"ready"' "$dir/server.out" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$dir/server.log"; echo "server failed to start" >&2; exit 1; }
  sleep 0.1
done
ready=$(grep '"event":"ready"' "$dir/server.out")
echo "$ready"
VIRTKM_SERVER=$(node -e 'console.log(JSON.parse(process.argv[1]).listen)' "$ready")
export VIRTKM_SERVER VIRTKM_CREDENTIALS="$data/admin.pem"

step "create encrypted volumes (one random secret each, sealed under the master key)"
virtkm volume create web-root --size 20G --format qcow2-luks
virtkm volume create db-data --size 100G --format luks2 --sector-size 4096
virtkm volume create scratch --size 8G --format plain --key-size 512
virtkm volume create legacy --size 10G --format luks

step "list and show them"
virtkm volume list
virtkm volume show db-data
virtkm volume show web-root --json

step "a frontend credential, and an enrollment token for a host"
virtkm credential create portal --role frontend --out "$dir/portal.pem"
virtkm host token create hv1

step "the audit trail (hash-chained) and its verification"
virtkm audit list
virtkm audit verify

step "no volume secret leaves the server except sealed to an enrolled host; the data directory holds only sealed secrets"
ls -l "$data"
echo
echo "server log: $dir/server.log; data directory: $data"
