#!/usr/bin/env bash
# Idempotent setup of a Debian 12 machine for building and testing virtkm
# (`--host-tools` adds libvirt, QEMU, qemu-img, cryptsetup, keyutils, SoftHSM2 and swtpm for the tests):
#   1. Debian packages, installed only when missing (apt-get update only if needed);
#   2. npm dependencies (`npm ci`), only when node_modules is missing or stale;
#   3. `npm run build` (buf generate + tsc).
# Runs unattended (CI=true, no stdin). Safe to run repeatedly.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages. Tests use openssl and sqlite3 (to inspect the database) and procps
# (pgrep/ps, to check for leftover processes). g++ (which brings gcc) also builds the small
# madvise library that lets the services lock all of their memory (scripts/build-native.mjs).
# libsodium23: the server seals key packets with the native libsodium (shared/src/native-sodium.ts).
# python3, make and g++ are needed by
# `npm ci` whenever a native addon (better-sqlite3, koffi) is compiled from source because
# no prebuilt binary can be downloaded.
APT_PACKAGES=(openssl sqlite3 procps ca-certificates python3 make gcc g++ libsodium23)
# With --host-tools (the test suite): what the agent drives on a libvirt host: libvirtd and
# QEMU (KVM or TCG), qemu-img/qemu-io, cryptsetup, the kernel keyring tools, and the
# PKCS#11 (SoftHSM2) and TPM 2.0 (swtpm, tpm2-tools) stand-ins of the sealer tests.
HOST_TOOL_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt0 qemu-system-x86 qemu-utils cryptsetup-bin keyutils libkeyutils1 softhsm2 swtpm swtpm-tools tpm2-tools)
if [[ "${1:-}" == "--host-tools" ]]; then
  APT_PACKAGES+=("${HOST_TOOL_PACKAGES[@]}")
fi

# ---------------------------------------------------------------------------------------
# 1. Debian packages

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 || die "packages ${missing[*]} are missing and this is not root (and sudo is not available); install them or re-run as root"
    SUDO=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these packages by hand: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp)
  if ! "${SUDO[@]}" apt-get update -q >"$apt_log" 2>&1; then
    cat "$apt_log" >&2; rm -f "$apt_log"
    die "apt-get update failed"
  fi
  if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
      </dev/null >"$apt_log" 2>&1; then
    cat "$apt_log" >&2; rm -f "$apt_log"
    die "apt-get install ${missing[*]} failed"
  fi
  rm -f "$apt_log"
  for pkg in "${missing[@]}"; do
    is_installed "$pkg" || die "package $pkg is still not installed after apt-get install"
  done
fi

# ---------------------------------------------------------------------------------------
# 2. Node.js and npm dependencies

command -v node >/dev/null 2>&1 || die "node not found; virtkm needs Node.js 20 or later (Debian 12's own nodejs is 18, too old)"
command -v npm >/dev/null 2>&1 || die "npm not found; install npm along with Node.js 20 or later"
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 20)) || die "Node.js $(node -v) is too old; virtkm needs Node.js 20 or later"

[[ -f package-lock.json ]] || die "package-lock.json is missing in $ROOT; cannot run npm ci"

needs_ci=""
if [[ ! -d node_modules ]]; then
  needs_ci="node_modules is missing"
elif [[ ! -f node_modules/.package-lock.json ]]; then
  needs_ci="node_modules/.package-lock.json is missing"
elif [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
  needs_ci="package-lock.json is newer than node_modules"
fi

if [[ -n "$needs_ci" ]]; then
  log "running npm ci ($needs_ci; native addons take about a minute)"
  npm_log=$(mktemp)
  if ! npm ci --no-audit --no-fund --loglevel=error </dev/null >"$npm_log" 2>&1; then
    grep -v 'Unknown user config "nodedir"' "$npm_log" >&2 || true
    rm -f "$npm_log"
    die "npm ci failed (see the output above)"
  fi
  rm -f "$npm_log"
  # npm ci leaves .package-lock.json with its own time; make the freshness check stable.
  [[ -f node_modules/.package-lock.json ]] && touch node_modules/.package-lock.json
fi

# ---------------------------------------------------------------------------------------
# 3. Build

# tsc never deletes outputs: drop compiled tests whose TypeScript source is gone, so that
# ava does not keep running deleted tests.
if [[ -d dist/test ]]; then
  while IFS= read -r -d '' js; do
    rel=${js#dist/}
    src=${rel%.js}.ts
    if [[ ! -f "$src" ]]; then
      rm -f -- "$js" "$js.map"
    fi
  done < <(find dist/test -type f -name '*.js' -print0)
fi

log "building (npm run build)"
build_log=$(mktemp)
if ! npm run build </dev/null >"$build_log" 2>&1; then
  grep -v 'Unknown user config "nodedir"' "$build_log" >&2 || true
  rm -f "$build_log"
  die "npm run build failed (see the output above)"
fi
rm -f "$build_log"
log "done"
