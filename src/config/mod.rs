//! Configuration of `tally-ingest`: one TOML file, every key overridable by `TALLY_<SECTION>_<KEY>`.
//!
//! Unknown keys (in the file or in a `TALLY_<SECTION>_*` variable of a known section) are errors that
//! name the key. Defaults live in named functions; `validate()` is pure and separate from building
//! clients.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod layered;

use layered::Layered;

/// Errors from loading or validating configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The whole configuration of the ingest worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub dedupe: DedupeConfig,
    #[serde(default)]
    pub meters: MetersConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub ingest: IngestLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    #[serde(default = "default_brokers")]
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default = "default_group_id")]
    pub group_id: String,
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Raw librdkafka properties, passed through to the consumer and the dead-letter producer.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    #[serde(default = "default_ch_url")]
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_ch_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// Per-request timeout; a request that times out is retried after re-checking what landed.
    #[serde(default = "default_ch_timeout_secs")]
    pub timeout_secs: u64,
    /// `tally-ingest prune` drops months of narrow rows older than this. The narrow table is the
    /// dedupe authority: it must cover `dedupe.window_secs + dedupe.replay_slack_secs`.
    #[serde(default = "default_events_retention_days")]
    pub events_retention_days: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default = "default_jwks_path")]
    pub jwks_path: PathBuf,
    #[serde(default = "default_api_keys_path")]
    pub api_keys_path: PathBuf,
    #[serde(default = "default_issuer")]
    pub issuer: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    #[serde(default = "default_reload_interval_secs")]
    pub reload_interval_secs: u64,
    /// Upper bound of the verified-credential cache (entries).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Where API keys live: `file` (`api_keys_path`, single node) or `clickhouse` (the table
    /// `api_keys`, shared by every worker and managed with `tally-ingest keys`).
    #[serde(default = "default_api_keys_store")]
    pub api_keys_store: ApiKeysStore,
    /// Server-side secret of the `clickhouse` key store: secrets are stored as
    /// HMAC-SHA256(pepper, secret) (docs/identity.md). At least 32 bytes; set
    /// `TALLY_AUTH_API_KEY_PEPPER`. Never logged.
    #[serde(default)]
    pub api_key_pepper: Redacted,
    /// The main issuer's keys over HTTP as well as (or instead of, with `jwks_path = ""`) the
    /// file: its OIDC discovery base URL (`{url}/.well-known/openid-configuration` → `jwks_uri`)…
    #[serde(default)]
    pub oidc_issuer_url: String,
    /// …or its JWKS URL directly.
    #[serde(default)]
    pub jwks_url: String,
    /// More identity providers, each with its own claim names (docs/identity.md).
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Least seconds between two fetches of one issuer's key set (an unknown `kid` triggers one).
    #[serde(default = "default_jwks_refetch_min_secs")]
    pub jwks_refetch_min_secs: u64,
    /// How long a fetched key set is used when the answer has no `Cache-Control: max-age`.
    #[serde(default = "default_jwks_cache_secs")]
    pub jwks_cache_secs: u64,
    /// Timeout of one request to an identity provider, milliseconds.
    #[serde(default = "default_jwks_timeout_ms")]
    pub jwks_timeout_ms: u64,
}

