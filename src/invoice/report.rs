//! The finance report of a reconcile: per (org, customer, meter, period) tally's value, Stripe
//! before, the delta pushed, Stripe after and a status; as a table, CSV or JSON.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::ledger::Action;
use super::period::Period;
use super::plan::{BucketPlan, ItemCheck, Status, Target};
use super::reconcile::{Sent, StripeView};
use crate::timestamp::format_rfc3339;

type Key = (String, String, i64, i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            _ => Err(format!("format must be table, csv or json, not {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub org_id: String,
    pub customer: String,
    pub meter: String,
    pub stripe_target: String,
    /// tally's total over the period; `None` when it is refused (`total_overflow`: a total of the
    /// pair needs more than 64 bits, PRODUCT.md §1; the note names it).
    pub tally: Option<u64>,
    pub ledger_before: u64,
    pub stripe_before: Option<u64>,
    /// Change of the ledger's value by this run (negative after cancels); in a dry run, the
    /// change `--apply` would make. 128 bits: both sides are 64-bit totals.
    pub delta_pushed: i128,
    pub stripe_after: Option<u64>,
    pub needs_credit: u64,
    /// Usage Stripe does not hold and will not get without action (see [`BucketPlan::unbilled`]).
    pub unbilled: u64,
    pub status: String,
    pub buckets: usize,
    pub buckets_unsettled: usize,
    pub note: String,
}

/// A bucket that is not reconciled.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub org_id: String,
    pub meter: String,
    pub bucket_start: String,
    pub bucket_end: String,
    pub status: &'static str,
    /// `None` for a refused bucket (`total_overflow`).
    pub tally: Option<u64>,
    pub ledger: u64,
    pub stripe: Option<u64>,
    pub needs_credit: u64,
    pub unbilled: u64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub period_from: String,
    pub period_to: String,
    pub mode: String,
    pub applied: bool,
    pub rows: usize,
    pub buckets: usize,
    pub buckets_unsettled: usize,
    pub writes_done: usize,
    pub pushes_done: usize,
    pub sets_done: usize,
    pub cancels_done: usize,
    pub repairs_done: usize,
    pub writes_failed: usize,
    pub cancels_refused: usize,
    pub writes_pending: usize,
    pub stripe_requests: u64,
    pub elapsed_secs: f64,
    pub exit_code: i32,
    /// Why the run stopped writing early (Stripe unreachable), if it did.
    pub aborted: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub summary: Summary,
    pub rows: Vec<Row>,
    pub problems: Vec<Problem>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        period: Period,
        mode: &str,
        applied: bool,
        keys: &BTreeSet<Key>,
        tally: &BTreeMap<Key, u64>,
        before: &BTreeMap<Key, BucketPlan>,
        after: &BTreeMap<Key, BucketPlan>,
        stripe_before: &StripeView,
        stripe_after: &StripeView,
        sent: &Sent,
        targets: &HashMap<(String, String), Option<Target>>,
        refused: &BTreeSet<(String, String)>,
        items: &[ItemCheck],
        stripe_requests: u64,
        elapsed_secs: f64,
    ) -> Report {
        let mut by_pair: BTreeMap<(String, String), Vec<&Key>> = BTreeMap::new();
        for k in keys {
            by_pair.entry((k.0.clone(), k.1.clone())).or_default().push(k);
        }
        let pair_of = |k: &Key| (k.0.clone(), k.1.clone());
        let mut rows = Vec::new();
        let mut problems = Vec::new();
        for (pair, ks) in &by_pair {
            let target = targets.get(pair).cloned().flatten();
            let sum = |f: &dyn Fn(&BucketPlan) -> u64, m: &BTreeMap<Key, BucketPlan>| -> u64 {
                ks.iter().filter_map(|k| m.get(*k)).map(f).sum()
            };
            let ledger_before = sum(&|p| p.ledger, before);
            let ledger_after = sum(&|p| p.ledger, after);
            // Legacy mode: the item's billing periods compared with Stripe's usage record summaries.
            let checks: Vec<&ItemCheck> = items
                .iter()
                .filter(|c| (c.org_id.as_str(), c.meter.as_str()) == (pair.0.as_str(), pair.1.as_str()))
                .collect();
            let worst = ks
                .iter()
                .filter_map(|k| after.get(*k))
                .chain(checks.iter().map(|c| &c.plan))
                .map(|p| p.status)
                .max()
                .unwrap_or(Status::Ok);
            let unsettled: Vec<&&Key> =
                ks.iter().filter(|k| after.get(**k).is_some_and(|p| !p.status.settled())).collect();
            let did = |a: Action| sent.done.iter().any(|(x, k, _)| *x == a && pair_of(k) == *pair);
            let failed = sent.failed.iter().any(|(k, _)| pair_of(k) == *pair);
            let pending = sent.indeterminate.iter().any(|(k, _)| pair_of(k) == *pair);
            let status = if failed {
                "failed".to_string()
            } else if pending {
                "pending".to_string()
            } else if worst.settled() {
                if sent.repaired.iter().any(|k| pair_of(k) == *pair) {
                    "repaired".into()
                } else if did(Action::Cancel) {
                    "corrected".into()
                } else if did(Action::Push) || did(Action::Set) {
                    "pushed".into()
                } else {
                    worst.as_str().into()
                }
            } else if !applied && worst == Status::Push {
                "would_push".into()
            } else if !applied && worst == Status::Correct {
                "would_correct".into()
            } else if !applied && worst == Status::Repair {
                "would_repair".into()
            } else {
                worst.as_str().into()
            };
            let unsettled_checks: Vec<&&ItemCheck> = checks.iter().filter(|c| !c.plan.status.settled()).collect();
            let note = unsettled
                .iter()
                .filter_map(|k| after.get(**k))
                .chain(unsettled_checks.iter().map(|c| &c.plan))
                .map(|p| p.note.clone())
                .find(|n| !n.is_empty())
                .or_else(|| {
                    sent.failed
                        .iter()
                        .chain(&sent.cancels_refused)
                        .find(|(k, _)| pair_of(k) == *pair)
                        .map(|(_, e)| e.clone())
                })
                .unwrap_or_default();
            for k in &unsettled {
                let p = &after[**k];
                problems.push(Problem {
                    org_id: k.0.clone(),
                    meter: k.1.clone(),
                    bucket_start: format_rfc3339(k.2),
                    bucket_end: format_rfc3339(k.3),
                    status: match p.status {
                        Status::Push if !applied => "would_push",
                        Status::Repair if !applied => "would_repair",
                        s => s.as_str(),
                    },
                    tally: (!refused.contains(&pair_of(k))).then(|| tally.get(**k).copied().unwrap_or(0)),
                    ledger: p.ledger,
                    stripe: (mode == "meters" && target.is_some())
                        .then(|| stripe_after.bucket.get(**k).copied().unwrap_or(0)),
                    needs_credit: p.needs_credit,
                    unbilled: p.unbilled,
                    note: p.note.clone(),
                });
            }
            for c in &unsettled_checks {
                problems.push(Problem {
                    org_id: c.org_id.clone(),
                    meter: c.meter.clone(),
                    bucket_start: format_rfc3339(c.start),
                    bucket_end: format_rfc3339(c.end),
                    status: match c.plan.status {
                        Status::Repair if !applied => "would_repair",
                        s => s.as_str(),
                    },
                    tally: None,
                    ledger: c.plan.ledger,
                    stripe: Some(c.stripe),
                    needs_credit: c.plan.needs_credit,
                    unbilled: c.plan.unbilled,
                    note: c.plan.note.clone(),
                });
            }
            rows.push(Row {
                org_id: pair.0.clone(),
                customer: target.as_ref().map(|t| t.customer.clone()).unwrap_or_default(),
                meter: pair.1.clone(),
                stripe_target: target.as_ref().map(|t| t.target.clone()).unwrap_or_default(),
                // A refused pair's total is not shown; every other pair's buckets sum within 64
                // bits (read_tally refuses a pair whose sum does not).
                tally: (!refused.contains(pair)).then(|| ks.iter().map(|k| tally.get(*k).copied().unwrap_or(0)).sum()),
                ledger_before,
                stripe_before: target.as_ref().and(stripe_before.pair.get(pair).copied()),
                delta_pushed: if applied {
                    i128::from(ledger_after) - i128::from(ledger_before)
                } else {
                    // What --apply would change: the planned buckets' tally − ledger.
                    ks.iter()
                        .filter_map(|k| {
                            before
                                .get(*k)
                                .filter(|p| matches!(p.status, Status::Push | Status::Correct))
                                .map(|p| (k, p))
                        })
                        .map(|(k, p)| i128::from(tally.get(*k).copied().unwrap_or(0)) - i128::from(p.ledger))
                        .sum()
                },
                stripe_after: target.as_ref().and(stripe_after.pair.get(pair).copied()),
                needs_credit: sum(&|p| p.needs_credit, after)
                    + unsettled_checks.iter().map(|c| c.plan.needs_credit).sum::<u64>(),
                unbilled: ks
                    .iter()
                    .filter_map(|k| after.get(*k))
                    .chain(unsettled_checks.iter().map(|c| &c.plan))
                    .filter(|p| !p.status.settled())
                    .map(|p| p.unbilled)
                    .sum(),
                status,
                buckets: ks.len(),
                buckets_unsettled: unsettled.len() + unsettled_checks.len(),
                note,
            });
        }
        let count = |a: Action| sent.done.iter().filter(|(x, _, _)| *x == a).count();
        // A refused pair is an error even while a bucket of it shows `pending` first.
        let any_error = !sent.failed.is_empty()
            || !sent.indeterminate.is_empty()
            || !refused.is_empty()
            || after.values().any(|p| p.status.is_error());
        let buckets_unsettled = after.values().filter(|p| !p.status.settled()).count()
            + items.iter().filter(|c| !c.plan.status.settled()).count();
        let exit_code = if any_error {
            1
        } else if buckets_unsettled > 0 {
            2
        } else {
            0
        };
        Report {
            summary: Summary {
                period_from: format_rfc3339(period.from),
                period_to: format_rfc3339(period.to),
                mode: mode.to_string(),
                applied,
                rows: rows.len(),
                buckets: keys.len(),
                buckets_unsettled,
                writes_done: sent.done.len(),
                pushes_done: count(Action::Push),
                sets_done: count(Action::Set),
                cancels_done: count(Action::Cancel),
                repairs_done: sent.repaired.len(),
                writes_failed: sent.failed.len(),
                cancels_refused: sent.cancels_refused.len(),
                writes_pending: sent.indeterminate.len(),
                stripe_requests,
                elapsed_secs,
                exit_code,
                aborted: sent.aborted.clone(),
            },
            rows,
            problems,
        }
    }

    pub fn exit_code(&self) -> i32 {
        self.summary.exit_code
    }

    /// Unsettled buckets per status (for the drift gauge).
    pub fn drift_by_status(&self) -> Vec<(&'static str, usize)> {
        let mut m: BTreeMap<&'static str, usize> = BTreeMap::new();
        for p in &self.problems {
            *m.entry(p.status).or_default() += 1;
        }
        m.into_iter().collect()
    }

    /// Quantity in the unsettled buckets per status (for the drift value gauge): what is not
    /// billed (lost, closed, refused) or over-billed (needs a credit).
    pub fn drift_value_by_status(&self) -> Vec<(&'static str, u64)> {
        let mut m: BTreeMap<&'static str, u64> = BTreeMap::new();
        for p in &self.problems {
            *m.entry(p.status).or_default() += p.unbilled + p.needs_credit;
        }
        m.into_iter().collect()
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string_pretty(self).expect("report serializes") + "\n",
            Format::Csv => {
                let mut out = String::from(
                    "org_id,customer,meter,stripe_target,tally,stripe_before,delta_pushed,stripe_after,needs_credit,unbilled,status,buckets,buckets_unsettled,note\n",
                );
                for r in &self.rows {
                    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
                    let fields = [
                        csv(&r.org_id),
                        csv(&r.customer),
                        csv(&r.meter),
                        csv(&r.stripe_target),
                        opt(r.tally),
                        opt(r.stripe_before),
                        r.delta_pushed.to_string(),
                        opt(r.stripe_after),
                        r.needs_credit.to_string(),
                        r.unbilled.to_string(),
                        csv(&r.status),
                        r.buckets.to_string(),
                        r.buckets_unsettled.to_string(),
                        csv(&r.note),
                    ];
                    out.push_str(&fields.join(","));
                    out.push('\n');
                }
                out
            }
            Format::Table => self.table(),
        }
    }

    fn table(&self) -> String {
        let head = [
            "ORG",
            "CUSTOMER",
            "METER",
            "TALLY",
            "STRIPE BEFORE",
            "DELTA",
            "STRIPE AFTER",
            "CREDIT",
            "UNBILLED",
            "STATUS",
        ];
        let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        let cells: Vec<[String; 10]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.org_id.clone(),
                    if r.customer.is_empty() { "-".into() } else { r.customer.clone() },
                    r.meter.clone(),
                    opt(r.tally),
                    opt(r.stripe_before),
                    format!("{:+}", r.delta_pushed),
                    opt(r.stripe_after),
                    r.needs_credit.to_string(),
                    r.unbilled.to_string(),
                    r.status.clone(),
                ]
            })
            .collect();
        let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
        for c in &cells {
            for (i, v) in c.iter().enumerate() {
                w[i] = w[i].max(v.chars().count());
            }
        }
        let line = |vals: &[String]| -> String {
            let mut s = String::new();
            for (i, v) in vals.iter().enumerate() {
                let pad = w[i] - v.chars().count();
                if (3..9).contains(&i) {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(v);
                } else {
                    s.push_str(v);
                    s.push_str(&" ".repeat(pad));
                }
                s.push_str("  ");
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(&head.map(String::from));
        for c in &cells {
            out.push_str(&line(c));
        }
        let s = &self.summary;
        out.push_str(&format!(
            "\n{} {}..{} ({} mode): {} rows, {} buckets, {} not reconciled; {} writes to Stripe ({} pushes, {} sets, {} cancels, {} repairs), \
             {} refused, {} pending; {} Stripe requests in {:.1} s; exit {}\n",
            if s.applied { "applied" } else { "dry run" },
            s.period_from,
            s.period_to,
            s.mode,
            s.rows,
            s.buckets,
            s.buckets_unsettled,
            s.writes_done,
            s.pushes_done,
            s.sets_done,
            s.cancels_done,
            s.repairs_done,
            s.writes_failed,
            s.writes_pending,
            s.stripe_requests,
            s.elapsed_secs,
            s.exit_code
        ));
        if let Some(why) = &s.aborted {
            out.push_str(&format!("\nSTOPPED EARLY: {why}\n"));
        }
        const SHOWN: usize = 20;
        if !self.problems.is_empty() {
            out.push_str("\nbuckets not reconciled:\n");
            for p in self.problems.iter().take(SHOWN) {
                out.push_str(&format!(
                    "  {} {} {}..{} {} tally={} ledger={} stripe={} unbilled={} credit={} {}\n",
                    p.org_id,
                    p.meter,
                    p.bucket_start,
                    p.bucket_end,
                    p.status,
                    opt(p.tally),
                    p.ledger,
                    opt(p.stripe),
                    p.unbilled,
                    p.needs_credit,
                    p.note
                ));
            }
            if self.problems.len() > SHOWN {
                out.push_str(&format!("  ... and {} more (--format json lists all)\n", self.problems.len() - SHOWN));
            }
        }
        out
    }
}

/// A CSV field, quoted when it needs to be.
pub fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
