#!/usr/bin/env bash
# The whole test suite N times in a row with a CPU hog on every core (as on a loaded CI host);
# stops at the first failing run. The suite must pass this: tests wait for events, never for
# a number of seconds.
#
#   scripts/stress-tests.sh [RUNS=5] [extra pytest arguments]
#
# Uses stress-ng (installed with apt-get when run as root) or, without it, one shell busy
# loop per core. PYTHON selects the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
[ $# -gt 0 ] && shift
python=${PYTHON:-.venv/bin/python}
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
cores=$(nproc)

if ! command -v stress-ng >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stress-ng >/dev/null || true
fi
hogs=()
if command -v stress-ng >/dev/null 2>&1; then
  stress-ng --cpu "$cores" --quiet &
  hogs+=($!)
  hog="stress-ng --cpu $cores"
else
  for _ in $(seq "$cores"); do
    (while :; do :; done) &
    hogs+=($!)
  done
  hog="$cores busy loops"
fi
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT

for i in $(seq "$runs"); do
  echo "== run $i/$runs with $hog ($(date +%T))"
  # SIGINT back to Python's default: a shell started in the background ignores it, and the
  # tests that stop a child with Ctrl-C would hang on an inherited SIG_IGN.
  if ! "$python" -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' -x -q -p no:randomly -p no:cacheprovider "$@"; then
    echo "== run $i/$runs FAILED"
    exit 1
  fi
done
echo "== all $runs runs passed with $hog"