impl AuthConfig {
    /// The `auth` section's rules, shared by tally-ingest and tally-api (which reads the same
    /// section): bounds, issuer entries (distinct, https, and which orgs each may name), and the
    /// key store's pepper.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.leeway_secs > 86_400 {
            return bad("auth.leeway_secs", "must be at most one day (86400)");
        }
        for iss in &self.issuers {
            if iss.issuer.is_empty() || (iss.oidc_issuer_url.is_empty() == iss.jwks_url.is_empty()) {
                return bad("auth.issuers", "each needs an issuer and exactly one of oidc_issuer_url or jwks_url");
            }
        }
        if !self.oidc_issuer_url.is_empty() && !self.jwks_url.is_empty() {
            return bad("auth.jwks_url", "set auth.oidc_issuer_url or auth.jwks_url, not both");
        }
        let mut seen = vec![self.issuer.as_str()];
        for iss in &self.issuers {
            // Tokens choose their issuer entry by `iss`: two entries for one `iss` would make the
            // second one's org and claim names silently unused.
            if seen.contains(&iss.issuer.as_str()) {
                return bad("auth.issuers", "two entries for the same issuer (or the same as auth.issuer)");
            }
            seen.push(&iss.issuer);
            match (&iss.org_id, iss.orgs.is_empty(), iss.any_org) {
                (Some(_), true, false) | (None, false, false) | (None, true, true) => {}
                (Some(_), _, _) => {
                    return bad("auth.issuers", "org_id fixes the org: orgs and any_org do not apply with it");
                }
                (None, false, true) => return bad("auth.issuers", "set orgs or any_org, not both"),
                (None, true, false) => {
                    return bad(
                        "auth.issuers",
                        "an issuer whose tokens name their org by claim needs orgs = [...] (the orgs it may name) or \
                         any_org = true (an identity provider the operator runs); a customer's own identity provider \
                         fixes its org with org_id (docs/identity.md)",
                    );
                }
            }
            for url in [&iss.oidc_issuer_url, &iss.jwks_url].into_iter().filter(|u| !u.is_empty()) {
                if crate::verify::jwks::check_url(url).is_err() {
                    return bad("auth.issuers", "identity provider URLs must be https (plain http only to loopback)");
                }
            }
        }
        for url in [&self.oidc_issuer_url, &self.jwks_url].into_iter().filter(|u| !u.is_empty()) {
            if crate::verify::jwks::check_url(url).is_err() {
                return bad(
                    "auth.oidc_issuer_url",
                    "identity provider URLs must be https (plain http only to loopback)",
                );
            }
        }
        if self.jwks_refetch_min_secs == 0 || self.jwks_refetch_min_secs > 86_400 {
            return bad(
                "auth.jwks_refetch_min_secs",
                "must be between 1 and 86400 (it rate-limits fetches on unknown kids)",
            );
        }
        if self.jwks_cache_secs > 86_400 {
            return bad("auth.jwks_cache_secs", "must be at most 86400");
        }
        if self.jwks_timeout_ms == 0 || self.jwks_timeout_ms > 60_000 {
            return bad("auth.jwks_timeout_ms", "must be between 1 and 60000");
        }
        if self.api_keys_store == ApiKeysStore::ClickHouse && self.api_key_pepper.0.len() < 32 {
            return bad(
                "auth.api_key_pepper",
                "must be at least 32 bytes with api_keys_store = \"clickhouse\" (set TALLY_AUTH_API_KEY_PEPPER)",
            );
        }
        Ok(())
    }
}

/// One more identity provider (`[[auth.issuers]]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// `iss` of its tokens, exactly.
    pub issuer: String,
    /// OIDC discovery base URL (usually the issuer URL)…
    #[serde(default)]
    pub oidc_issuer_url: String,
    /// …or the JWKS URL directly.
    #[serde(default)]
    pub jwks_url: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Claim with the org id (a string).
    #[serde(default = "default_org_claim")]
    pub org_claim: String,
    /// Every token of this issuer belongs to this org (the org's own IdP); `org_claim` unused.
    #[serde(default)]
    pub org_id: Option<String>,
    /// Without `org_id`: the only orgs `org_claim` may name; a token naming another is refused
    /// (`invalid_credentials`). Whoever runs an identity provider decides what it puts in its
    /// claims: a customer's Keycloak realm admin could otherwise bill, and read, any org.
    #[serde(default)]
    pub orgs: Vec<String>,
    /// Without `org_id` and `orgs`: this identity provider is the operator's own, and its tokens
    /// may name any org. `validate` refuses a claim-named issuer that has neither.
    #[serde(default)]
    pub any_org: bool,
    /// Claim with the project id (a string).
    #[serde(default = "default_project_claim")]
    pub project_claim: String,
    /// Claim with the scopes: a space-separated string or an array of strings.
    #[serde(default = "default_scope_claim")]
    pub scope_claim: String,
    /// The scope that allows ingest.
    #[serde(default = "default_required_scope")]
    pub required_scope: String,
}

/// Where API keys are stored (PRODUCT.md §2, API key lifecycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeysStore {
    File,
    #[serde(rename = "clickhouse")]
    ClickHouse,
}

