//! `tally-invoicer reconcile`: verify → read tally → read the ledger → (apply: resend what an
//! earlier run left pending) → read Stripe → plan → (apply: cancels, then pushes, each recorded in
//! the ledger before and after its call) → read Stripe again → report. docs/invoicing.md argues
//! why a crash at any point followed by a rerun pushes nothing twice and misses nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::config::{Granularity, InvoicerConfig, StripeMode};
use super::ledger::{Action, Entry, Ledger, Outcome, Push, State};
use super::mapping::Mapping;
use super::period::Period;
use super::plan::{check_item, plan, Bucket, BucketPlan, Ctx, Item, ItemCheck, Refusal, Target};
use super::progress::Progress;
use super::report::{Report, Row};
use super::stripe::invoices::{self, FinalPeriod};
use super::stripe::meters::{self, MeterInfo};
use super::stripe::{legacy, StripeError, StripeHttp};
use super::usage::{self, Mismatch};
use crate::meter::{Aggregation, Meters};
use crate::sink::clickhouse::{ChError, ClickHouse};
use crate::timestamp::format_rfc3339;

/// Pushes whose intents are written to the ledger in one insert, before any of them is sent.
const CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    #[error("the aggregates disagree with their events in {} place(s); nothing was pushed", .0.len())]
    Verify(Vec<Mismatch>),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
    #[error("stripe: {0}")]
    Stripe(#[from] StripeError),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    StripeDown(String),
}

pub struct Options {
    pub period: Period,
    pub apply: bool,
    pub granularity: Granularity,
    pub progress: bool,
    /// Push again what Stripe lost after accepting it (`stripe_missing` buckets).
    pub repair_missing: bool,
    /// Plan buckets again whose last write Stripe refused for a reason that may be fixed.
    pub retry_failed: bool,
}

/// What a run needs: configuration, clients, mapping and meter definitions.
pub struct Env<'a> {
    pub cfg: &'a InvoicerConfig,
    pub ch: &'a ClickHouse,
    pub stripe: &'a StripeHttp,
    pub mapping: &'a Mapping,
    pub meters: &'a Meters,
    pub run_id: String,
    /// How long a ClickHouse outage during the run is waited out.
    pub ch_wait: std::time::Duration,
}

pub fn now_secs() -> i64 {
    crate::source::worker::now_secs()
}

/// Key of a bucket: (org, meter, start, end).
type Key = (String, String, i64, i64);

struct Resolved {
    targets: HashMap<(String, String), Option<Target>>,
    infos: HashMap<String, MeterInfo>,
}

