//! Configuration of `tally-api` (PRODUCT.md §10, §11): one TOML file, every key overridable by
//! `TALLY_<SECTION>_<KEY>` (e.g. `TALLY_API_LISTEN`), unknown keys are errors that name the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{
    default_from_serde, load_sections, AuthConfig, ClickHouseConfig, ConfigError, DedupeConfig, KafkaConfig,
    MetersConfig, Redacted,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default)]
    pub api: ApiSection,
    /// The ingest workers' source topic and consumer group: `complete_until` is read from the
    /// group's committed offsets (src/api/progress.rs).
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    /// Credentials as for ingest (PRODUCT.md §2); the audience is `api.audience`.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `window_secs` must be the ingest workers': it decides `final_until`.
    #[serde(default)]
    pub dedupe: DedupeConfig,
    #[serde(default)]
    pub meters: MetersConfig,
    #[serde(default)]
    pub metrics: ApiMetricsConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
}

/// Threshold notifications (src/api/notify, docs/api.md "Notifications").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Whether this replica takes part in evaluating thresholds (any number of replicas may).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The compacted topic of org states (key org_id): the ingestion fleet's block/allow list and
    /// the notifiers' ledger.
    #[serde(default = "default_notify_topic")]
    pub topic: String,
    /// Consumer group of the notifiers: its partition assignment decides which replica owns an org.
    #[serde(default = "default_notify_group")]
    pub group_id: String,
    /// How often the owned orgs are evaluated, milliseconds.
    #[serde(default = "default_notify_interval_ms")]
    pub interval_ms: u64,
    /// Notifications of periods that ended more than this many days ago leave the org's record.
    #[serde(default = "default_keep_days")]
    pub keep_days: u32,
    /// Webhook endpoint ("" = no webhooks).
    #[serde(default)]
    pub webhook_url: String,
    /// The webhooks' signing secret (`TALLY_NOTIFY_WEBHOOK_SECRET`): a Standard Webhooks
    /// `whsec_<base64>` secret (its decoded bytes are the HMAC-SHA256 key), or any other string
    /// (its bytes are the key); at least 16 bytes of key. Never logged.
    #[serde(default)]
    pub webhook_secret: Redacted,
    #[serde(default = "default_webhook_max_attempts")]
    pub webhook_max_attempts: u32,
    #[serde(default = "default_webhook_timeout_ms")]
    pub webhook_timeout_ms: u64,
    /// First pause between attempts (doubling, at most 60 s).
    #[serde(default = "default_webhook_backoff_ms")]
    pub webhook_backoff_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// HTTP listen address (`TALLY_API_LISTEN`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Plans and their assignment to orgs.
    #[serde(default = "default_plans_path")]
    pub plans_path: PathBuf,
    /// Required JWT `aud` for the API (tokens for ingest carry `tally-ingest`; one token may carry both).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// How often the ingest group's progress (`complete_until`) is read from Kafka, milliseconds.
    #[serde(default = "default_progress_refresh_ms")]
    pub progress_refresh_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiMetricsConfig {
    /// Prometheus address ("" = none).
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:8480".into()
}
fn default_plans_path() -> PathBuf {
    "config/plans.toml".into()
}
fn default_audience() -> String {
    "tally-api".into()
}
fn default_progress_refresh_ms() -> u64 {
    2000
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9466".into()
}
fn default_true() -> bool {
    true
}
fn default_notify_topic() -> String {
    "tally.entitlements".into()
}
fn default_notify_group() -> String {
    "tally-api-notifier".into()
}
fn default_notify_interval_ms() -> u64 {
    5000
}
fn default_keep_days() -> u32 {
    62
}
fn default_webhook_max_attempts() -> u32 {
    8
}
fn default_webhook_timeout_ms() -> u64 {
    5000
}
fn default_webhook_backoff_ms() -> u64 {
    500
}

default_from_serde!(ApiSection, ApiMetricsConfig, NotifyConfig);

pub const API_SECTIONS: &[&str] = &["api", "kafka", "clickhouse", "auth", "dedupe", "meters", "metrics", "notify"];

impl ApiConfig {
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let cfg: ApiConfig = load_sections(path, env, API_SECTIONS)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("api.listen", "must be an address such as 127.0.0.1:8480");
        }
        if self.api.progress_refresh_ms == 0 {
            return bad("api.progress_refresh_ms", "must be at least 1");
        }
        if self.api.audience.is_empty() {
            return bad("api.audience", "must not be empty");
        }
        self.auth.validate()?;
        let n = &self.notify;
        if n.interval_ms == 0 {
            return bad("notify.interval_ms", "must be at least 1");
        }
        let url = &n.webhook_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return bad("notify.webhook_url", "must be an http(s) URL");
        }
        if !n.webhook_url.is_empty() {
            if let Err(e) = super::notify::webhook::signing_key(&n.webhook_secret.0) {
                return bad(
                    "notify.webhook_secret",
                    &format!("{e} when webhooks are on (TALLY_NOTIFY_WEBHOOK_SECRET)"),
                );
            }
        }
        Ok(())
    }

    /// The credential settings with the API's audience, for every issuer (a token for ingest
    /// is not a token for the API).
    pub fn auth(&self) -> AuthConfig {
        let issuers = self
            .auth
            .issuers
            .iter()
            .map(|i| crate::config::IssuerConfig { audience: self.api.audience.clone(), ..i.clone() })
            .collect();
        AuthConfig { audience: self.api.audience.clone(), issuers, ..self.auth.clone() }
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
        let c = ApiConfig::load(None, env(&[("TALLY_API_LISTEN", "0.0.0.0:9999"), ("TALLY_KAFKA_GROUP_ID", "2024")]))
            .unwrap();
        assert_eq!(c.api.listen, "0.0.0.0:9999");
        assert_eq!(c.kafka.group_id, "2024", "read as a string");
        assert_eq!(c.auth().audience, "tally-api");
        let d = ApiConfig::load(None, env(&[])).unwrap();
        assert_eq!(d.api.listen, "127.0.0.1:8480", "PRODUCT.md §11 default");
        assert_eq!(d.metrics.listen, "127.0.0.1:9466");
        let e = ApiConfig::load(None, env(&[("TALLY_API_LISTN", "x")])).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e = ApiConfig::load(None, env(&[("TALLY_API_LISTEN", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("api.listen"), "{e}");
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/api.example.toml");
        let c = ApiConfig::load(Some(&path), env(&[])).unwrap();
        assert_eq!(c.api.plans_path, PathBuf::from("config/plans.toml"));
    }
}