/// A secret configuration value: its `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "[redacted]" })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Bloom filter bytes per assigned partition. Memory = this x assigned partitions; a fuller
    /// filter costs more ClickHouse look-ups, never exactness.
    #[serde(default = "default_bloom_bytes")]
    pub bloom_bytes_per_partition: usize,
    /// Recently remembered keys kept exactly per assigned partition, at most (16 bytes each; rounded
    /// down to a power of two of 4-key sets, src/dedupe.rs).
    #[serde(default = "default_recent_keys")]
    pub recent_keys_per_partition: usize,
    /// Kafka retention to cover when loading a partition's filter: keys of events older than
    /// `now - window - this` are not loaded, and such (replayed) events are always checked in ClickHouse.
    #[serde(default = "default_replay_slack_secs")]
    pub replay_slack_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetersConfig {
    #[serde(default = "default_meters_path")]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestLimits {
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default = "default_max_future_secs")]
    pub max_future_secs: u64,
    /// A batch closes at this many messages (a `{"batch": [...]}` message holds up to 1,000 events) ...
    #[serde(default = "default_batch_max_messages")]
    pub batch_max_messages: usize,
    /// ... or after this long, whichever comes first.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Longest pause between retries of a failing ClickHouse or broker call.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_topic() -> String {
    "trace-events".into()
}
fn default_group_id() -> String {
    "tally-ingest".into()
}
fn default_dlq_topic() -> String {
    "trace-events.rejected".into()
}
fn default_ch_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_database() -> String {
    "tally".into()
}
fn default_ch_user() -> String {
    "default".into()
}
fn default_ch_timeout_secs() -> u64 {
    60
}
fn default_events_retention_days() -> u64 {
    400
}
fn default_jwks_path() -> PathBuf {
    "config/dev/jwks.json".into()
}
fn default_api_keys_path() -> PathBuf {
    "config/dev/api_keys.json".into()
}
fn default_issuer() -> String {
    "https://auth.tally.local".into()
}
fn default_audience() -> String {
    "tally-ingest".into()
}
fn default_leeway_secs() -> u64 {
    60
}
fn default_reload_interval_secs() -> u64 {
    10
}
fn default_cache_entries() -> usize {
    100_000
}
fn default_jwks_refetch_min_secs() -> u64 {
    30
}
fn default_jwks_cache_secs() -> u64 {
    300
}
fn default_jwks_timeout_ms() -> u64 {
    5000
}
fn default_org_claim() -> String {
    "org_id".into()
}
fn default_project_claim() -> String {
    "project_id".into()
}
fn default_scope_claim() -> String {
    "scope".into()
}
fn default_required_scope() -> String {
    "ingest".into()
}
fn default_api_keys_store() -> ApiKeysStore {
    ApiKeysStore::File
}
fn default_window_secs() -> u64 {
    30 * 24 * 3600
}
fn default_bloom_bytes() -> usize {
    16 << 20
}
fn default_recent_keys() -> usize {
    262_144
}
fn default_replay_slack_secs() -> u64 {
    7 * 24 * 3600
}
fn default_meters_path() -> PathBuf {
    "config/meters.toml".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_max_message_bytes() -> usize {
    1 << 20
}
fn default_max_future_secs() -> u64 {
    300
}
fn default_batch_max_messages() -> usize {
    20_000
}
fn default_batch_max_wait_ms() -> u64 {
    250
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

/// `impl Default` from the serde defaults (an empty table), so that defaults live in one place.
macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("defaults deserialize from an empty table")
            }
        }
    )*};
}
pub(crate) use default_from_serde;

/// Reads `path` (if given), applies `TALLY_<SECTION>_<KEY>` overrides of `sections` from `env`
/// (each read with the type of the key it sets, see [`layered`]) and deserializes.
pub fn load_sections<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
) -> Result<T, ConfigError> {
    let table = match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
            toml::from_str(&text)
                .map_err(|e| ConfigError::Parse(format!("{}: {}", p.display(), e.to_string().trim_end())))?
        }
        None => toml::Table::new(),
    };
    from_table(table, env, sections)
}

/// Parses configuration text (what a file holds) with the overrides of `env` applied.
pub fn parse_sections<T: serde::de::DeserializeOwned>(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
) -> Result<T, ConfigError> {
    let table = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string().trim_end().to_string()))?;
    from_table(table, env, sections)
}

fn from_table<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
) -> Result<T, ConfigError> {
    let layered = layer_env(table, env, sections)?;
    T::deserialize(layered).map_err(|e| ConfigError::Parse(e.0))
}
default_from_serde!(KafkaConfig, ClickHouseConfig, AuthConfig, DedupeConfig, MetersConfig, MetricsConfig, IngestLimits);