pub fn reconcile(env: &Env, opts: &Options) -> Result<Report, ReconcileError> {
    let started = std::time::Instant::now();
    let period = opts.period;
    let g = opts.granularity;
    period.check_granularity(g).map_err(ReconcileError::Setup)?;
    let mode = match env.cfg.stripe.mode {
        StripeMode::Meters => "meters",
        StripeMode::Legacy => "legacy",
    };
    let account = env.cfg.stripe.account.as_str();

    // Money never moves on aggregates that disagree with their own events.
    let verified = usage::verify(env.ch, period)?;
    metrics::gauge!(super::metrics::VERIFY_MISMATCHES).set(verified.mismatches.len() as f64);
    if !verified.mismatches.is_empty() {
        return Err(ReconcileError::Verify(verified.mismatches));
    }
    let tally = read_tally(env, period, g.secs(), &verified)?;

    let resolved = resolve(env, &tally)?;
    let ledger = Ledger::new(env.ch, mode, account, &env.run_id, env.ch_wait);
    let mut progress = Progress::new(opts.progress);
    let mut sent = Sent::default();

    if opts.apply {
        // An earlier run may have died between an intent and its outcome: resend those first,
        // identically (same identifier, same Idempotency-Key), unless too old to be recognised.
        let now = now_secs();
        let pending: Vec<Entry> = ledger
            .read(period.from, period.to)?
            .into_iter()
            .filter(|p| p.outcome == Outcome::Pending && now - p.intent_at <= super::plan::RESEND_WINDOW_SECS)
            .map(|p| p.entry)
            .collect();
        if !pending.is_empty() {
            tracing::info!(count = pending.len(), "resending pushes left pending by an earlier run");
            execute(env, &ledger, &resolved, pending, &mut progress, &mut sent)?;
            if let Some(why) = sent.aborted.take() {
                return Err(ReconcileError::StripeDown(why));
            }
        }
    }

    let pushes = ledger.read(period.from, period.to)?;
    let by_key = group_pushes(&pushes, period, g)?;
    let keys: BTreeSet<Key> = tally
        .buckets
        .keys()
        .chain(by_key.keys())
        .chain(tally.refused.values().flat_map(|r| &r.keys))
        .cloned()
        .collect();
    let stripe_before = read_stripe(env, &resolved, &keys, period, g)?;

    let mut plans = plan_all(env, opts, mode, &resolved, &keys, &tally, &by_key, &stripe_before);
    let checks_before = item_checks(env, opts, mode, &ledger, &resolved, &stripe_before)?;
    let before: BTreeMap<Key, BucketPlan> = plans.clone();
    // Plans again from the ledger as it is now.
    let replan = |stripe: &StripeView| -> Result<BTreeMap<Key, BucketPlan>, ReconcileError> {
        let pushes = ledger.read(period.from, period.to)?;
        let by_key = group_pushes(&pushes, period, g)?;
        Ok(plan_all(env, opts, mode, &resolved, &keys, &tally, &by_key, stripe))
    };
    if opts.apply {
        let cancels: Vec<Entry> =
            plans.values().flat_map(|p| p.actions.iter().filter(|a| a.action == Action::Cancel).cloned()).collect();
        if !cancels.is_empty() {
            execute(env, &ledger, &resolved, cancels, &mut progress, &mut sent)?;
            plans = replan(&stripe_before)?;
        }
        // A legacy item repair goes into a bucket with no write of its own this run (the next run
        // plans it from the ledger as it is then), so that no two writes share a bucket and seq.
        let busy: BTreeSet<Key> = plans.iter().filter(|(_, p)| !p.actions.is_empty()).map(|(k, _)| k.clone()).collect();
        let writes: Vec<Entry> = plans
            .values()
            .flat_map(|p| p.actions.iter())
            .chain(
                checks_before
                    .iter()
                    .filter(|c| !tally.refused.contains_key(&(c.org_id.clone(), c.meter.clone())))
                    .flat_map(|c| c.plan.actions.iter())
                    .filter(|a| !busy.contains(&key_of(a))),
            )
            .filter(|a| a.action != Action::Cancel)
            .cloned()
            .collect();
        execute(env, &ledger, &resolved, writes, &mut progress, &mut sent)?;
        progress.finish();
    }

    let (after, stripe_after) = if opts.apply && sent.aborted.is_none() {
        // Read Stripe again for the (org, meter) pairs this run wrote to.
        let touched: BTreeSet<(&str, &str)> = sent.keys.iter().map(|k| (k.0.as_str(), k.1.as_str())).collect();
        let refresh: BTreeSet<Key> =
            keys.iter().filter(|k| touched.contains(&(k.0.as_str(), k.1.as_str()))).cloned().collect();
        let mut stripe_after = stripe_before.clone();
        stripe_after.merge(read_stripe(env, &resolved, &refresh, period, g)?);
        (replan(&stripe_after)?, stripe_after)
    } else if opts.apply {
        // Stripe stopped answering: report from the ledger; what is pending is resent next run.
        (replan(&stripe_before)?, stripe_before.clone())
    } else {
        (plans, stripe_before.clone())
    };

    let checks_after =
        if opts.apply { item_checks(env, opts, mode, &ledger, &resolved, &stripe_after)? } else { checks_before };
    let report = Report::build(
        period,
        mode,
        opts.apply,
        &keys,
        &tally.buckets,
        &before,
        &after,
        &stripe_before,
        &stripe_after,
        &sent,
        &resolved.targets,
        &tally.refused.keys().cloned().collect(),
        &checks_after,
        env.stripe.requests(),
        started.elapsed().as_secs_f64(),
    );
    for (st, n) in report.drift_by_status() {
        metrics::gauge!(super::metrics::DRIFT_BUCKETS, "status" => st).set(n as f64);
    }
    for (st, v) in report.drift_value_by_status() {
        metrics::gauge!(super::metrics::DRIFT_VALUE, "status" => st).set(v as f64);
    }
    // Over every tenant: 128 bits, as two tenants' 64-bit figures may not add up in 64.
    let total = |f: &dyn Fn(&Row) -> u64| report.rows.iter().map(|r| u128::from(f(r))).sum::<u128>() as f64;
    metrics::gauge!(super::metrics::NEEDS_CREDIT).set(total(&|r| r.needs_credit));
    metrics::gauge!(super::metrics::UNBILLED).set(total(&|r| r.unbilled));
    metrics::gauge!(super::metrics::RUN_SECONDS).set(started.elapsed().as_secs_f64());
    Ok(report)
}

/// Tally's side of a run.
#[derive(Default)]
struct Tally {
    /// Each bucket's exact total, for the (org, meter) pairs that are not refused.
    buckets: BTreeMap<Key, u64>,
    refused: Refused,
}

/// (org, meter) pairs refused because one of their totals needs more than 64 bits (PRODUCT.md
/// §1): their buckets (to report) and why. Nothing is written for them; every other pair of the
/// run goes on, so one tenant's extreme events cannot stop the others' billing.
type Refused = BTreeMap<(String, String), Overflowed>;

struct Overflowed {
    keys: BTreeSet<Key>,
    /// The first figure that overflowed, as [`ChError::TotalOverflow`] names it.
    why: String,
}

