#!/usr/bin/env bash
# Stops the services that start.sh started. Data of ClickHouse stays in .local/ (tansu is in-memory).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
for pidfile in "$STATE/tansu/pid" "$STATE/clickhouse/pid"; do
  if pid_alive "$pidfile"; then
    pid=$(cat "$pidfile"); log "stopping pid $pid ($pidfile)"; kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done
