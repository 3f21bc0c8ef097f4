#!/usr/bin/env bash
# Runs scripts/check_chdb.py on chDB (ClickHouse in-process), next to the 18.16 server of the
# integration tests: on current ClickHouse (chdb-core 26.9) and on ClickHouse 24.8 (chdb 2.1.1,
# the line of docker-compose.yml's server), each from its virtualenv (scripts/venv.sh installs
# them once).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
for engine in "" clickhouse-24.8; do
  PYTHON=$("$ROOT/scripts/venv.sh" ${engine:+"$engine"})
  "$PYTHON" "$ROOT/scripts/check_chdb.py"
done
