#!/bin/sh
# Installs what is missing, then runs the test suite (extra arguments go to pytest).
set -e
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
sh scripts/ensure_requirements.sh
exec $PY -m pytest -q tests "$@"
