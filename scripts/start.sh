#!/usr/bin/env bash
# Installs (if missing) and starts ClickHouse and tansu as plain processes on project-local state,
# then creates the topics. Idempotent: running services are left alone.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
"$ROOT/scripts/install.sh"

ch_up() { python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$CH_HTTP_PORT/ping', timeout=2)"; }
kafka_up() { "$TANSU" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT"); }

# --- ClickHouse --------------------------------------------------------------------------------
CH="$STATE/clickhouse"
# The server's data (parts and metadata) lives in memory, on /dev/shm, by default: on a disk
# whose ext4 has no journal (this development machine's), the kernel checks recently deleted
# inodes for every file it creates, and that was half of the server's CPU on an insert
# (docs/services.md, "ClickHouse's data directory"). It lasts until the machine restarts (tansu's
# memory storage does not: a broker restart empties it). TALLYDEV_CH_DATA_DIR puts it elsewhere
# (e.g. "$CH/data", on disk).
# The choice is recorded in $CH/data_dir when a server starts on it, and kept by every later start
# (the tests stop and restart the server) until TALLYDEV_CH_DATA_DIR names another.
# Each state directory has its own directory on /dev/shm, which names the state directory: one
# whose state directory is gone (a removed CI clone) and whose server is stopped is removed, so
# memory is not left behind.
# running_with TEXT: some process's command line holds TEXT (a fixed string, not a pattern).
running_with() { grep -qsF -- "$1" /proc/[0-9]*/cmdline; }
if [[ -d /dev/shm && -w /dev/shm ]]; then
  for d in /dev/shm/tally-*/; do
    # Only this user's (/dev/shm is shared: another user's state directory may be unreadable).
    [[ -O $d && -s $d/state ]] || continue
    owner=$(cat "$d/state")
    if [[ ! -d $owner ]] && ! running_with "config-file=$owner/clickhouse/config.xml"; then
      log "removing $d (its state directory $owner is gone)"
      rm -rf "$d" || log "could not remove $d"
    fi
  done
fi
record_data_dir=false
if [[ -n ${TALLYDEV_CH_DATA_DIR:-} ]]; then
  CH_DATA="${TALLYDEV_CH_DATA_DIR%/}"
  [[ $CH_DATA == /* ]] || CH_DATA="$PWD/$CH_DATA"
elif [[ -s $CH/data_dir ]]; then
  CH_DATA=$(cat "$CH/data_dir")
elif [[ -f $CH/config.xml ]] && ch_up >/dev/null 2>&1; then
  # A server started before the choice was recorded: keep the data directory it runs on.
  CH_DATA=$(sed -n 's|^ *<path>\(.*\)/</path>.*|\1|p' "$CH/config.xml" | head -1)
  record_data_dir=true
elif [[ -d /dev/shm && -w /dev/shm ]]; then
  CH_DATA="/dev/shm/tally-$(printf %s "$STATE" | sha256sum | cut -c1-12)/clickhouse"
else
  CH_DATA="$CH/data"
fi
mkdir -p "$CH"
if [[ $record_data_dir == true ]]; then printf %s "$CH_DATA" >"$CH/data_dir"; fi
if [[ $CH_DATA == /dev/shm/tally-*/clickhouse ]]; then
  # Named on every start: after a restart of the machine the directory is made anew.
  mkdir -p "${CH_DATA%/clickhouse}" && printf %s "$STATE" >"${CH_DATA%/clickhouse}/state"
fi
if ! ch_up >/dev/null 2>&1; then
  # Recorded only when a server starts on it (a running server keeps the directory it has).
  printf %s "$CH_DATA" >"$CH/data_dir"
  mkdir -p "$CH_DATA" "$CH/tmp" "$CH/user_files" "$CH/format_schemas" "$CH/log"
  sed -e "s|/var/lib/clickhouse/|$CH_DATA/|g; s|$CH_DATA/tmp/|$CH/tmp/|; s|$CH_DATA/user_files/|$CH/user_files/|; s|$CH_DATA/format_schemas/|$CH/format_schemas/|" \
      -e "s|/var/log/clickhouse-server/|$CH/log/|g" \
      -e "s|<http_port>8123</http_port>|<http_port>$CH_HTTP_PORT</http_port>|" \
      -e "s|<tcp_port>9000</tcp_port>|<tcp_port>$CH_TCP_PORT</tcp_port>|" \
      -e "s|<interserver_http_port>9009</interserver_http_port>||" \
      -e "s|<listen_host>::1</listen_host>||" \
      -e "s|<!-- <timezone>Europe/Moscow</timezone> -->|<timezone>UTC</timezone>|" \
      -e "s|<keep_alive_timeout>3</keep_alive_timeout>|<keep_alive_timeout>30</keep_alive_timeout>|" \
      /etc/clickhouse-server/config.xml > "$CH/config.xml"
  cp /etc/clickhouse-server/users.xml "$CH/users.xml"
  log "starting clickhouse-server (config in $CH, data in $CH_DATA)"
  # Its allocator (jemalloc), configured as ClickHouse's own builds configure it
  # (contrib/jemalloc-cmake/CMakeLists.txt: per-CPU arenas, no separate arena that returns large
  # allocations to the kernel at once, freed pages kept 5 s) and without transparent huge pages,
  # as ClickHouse's usage recommendations ask ("Huge Pages": they interfere with memory
  # allocators). Debian's 18.16 links the system jemalloc with none of this: on this machine
  # (THP "always") that cost a third of the server's CPU in an ingest pass, most of it the kernel
  # zeroing fresh huge pages (docs/measurements.md, "ClickHouse's allocator").
  # TALLYDEV_CH_MALLOC_CONF overrides it (empty: Debian's defaults, to measure against).
  CH_MALLOC_CONF="${TALLYDEV_CH_MALLOC_CONF-thp:never,percpu_arena:percpu,oversize_threshold:0,muzzy_decay_ms:5000,dirty_decay_ms:5000}"
  # Detached (setsid, no inherited stdio): nothing of it may hold the caller's pipes open.
  (cd "$CH" && MALLOC_CONF="$CH_MALLOC_CONF" exec setsid clickhouse-server --config-file="$CH/config.xml" \
    </dev/null >"$CH/log/stdout.log" 2>&1) &
  echo $! >"$CH/pid"
  wait_for clickhouse 60 ch_up
fi
# ch_query SQL: runs SQL on the server, prints the answer; on an error, its message and exit 1.
ch_query() {
  python3 - "$CH_HTTP_PORT" "$1" <<'PY'
import sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/"
try:
    print(urllib.request.urlopen(urllib.request.Request(url, data=sys.argv[2].encode()), timeout=10).read().decode().strip())
except Exception as e:
    body = getattr(e, "read", lambda: b"")().decode(errors="replace")[:300]
    sys.exit(f"{e} {body}")
PY
}
# Whatever server answers must be this state directory's (a server left running by a removed
# checkout keeps its data in memory and would answer every query; one started elsewhere would be
# killed and restarted by the tests through this directory's pid file), and usable.
served=$(ch_query "SELECT data_path FROM system.databases WHERE name = 'system'" 2>/dev/null || true)
if [[ -n $served && $served != "$CH_DATA/data/system/" ]]; then
  log "the ClickHouse server on 127.0.0.1:$CH_HTTP_PORT keeps its data in ${served%/data/system/}, not in $CH_DATA, the one chosen for $STATE: stop it (scripts/stop.sh, if it is this state directory's server), or set TALLYDEV_CH_HTTP_PORT and TALLYDEV_CH_TCP_PORT"
  exit 1
fi
ch_usable() { ch_query "CREATE DATABASE IF NOT EXISTS _tally_probe" >/dev/null && ch_query "DROP DATABASE IF EXISTS _tally_probe" >/dev/null; }
if ! ch_usable; then
  log "the ClickHouse server on 127.0.0.1:$CH_HTTP_PORT does not work (see above); stop it or set TALLYDEV_CH_HTTP_PORT"
  exit 1
fi
log "clickhouse up on 127.0.0.1:$CH_HTTP_PORT"

# --- tansu (Kafka protocol) --------------------------------------------------------------------
K="$STATE/tansu"
mkdir -p "$K"
if ! pid_alive "$K/pid"; then
  log "starting tansu broker (memory storage)"
  setsid "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ </dev/null >"$K/broker.log" 2>&1 &
  echo $! >"$K/pid"
  wait_for tansu 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT"
fi
log "tansu up on 127.0.0.1:$KAFKA_PORT"

# create_topic NAME PARTITIONS: idempotent.
create_topic() {
  if ! "$TANSU" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>/dev/null | grep -q "\"name\":\"$1\""; then
    "$TANSU" topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions "$2" "$1" >/dev/null 2>&1 || true
  fi
}
for t in ${TALLYDEV_TOPICS:-trace-events trace-events.rejected}; do create_topic "$t" 6; done
# tally-api's org states and notifier ledger (compacted in production: docker-compose.yml).
create_topic tally.entitlements 6