/// Reads each bucket's total: unique meters over the period, additive meters per `bucket_secs`
/// from the aggregates' figures that `verified` compared with the events. Each of those equals the
/// exact events figure (the caller stops on a mismatch) or is an overflow, refused: so no figure
/// that wrapped can become a bucket, however much is ingested meanwhile. (A second read of the
/// aggregates, as before, could see an hour wrap that the comparison never saw.)
fn read_tally(env: &Env, period: Period, bucket_secs: i64, verified: &usage::Verification) -> Result<Tally, ChError> {
    let additive = |meter: &str| env.meters.get(meter).is_some_and(|d| d.aggregation != Aggregation::Unique);
    let mut sums: BTreeMap<(String, String, i64), u128> = BTreeMap::new();
    for ((org, _, meter, hour), v) in verified.aggregates.iter().filter(|(k, _)| additive(&k.2)) {
        *sums.entry((org.clone(), meter.clone(), hour - hour.rem_euclid(bucket_secs))).or_default() += v;
    }
    let overflows: Vec<&usage::Overflow> = verified.overflows.iter().filter(|o| additive(&o.meter)).collect();
    let mut tally = Tally::additive(sums.into_iter(), &overflows, bucket_secs);
    for ((org, meter), v) in usage::unique_period(env.ch, period)? {
        tally.buckets.insert((org, meter, period.from, period.to), v);
    }
    Ok(tally)
}

impl Tally {
    /// The additive buckets from their exact `sums` ((org, meter, bucket start) → total), with
    /// an (org, meter) refused when an hour of one of its projects (`overflows`, from the
    /// per-event rows: the aggregates wrap), one of its buckets, or the sum of its buckets needs
    /// more than 64 bits. A refused pair's buckets are all in [`Tally::refused`], none in
    /// [`Tally::buckets`].
    fn additive(
        sums: impl Iterator<Item = ((String, String, i64), u128)>,
        overflows: &[&usage::Overflow],
        bucket_secs: i64,
    ) -> Tally {
        let key = |org: &str, meter: &str, b: i64| (org.to_string(), meter.to_string(), b, b + bucket_secs);
        fn refuse<'r>(
            refused: &'r mut Refused,
            org: &str,
            meter: &str,
            why: &dyn Fn() -> String,
        ) -> &'r mut Overflowed {
            refused
                .entry((org.to_string(), meter.to_string()))
                .or_insert_with(|| Overflowed { keys: BTreeSet::new(), why: why() })
        }
        let mut refused = Refused::new();
        for o in overflows {
            let r = refuse(&mut refused, &o.org_id, &o.meter, &|| o.error().to_string());
            if let Some(h) = o.hour {
                r.keys.insert(key(&o.org_id, &o.meter, h - h.rem_euclid(bucket_secs)));
            }
        }
        let mut buckets = BTreeMap::new();
        let mut pairs: BTreeMap<(String, String), u128> = BTreeMap::new();
        for ((org, meter, b), v) in sums {
            *pairs.entry((org.clone(), meter.clone())).or_default() += v;
            let what = || format!("{org}/{meter} in the bucket at {}", format_rfc3339(b));
            match super::sql::fits(v, &what) {
                Ok(v) => {
                    buckets.insert(key(&org, &meter, b), v);
                }
                Err(e) => {
                    refuse(&mut refused, &org, &meter, &|| e.to_string()).keys.insert(key(&org, &meter, b));
                }
            }
        }
        for ((org, meter), total) in pairs {
            if let Err(e) = super::sql::fits(total, &|| format!("{org}/{meter} over the period")) {
                refuse(&mut refused, &org, &meter, &|| e.to_string());
            }
        }
        buckets.retain(|k: &Key, _| match refused.get_mut(&(k.0.clone(), k.1.clone())) {
            Some(r) => {
                r.keys.insert(k.clone());
                false
            }
            None => true,
        });
        Tally { buckets, refused }
    }
}

