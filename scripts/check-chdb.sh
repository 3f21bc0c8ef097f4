#!/usr/bin/env bash
# Runs scripts/check_chdb.py on chDB (current ClickHouse, in-process), from the project's
# virtualenv (scripts/venv.sh installs it once).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PYTHON=$("$ROOT/scripts/venv.sh")
"$PYTHON" "$ROOT/scripts/check_chdb.py"
