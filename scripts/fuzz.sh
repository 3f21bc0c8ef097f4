#!/usr/bin/env bash
# Runs every cargo-fuzz target for a fixed time from its committed seed corpus; fails on a crash
# (a panic, including a broken invariant asserted inside the target).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET=30] [TARGET...]
#        scripts/fuzz.sh --build-only   (installs cargo-fuzz and builds the targets; scripts/test.sh
#                                        runs it in the background while the tests run)
# Installs cargo-fuzz (crates.io, pinned) if missing. Builds on stable Rust: no sanitizer
# (`-s none`; the only unsafe code, src/source/headers.rs, is not reached by the targets), release with
# debug assertions and overflow checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build_only=false
if [[ ${1:-} == --build-only ]]; then build_only=true; shift; fi
secs="${1:-30}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then targets=(decode pipeline credentials timestamp config); fi
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked >&2
fi
flags=(-O -a -s none)
cargo fuzz build "${flags[@]}" >&2
if $build_only; then exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  log="$work/$t.log"
  # New inputs go to the scratch corpus; the committed seeds are only read.
  if cargo fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$work/$t-" >"$log" 2>&1; then
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    echo "[fuzz] $t: ok, $runs runs in ${secs}s ($rate exec/s)"
  else
    echo "[fuzz] $t: FAILED" >&2
    grep -E "panicked|assert|left|right|ERROR|SUMMARY" -A2 "$log" | head -30 >&2
    for a in "$work/$t"-crash-* "$work/$t"-oom-* "$work/$t"-timeout-*; do
      [[ -f $a ]] && { echo "[fuzz] input ($a):" >&2; head -c 600 "$a" | od -c | head -12 >&2; }
    done
    status=1
  fi
done
exit $status
