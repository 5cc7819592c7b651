#!/usr/bin/env bash
# The whole test suite: setup (packages, npm ci, build), lint, then every ava test.
# The LAST line of output is always `N passed, N failed` (plus `, N skipped` when any),
# machine-read by CI. A failed setup or lint counts as one failed test each.
# Exit status is non-zero when anything failed.
#
# Usage: bash scripts/test.sh [ava arguments, e.g. a test file glob]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

passed=0
failed=0
skipped=0
extra_failures=()

summary_file=$(mktemp)
trap 'rm -f "$summary_file"' EXIT

# Prints the summary line (always the last line) and exits.
finish() {
  local line="$passed passed, $failed failed"
  ((skipped > 0)) && line+=", $skipped skipped"
  echo
  echo "== total (ava tests; a failed setup or lint counts as one failed test)"
  if ((${#extra_failures[@]} > 0)); then
    echo "Failed outside the test runner:"
    printf '  - %s\n' "${extra_failures[@]}"
  fi
  echo "$line"
  if ((failed > 0)); then exit 1; fi
  exit 0
}

# Runs a command, dropping npm's harmless 'Unknown user config "nodedir"' warnings; returns
# the command's own exit status.
run_quiet_npm() {
  local -a statuses
  set +e
  "$@" </dev/null 2>&1 | sed -u '/Unknown user config "nodedir"/d'
  statuses=("${PIPESTATUS[@]}")
  set -e
  return "${statuses[0]}"
}

echo "== setup"
if ! bash scripts/setup.sh --host-tools </dev/null; then
  failed=$((failed + 1))
  extra_failures+=("setup (scripts/setup.sh failed)")
  if [[ ! -d node_modules/ava ]] || [[ -z "$(find dist/test -name '*.test.js' -print -quit 2>/dev/null)" ]]; then
    echo "test.sh: nothing to test without a successful setup" >&2
    finish
  fi
  echo "test.sh: setup failed; running lint and tests on what is there anyway" >&2
fi

echo "== lint"
if run_quiet_npm npm run lint; then
  echo "lint: ok"
else
  failed=$((failed + 1))
  extra_failures+=("lint (npm run lint failed)")
fi

echo "== tests"
runner_status=0
VIRTKM_TEST_SUMMARY="$summary_file" node scripts/run-tests.mjs "$@" </dev/null || runner_status=$?

# shellcheck disable=SC2016
if counts=$(node -e '
  const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const n = (v) => (Number.isInteger(v) && v >= 0 ? v : 0);
  console.log(`${n(s.passed)} ${n(s.failed)} ${n(s.skipped)}`);
' "$summary_file" 2>/dev/null); then
  read -r t_passed t_failed t_skipped <<<"$counts"
  passed=$((passed + t_passed))
  failed=$((failed + t_failed))
  skipped=$((skipped + t_skipped))
  if ((runner_status != 0 && t_failed == 0)); then
    failed=$((failed + 1))
    extra_failures+=("test runner exited with status $runner_status")
  fi
else
  failed=$((failed + 1))
  extra_failures+=("tests (scripts/run-tests.mjs wrote no summary; exit status $runner_status)")
fi

finish
