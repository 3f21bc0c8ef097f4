#!/usr/bin/env bash
# Checks the Prometheus side of the monitoring (docs/alerts.md):
#   - promtool check config config/prometheus.yml (and the rule files it loads)
#   - promtool check rules + promtool test rules (config/alerts/tally.rules{,.test}.yml)
#   - every alert has a severity (page|ticket), summary, description and a runbook pointing at a
#     section of docs/alerts.md that exists
#   - every query of the Grafana dashboard parses (config/grafana/dashboards/tally.json)
# Exits non-zero on any failure.
#
# promtool: the one on PATH, else a copy in the cache, else it is extracted once from Debian's
# `prometheus` package (apt-get download + dpkg-deb). The package is not installed: its postinst
# adds a system user and, on a machine without systemd, starts the Prometheus server through
# /etc/init.d unless a policy-rc.d forbids it (and fails the install if the start fails).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RULES="$ROOT/config/alerts/tally.rules.yml"
TESTS="$ROOT/config/alerts/tally.rules.test.yml"
PROM_CONFIG="$ROOT/config/prometheus.yml"
DOC="$ROOT/docs/alerts.md"
DASHBOARD="$ROOT/config/grafana/dashboards/tally.json"
PROMTOOL_CACHED="$CACHE/promtool/promtool"

say() { printf '[alerts] %s\n' "$*" >&2; }

# Prints the path of a working promtool, extracting it from the Debian package if needed.
find_promtool() {
  if command -v promtool >/dev/null 2>&1; then
    command -v promtool
    return
  fi
  if [[ -x $PROMTOOL_CACHED ]] && "$PROMTOOL_CACHED" --version >/dev/null 2>&1; then
    echo "$PROMTOOL_CACHED"
    return
  fi
  say "extracting promtool from Debian's prometheus package into $(dirname "$PROMTOOL_CACHED")"
  local tmp status=0
  tmp=$(mktemp -d)
  set +e
  (
    set -e
    cd "$tmp"
    # An out-of-date package list (or none yet) cannot find the package: update once and retry.
    if ! apt-get download prometheus >apt.log 2>&1; then
      if [[ $(id -u) -ne 0 ]]; then
        cat apt.log >&2
        say "cannot download the prometheus package: run as root, or put promtool on PATH"
        exit 1
      fi
      apt-get update >apt.log 2>&1 || { cat apt.log >&2; exit 1; }
      apt-get download prometheus >apt.log 2>&1 || { cat apt.log >&2; exit 1; }
    fi
    deb=(prometheus_*.deb)
    dpkg-deb --fsys-tarfile "${deb[0]}" >promtool.tar
    tar -xf promtool.tar ./usr/bin/promtool
    mkdir -p "$(dirname "$PROMTOOL_CACHED")"
    install -m 0755 usr/bin/promtool "$PROMTOOL_CACHED.tmp.$$"
    mv -f "$PROMTOOL_CACHED.tmp.$$" "$PROMTOOL_CACHED"
  )
  status=$?
  set -e
  rm -rf "$tmp"
  if ((status != 0)) || ! "$PROMTOOL_CACHED" --version >/dev/null 2>&1; then
    say "could not install promtool"
    return 1
  fi
  say "$("$PROMTOOL_CACHED" --version 2>&1 | head -n1)"
  echo "$PROMTOOL_CACHED"
}

# Every alert: severity page|ticket, summary, description, runbook docs/alerts.md#<anchor> where
# <anchor> is a heading of docs/alerts.md (GitHub's anchor: lower case, punctuation dropped,
# spaces to hyphens).
lint_rules() {
  awk -v doc="$DOC" '
    function anchor(h) {
      sub(/^#+[ \t]*/, "", h); h = tolower(h)
      gsub(/[^a-z0-9 _-]/, "", h); gsub(/ /, "-", h)
      return h
    }
    function finish() {
      if (name == "") return
      if (severity !~ /^(page|ticket)$/) fail(name ": severity must be page or ticket, is \"" severity "\"")
      if (!summary) fail(name ": no summary annotation")
      if (!description) fail(name ": no description annotation")
      if (runbook == "") fail(name ": no runbook annotation")
      else if (runbook !~ /^docs\/alerts\.md#/) fail(name ": runbook must point at docs/alerts.md#<section>, is " runbook)
      else if (!(substr(runbook, 16) in anchors)) fail(name ": runbook " runbook " has no such section in docs/alerts.md")
      name = ""
    }
    function fail(msg) { print "[alerts] " msg > "/dev/stderr"; bad = 1 }
    BEGIN {
      while ((getline line < doc) > 0) if (line ~ /^#+ /) { anchors[anchor(line)] = 1; sections++ }
      if (sections == 0) fail("no sections in " doc)
    }
    /^[ \t]*- (alert|record|name):/ { finish() }
    /^[ \t]*- alert:/ {
      name = $3; n++; severity = ""; summary = 0; description = 0; runbook = ""
    }
    name != "" && /^[ \t]+severity:/ { severity = $2; gsub(/"/, "", severity); gsub("\047", "", severity) }
    name != "" && /^[ \t]+summary:/ { summary = 1 }
    name != "" && /^[ \t]+description:/ { description = 1 }
    name != "" && /^[ \t]+runbook:/ { runbook = $2; gsub(/"/, "", runbook); gsub("\047", "", runbook) }
    END {
      finish()
      if (n == 0) fail("no alerts found")
      if (!bad) print "  SUCCESS: " n " alerts have severity, summary, description and a runbook section"
      exit bad
    }
  ' "$RULES"
}

# The dashboard's queries as recording rules, for promtool to parse ($__rate_interval -> 1m).
check_dashboard() {
  local tmp status=0
  tmp=$(mktemp -d)
  python3 - "$DASHBOARD" >"$tmp/dashboard.rules.yml" <<'PY' || status=$?
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert exprs, "no queries in the dashboard"
for p in dash["panels"]:
    for t in p.get("targets", []):
        assert t.get("datasource", {}).get("uid") == "prometheus", p["title"] + ": datasource uid is not prometheus"
print("groups:\n  - name: dashboard\n    rules:")
for i, e in enumerate(exprs):
    print(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e.replace('$__rate_interval', '1m'))}")
PY
  if ((status == 0)); then
    "$PROMTOOL" check rules "$tmp/dashboard.rules.yml" >"$tmp/out" 2>&1 || status=$?
    if ((status == 0)); then
      echo "  SUCCESS: $(grep -c 'record:' "$tmp/dashboard.rules.yml") dashboard queries parse"
    else
      cat "$tmp/out" >&2
    fi
  fi
  rm -rf "$tmp"
  return "$status"
}

PROMTOOL=$(find_promtool)
cd "$ROOT"
"$PROMTOOL" check config "${PROM_CONFIG#"$ROOT/"}"
"$PROMTOOL" check rules "${RULES#"$ROOT/"}"
"$PROMTOOL" test rules "${TESTS#"$ROOT/"}"
echo "Checking runbooks ($(basename "$RULES") -> docs/alerts.md)"
lint_rules
echo "Checking the Grafana dashboard queries (${DASHBOARD#"$ROOT/"})"
check_dashboard
