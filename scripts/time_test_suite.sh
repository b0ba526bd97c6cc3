#!/usr/bin/env bash
# Times the test suite as a new user meets it: a fresh clone of REV (default HEAD) in a temporary
# folder, an empty compilation cache, the README's install, then the default suite (or, with
# --ci, the whole .ci/run). Prints the wall times and the load average before and after.
#
#   bash scripts/time_test_suite.sh [--ci] [REV]
set -euo pipefail
ci=0
if [[ "${1:-}" == "--ci" ]]; then ci=1; shift; fi
rev="${1:-HEAD}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone" && git -C "$work/clone" checkout -q "$rev"
export XDG_CACHE_HOME="$work/cache"  # an empty compilation cache (~/.cache/jaxllm/xla)
cd "$work/clone"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)  rev $(git rev-parse --short HEAD)"
start=$(date +%s)
if (( ci )); then
    CI=true .ci/run > "$work/log" 2>&1 || { tail -40 "$work/log"; exit 1; }
    echo ".ci/run: $(( $(date +%s) - start )) s"
else
    python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" > /dev/null
    installed=$(date +%s)
    CI=true .venv/bin/python -m pytest -p no:cacheprovider > "$work/log" 2>&1 || true
    echo "install: $(( installed - start )) s, default suite: $(( $(date +%s) - installed )) s"
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E "^(=+ )?[0-9]+ (passed|failed)" "$work/log" | tail -1
grep -E "^real servers:" "$work/log" || true
