//! `tally-invoicer`: tally's usage, its verification, and reconciliation with Stripe.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use tally::invoice::config::{CustomerSource, Granularity, InvoicerConfig, StripeMode};
use tally::invoice::mapping::Mapping;
use tally::invoice::period::Period;
use tally::invoice::reconcile::{reconcile, Env, Options, ReconcileError};
use tally::invoice::report::{csv, Format};
use tally::invoice::stripe::StripeHttp;
use tally::invoice::{explain, metrics as m, provision, usage};
use tally::meter::Meters;
use tally::sink::clickhouse::ClickHouse;

#[derive(Parser)]
#[command(
    name = "tally-invoicer",
    version,
    about = "Reconcile tally's usage aggregates with Stripe, exactly and rerun-safe"
)]
struct Cli {
    /// Config file (TOML); every key can also be set as TALLY_<SECTION>_<KEY>.
    #[arg(long, global = true, env = "TALLY_INVOICER_CONFIG")]
    config: Option<PathBuf>,
    /// How long to wait for ClickHouse (at start, and during a run) before giving up.
    #[arg(long, global = true, default_value_t = 60)]
    wait_secs: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct PeriodArgs {
    /// A calendar month (UTC), e.g. 2026-11.
    #[arg(long)]
    month: Option<String>,
    /// Start (inclusive): RFC 3339, 2026-11-29T13 or 2026-11-29; whole hours.
    #[arg(long)]
    from: Option<String>,
    /// End (exclusive), same forms as --from.
    #[arg(long)]
    to: Option<String>,
}

impl PeriodArgs {
    fn period(&self) -> anyhow::Result<Period> {
        Period::from_args(self.month.as_deref(), self.from.as_deref(), self.to.as_deref()).map_err(anyhow::Error::msg)
    }
}

#[derive(Subcommand)]
enum Command {
    /// tally's totals per org/project/meter (unique meters merged across hours, not summed).
    Usage {
        #[command(flatten)]
        period: PeriodArgs,
        /// Only this org.
        #[arg(long)]
        org: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: Format,
    },
    /// Check that the aggregates equal what the per-event rows give, for every (org, project, meter, hour).
    Verify {
        #[command(flatten)]
        period: PeriodArgs,
        #[arg(long, default_value = "table")]
        format: Format,
    },
    /// Compare tally with Stripe per (customer, meter, bucket); with --apply push the deltas.
    /// Exit 0: reconciled; 2: drift remains (or would be pushed in a dry run); 1: error.
    Reconcile {
        #[command(flatten)]
        period: PeriodArgs,
        /// Push the planned deltas (default: dry run, print the plan).
        #[arg(long)]
        apply: bool,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Bucket size: hour or day (default: billing.granularity).
        #[arg(long)]
        granularity: Option<Granularity>,
        /// Also write the run's metrics to this file (node_exporter textfile collector).
        #[arg(long)]
        metrics_textfile: Option<PathBuf>,
        /// No progress bar even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// With --apply: push again what Stripe lost after accepting it (`stripe_missing`
        /// buckets), exactly the missing amount under a new deterministic identifier.
        #[arg(long)]
        repair_missing: bool,
        /// With --apply: plan buckets again whose last write Stripe refused (`failed`), once
        /// the cause (customer, meter, mapping) is fixed.
        #[arg(long)]
        retry_failed: bool,
    },
    /// Drill down from an invoice line (customer, meter, period) to the Stripe writes behind it,
    /// the buckets and projects behind each write, and with --events the events behind one hour.
    /// Totals add up at every level (additive meters).
    Explain {
        #[command(flatten)]
        period: PeriodArgs,
        /// Stripe customer id of the invoice line.
        #[arg(long)]
        customer: String,
        /// tally meter (or the Stripe meter id, event name or subscription item it is mapped to).
        #[arg(long)]
        meter: String,
        /// Bucket size: hour or day (default: billing.granularity).
        #[arg(long)]
        granularity: Option<Granularity>,
        /// List the events behind this hour instead (RFC 3339 or 2026-11-29T13), one page.
        #[arg(long)]
        events: Option<String>,
        /// With --events: only this project.
        #[arg(long)]
        project: Option<String>,
        /// With --events: events per page (1..=100000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// With --events: the `next_after` cursor printed by the previous page.
        #[arg(long)]
        after: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: Format,
    },
    /// Apply the ClickHouse schema, including the invoicer's ledger (idempotent).
    Migrate,
    /// Create Stripe meters and customers (and subscriptions: in legacy mode, or in meters mode
    /// with --subscription-start) for the orgs with usage in the period, and write the billing
    /// mapping. For the emulator and Stripe test mode.
    Provision {
        #[command(flatten)]
        period: PeriodArgs,
        /// Where to write the mapping (TOML).
        #[arg(long)]
        write_mapping: PathBuf,
        /// Legacy mode: start of the subscriptions' first billing period (RFC 3339 or date).
        #[arg(long)]
        legacy_start: Option<String>,
        /// Meters mode: also create a metered price per meter and a subscription per org with
        /// them, whose first billing period starts here (RFC 3339 or date).
        #[arg(long, conflicts_with = "legacy_start")]
        subscription_start: Option<String>,
    },
}

fn main() {
    tally::disable_transparent_huge_pages();
    tally::init_logging("warn");
    let code = match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn clickhouse(cfg: &InvoicerConfig, wait_secs: u64) -> anyhow::Result<ClickHouse> {
    let ch = ClickHouse::new(&cfg.clickhouse);
    ch.wait_ready(Duration::from_secs(wait_secs))
        .with_context(|| format!("clickhouse at {} did not answer within {wait_secs}s", cfg.clickhouse.url))?;
    Ok(ch)
}

fn migrate(ch: &ClickHouse) -> anyhow::Result<()> {
    let migrations = tally::sink::schema::load(None)?;
    // Migrations that re-create the ingest path's views are left to `tally-ingest migrate`.
    tally::sink::schema::migrate(ch, &migrations, tally::sink::schema::StopIngestion::Skip)
        .context("failed to apply the schema")?;
    Ok(())
}

fn stripe(cfg: &InvoicerConfig) -> anyhow::Result<StripeHttp> {
    cfg.require_api_key()?;
    Ok(StripeHttp::new(&cfg.stripe, cfg.stripe.mode == StripeMode::Meters))
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let cfg = InvoicerConfig::load(cli.config.as_deref(), std::env::vars()).context("failed to load config")?;
    match cli.command {
        Command::Usage { period, org, format } => {
            let period = period.period()?;
            let ch = clickhouse(&cfg, cli.wait_secs)?;
            let usage = usage::usage(&ch, period, org.as_deref())?;
            print!("{}", render_usage(&usage.rows, format));
            Ok(refuse(&usage.refused))
        }
        Command::Verify { period, format } => {
            let period = period.period()?;
            let ch = clickhouse(&cfg, cli.wait_secs)?;
            let mut v = usage::verify(&ch, period)?;
            let daily = usage::verify_daily_sketches(&ch, period)?;
            v.mismatches.extend(daily.mismatches);
            v.compared += daily.compared;
            print!("{}", render_mismatches(&v, period, format));
            let refused = refuse(&v.overflows);
            Ok(if v.mismatches.is_empty() { refused } else { 1 })
        }
        Command::Explain { period, customer, meter, granularity, events, project, limit, after, format } => {
            let ch = clickhouse(&cfg, cli.wait_secs)?;
            let meters = Meters::load(&cfg.meters.path).context("failed to load meters")?;
            // The drill-down reads the ledger and ClickHouse; Stripe only for the line's own figure.
            let stripe = StripeHttp::new(&cfg.stripe, cfg.stripe.mode == StripeMode::Meters);
            let mut mapping = Mapping::load(&cfg.billing.mapping_path)?;
            if cfg.billing.customer_source == CustomerSource::Metadata {
                cfg.require_api_key()?;
                mapping.add_metadata_customers(&tally::invoice::stripe::meters::list_customers(&stripe)?)?;
            }
            let env = Env {
                cfg: &cfg,
                ch: &ch,
                stripe: &stripe,
                mapping: &mapping,
                meters: &meters,
                run_id: String::new(),
                ch_wait: Duration::from_secs(cli.wait_secs),
            };
            if let Some(hour) = events {
                let hour = tally::invoice::period::parse_time(&hour).map_err(anyhow::Error::msg)?;
                let q = explain::EventsQuery {
                    customer: &customer,
                    meter: &meter,
                    hour,
                    project: project.as_deref(),
                    limit,
                    after: after.as_deref(),
                };
                print!("{}", explain::events(&env, &q)?.render(format));
            } else {
                let q = explain::Query {
                    customer: &customer,
                    meter: &meter,
                    period: period.period()?,
                    granularity: granularity.unwrap_or(cfg.billing.granularity),
                };
                print!("{}", explain::explain(&env, &q)?.render(format));
            }
            Ok(0)
        }
        Command::Migrate => {
            let ch = clickhouse(&cfg, cli.wait_secs)?;
            migrate(&ch)?;
            let left = tally::sink::schema::missing(&ch)?;
            if left.is_empty() {
                eprintln!("schema up to date");
            } else {
                eprintln!(
                    "schema up to date for invoicing; left for `tally-ingest migrate --ingestion-stopped`: {}",
                    left.join(", ")
                );
            }
            Ok(0)
        }
        Command::Provision { period, write_mapping, legacy_start, subscription_start } => {
            let period = period.period()?;
            let ch = clickhouse(&cfg, cli.wait_secs)?;
            let meters = Meters::load(&cfg.meters.path).context("failed to load meters")?;
            let usage = usage::usage(&ch, period, None)?;
            let mut orgs: Vec<String> =
                usage.rows.into_iter().map(|r| r.org_id).chain(usage.refused.into_iter().map(|o| o.org_id)).collect();
            orgs.sort();
            orgs.dedup();
            let time = |s: Option<String>| {
                s.map(|s| tally::invoice::period::parse_time(&s).map_err(anyhow::Error::msg)).transpose()
            };
            let subscriptions = match (time(legacy_start)?, time(subscription_start)?) {
                (Some(t), _) => Some(provision::Subscriptions::Legacy(t)),
                (None, Some(t)) => Some(provision::Subscriptions::Metered(t)),
                (None, None) => None,
            };
            let text = provision::provision(&stripe(&cfg)?, &meters, &orgs, subscriptions)?;
            std::fs::write(&write_mapping, text)
                .with_context(|| format!("failed to write {}", write_mapping.display()))?;
            eprintln!("provisioned {} orgs; mapping written to {}", orgs.len(), write_mapping.display());
            Ok(0)
        }
        Command::Reconcile {
            period,
            apply,
            format,
            granularity,
            metrics_textfile,
            no_progress,
            repair_missing,
            retry_failed,
        } => {
            let period = period.period()?;
            let handle = m::install(&cfg.metrics.listen)?;
            let ch = clickhouse(&cfg, cli.wait_secs)?;
            if apply {
                migrate(&ch)?;
            }
            let meters = Meters::load(&cfg.meters.path).context("failed to load meters")?;
            let stripe = stripe(&cfg)?;
            let mut mapping = Mapping::load(&cfg.billing.mapping_path)?;
            if cfg.billing.customer_source == CustomerSource::Metadata {
                let customers = tally::invoice::stripe::meters::list_customers(&stripe)?;
                mapping.add_metadata_customers(&customers)?;
            }
            let env = Env {
                cfg: &cfg,
                ch: &ch,
                stripe: &stripe,
                mapping: &mapping,
                meters: &meters,
                run_id: format!("{}-{}", tally::invoice::reconcile::now_secs(), std::process::id()),
                ch_wait: Duration::from_secs(cli.wait_secs),
            };
            let opts = Options {
                period,
                apply,
                granularity: granularity.unwrap_or(cfg.billing.granularity),
                progress: !no_progress,
                repair_missing,
                retry_failed,
            };
            let result = reconcile(&env, &opts);
            let code = match result {
                Ok(report) => {
                    print!("{}", report.render(format));
                    if report.exit_code() == 0 {
                        metrics::gauge!(m::LAST_SUCCESS).set(tally::invoice::reconcile::now_secs() as f64);
                    }
                    report.exit_code()
                }
                Err(ReconcileError::Verify(mismatches)) => {
                    let v = usage::Verification { mismatches, ..Default::default() };
                    print!("{}", render_mismatches(&v, period, format));
                    eprintln!(
                        "error: aggregates disagree with their events; refusing to push (run `tally-invoicer verify`)"
                    );
                    1
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            };
            if let Some(path) = metrics_textfile {
                m::write_textfile(&handle, &path).with_context(|| format!("failed to write {}", path.display()))?;
            }
            std::io::stdout().flush()?;
            Ok(code)
        }
    }
}

/// Names each figure refused for needing more than 64 bits on stderr (PRODUCT.md §1); the exit
/// code: 1 if there is any, else 0.
fn refuse(overflows: &[usage::Overflow]) -> i32 {
    for o in overflows {
        eprintln!("error: {}", o.error());
    }
    i32::from(!overflows.is_empty())
}

fn render_usage(rows: &[usage::UsageRow], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).expect("json") + "\n",
        Format::Csv => {
            let mut s = String::from("org_id,project_id,meter,value,kind\n");
            for r in rows {
                s.push_str(&format!(
                    "{},{},{},{},{}\n",
                    csv(&r.org_id),
                    csv(&r.project_id),
                    csv(&r.meter),
                    r.value,
                    r.kind
                ));
            }
            s
        }
        Format::Table => {
            let w = |f: &dyn Fn(&usage::UsageRow) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
            let (wo, wp, wm) = (w(&|r| r.org_id.len(), 3), w(&|r| r.project_id.len(), 7), w(&|r| r.meter.len(), 5));
            let mut s = format!("{:wo$}  {:wp$}  {:wm$}  {:>14}  KIND\n", "ORG", "PROJECT", "METER", "VALUE");
            for r in rows {
                s.push_str(&format!(
                    "{:wo$}  {:wp$}  {:wm$}  {:>14}  {}\n",
                    r.org_id, r.project_id, r.meter, r.value, r.kind
                ));
            }
            s
        }
    }
}

fn render_mismatches(v: &usage::Verification, period: Period, format: Format) -> String {
    let (mm, compared) = (&v.mismatches, v.compared);
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({
                "period": period.to_string(), "compared": compared, "mismatches": mm, "overflows": v.overflows,
            }))
            .expect("json")
                + "\n"
        }
        Format::Csv => {
            let mut s = String::from("org_id,project_id,meter,hour,window,aggregates,events\n");
            for x in mm {
                s.push_str(&format!(
                    "{},{},{},{},{},{},{}\n",
                    csv(&x.org_id),
                    csv(&x.project_id),
                    csv(&x.meter),
                    x.hour,
                    x.window,
                    x.aggregates,
                    x.events
                ));
            }
            s
        }
        Format::Table => {
            if mm.is_empty() && v.overflows.is_empty() {
                return format!("{period}: aggregates equal the per-event rows ({compared} figures compared)\n");
            }
            if mm.is_empty() {
                return format!(
                    "{period}: aggregates equal the per-event rows ({compared} figures compared), but {} figure(s) need more than 64 bits (listed on stderr)\n",
                    v.overflows.len()
                );
            }
            let mut s = format!("{period}: {} mismatch(es) between aggregates and events:\n", mm.len());
            for x in mm {
                s.push_str(&format!(
                    "  {} {} {} {} ({}): aggregates {} events {}\n",
                    x.org_id, x.project_id, x.meter, x.hour, x.window, x.aggregates, x.events
                ));
            }
            s
        }
    }
}