/// Sections of the ingest config; `TALLY_<SECTION>_<KEY>` variables of these sections are applied.
pub const INGEST_SECTIONS: &[&str] = &["kafka", "clickhouse", "auth", "dedupe", "meters", "metrics", "ingest"];

impl IngestConfig {
    /// Reads `path` (if given), applies `TALLY_*` overrides from `env`, deserializes and validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let cfg: IngestConfig = load_sections(path, env, INGEST_SECTIONS)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`IngestConfig::load`] from the text of a file.
    pub fn parse(text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let cfg: IngestConfig = parse_sections(text, env, INGEST_SECTIONS)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pure checks of values that would otherwise fail late.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.kafka.topic.is_empty() {
            return bad("kafka.topic", "must not be empty");
        }
        if self.kafka.topic == self.kafka.dlq_topic {
            return bad("kafka.dlq_topic", "must differ from kafka.topic");
        }
        if !self.clickhouse.url.starts_with("http://") && !self.clickhouse.url.starts_with("https://") {
            return bad("clickhouse.url", "must start with http:// or https://");
        }
        if !self.clickhouse.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || self.clickhouse.database.is_empty()
        {
            return bad("clickhouse.database", "must be a plain identifier [A-Za-z0-9_]");
        }
        if self.dedupe.window_secs == 0 {
            return bad("dedupe.window_secs", "must be > 0");
        }
        // Seconds in these keys reach i64 arithmetic on times: bound them to what makes sense.
        const TEN_YEARS_SECS: u64 = 3650 * 86_400;
        if self.dedupe.window_secs > TEN_YEARS_SECS {
            return bad("dedupe.window_secs", "must be at most 10 years (315360000)");
        }
        if self.dedupe.replay_slack_secs > TEN_YEARS_SECS {
            return bad("dedupe.replay_slack_secs", "must be at most 10 years (315360000)");
        }
        if self.ingest.max_future_secs > 86_400 * 366 {
            return bad("ingest.max_future_secs", "must be at most one year (31622400)");
        }
        self.auth.validate()?;
        if self.clickhouse.events_retention_days.saturating_mul(86_400)
            < self.dedupe.window_secs + self.dedupe.replay_slack_secs
        {
            return bad("clickhouse.events_retention_days", "must cover dedupe.window_secs + dedupe.replay_slack_secs");
        }
        if self.dedupe.bloom_bytes_per_partition < 1024 {
            return bad("dedupe.bloom_bytes_per_partition", "must be at least 1024");
        }
        if self.ingest.batch_max_messages == 0 || self.ingest.batch_max_messages > 500_000 {
            return bad("ingest.batch_max_messages", "must be within 1..=500000");
        }
        if self.ingest.max_message_bytes == 0 {
            return bad("ingest.max_message_bytes", "must be > 0");
        }
        // Consumer settings that exactness depends on cannot be overridden to values that break
        // it (found by a review of what a real Kafka cluster does that tansu does not).
        for (key, value) in &self.kafka.options {
            let allowed = FIXED_KAFKA_OPTIONS.iter().find(|(k, _, _)| k == key);
            if let Some((_, allowed, why)) = allowed {
                if !allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim())) {
                    return Err(ConfigError::Invalid {
                        key: "kafka.options",
                        reason: format!("{key} = {value:?} is refused: {why}"),
                    });
                }
            }
        }
        // A worker must never be expelled from the group while its ClickHouse requests are in
        // flight (it does not poll then): see docs/exactly-once.md, "Zombie writers".
        let max_poll_ms: u64 = match self.kafka.options.get("max.poll.interval.ms") {
            Some(v) => v.parse().map_err(|_| ConfigError::Invalid {
                key: "kafka.options",
                reason: format!("max.poll.interval.ms {v:?} is not a number"),
            })?,
            None => 300_000,
        };
        // The longest run of requests without a poll is one INSERT attempt: 4 requests
        // (docs/exactly-once.md, "Zombie writers").
        if self.clickhouse.timeout_secs == 0 || self.clickhouse.timeout_secs.saturating_mul(4000) > max_poll_ms {
            return bad("clickhouse.timeout_secs", "must be > 0 and at most a quarter of kafka max.poll.interval.ms");
        }
        Ok(())
    }
}

