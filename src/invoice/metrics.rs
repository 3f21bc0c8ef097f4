//! Every metric `tally-invoicer` exports (§8), defined in one place, served on `metrics.listen`
//! while it runs and written to `--metrics-textfile` for node_exporter.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

pub const PUSHES: &str = "tally_invoicer_pushes_total";
pub const PUSHED_VALUE: &str = "tally_invoicer_pushed_value_total";
pub const DRIFT_BUCKETS: &str = "tally_invoicer_drift_buckets";
pub const DRIFT_VALUE: &str = "tally_invoicer_drift_value";
pub const NEEDS_CREDIT: &str = "tally_invoicer_needs_credit_value";
pub const UNBILLED: &str = "tally_invoicer_unbilled_value";
pub const VERIFY_MISMATCHES: &str = "tally_invoicer_verify_mismatches";
pub const STRIPE_REQUESTS: &str = "tally_invoicer_stripe_requests_total";
pub const STRIPE_ERRORS: &str = "tally_invoicer_stripe_errors_total";
pub const STRIPE_RETRIES: &str = "tally_invoicer_stripe_retries_total";
pub const STRIPE_KEYS_RENEWED: &str = "tally_invoicer_stripe_idempotency_keys_renewed_total";
pub const STRIPE_REQUEST_SECONDS: &str = "tally_invoicer_stripe_request_seconds";
pub const RUN_SECONDS: &str = "tally_invoicer_run_seconds";
pub const LAST_SUCCESS: &str = "tally_invoicer_last_success_timestamp_seconds";

pub fn describe() {
    describe_counter!(PUSHES, "Stripe writes by action (push, set, cancel) and outcome (done, failed, pending).");
    describe_counter!(PUSHED_VALUE, "Usage quantity pushed to Stripe, by action.");
    describe_gauge!(DRIFT_BUCKETS, "Buckets not reconciled at the end of the run, by status.");
    describe_gauge!(
        DRIFT_VALUE,
        "Usage quantity in the buckets not reconciled, by status (stripe_missing, period_closed, too_old_for_stripe: \
         not billed; needs_credit, stripe_ahead: over-billed)."
    );
    describe_gauge!(NEEDS_CREDIT, "Over-reported usage that needs a credit note.");
    describe_gauge!(UNBILLED, "Usage Stripe does not hold and will not get without action (lost, closed, refused).");
    describe_gauge!(VERIFY_MISMATCHES, "(org, project, meter, hour) where aggregates disagree with the events.");
    describe_counter!(STRIPE_REQUESTS, "Stripe HTTP requests, by endpoint and status class.");
    describe_counter!(STRIPE_ERRORS, "Stripe requests that failed after retries, by endpoint.");
    describe_counter!(STRIPE_RETRIES, "Stripe requests retried (429, 5xx, network), by endpoint.");
    describe_counter!(
        STRIPE_KEYS_RENEWED,
        "Stripe writes resent under a new Idempotency-Key after a 5xx (Stripe keeps a 500 under its key for 24 h), by endpoint."
    );
    describe_histogram!(STRIPE_REQUEST_SECONDS, Unit::Seconds, "Latency of one Stripe HTTP attempt.");
    describe_gauge!(RUN_SECONDS, Unit::Seconds, "Duration of the last command.");
    describe_gauge!(LAST_SUCCESS, Unit::Seconds, "Unix time of the last reconcile that ended reconciled (exit 0).");
}

/// Installs the recorder; serves `/metrics` on `listen` unless empty.
pub fn install(listen: &str) -> anyhow::Result<PrometheusHandle> {
    use anyhow::Context;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("failed to install the metrics recorder")?;
    describe();
    if !listen.is_empty() {
        // A busy port must not stop billing: the run goes on without the listener.
        let listener = match std::net::TcpListener::bind(listen) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(listen, error = %e, "cannot serve metrics; continuing without (see --metrics-textfile)");
                return Ok(handle);
            }
        };
        let h = handle.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::spawn(move || {
            crate::httpd::serve(
                listener,
                stop,
                std::sync::Arc::new(move |_req| crate::httpd::Reply::Respond {
                    status: 200,
                    headers: vec![("Content-Type".into(), "text/plain; version=0.0.4".into())],
                    body: h.render().into_bytes(),
                }),
            )
        });
    }
    Ok(handle)
}

/// Writes the current metrics to `path` atomically (node_exporter's textfile collector).
pub fn write_textfile(handle: &PrometheusHandle, path: &std::path::Path) -> std::io::Result<()> {
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, handle.render())?;
    std::fs::rename(&tmp, path)
}
