#!/bin/sh
# Installs requirements.txt when one of its packages cannot be imported. An installed torch is
# left alone (it may be a CUDA build of another version); a missing one gets the pinned version.
# Usage: sh scripts/ensure_requirements.sh   (from anywhere; PYTHON overrides the interpreter)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
MODULES="torch numpy scipy sklearn ml_collections absl tqdm PIL matplotlib wandb pytest"
if $PY -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $MODULES \
    2>/dev/null; then
  exit 0
fi
echo "installing missing requirements (requirements.txt) ..." >&2
if $PY -c "import torch" 2>/dev/null; then
  REQ=$(mktemp)
  grep -v '^torch==' requirements.txt > "$REQ"
  $PY -m pip install -q -r "$REQ"; rc=$?
  rm -f "$REQ"
  exit $rc
fi
exec $PY -m pip install -q -r requirements.txt
