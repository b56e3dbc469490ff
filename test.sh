#!/usr/bin/env bash
# The test command: sets up the environment if needed (scripts/env.sh), then runs the whole suite
# with pytest.
# Extra arguments go to pytest, e.g. ./test.sh tests/test_rope.py -x
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
"$PY" -m pytest -q "$@"
