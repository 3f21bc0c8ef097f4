//! `tally-invoicer`: reconciles tally's ClickHouse aggregates with Stripe, exactly and rerun-safe.
//!
//! Data flow: [`usage`] (tally's totals, verified against the per-event rows) and [`ledger`]
//! (what was pushed) and [`stripe`] (what Stripe shows) → [`plan`] (a pure decision per bucket)
//! → [`reconcile`] (intent → call → outcome, recorded in the ledger) → [`report`]; [`explain`] drills from an invoice line down to the events.
//! docs/invoicing.md holds the exactness argument.

pub mod config;
pub mod explain;
pub mod ledger;
pub mod mapping;
pub mod metrics;
pub mod period;
pub mod plan;
pub mod progress;
pub mod provision;
pub mod reconcile;
pub mod report;
pub mod sql;
pub mod stripe;
pub mod usage;
