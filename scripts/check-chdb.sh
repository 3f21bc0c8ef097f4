#!/usr/bin/env bash
# Runs scripts/check_chdb.py on chDB (current ClickHouse, in-process), installing it once into
# a project-local virtualenv.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CHDB_VERSION="26.9.0"
VENV="$STATE/venv"
if ! "$VENV/bin/python" -c "import chdb, sys; sys.exit(chdb.__version__ != '$CHDB_VERSION')" 2>/dev/null; then
  log "installing chdb-core==$CHDB_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "chdb-core==$CHDB_VERSION"
fi
"$VENV/bin/python" "$ROOT/scripts/check_chdb.py"
