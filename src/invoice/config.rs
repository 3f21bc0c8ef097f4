//! Configuration of `tally-invoicer` (PRODUCT.md §10): one TOML file, every key overridable by
//! `TALLY_<SECTION>_<KEY>`, unknown keys are errors that name the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{default_from_serde, load_sections, ClickHouseConfig, ConfigError, MetersConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoicerConfig {
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub meters: MetersConfig,
    #[serde(default)]
    pub stripe: StripeConfig,
    #[serde(default)]
    pub billing: BillingConfig,
    #[serde(default)]
    pub metrics: InvoicerMetricsConfig,
}

/// Which Stripe API records usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StripeMode {
    /// Billing Meters: meter events, summaries, cancel adjustments (the default).
    Meters,
    /// Legacy usage records on subscription items (accounts pinned before 2025-03-31.basil).
    Legacy,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// Base URL, ending in `/` (`https://api.stripe.com/`; tests use the emulator).
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Secret key. Never logged, never in an error or a report.
    #[serde(default)]
    pub api_key: String,
    /// `Stripe-Account` header for a connected account ("" = the platform account).
    #[serde(default)]
    pub account: String,
    #[serde(default = "default_mode")]
    pub mode: StripeMode,
    /// Client-side rate limit, requests per second across all threads.
    #[serde(default = "default_max_requests_per_sec")]
    pub max_requests_per_sec: u32,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempts per request (429/5xx/network errors are retried; `Stripe-Should-Retry` is honoured).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Seconds after a bucket's last write before Stripe's summary must show it (PRODUCT.md §7).
    /// Stripe's summaries are eventually consistent (minutes in practice); once a bucket's writes
    /// are older than this, Stripe holding less than the ledger is `stripe_missing`, not lag.
    #[serde(default = "default_settle_secs")]
    pub settle_secs: u32,
    /// Meters mode: a draft cycle invoice that Stripe finalizes within this many seconds counts
    /// as finalized, so no write is planned that could land after it (default 900; docs/invoicing.md).
    #[serde(default = "default_finalize_margin_secs")]
    pub finalize_margin_secs: u32,
    /// Meters mode: a write is judged on time only if answered this many seconds before Stripe
    /// finalized its period's invoice, late only if planned this many seconds after; in between
    /// it is `unresolved` (the invoicer's clock against Stripe's; default 120).
    #[serde(default = "default_landing_tolerance_secs")]
    pub landing_tolerance_secs: u32,
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field("api_base", &self.api_base)
            .field("api_key", &"[redacted]")
            .field("account", &self.account)
            .field("mode", &self.mode)
            .field("max_requests_per_sec", &self.max_requests_per_sec)
            .field("concurrency", &self.concurrency)
            .field("settle_secs", &self.settle_secs)
            .field("finalize_margin_secs", &self.finalize_margin_secs)
            .field("landing_tolerance_secs", &self.landing_tolerance_secs)
            .finish_non_exhaustive()
    }
}

/// Size of the buckets compared and pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn secs(self) -> i64 {
        match self {
            Granularity::Hour => 3600,
            Granularity::Day => 86_400,
        }
    }

    pub fn stripe_window(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            _ => Err(format!("granularity must be hour or day, not {s:?}")),
        }
    }
}

