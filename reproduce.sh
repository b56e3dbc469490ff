#!/usr/bin/env bash
# The main job, one command: sets up the environment if needed (scripts/env.sh), prepares the data,
# pretrains, extends with every method, fine-tunes, evaluates and writes the report (reproduce.py;
# its --help lists options).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
"$PY" reproduce.py "$@"
