#!/usr/bin/env bash
# The project's Python tools in one virtualenv ($TALLYDEV_STATE_DIR/venv, default .local/venv),
# installed once from PyPI with pinned versions, idempotent and quick when already there:
# chDB (schema checks on current ClickHouse) and PyJWT with cryptography (an independent
# library that signs the tokens the identity tests verify) and schemathesis (property-based
# tests of tally-api against its OpenAPI document) and confluent-kafka (an independent Kafka
# producer, with every compression codec). Prints the interpreter's path.
#
# `scripts/venv.sh clickhouse-24.8` instead prints the interpreter of a second virtualenv
# ($STATE/venv-chdb-24.8) holding only chDB 2.1.1, whose engine is ClickHouse 24.8.4, the line of
# docker-compose.yml's server: scripts/check-chdb.sh proves the schema on it too.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = "clickhouse-24.8" ]; then
  VENV="$STATE/venv-chdb-24.8"
  CHDB_24_VERSION="2.1.1"
  if ! "$VENV/bin/python" -c "import sys, chdb; sys.exit(chdb.__version__ != '$CHDB_24_VERSION')" 2>/dev/null; then
    log "installing chdb==$CHDB_24_VERSION (ClickHouse 24.8) into $VENV" >&2
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet "chdb==$CHDB_24_VERSION" >&2
  fi
  echo "$VENV/bin/python"
  exit 0
elif [ -n "${1:-}" ]; then
  echo "scripts/venv.sh: unknown argument '$1' (none, or clickhouse-24.8)" >&2
  exit 2
fi
VENV="$STATE/venv"
CHDB_VERSION="26.9.0"
PYJWT_VERSION="2.10.1"
CRYPTOGRAPHY_VERSION="44.0.0"
SCHEMATHESIS_VERSION="4.32.5"
CONFLUENT_KAFKA_VERSION="2.16.1"
if ! "$VENV/bin/python" - <<PY 2>/dev/null
import sys, importlib.metadata as md, chdb, jwt, cryptography, confluent_kafka
sys.exit(not (chdb.__version__ == "$CHDB_VERSION" and jwt.__version__ == "$PYJWT_VERSION"
              and cryptography.__version__ == "$CRYPTOGRAPHY_VERSION"
              and md.version("schemathesis") == "$SCHEMATHESIS_VERSION"
              and md.version("confluent-kafka") == "$CONFLUENT_KAFKA_VERSION"))
PY
then
  log "installing chdb-core==$CHDB_VERSION PyJWT==$PYJWT_VERSION cryptography==$CRYPTOGRAPHY_VERSION schemathesis==$SCHEMATHESIS_VERSION confluent-kafka==$CONFLUENT_KAFKA_VERSION into $VENV" >&2
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet "chdb-core==$CHDB_VERSION" "PyJWT==$PYJWT_VERSION" "cryptography==$CRYPTOGRAPHY_VERSION" \
    "schemathesis==$SCHEMATHESIS_VERSION" "confluent-kafka==$CONFLUENT_KAFKA_VERSION" >&2
fi
echo "$VENV/bin/python"