/// `kafka.options` keys that exactness fixes, with the only values accepted (none: the key is
/// refused) and why (docs/exactly-once.md, "Limits"). Validation refuses any other value.
pub const FIXED_KAFKA_OPTIONS: &[(&str, &[&str], &str)] = &[
    (
        "auto.offset.reset",
        &["earliest", "smallest", "beginning"],
        "a new group must read each partition from its first message (`latest` skips what is there)",
    ),
    (
        "isolation.level",
        &["read_committed"],
        "events of aborted Kafka transactions must not be billed (`read_uncommitted` reads them)",
    ),
    ("enable.auto.commit", &["false"], "offsets are committed only after their rows and dead letters are written"),
    (
        "enable.auto.offset.store",
        &["false"],
        "offsets are committed only after their rows and dead letters are written",
    ),
    (
        "group.instance.id",
        &[],
        "with static membership a replaced member is fenced without a revocation, so nothing waits \
         for its INSERT in flight before the partitions' next owner loads its dedupe state",
    ),
];

/// Lays the `TALLY_<SECTION>_<KEY>` variables of `sections` over a file's table. Variables of
/// other sections (and other `TALLY_*` names) are not configuration.
pub fn layer_env(
    table: toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
) -> Result<Layered, ConfigError> {
    let mut layered = Layered::from_file(table);
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("TALLY_") else { continue };
        let rest = rest.to_ascii_lowercase();
        let Some(section) = sections
            .iter()
            .find(|s| rest.len() > s.len() + 1 && rest.starts_with(**s) && rest.as_bytes()[s.len()] == b'_')
        else {
            continue;
        };
        let key = &rest[section.len() + 1..];
        layered.set_env(section, key, &name, &value).map_err(|e| ConfigError::Parse(e.0))?;
    }
    Ok(layered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = IngestConfig::load(None, env(&[])).unwrap();
        assert_eq!(c.kafka.topic, "trace-events");
        assert_eq!(c.kafka.group_id, "tally-ingest");
        assert_eq!(c.kafka.dlq_topic, "trace-events.rejected");
        assert_eq!(c.clickhouse.database, "tally");
        assert_eq!(c.auth.audience, "tally-ingest");
        assert_eq!(c.auth.leeway_secs, 60);
        assert_eq!(c.auth.reload_interval_secs, 10);
        assert_eq!(c.dedupe.window_secs, 30 * 24 * 3600);
        assert_eq!(c.metrics.listen, "127.0.0.1:9464");
        assert_eq!(c.ingest.max_message_bytes, 1 << 20);
        assert_eq!(c.ingest.max_future_secs, 300);
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let dir = std::env::temp_dir().join(format!("tally-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "[kafka]\ntopic = \"a\"\n[dedupe]\nwindow_secs = 5\n").unwrap();
        let c = IngestConfig::load(
            Some(&p),
            env(&[("TALLY_KAFKA_TOPIC", "b"), ("TALLY_DEDUPE_WINDOW_SECS", "7"), ("TALLY_OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(c.kafka.topic, "b");
        assert_eq!(c.dedupe.window_secs, 7);
    }

    /// A claim-named issuer says which orgs it may name, or that it is the operator's own: a
    /// customer's identity provider could otherwise name any org (found by a review).
    #[test]
    fn an_issuer_that_names_orgs_by_claim_says_which() {
        let dir = std::env::temp_dir().join(format!("tally-cfg-iss-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |entry: &str| {
            let p = dir.join("c.toml");
            std::fs::write(
                &p,
                format!("[[auth.issuers]]\nissuer = \"https://kc.example/realms/acme\"\noidc_issuer_url = \"https://kc.example/realms/acme\"\n{entry}"),
            )
            .unwrap();
            IngestConfig::load(Some(&p), env(&[]))
        };
        let err = load("org_claim = \"org_id\"\n").unwrap_err().to_string();
        assert!(err.contains("orgs") && err.contains("any_org"), "{err}");
        assert_eq!(load("orgs = [\"acme\", \"acme-eu\"]\n").unwrap().auth.issuers[0].orgs, ["acme", "acme-eu"]);
        assert!(load("any_org = true\n").unwrap().auth.issuers[0].any_org);
        assert!(load("org_id = \"acme\"\n").is_ok());
        assert!(load("orgs = [\"acme\"]\nany_org = true\n").is_err());
        assert!(load("org_id = \"acme\"\norgs = [\"acme\"]\n").is_err());
        assert!(load("org_id = \"acme\"\nany_org = true\n").is_err());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = IngestConfig::load(None, env(&[("TALLY_KAFKA_TOPICS", "x")])).unwrap_err();
        assert!(err.to_string().contains("topics"), "{err}");
        let dir = std::env::temp_dir().join(format!("tally-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "[clickhouse]\nurll = \"x\"\n").unwrap();
        let err = IngestConfig::load(Some(&p), env(&[])).unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    /// Issue 7, row 10: an override is read with the type of its key; a bad one names its variable.
    #[test]
    fn env_overrides_take_the_type_of_their_key() {
        let c = IngestConfig::load(
            None,
            env(&[
                ("TALLY_CLICKHOUSE_PASSWORD", "123456"),
                ("TALLY_KAFKA_GROUP_ID", "2024"),
                ("TALLY_KAFKA_TOPIC", "true"),
                ("TALLY_AUTH_ISSUER", "1e3"),
                ("TALLY_CLICKHOUSE_USER", "0"),
                ("TALLY_METERS_PATH", "12"),
                ("TALLY_DEDUPE_WINDOW_SECS", "3600"),
            ]),
        )
        .unwrap();
        assert_eq!(c.clickhouse.password, "123456");
        assert_eq!(c.kafka.group_id, "2024");
        assert_eq!(c.kafka.topic, "true");
        assert_eq!(c.auth.issuer, "1e3");
        assert_eq!(c.clickhouse.user, "0");
        assert_eq!(c.meters.path, PathBuf::from("12"));
        assert_eq!(c.dedupe.window_secs, 3600);
        for (var, text) in [
            ("TALLY_KAFKA_PORT", "9092"),
            ("TALLY_DEDUPE_WINDOW_SECS", "a month"),
            ("TALLY_DEDUPE_WINDOW_SECS", "-5"),
            ("TALLY_INGEST_MAX_MESSAGE_BYTES", "99999999999999999999999"),
            ("TALLY_KAFKA_OPTIONS", "acks=all"),
        ] {
            let err = IngestConfig::load(None, env(&[(var, text)])).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={text}: {err}");
        }
    }

    #[test]
    fn request_timeout_must_stay_below_the_poll_interval() {
        // One INSERT attempt is 4 requests without a poll: 4 × 76 s > 300 s.
        let err = IngestConfig::load(None, env(&[("TALLY_CLICKHOUSE_TIMEOUT_SECS", "76")])).unwrap_err();
        assert!(err.to_string().contains("clickhouse.timeout_secs"), "{err}");
        assert!(IngestConfig::load(None, env(&[("TALLY_CLICKHOUSE_TIMEOUT_SECS", "75")])).is_ok());
    }

    #[test]
    fn kafka_options_that_break_exactness_are_refused() {
        let with = |key: &str, value: &str| {
            let cfg: IngestConfig =
                parse_sections(&format!("[kafka.options]\n\"{key}\" = \"{value}\"\n"), env(&[]), INGEST_SECTIONS)
                    .unwrap();
            cfg.validate()
        };
        for (key, value) in [
            ("auto.offset.reset", "latest"),
            ("auto.offset.reset", "error"),
            ("isolation.level", "read_uncommitted"),
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "true"),
            ("group.instance.id", "worker-1"),
        ] {
            let err = with(key, value).unwrap_err().to_string();
            assert!(err.contains("kafka.options") && err.contains(key), "{key} = {value}: {err}");
        }
        // The values the worker sets itself, in any case, and unrelated keys, are accepted.
        for (key, value) in [
            ("auto.offset.reset", "earliest"),
            ("auto.offset.reset", "Smallest"),
            ("isolation.level", "read_committed"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("fetch.max.bytes", "1048576"),
            ("partition.assignment.strategy", "cooperative-sticky"),
        ] {
            assert!(with(key, value).is_ok(), "{key} = {value}");
        }
    }

    #[test]
    fn validate_rejects_same_topic_for_dlq() {
        let err = IngestConfig::load(None, env(&[("TALLY_KAFKA_DLQ_TOPIC", "trace-events")])).unwrap_err();
        assert!(err.to_string().contains("kafka.dlq_topic"));
    }
}
