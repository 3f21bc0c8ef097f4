#!/usr/bin/env bash
# Stops the services that start.sh started. ClickHouse's data stays where start.sh put it (in memory
# on /dev/shm by default, until the machine restarts; tansu is in-memory).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# stop NAME PIDFILE PATTERN: the recorded pid and anything matching PATTERN (clickhouse-server
# runs a watchdog parent and the server as its child).
stop() {
  local name=$1 pidfile=$2 pattern=$3 pids
  pids="$(cat "$pidfile" 2>/dev/null || true) $(pgrep -f -- "$pattern" || true)"
  pids=$(echo $pids)
  [[ -n $pids ]] || { rm -f "$pidfile"; return 0; }
  log "stopping $name (pids $pids)"
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 60); do
    pgrep -f -- "$pattern" >/dev/null || break
    sleep 0.5
  done
  pkill -9 -f -- "$pattern" 2>/dev/null || true
  rm -f "$pidfile"
}
stop tansu "$STATE/tansu/pid" "$TANSU broker"
stop clickhouse "$STATE/clickhouse/pid" "config-file=$STATE/clickhouse/config.xml"