/// Maps each (org, meter) with usage to its Stripe target, checking Stripe meters first.
fn resolve(env: &Env, tally: &Tally) -> Result<Resolved, ReconcileError> {
    let mut infos = HashMap::new();
    if env.cfg.stripe.mode == StripeMode::Meters {
        for id in env.mapping.stripe_meters() {
            let info = meters::retrieve_meter(env.stripe, id)?;
            infos.insert(id.to_string(), info);
        }
    }
    let mut pairs: BTreeSet<(String, String)> =
        tally.buckets.keys().map(|k| (k.0.clone(), k.1.clone())).chain(tally.refused.keys().cloned()).collect();
    for org in env.mapping.customers.keys() {
        for m in env.meters.meters() {
            pairs.insert((org.clone(), m.name.clone()));
        }
    }
    let mut targets = HashMap::new();
    for (org, meter) in pairs {
        let Some(def) = env.meters.get(&meter) else { continue };
        let unique = def.aggregation == Aggregation::Unique;
        let target = match (env.cfg.stripe.mode, env.mapping.customer(&org)) {
            (_, None) => None,
            (StripeMode::Meters, Some(customer)) => match env.mapping.meter(&org, &meter) {
                None => None,
                Some(mm) => {
                    let info = &infos[&mm.stripe_meter];
                    let want = if unique { "last" } else { "sum" };
                    if info.formula != want {
                        return Err(ReconcileError::Setup(format!(
                            "Stripe meter {} ({}) aggregates with `{}`, but tally meter {meter} needs `{want}`",
                            info.id, info.event_name, info.formula
                        )));
                    }
                    // A pre-aggregated meter counts only the last event of each hour or day: the
                    // hourly deltas tally pushes would replace one another.
                    if let Some(window) = &info.event_time_window {
                        return Err(ReconcileError::Setup(format!(
                            "Stripe meter {} ({}) is pre-aggregated (event_time_window = {window}): it keeps only \
                             the last event of each {window}, and tally pushes hourly deltas that must add up; \
                             map tally meter {meter} to a meter without an event time window",
                            info.id, info.event_name
                        )));
                    }
                    if let Some(en) = &mm.event_name {
                        if *en != info.event_name {
                            return Err(ReconcileError::Setup(format!(
                                "billing mapping says meter {} has event_name {en}, Stripe says {}",
                                info.id, info.event_name
                            )));
                        }
                    }
                    if !info.active {
                        return Err(ReconcileError::Setup(format!("Stripe meter {} is not active", info.id)));
                    }
                    Some(Target {
                        customer: customer.to_string(),
                        target: info.id.clone(),
                        event_name: info.event_name.clone(),
                    })
                }
            },
            (StripeMode::Legacy, Some(customer)) => env.mapping.item(&org, &meter).map(|item| Target {
                customer: customer.to_string(),
                target: item.to_string(),
                event_name: String::new(),
            }),
        };
        targets.insert((org, meter), target);
    }
    // Two tally meters of one customer on one Stripe meter (or item) would add up in Stripe's
    // figures and make every comparison wrong.
    let mut seen: HashMap<(&str, &str), &str> = HashMap::new();
    for ((_, meter), t) in &targets {
        if let Some(t) = t {
            if let Some(other) = seen.insert((t.customer.as_str(), t.target.as_str()), meter.as_str()) {
                return Err(ReconcileError::Setup(format!(
                    "billing mapping: tally meters {other} and {meter} of customer {} both go to {}; each needs its own",
                    t.customer, t.target
                )));
            }
        }
    }
    Ok(Resolved { targets, infos })
}

/// Assigns ledger pushes to the buckets of this run.
fn group_pushes(pushes: &[Push], period: Period, g: Granularity) -> Result<BTreeMap<Key, Vec<&Push>>, ReconcileError> {
    let mut out: BTreeMap<Key, Vec<&Push>> = BTreeMap::new();
    for p in pushes {
        let e = &p.entry;
        let key = if e.action == Action::Set {
            if (e.bucket_start, e.bucket_end) != (period.from, period.to) {
                continue; // a distinct count of another period
            }
            (e.org_id.clone(), e.meter.clone(), period.from, period.to)
        } else {
            let b = Period::bucket_of(e.bucket_start, g);
            if e.bucket_end > b + g.secs() || e.bucket_start < period.from || e.bucket_end > period.to {
                return Err(ReconcileError::Setup(format!(
                    "the ledger holds a push for {}..{} that does not fit the buckets of this run ({} granularity, period {period}); \
                     reconcile with the granularity and period boundaries used before",
                    format_rfc3339(e.bucket_start),
                    format_rfc3339(e.bucket_end),
                    g.stripe_window()
                )));
            }
            (e.org_id.clone(), e.meter.clone(), b, b + g.secs())
        };
        out.entry(key).or_default().push(p);
    }
    Ok(out)
}

/// Stripe's figures: per bucket (meters mode) and per (org, meter) over the period.
#[derive(Debug, Clone, Default)]
pub struct StripeView {
    pub bucket: BTreeMap<Key, u64>,
    pub pair: BTreeMap<(String, String), u64>,
    /// Where each (org, meter) is open from: legacy mode, the start of its subscription item's
    /// current billing period; meters mode, the end of the latest usage period Stripe finalized
    /// an invoice for (absent when no subscription bills the meter; [`invoices`]).
    pub open_from: BTreeMap<(String, String), i64>,
    /// Meters mode: each (org, meter)'s closed billing periods, with when Stripe finalized them.
    pub finals: BTreeMap<(String, String), Vec<FinalPeriod>>,
    /// Legacy mode: each (org, meter)'s usage record summaries and current billing period.
    pub items: BTreeMap<(String, String), LegacyItem>,
}

/// Legacy mode: what Stripe says about one subscription item.
#[derive(Debug, Clone, Default)]
pub struct LegacyItem {
    /// (period start, period end, total usage) of every billing period with usage.
    pub periods: Vec<(i64, i64, u64)>,
    pub current: (i64, i64),
}