/// Where org → customer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerSource {
    /// `[orgs]` in the mapping file.
    File,
    /// Stripe customers whose metadata `tally_org_id` names the org (the file's `[orgs]` still wins).
    Metadata,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    #[serde(default = "default_mapping_path")]
    pub mapping_path: PathBuf,
    #[serde(default = "default_customer_source")]
    pub customer_source: CustomerSource,
    #[serde(default = "default_granularity")]
    pub granularity: Granularity,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoicerMetricsConfig {
    /// Prometheus address while running ("" = no listener).
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_api_base() -> String {
    "https://api.stripe.com/".into()
}
fn default_mode() -> StripeMode {
    StripeMode::Meters
}
fn default_max_requests_per_sec() -> u32 {
    // Stripe's live-mode limit is 100 read/write operations per second; stay below it.
    80
}
fn default_concurrency() -> usize {
    4
}
fn default_max_attempts() -> u32 {
    8
}
fn default_initial_backoff_ms() -> u64 {
    250
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_settle_secs() -> u32 {
    7200
}
fn default_finalize_margin_secs() -> u32 {
    crate::invoice::stripe::invoices::FINALIZE_MARGIN_SECS as u32
}
fn default_landing_tolerance_secs() -> u32 {
    120
}
fn default_mapping_path() -> PathBuf {
    "config/billing.toml".into()
}
fn default_customer_source() -> CustomerSource {
    CustomerSource::File
}
fn default_granularity() -> Granularity {
    Granularity::Hour
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9465".into()
}

default_from_serde!(StripeConfig, BillingConfig, InvoicerMetricsConfig);

pub const INVOICER_SECTIONS: &[&str] = &["clickhouse", "meters", "stripe", "billing", "metrics"];

impl InvoicerConfig {
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let cfg: InvoicerConfig = load_sections(path, env, INVOICER_SECTIONS)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        let s = &self.stripe;
        if !(s.api_base.starts_with("http://") || s.api_base.starts_with("https://")) || !s.api_base.ends_with('/') {
            return bad("stripe.api_base", "must be an http(s) URL ending in '/'");
        }
        if s.max_requests_per_sec == 0 {
            return bad("stripe.max_requests_per_sec", "must be at least 1");
        }
        if s.concurrency == 0 || s.concurrency > 64 {
            return bad("stripe.concurrency", "must be between 1 and 64");
        }
        if s.max_attempts == 0 {
            return bad("stripe.max_attempts", "must be at least 1");
        }
        if s.initial_backoff_ms > s.max_backoff_ms {
            return bad("stripe.initial_backoff_ms", "must not exceed stripe.max_backoff_ms");
        }
        Ok(())
    }

    /// The key, or a clear error when a command needs Stripe and none is configured.
    pub fn require_api_key(&self) -> Result<&str, ConfigError> {
        if self.stripe.api_key.is_empty() {
            return Err(ConfigError::Invalid {
                key: "stripe.api_key",
                reason: "is required (set TALLY_STRIPE_API_KEY)".into(),
            });
        }
        Ok(&self.stripe.api_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn contract_keys_and_env_names() {
        let c = InvoicerConfig::load(
            None,
            env(&[
                ("TALLY_STRIPE_API_BASE", "http://127.0.0.1:12111/"),
                ("TALLY_STRIPE_API_KEY", "sk_test_x"),
                ("TALLY_BILLING_MAPPING_PATH", "/tmp/b.toml"),
                ("TALLY_BILLING_GRANULARITY", "day"),
                ("TALLY_STRIPE_MODE", "legacy"),
            ]),
        )
        .unwrap();
        assert_eq!(c.stripe.api_base, "http://127.0.0.1:12111/");
        assert_eq!(c.require_api_key().unwrap(), "sk_test_x");
        assert_eq!(c.billing.mapping_path, PathBuf::from("/tmp/b.toml"));
        assert_eq!(c.billing.granularity, Granularity::Day);
        assert_eq!(c.stripe.mode, StripeMode::Legacy);
        assert_eq!(c.clickhouse.database, "tally");
        assert_eq!(c.metrics.listen, "127.0.0.1:9465");
        assert_eq!(c.stripe.settle_secs, 7200, "PRODUCT.md §7: two hours by default");
        assert!(!format!("{c:?}").contains("sk_test_x"), "the key never appears in Debug output");
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/invoicer.example.toml");
        let c = InvoicerConfig::load(Some(&path), env(&[])).unwrap();
        assert_eq!(c.stripe.max_requests_per_sec, 80);
        assert_eq!(c.billing.customer_source, CustomerSource::File);
    }

    #[test]
    fn bad_values_are_named() {
        let e = InvoicerConfig::load(None, env(&[("TALLY_STRIPE_API_BASE", "http://x")])).unwrap_err();
        assert!(e.to_string().contains("stripe.api_base"), "{e}");
        let e = InvoicerConfig::load(None, env(&[("TALLY_STRIPE_RATE", "3")])).unwrap_err();
        assert!(e.to_string().contains("rate"), "{e}");
        let e = InvoicerConfig::load(None, env(&[])).unwrap().require_api_key().map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("TALLY_STRIPE_API_KEY"), "{e}");
    }
}
