//! `tally-ingest`: the exact ingest worker and its operator tools.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tally::config::IngestConfig;

#[derive(Parser)]
#[command(name = "tally-ingest", version, about = "Exact usage metering: Kafka → verify → dedupe → meter → ClickHouse")]
struct Cli {
    /// Config file (TOML); every key can also be set as TALLY_<SECTION>_<KEY>.
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the ClickHouse schema (idempotent).
    Migrate {
        /// Read migrations from this directory instead of the built-in ones.
        #[arg(long)]
        schemas: Option<PathBuf>,
        /// How long to wait for ClickHouse to come up before giving up.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        /// Every tally-ingest worker is stopped: apply migrations that re-create the aggregates'
        /// views too (refused without it on an existing database; docs/clickhouse.md).
        #[arg(long)]
        ingestion_stopped: bool,
    },
    /// Join the consumer group and ingest until SIGTERM/SIGINT.
    Run,
    /// Produce synthetic traffic and write the expected totals as JSON.
    Generate(GenerateArgs),
    /// Write development key material (JWKS, API keys, and the generator's private side).
    Keygen {
        #[arg(long, default_value = "config/dev")]
        dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        orgs: usize,
        #[arg(long, default_value_t = 6)]
        projects_per_org: usize,
    },
    /// Sign a development JWT with the keys of `keygen` (to try tally-api or a producer), printed
    /// to stdout. Never for production: the private key lives in the keys directory.
    Token {
        #[arg(long, default_value = "config/dev")]
        dir: PathBuf,
        /// org_id claim.
        #[arg(long)]
        org: String,
        /// project_id claim; without it the token covers the whole org (tally-api only).
        #[arg(long)]
        project: Option<String>,
        /// Space-separated scopes: ingest, usage:read, usage:admin.
        #[arg(long, default_value = "usage:read")]
        scope: String,
        /// aud claim (tally-api's api.audience, or tally-ingest).
        #[arg(long, default_value = "tally-api")]
        audience: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
    /// Show, wait for, or reset the group's committed offsets.
    Offsets {
        /// Wait until the offsets reach the `end_offsets` of this expected-outcome file.
        #[arg(long)]
        wait_for: Option<PathBuf>,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// Reset every partition to the earliest offset (stop the workers first).
        #[arg(long)]
        reset_to_earliest: bool,
    },
    /// Summarise the dead-letter topic by reason.
    DeadLetters,
    /// Manage API keys in the shared key store (auth.api_keys_store = "clickhouse").
    Keys {
        #[command(subcommand)]
        command: tally::verify::cli::KeysCommand,
    },
    /// Drop months of narrow rows older than clickhouse.events_retention_days.
    Prune {
        /// Only list what would be dropped.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Directory with the development keys (see `keygen`).
    #[arg(long, default_value = "config/dev")]
    keys_dir: PathBuf,
    /// Events to produce (accepted, duplicate and rejected together).
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// Events per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Build every message first, then send them at `--rate` (for rates above what building
    /// messages sustains; holds the workload in memory, about 0.8 KiB per event).
    #[arg(long)]
    prebuild: bool,
    /// Send as a transactional producer, committing every N messages (0: no transactions); the
    /// commit markers leave gaps in the partitions' offsets.
    #[arg(long, default_value_t = 0)]
    transaction_messages: u64,
    /// Share of duplicate copies.
    #[arg(long, default_value_t = 0.06)]
    dup_ratio: f64,
    /// Share of messages rejected as a whole.
    #[arg(long, default_value_t = 0.03)]
    bad_message_ratio: f64,
    /// Share of bad events inside batch messages.
    #[arg(long, default_value_t = 0.02)]
    bad_event_ratio: f64,
    /// Share of messages that are batches.
    #[arg(long, default_value_t = 0.3)]
    batch_ratio: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the expected outcome.
    #[arg(long, default_value = "expected.json")]
    expected: PathBuf,
    /// Also print the expected totals per (org, project, meter) to stdout.
    #[arg(long)]
    print_totals: bool,
}

fn main() -> anyhow::Result<()> {
    tally::disable_transparent_huge_pages();
    tally::init_logging("info");
    let cli = Cli::parse();
    let cfg = IngestConfig::load(cli.config.as_deref(), std::env::vars()).context("failed to load config")?;
    match cli.command {
        Command::Migrate { schemas, wait_secs, ingestion_stopped } => {
            let ch = tally::sink::clickhouse::ClickHouse::new(&cfg.clickhouse);
            ch.wait_ready(Duration::from_secs(wait_secs))
                .with_context(|| format!("clickhouse at {} did not come up in {wait_secs}s", cfg.clickhouse.url))?;
            let migrations = tally::sink::schema::load(schemas.as_deref())?;
            use tally::sink::schema::StopIngestion;
            let stop = if ingestion_stopped { StopIngestion::Apply } else { StopIngestion::Refuse };
            let applied = tally::sink::schema::migrate(&ch, &migrations, stop)?;
            eprintln!(
                "migrations applied: {}",
                if applied.is_empty() { "none (up to date)".into() } else { applied.join(", ") }
            );
        }
        Command::Keys { command } => tally::verify::cli::run(&cfg, command)?,
        Command::Run => {
            tally::metrics::install(&cfg.metrics.listen)?;
            let shutdown = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, shutdown.clone()).context("failed to install signal handler")?;
            }
            tally::source::worker::run(cfg, shutdown)?;
        }
        Command::Generate(a) => {
            let keys = tally::devkeys::DevKeys::read(&a.keys_dir).with_context(|| {
                format!("failed to read dev keys in {} (run `tally-ingest keygen`)", a.keys_dir.display())
            })?;
            let defs = tally::meter::parse_defs(&std::fs::read_to_string(&cfg.meters.path)?)?;
            let gen = tally::loadgen::GenConfig {
                events: a.events,
                rate: a.rate,
                prebuild: a.prebuild,
                transaction_messages: a.transaction_messages,
                dup_ratio: a.dup_ratio,
                bad_message_ratio: a.bad_message_ratio,
                bad_event_ratio: a.bad_event_ratio,
                batch_ratio: a.batch_ratio,
                seed: a.seed,
                max_message_bytes: cfg.ingest.max_message_bytes,
                window_secs: cfg.dedupe.window_secs,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let out = tally::loadgen::generate(
                &gen,
                &keys,
                defs,
                &tally::source::client_config(&cfg.kafka),
                &cfg.kafka.topic,
                |_| {},
            )?;
            std::fs::write(&a.expected, serde_json::to_string(&out)?)?;
            if a.print_totals {
                let mut totals = std::collections::BTreeMap::<(&str, &str, &str), u64>::new();
                for (o, p, m, _, v) in &out.totals {
                    *totals.entry((o, p, m)).or_default() += v;
                }
                for (o, p, m, n) in &out.unique_overall {
                    totals.insert((o, p, m), *n);
                }
                println!("org_id\tproject_id\tmeter\tvalue");
                for ((o, p, m), v) in totals {
                    println!("{o}\t{p}\t{m}\t{v}");
                }
            }
            eprintln!(
                "produced {} messages / {} events in {:.1}s (sending {:.1}s): {} accepted, {} duplicates, {} rejected; expected outcome in {}",
                out.messages, out.events, t.elapsed().as_secs_f64(), out.send_secs, out.accepted, out.duplicates, out.rejected_events, a.expected.display()
            );
        }
        Command::Keygen { dir, orgs, projects_per_org } => {
            let keys = tally::devkeys::DevKeys::generate(orgs, projects_per_org, &cfg.auth.issuer, &cfg.auth.audience);
            keys.write(&dir)?;
            eprintln!("wrote {} projects' keys to {}", keys.tenants.len(), dir.display());
        }
        Command::Token { dir, org, project, scope, audience, ttl_secs } => {
            let keys = tally::devkeys::DevKeys::read(&dir)
                .with_context(|| format!("no development keys in {} (run keygen first)", dir.display()))?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            let mut claims = serde_json::json!({
                "iss": keys.issuer, "aud": [audience], "iat": now, "exp": now.saturating_add(ttl_secs),
                "org_id": org, "scope": scope, "sub": "tally-dev",
            });
            if let Some(p) = project {
                claims["project_id"] = p.into();
            }
            println!("{}", keys.sign_eddsa(&claims));
        }
        Command::Offsets { wait_for, timeout_secs, reset_to_earliest } => {
            if reset_to_earliest {
                tally::admin::reset(&cfg.kafka, 0)?;
            }
            if let Some(path) = wait_for {
                let e: tally::loadgen::expected::Expected = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                tally::admin::wait_committed(&cfg.kafka, &e.end_offsets, Duration::from_secs(timeout_secs))?;
            }
            println!("{}", serde_json::to_string(&tally::admin::committed(&cfg.kafka)?)?);
        }
        Command::Prune { dry_run } => {
            let ch = tally::sink::clickhouse::ClickHouse::new(&cfg.clickhouse);
            let now = tally::source::worker::now_secs();
            let dropped = tally::sink::retention::prune(&ch, cfg.clickhouse.events_retention_days, now, dry_run)?;
            let verb = if dry_run { "would drop" } else { "dropped" };
            eprintln!("{verb} {} month partition(s) of events: {dropped:?}", dropped.len());
        }
        Command::DeadLetters => {
            let records = tally::admin::read_dead_letters(&cfg.kafka, None, Duration::from_secs(3))?;
            let mut by_reason = std::collections::BTreeMap::<String, (u64, std::collections::BTreeSet<_>)>::new();
            for r in records {
                let e = by_reason.entry(r.reason.clone()).or_default();
                e.0 += 1;
                e.1.insert((r.source_partition, r.source_offset, r.batch_index));
            }
            println!("{:<22} {:>8} {:>8}", "reason", "records", "distinct");
            for (reason, (n, distinct)) in by_reason {
                println!("{reason:<22} {n:>8} {:>8}", distinct.len());
            }
        }
    }
    Ok(())
}