impl StripeView {
    fn merge(&mut self, other: StripeView) {
        let pairs: BTreeSet<(String, String)> = other.pair.keys().cloned().collect();
        self.bucket.retain(|k, _| !pairs.contains(&(k.0.clone(), k.1.clone())));
        self.bucket.extend(other.bucket);
        self.pair.extend(other.pair);
        self.open_from.extend(other.open_from);
        self.finals.extend(other.finals);
        self.items.extend(other.items);
    }
}

fn read_stripe(
    env: &Env,
    resolved: &Resolved,
    keys: &BTreeSet<Key>,
    period: Period,
    g: Granularity,
) -> Result<StripeView, ReconcileError> {
    let mut pairs: BTreeMap<(String, String), Target> = BTreeMap::new();
    for k in keys {
        if let Some(Some(t)) = resolved.targets.get(&(k.0.clone(), k.1.clone())) {
            pairs.insert((k.0.clone(), k.1.clone()), t.clone());
        }
    }
    let list: Vec<(&(String, String), &Target)> = pairs.iter().collect();
    let unique = |meter: &str| env.meters.get(meter).is_some_and(|d| d.aggregation == Aggregation::Unique);
    type Read = (Vec<(i64, u64)>, Option<LegacyItem>);
    let results = parallel(&list, env.cfg.stripe.concurrency, |((_, meter), t)| -> Result<Read, StripeError> {
        match env.cfg.stripe.mode {
            StripeMode::Meters => {
                let window = (!unique(meter)).then(|| g.stripe_window());
                let s = meters::summaries(env.stripe, &t.target, &t.customer, period.from, period.to, window)?;
                Ok((s.into_iter().map(|(start, v)| (start, v.max(0.0).round() as u64)).collect(), None))
            }
            StripeMode::Legacy => {
                let current = legacy::current_period(env.stripe, &t.target)?;
                // The spec lets a summary's period bounds be null: the current period's end is
                // the subscription's; a period without a start cannot be placed and is left out.
                let periods: Vec<(i64, i64, u64)> = legacy::summaries(env.stripe, &t.target)?
                    .into_iter()
                    .filter_map(|(s, e, v)| {
                        let s = s?;
                        let e = e.unwrap_or(if s == current.0 { current.1 } else { s });
                        (e > s).then_some((s, e, v.max(0) as u64))
                    })
                    .collect();
                let total = periods.iter().filter(|(s, e, _)| *s < period.to && *e > period.from).map(|p| p.2).sum();
                Ok((vec![(period.from, total)], Some(LegacyItem { periods, current })))
            }
        }
    });
    let mut view = StripeView::default();
    if env.cfg.stripe.mode == StripeMode::Meters {
        // Meters mode: which periods each customer's invoices have closed, one read per customer.
        let customers: Vec<&str> =
            list.iter().map(|(_, t)| t.customer.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
        let now = now_secs();
        let margin = i64::from(env.cfg.stripe.finalize_margin_secs);
        let finalized =
            parallel(&customers, env.cfg.stripe.concurrency, |c| invoices::finalized(env.stripe, c, now, margin));
        let mut by_customer = BTreeMap::new();
        for (c, f) in customers.iter().zip(finalized) {
            by_customer.insert(*c, f?);
        }
        for ((org, meter), t) in &list {
            if let Some(closed) = by_customer.get(t.customer.as_str()).and_then(|f| f.get(&t.target)) {
                view.open_from.insert((org.clone(), meter.clone()), closed.until);
                view.finals.insert((org.clone(), meter.clone()), closed.periods.clone());
            }
        }
    }
    for (((org, meter), _), r) in list.iter().zip(results) {
        let (values, item) = r?;
        if let Some(item) = item {
            view.open_from.insert((org.clone(), meter.clone()), item.current.0);
            view.items.insert((org.clone(), meter.clone()), item);
        }
        let total: u64 = values.iter().map(|(_, v)| v).sum();
        view.pair.insert((org.clone(), meter.clone()), total);
        if env.cfg.stripe.mode == StripeMode::Meters {
            if unique(meter) {
                view.bucket.insert((org.clone(), meter.clone(), period.from, period.to), total);
            } else {
                for (start, v) in values {
                    let b = Period::bucket_of(start, g);
                    *view.bucket.entry((org.clone(), meter.clone(), b, b + g.secs())).or_default() += v;
                }
            }
        }
    }
    Ok(view)
}

fn ctx<'a>(env: &'a Env, opts: &Options, mode: &'a str) -> Ctx<'a> {
    Ctx {
        mode,
        account: &env.cfg.stripe.account,
        now: now_secs(),
        can_cancel: env.cfg.stripe.mode == StripeMode::Meters,
        settle_secs: i64::from(env.cfg.stripe.settle_secs),
        repair_missing: opts.repair_missing,
        retry_failed: opts.retry_failed,
        landing_tolerance_secs: i64::from(env.cfg.stripe.landing_tolerance_secs),
    }
}

/// Legacy mode: compares the ledger with each subscription item's usage record summaries,
/// billing period by billing period (plan.rs [`check_item`]). The ledger is read over every
/// billing period that overlaps the reconciled one.
fn item_checks(
    env: &Env,
    opts: &Options,
    mode: &str,
    ledger: &Ledger,
    resolved: &Resolved,
    stripe: &StripeView,
) -> Result<Vec<ItemCheck>, ReconcileError> {
    if env.cfg.stripe.mode != StripeMode::Legacy || stripe.items.is_empty() {
        return Ok(Vec::new());
    }
    let period = opts.period;
    let overlapping = |it: &LegacyItem| -> Vec<(i64, i64)> {
        it.periods
            .iter()
            .map(|(s, e, _)| (*s, *e))
            .chain([it.current])
            .filter(|(s, e)| *s < period.to && *e > period.from)
            .collect()
    };
    let from = stripe.items.values().flat_map(overlapping).map(|p| p.0).min().unwrap_or(period.from).min(period.from);
    let to = stripe.items.values().flat_map(overlapping).map(|p| p.1).max().unwrap_or(period.to).max(period.to);
    let pushes = ledger.read(from, to)?;
    let ctx = ctx(env, opts, mode);
    let mut out = Vec::new();
    for ((org, meter), it) in &stripe.items {
        let Some(Some(target)) = resolved.targets.get(&(org.clone(), meter.clone())) else { continue };
        let item = Item {
            org_id: org.clone(),
            meter: meter.clone(),
            target: target.clone(),
            unique: env.meters.get(meter).is_some_and(|d| d.aggregation == Aggregation::Unique),
            periods: it.periods.clone(),
            current: it.current,
            pushes: pushes.iter().filter(|p| p.entry.org_id == *org && p.entry.meter == *meter).collect(),
            period: (period.from, period.to),
            bucket_secs: opts.granularity.secs(),
        };
        out.extend(check_item(&ctx, &item));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn plan_all(
    env: &Env,
    opts: &Options,
    mode: &str,
    resolved: &Resolved,
    keys: &BTreeSet<Key>,
    tally: &Tally,
    by_key: &BTreeMap<Key, Vec<&Push>>,
    stripe: &StripeView,
) -> BTreeMap<Key, BucketPlan> {
    let ctx = ctx(env, opts, mode);
    keys.iter()
        .map(|k| {
            let unique = env.meters.get(&k.1).is_some_and(|d| d.aggregation == Aggregation::Unique);
            let target = resolved.targets.get(&(k.0.clone(), k.1.clone())).cloned().flatten();
            let b = Bucket {
                org_id: k.0.clone(),
                meter: k.1.clone(),
                start: k.2,
                end: k.3,
                unique,
                stripe: match env.cfg.stripe.mode {
                    StripeMode::Meters if target.is_some() => Some(stripe.bucket.get(k).copied().unwrap_or(0)),
                    _ => None,
                },
                open_from: stripe.open_from.get(&(k.0.clone(), k.1.clone())).copied(),
                finals: stripe
                    .finals
                    .get(&(k.0.clone(), k.1.clone()))
                    .map(|f| f.iter().filter(|p| p.end > k.2).copied().collect())
                    .unwrap_or_default(),
                target,
                tally: tally.buckets.get(k).copied().unwrap_or(0),
                pushes: by_key.get(k).cloned().unwrap_or_default(),
                overflow: tally.refused.get(&(k.0.clone(), k.1.clone())).map(|r| r.why.clone()),
            };
            (k.clone(), plan(&ctx, &b))
        })
        .collect()
}

/// What this run sent, and how it ended.
#[derive(Debug, Default)]
pub struct Sent {
    pub keys: Vec<Key>,
    /// (action, key, value) of writes Stripe accepted.
    pub done: Vec<(Action, Key, u64)>,
    /// Writes Stripe accepted that repair what it lost (additive repairs and `last` values set again).
    pub repaired: Vec<Key>,
    pub failed: Vec<(Key, String)>,
    /// Cancels Stripe refused (too old): the over-report stays and is reported `needs_credit`.
    pub cancels_refused: Vec<(Key, String)>,
    /// Outcome unknown after all retries: left pending for the next run.
    pub indeterminate: Vec<(Key, String)>,
    /// Set when Stripe stopped answering and the run stopped writing.
    pub aborted: Option<String>,
}

fn key_of(e: &Entry) -> Key {
    (e.org_id.clone(), e.meter.clone(), e.bucket_start, e.bucket_end)
}

/// Sends `entries`, chunk by chunk: intents recorded, calls made, outcomes recorded.
fn execute(
    env: &Env,
    ledger: &Ledger,
    resolved: &Resolved,
    entries: Vec<Entry>,
    progress: &mut Progress,
    sent: &mut Sent,
) -> Result<(), ReconcileError> {
    progress.add_total(entries.len());
    // A circuit breaker: after this many writes in a row ended without an answer (each after all
    // its retries), Stripe is taken to be down and the rest is not sent — their intents stay
    // pending (or they are not planned yet) and the next run sends them.
    let limit = 2 * env.cfg.stripe.concurrency.max(1);
    let streak = AtomicUsize::new(0);
    for chunk in entries.chunks(CHUNK) {
        if sent.aborted.is_some() {
            break;
        }
        let intents: Vec<(&Entry, State, &str)> = chunk.iter().map(|e| (e, State::Intent, e.reason.as_str())).collect();
        ledger.append(&intents, now_secs())?;
        let results = parallel(chunk, env.cfg.stripe.concurrency, |e| {
            if streak.load(Ordering::SeqCst) >= limit {
                return Err(StripeError::Transport("not sent: Stripe stopped answering (circuit open)".into()));
            }
            let r = send(env, resolved, e);
            match &r {
                Err(err) if err.is_indeterminate() => streak.fetch_add(1, Ordering::SeqCst),
                _ => streak.swap(0, Ordering::SeqCst),
            };
            r
        });
        let mut outcomes: Vec<(&Entry, State, String)> = Vec::new();
        for (e, r) in chunk.iter().zip(results) {
            let action = e.action.as_str();
            sent.keys.push(key_of(e));
            match r {
                Ok(()) => {
                    metrics::counter!(super::metrics::PUSHES, "action" => action, "outcome" => "done").increment(1);
                    metrics::counter!(super::metrics::PUSHED_VALUE, "action" => action).increment(e.value);
                    sent.done.push((e.action, key_of(e), e.value));
                    if e.action == Action::Repair || e.reason.starts_with("repair:") {
                        sent.repaired.push(key_of(e));
                    }
                    outcomes.push((e, State::Done, String::new()));
                }
                Err(err) if err.is_indeterminate() => {
                    metrics::counter!(super::metrics::PUSHES, "action" => action, "outcome" => "pending").increment(1);
                    tracing::warn!(push_id = %e.push_id, error = %err, "outcome unknown; left pending for the next run");
                    sent.indeterminate.push((key_of(e), err.to_string()));
                }
                Err(err) => {
                    // The class decides the bucket's later runs (plan.rs): a refusal that cannot
                    // succeed on retry is reported, never planned again as a new push.
                    let class = Refusal::classify(
                        env.cfg.stripe.mode == StripeMode::Legacy,
                        e.event_ts,
                        now_secs(),
                        err.param(),
                    );
                    metrics::counter!(super::metrics::PUSHES, "action" => action, "outcome" => "failed").increment(1);
                    tracing::warn!(push_id = %e.push_id, class = class.prefix(), error = %err, "stripe refused a write");
                    let detail = format!("{}: {err}", class.prefix());
                    if e.action == Action::Cancel {
                        sent.cancels_refused.push((key_of(e), detail.clone()));
                    } else {
                        sent.failed.push((key_of(e), detail.clone()));
                    }
                    outcomes.push((e, State::Failed, detail));
                }
            }
        }
        let rows: Vec<(&Entry, State, &str)> = outcomes.iter().map(|(e, s, d)| (*e, *s, d.as_str())).collect();
        ledger.append(&rows, now_secs())?;
        progress.advance(chunk.len());
        if streak.load(Ordering::SeqCst) >= limit {
            let why = format!(
                "Stripe stopped answering: {limit} writes in a row got no answer after {} attempts each; \
                 stopped writing, {} write(s) pending — rerun when Stripe is back",
                env.cfg.stripe.max_attempts,
                sent.indeterminate.len()
            );
            tracing::error!("{why}");
            sent.aborted = Some(why);
        }
    }
    Ok(())
}

/// One Stripe call for one ledger entry.
fn send(env: &Env, resolved: &Resolved, e: &Entry) -> Result<(), StripeError> {
    let r = match (env.cfg.stripe.mode, e.action) {
        (StripeMode::Meters, Action::Push | Action::Set | Action::Repair) => {
            let info = resolved
                .infos
                .get(&e.target)
                .ok_or_else(|| StripeError::Client(format!("meter {} is no longer mapped", e.target)))?;
            meters::create_meter_event(env.stripe, info, &e.customer, e.value, e.event_ts, &e.push_id)
        }
        (StripeMode::Meters, Action::Cancel) => {
            meters::cancel_meter_event(env.stripe, &e.event_name, &e.cancels, &e.push_id)
        }
        (StripeMode::Legacy, Action::Push | Action::Set | Action::Repair) => {
            legacy::create_usage_record(env.stripe, &e.target, e.value, e.event_ts, e.action == Action::Set, &e.push_id)
        }
        (StripeMode::Legacy, Action::Cancel) => Err(StripeError::Client("usage records cannot be cancelled".into())),
    };
    match r {
        // The identifier is already taken: an earlier attempt of this very push landed.
        Err(err) if err.is_duplicate_identifier() && e.action != Action::Cancel => Ok(()),
        other => other,
    }
}

/// Runs `f` over `items` on `threads` threads; results in input order.
pub fn parallel<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                out.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    out.into_inner().expect("results lock").into_iter().map(|r| r.expect("every item ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClickHouseConfig;

    /// Each way a total of an (org, meter) can need more than 64 bits refuses that pair, all
    /// its buckets, and nothing else.
    #[test]
    fn a_total_beyond_64_bits_refuses_its_pair_and_only_it() {
        const H: i64 = 20_833 * 86_400; // a whole day
        let big = u128::from(u64::MAX);
        let sum = |org: &str, meter: &str, b: i64, v: u128| ((org.to_string(), meter.to_string(), b), v);
        let sums = vec![
            sum("a", "input_tokens", H, 5),          // refused by an hour of its events
            sum("a", "input_tokens", H + 86_400, 6), // … with every bucket of the pair
            sum("a", "output_tokens", H, 7),
            sum("b", "input_tokens", H, big + 1), // one bucket beyond 64 bits
            sum("b", "input_tokens", H + 86_400, 1),
            sum("c", "input_tokens", H, big / 2 + 1), // each bucket fits, the period does not
            sum("c", "input_tokens", H + 86_400, big / 2 + 1),
            sum("d", "input_tokens", H, big), // exactly 2^64 − 1 fits
        ];
        let hour = usage::Overflow {
            org_id: "a".into(),
            project_id: "p".into(),
            meter: "input_tokens".into(),
            hour: Some(H + 2 * 86_400 + 3600),
            total: big + 2,
        };
        let t = Tally::additive(sums.into_iter(), &[&hour], 86_400);
        let pair = |o: &str, m: &str| (o.to_string(), m.to_string());
        let key = |o: &str, m: &str, b: i64| (o.to_string(), m.to_string(), b, b + 86_400);
        assert_eq!(
            t.refused.keys().cloned().collect::<Vec<_>>(),
            [pair("a", "input_tokens"), pair("b", "input_tokens"), pair("c", "input_tokens")]
        );
        let a = &t.refused[&pair("a", "input_tokens")];
        assert_eq!(a.keys, [H, H + 86_400, H + 2 * 86_400].map(|b| key("a", "input_tokens", b)).into());
        assert!(
            a.why.contains("total_overflow")
                && a.why.contains("a/p/input_tokens at hour")
                && a.why.contains(&(big + 2).to_string()),
            "{}",
            a.why
        );
        let b = &t.refused[&pair("b", "input_tokens")];
        assert_eq!(b.keys, [H, H + 86_400].map(|d| key("b", "input_tokens", d)).into());
        assert!(
            b.why.contains("b/input_tokens in the bucket at") && b.why.contains(&(big + 1).to_string()),
            "{}",
            b.why
        );
        let c = &t.refused[&pair("c", "input_tokens")];
        assert!(
            c.why.contains("c/input_tokens over the period") && c.why.contains(&(big + 1).to_string()),
            "{}",
            c.why
        );
        assert_eq!(c.keys.len(), 2);
        let kept: Vec<(Key, u64)> = t.buckets.into_iter().collect();
        assert_eq!(kept, [(key("a", "output_tokens", H), 7), (key("d", "input_tokens", H), u64::MAX)]);
    }

    #[test]
    fn two_meters_on_one_stripe_target_are_refused() {
        let cfg = InvoicerConfig::load(None, vec![("TALLY_STRIPE_MODE".to_string(), "legacy".to_string())]).unwrap();
        let ch = ClickHouse::new(&ClickHouseConfig::default());
        let stripe = StripeHttp::new(&cfg.stripe, false);
        let meters = Meters::parse(crate::meter::DEFAULT_METERS_TOML).unwrap();
        let mapping = Mapping::parse(
            "[customers]\n\"o\" = \"cus_1\"\n[subscription_items.\"o\"]\nevents = \"si_1\"\ntraces = \"si_1\"\n",
        )
        .unwrap();
        let env = Env {
            cfg: &cfg,
            ch: &ch,
            stripe: &stripe,
            mapping: &mapping,
            meters: &meters,
            run_id: "t".into(),
            ch_wait: std::time::Duration::ZERO,
        };
        let err = resolve(&env, &Tally::default()).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("si_1"), "{err}");
        let ok =
            Mapping::parse("[customers]\n\"o\" = \"cus_1\"\n[subscription_items.\"o\"]\nevents = \"si_1\"\n").unwrap();
        let env = Env { mapping: &ok, ..env };
        let r = resolve(&env, &Tally::default()).unwrap();
        assert_eq!(r.targets[&("o".to_string(), "events".to_string())].as_ref().unwrap().target, "si_1");
        assert_eq!(r.targets[&("o".to_string(), "traces".to_string())], None, "unmapped meter");
    }
}
