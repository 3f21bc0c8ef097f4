"""Turns target/bench/{core,ingest}.json (written by `cargo bench --bench pipeline` and
`cargo bench --bench ingest`) into docs/benchmarks.md (table of ratios against the yardsticks
measured in the same run) and a PNG plot. Usage: bench_report.py BENCH_DIR OUT_MD OUT_PNG"""
import datetime
import json
import os
import platform
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out_md, out_png = sys.argv[1:4]
core = json.load(open(os.path.join(src, "core.json")))
ing = json.load(open(os.path.join(src, "ingest.json")))
best = lambda v: min(v) if isinstance(v, list) else v
raw, first, replay = best(ing["raw_consume_s"]), best(ing["first_pass_s"]), best(ing["replay_s"])
two, plain, full = ing["two_workers_s"], best(ing["insert_plain_s"]), best(ing["insert_full_s"])
r = ing["ratios"]


def ok(cond):
    return "met" if cond else "**not met**"


rows = [
    ("end to end, 1 worker: assigned → caught up, vs raw consume", f"{first:.2f} s vs {raw:.2f} s",
     f"{r['first_pass_vs_raw_consume']:.2f}×", "≤ 1.25×", ok(r["first_pass_vs_raw_consume"] <= 1.25)),
    ("2 workers on the same box vs 1 (rebalance included)", f"{two:.2f} s vs {first:.2f} s",
     f"{r['two_workers_vs_one']:.2f}×", "≤ 1.0×", ok(r["two_workers_vs_one"] <= 1.0)),
]
if r.get("two_workers_vs_one_after_the_rebalance") is not None:
    rows.append(("… 2 workers once both hold partitions: time per row left to write vs the best 1-worker pass's "
                 "time per row (tansu holds each JoinGroup for half the session timeout; docs/services.md)",
                 f"{two - ing['two_workers_settled_s']:.2f} s for the "
                 f"{100 * (1 - ing['two_workers_settled_rows'] / ing['rows']):.0f} % of rows left",
                 f"{r['two_workers_vs_one_after_the_rebalance']:.2f}×", "(part)", "—"))
if r.get("two_workers_together_vs_one") is not None:
    rows.append(("2 workers started together (1 s apart, in the group's first join round) vs 1",
                 f"{ing['two_workers_together_s']:.2f} s vs {first:.2f} s "
                 f"({ing['two_workers_together_assignments']} non-empty assignments; 2 = one round)",
                 f"{r['two_workers_together_vs_one']:.2f}×", "≤ 1.0×", ok(r["two_workers_together_vs_one"] <= 1.0)))
rows += [
    ("replay rate vs first pass", f"{replay:.2f} s vs {first:.2f} s",
     f"{r['replay_rate_vs_first_pass']:.2f}×", "≥ 0.5×", ok(r["replay_rate_vs_first_pass"] >= 0.5)),
    ("ClickHouse: insert with the aggregates (carrier rows) vs plain insert of the narrow rows",
     f"{full:.2f} s vs {plain:.2f} s",
     f"{r['aggregates_vs_plain_insert']:.2f}×", "≤ 1.5×", ok(r["aggregates_vs_plain_insert"] <= 1.5)),
]
if "aggregates_vs_plain_insert_cpu" in r:
    cpu = ing["insert_cpu_s"]
    rows.append(("… the same inserts' ClickHouse work: the server's CPU seconds (user + system, /proc), best round",
                 f"{best(cpu['full']):.2f} s vs {best(cpu['plain']):.2f} s",
                 f"{r['aggregates_vs_plain_insert_cpu']:.2f}×", "≤ 1.5×", ok(r["aggregates_vs_plain_insert_cpu"] <= 1.5)))
    if "aggregates_vs_plain_insert_006_views_cpu" in r:
        rows.append(("… … with schema 006's views (before 007: every inserted row array-joined), CPU seconds",
                     f"{best(cpu['full_006']):.2f} s vs {best(cpu['plain']):.2f} s",
                     f"{r['aggregates_vs_plain_insert_006_views_cpu']:.2f}×", "(before)", "—"))
    rows.append(("… … the schema before carrier rows, CPU seconds",
                 f"{best(cpu['full_before']):.2f} s vs {best(cpu['plain']):.2f} s",
                 f"{r['aggregates_vs_plain_insert_before_carriers_cpu']:.2f}×", "(before)", "—"))
if "aggregates_vs_plain_insert_before_carriers" in r:
    rows.append(("… the schema before carrier rows (views over every event's meters), same rows, same run",
                 f"{best(ing['insert_full_before_carriers_s']):.2f} s vs {plain:.2f} s",
                 f"{r['aggregates_vs_plain_insert_before_carriers']:.2f}×", "(before)", "—"))
    if "aggregates_vs_plain_insert_006_views" in r:
        rows.append(("… with schema 006's views (before 007), same rows, same run",
                     f"{best(ing['insert_full_006_views_s']):.2f} s vs {plain:.2f} s",
                     f"{r['aggregates_vs_plain_insert_006_views']:.2f}×", "(before)", "—"))
    rows.append(("… of which the carrier columns alone (plain insert with them)",
                 f"{best(ing['insert_plain_with_carrier_columns_s']):.2f} s vs {plain:.2f} s",
                 f"{r['carrier_columns_vs_plain_insert']:.2f}×", "(part)", "—"))
lat = ing.get("latency")
if lat:
    rows.append((f"p99 event-to-aggregate latency at {lat['rate_events_per_s']:,.0f} events/s sent "
                 f"({lat['vs_max_rate']:.2f}× the first pass's rate; messages built before sending)",
                 f"p50 ≤ {lat['p50_le_s']} s, p99 ≤ {lat['p99_le_s']} s ({lat['messages']:,} messages)",
                 "—", "reported", "reported"))
for c in core:
    rows.append((f"core, 1 core, {c['messages']}", f"{c['core_events_per_s'] / 1e6:.2f} M events/s",
                 f"{c['core_events_per_s'] / 1e6:.2f} M/s", "≥ 1.5 M/s", ok(c["core_events_per_s"] >= 1.5e6)))
    rows.append((f"core vs serde_json IgnoredAny on the same bytes, {c['messages']}",
                 f"{c['yardstick_events_per_s'] / 1e6:.2f} M events/s yardstick",
                 f"{c['core_vs_yardstick']:.2f}×", "≥ 1.0×", ok(c["core_vs_yardstick"] >= 1.0)))

# Where the server kept its data (scripts/bench.sh passes it; docs/services.md, "ClickHouse's data
# directory"): the same inserts cost far more on this machine's journal-less ext4 disk.
ch_data = os.environ.get("BENCH_CH_DATA", "not recorded")

md = [
    "# Benchmarks",
    "",
    f"Generated by `scripts/bench.sh` on {datetime.date.today()} ({platform.machine()}, "
    f"{os.cpu_count()} cores; ClickHouse 18.16 and tansu on the same machine). Every ratio compares two "
    "figures measured in the same run (this machine's absolute timings vary by ±40 % between runs); "
    "times are the best of the rounds. Totals are checked against the generator after every pass.",
    "",
    f"ClickHouse's data directory: {ch_data}.",
    "",
    f"Data: {ing['events']:,} generated events in {ing['messages']:,} messages, {ing['accepted']:,} accepted "
    f"({ing['rows']:,} narrow rows); produced in {ing['produce_s']:.1f} s.",
    "",
    "| what | measured | ratio | target | |",
    "|---|---|---|---|---|",
]
md += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
api_path = os.path.join(src, "api.json")
if os.path.exists(api_path):
    api = json.load(open(api_path))
    md += [
        "",
        "## tally-api (issue 10)",
        "",
        f"`scripts/bench-api.sh`: wrk against tally-api on a fixture of {api['fixture']} "
        f"({api['fixture_rows']:,} aggregate rows, merged), each request for a random org of the 1,000, "
        "with an admin token; wrk, tally-api and ClickHouse share the 2 cores. Every answer was a 200.",
        "",
        "| endpoint | connections | requests/s | p50 | p90 | p99 | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("usage", "`GET /v1/usage` one org, 31 days, `window=day` (7 meters × 31 days)"),
                        ("entitlements", "`GET /v1/entitlements/{org}` (3 limited meters, this period)")):
        for c in ("c1", "c8"):
            m = api[name][c]
            target = f"p99 ≤ 50 ms: {ok(m['p99_ms'] <= 50)}" if c == "c1" else "reported"
            md.append(f"| {label} | {c[1:]} | {m['requests_per_s']:.1f} | {m['p50_ms']:.1f} ms | "
                      f"{m['p90_ms']:.1f} ms | {m['p99_ms']:.1f} ms | {target} |")
md += [
    "",
    f"Events/s end to end: first pass {ing['events_per_s']['first_pass']:,.0f}, replay "
    f"{ing['events_per_s']['replay']:,.0f}. First group join (not in the times above): "
    f"{best(ing['first_join_s']):.1f} s.",
    "",
]
if "cpu_s" in ing:
    fc, rc = ing["cpu_s"]["first_pass"], ing["cpu_s"]["raw_consume"]
    total = fc["consumer"] + fc["clickhouse"] + fc["broker"]
    md += [
        f"Where the 2 cores go (CPU seconds, from `/proc/<pid>/stat`): the best first pass used "
        f"{fc['consumer']:.2f} s in tally-ingest, {fc['clickhouse']:.2f} s in ClickHouse and "
        f"{fc['broker']:.2f} s in the broker — {total:.2f} s, so on 2 cores it cannot take less than "
        f"{total / 2:.2f} s, or {total / 2 / best(ing['raw_consume_s']):.2f}× the raw consume; the raw "
        f"consume used {rc['consumer']:.2f} s in the consumer and {rc['broker']:.2f} s in the broker.",
        "",
    ]
md += [
    "Dedupe memory: " + "; ".join(f"{c['messages']}: {c['dedupe_bytes_per_key']:.0f} B per held key" for c in core)
    + " (the Bloom filter is sized by `dedupe.bloom_bytes_per_partition`, so bytes per key fall as keys grow).",
    "",
    "![seconds per pass](benchmarks.png)",
    "",
    "Raw data: `target/bench/core.json`, `target/bench/ingest.json`, `target/bench/api.json`.",
    "",
]
open(out_md, "w").write("\n".join(md))

fig, ax = plt.subplots(figsize=(8, 3.6))
labels = ["raw consume", "tally, 1 worker", "tally, 2 workers", "replay", "insert plain", "insert + aggregates"]
vals = [raw, first, two, replay, plain, full]
colors = ["#888888", "#1f77b4", "#1f77b4", "#ff7f0e", "#888888", "#2ca02c"]
ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
for i, v in enumerate(vals[::-1]):
    ax.text(v, i, f" {v:.2f} s", va="center")
ax.set_xlabel(f"seconds for {ing['events']:,} events ({ing['rows']:,} rows), best of the rounds")
ax.set_xlim(0, max(vals) * 1.2)
fig.tight_layout()
fig.savefig(out_png, dpi=110)
