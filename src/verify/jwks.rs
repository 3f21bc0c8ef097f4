//! Key sets fetched from identity providers over HTTP (PRODUCT.md §2, OIDC): discovery through
//! `/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4) → `jwks_uri`, or a
//! configured `jwks_url`. The set is kept for `Cache-Control: max-age` (RFC 9111 §5.2.2.1; a
//! default when absent); an unknown `kid` triggers a refetch at most once per
//! `auth.jwks_refetch_min_secs` (forged `kid`s cannot flood the IdP); when the IdP is down or
//! answers garbage, the last good set keeps serving (counted in `tally_auth_jwks_fetches_total`,
//! its age in `tally_auth_jwks_age_seconds`, and logged).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};

use super::keys::{parse_jwks_with, JwtKey};

pub const JWKS_FETCHES: &str = "tally_auth_jwks_fetches_total";
pub const JWKS_AGE: &str = "tally_auth_jwks_age_seconds";
pub const JWKS_KEYS: &str = "tally_auth_jwks_keys";

/// A fetched set: its keys, how many were skipped (other uses), its `max-age`.
type Fetched = (HashMap<String, JwtKey>, usize, Option<Duration>, u64);

/// Where and how often to fetch one issuer's keys.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `iss` of the tokens; also what discovery must answer as `issuer`.
    pub issuer: String,
    /// Discovery base URL (the issuer URL), or empty.
    pub discovery_url: String,
    /// The JWKS URL, or empty (then discovery finds it).
    pub jwks_url: String,
    /// Least time between two fetches (refetches on unknown `kid`s, refreshes, retries).
    pub min_refetch: Duration,
    /// How long a set is fresh when the answer has no `max-age`.
    pub default_max_age: Duration,
    pub timeout: Duration,
}

/// One issuer's key set, as last fetched.
pub struct RemoteJwks {
    cfg: RemoteConfig,
    agent: ureq::Agent,
    jwks_uri: Option<String>,
    keys: HashMap<String, JwtKey>,
    /// Hash of the last good JWKS body: a change of key material under the same `kid`s counts.
    body_hash: u64,
    fresh_until: Option<Instant>,
    last_attempt: Option<Instant>,
    last_success: Option<Instant>,
    /// HTTP fetches of the key set made (successful or not), for tests and metrics.
    pub fetches: u64,
}

/// Longest a fetched key set is trusted without asking again, whatever the IdP says: a key the
/// IdP withdrew stops verifying within this.
pub const MAX_AGE_CAP: Duration = Duration::from_secs(86_400);

/// `max-age` of a `Cache-Control` value, at most [`MAX_AGE_CAP`]; `no-store`/`no-cache` as 0.
pub fn max_age(cache_control: &str) -> Option<Duration> {
    let mut out = None;
    for d in cache_control.split(',').map(str::trim) {
        let d = d.to_ascii_lowercase();
        if d == "no-store" || d == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            out = v.trim_matches('"').parse::<u64>().ok().map(|s| Duration::from_secs(s).min(MAX_AGE_CAP));
        }
    }
    out
}

/// Key sets come over HTTPS: anyone on the path of a plain-HTTP fetch could add keys and mint
/// tokens. Plain HTTP is allowed only to the loopback interface (tests, a local sidecar):
/// `localhost`, 127.0.0.0/8 or `::1`, as parsed by the WHATWG URL rules (`url` crate), so that
/// neither `http://127.evil.example` nor `http://127.0.0.1@evil.example` passes. Every URL a
/// fetch requests is checked, redirect targets included ([`RemoteJwks`] follows redirects itself).
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!("{url:?}: identity provider URLs must be https (plain http only to loopback)")),
        _ => Err(format!("{url:?} is not an http(s) URL")),
    }
}

/// Most redirects one fetch follows (ureq's own default).
const MAX_REDIRECTS: usize = 5;

impl RemoteJwks {
    pub fn new(cfg: RemoteConfig) -> Self {
        // Redirects are followed by `get`, which checks each target before requesting it: ureq
        // would follow one from https to plain http.
        let agent = ureq::AgentBuilder::new().timeout_connect(cfg.timeout).timeout(cfg.timeout).redirects(0).build();
        let jwks_uri = (!cfg.jwks_url.is_empty()).then(|| cfg.jwks_url.clone());
        RemoteJwks {
            cfg,
            agent,
            jwks_uri,
            keys: HashMap::new(),
            body_hash: 0,
            fresh_until: None,
            last_attempt: None,
            last_success: None,
            fetches: 0,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    pub fn keys(&self) -> &HashMap<String, JwtKey> {
        &self.keys
    }

    /// Whether a set was ever fetched.
    pub fn ready(&self) -> bool {
        self.last_success.is_some()
    }

    fn may_fetch(&self, now: Instant) -> bool {
        self.last_attempt.is_none_or(|t| now.duration_since(t) >= self.cfg.min_refetch)
    }

    /// Fetches when the set is stale (or was never fetched), at most once per `min_refetch`.
    /// `Ok(true)`: the keys changed.
    pub fn refresh_if_stale(&mut self, now: Instant) -> Result<bool, String> {
        let stale = self.fresh_until.is_none_or(|t| now >= t);
        if !stale || !self.may_fetch(now) {
            return Ok(false);
        }
        self.fetch(now)
    }

    /// A token named a `kid` the set lacks: the IdP may have rotated. Refetches unless a fetch
    /// happened less than `min_refetch` ago. `Ok(true)`: the keys changed.
    pub fn on_unknown_kid(&mut self, now: Instant) -> Result<bool, String> {
        if !self.may_fetch(now) {
            counter!(JWKS_FETCHES, "issuer" => self.cfg.issuer.clone(), "result" => "rate_limited").increment(1);
            return Ok(false);
        }
        self.fetch(now)
    }

    /// GETs `url`, following up to [`MAX_REDIRECTS`] redirects, each target checked by
    /// [`check_url`] before it is requested, all within one `timeout` (as ureq's own redirects
    /// were: a chain of slow hops must not hold the worker for a timeout each). (body, `max-age`).
    fn get(&self, url: &str) -> Result<(String, Option<Duration>), String> {
        let deadline = Instant::now() + self.cfg.timeout;
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            check_url(&current)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "GET {url}: timed out after {} ms (redirects included)",
                    self.cfg.timeout.as_millis()
                ));
            }
            let resp = self.agent.get(&current).timeout(left).call().map_err(|e| format!("GET {current}: {e}"))?;
            if (300..400).contains(&resp.status()) {
                let location =
                    resp.header("location").ok_or_else(|| format!("GET {current}: redirect without Location"))?;
                let next = url::Url::parse(&current)
                    .and_then(|base| base.join(location))
                    .map_err(|e| format!("GET {current}: redirect to {location:?}: {e}"))?;
                current = next.into();
                continue;
            }
            let age = resp.header("cache-control").and_then(max_age);
            let body = resp.into_string().map_err(|e| format!("GET {current}: {e}"))?;
            return Ok((body, age));
        }
        Err(format!("GET {url}: more than {MAX_REDIRECTS} redirects"))
    }

    fn discover(&self) -> Result<String, String> {
        check_url(&self.cfg.discovery_url)?;
        let base = self.cfg.discovery_url.trim_end_matches('/');
        let url = format!("{base}/.well-known/openid-configuration");
        let (body, _) = self.get(&url)?;
        let doc: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{url}: {e}"))?;
        // OpenID Connect Discovery §4.3: the document's issuer must be the one configured.
        if doc["issuer"].as_str() != Some(self.cfg.issuer.as_str()) {
            return Err(format!("{url}: issuer {} is not {:?}", doc["issuer"], self.cfg.issuer));
        }
        doc["jwks_uri"].as_str().map(str::to_string).ok_or_else(|| format!("{url}: no jwks_uri"))
    }

    /// Fetches the set now. On failure the last good set stays.
    pub fn fetch(&mut self, now: Instant) -> Result<bool, String> {
        self.last_attempt = Some(now);
        self.fetches += 1;
        let result = self.try_fetch();
        let issuer = self.cfg.issuer.clone();
        match result {
            Ok((keys, skipped, age, body_hash)) => {
                counter!(JWKS_FETCHES, "issuer" => issuer.clone(), "result" => "ok").increment(1);
                gauge!(JWKS_KEYS, "issuer" => issuer).set(keys.len() as f64);
                if skipped > 0 {
                    tracing::debug!(issuer = %self.cfg.issuer, skipped, "JWKS keys for other uses skipped");
                }
                let changed = body_hash != self.body_hash || self.last_success.is_none();
                self.body_hash = body_hash;
                self.keys = keys;
                self.last_success = Some(now);
                let age = age.unwrap_or(self.cfg.default_max_age).min(MAX_AGE_CAP);
                self.fresh_until = Some(now.checked_add(age).unwrap_or(now));
                Ok(changed)
            }
            Err(e) => {
                counter!(JWKS_FETCHES, "issuer" => issuer, "result" => "error").increment(1);
                // Rediscover next time: the IdP may have moved its key set.
                if !self.cfg.discovery_url.is_empty() {
                    self.jwks_uri = None;
                }
                Err(e)
            }
        }
    }

    /// (keys, keys skipped, max-age).
    fn try_fetch(&mut self) -> Result<Fetched, String> {
        let uri = match &self.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let u = self.discover()?;
                self.jwks_uri = Some(u.clone());
                u
            }
        };
        let (body, age) = self.get(&uri)?;
        let (keys, skipped) = parse_jwks_with(&body, true).map_err(|e| format!("{uri}: {e}"))?;
        Ok((keys, skipped, age, xxhash_rust::xxh3::xxh3_64(body.as_bytes())))
    }

    /// Seconds since the last good fetch (for the age gauge).
    pub fn report_age(&self, now: Instant) {
        if let Some(t) = self.last_success {
            gauge!(JWKS_AGE, "issuer" => self.cfg.issuer.clone()).set(now.duration_since(t).as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback() {
        assert!(check_url("https://idp.example/keys").is_ok());
        assert!(check_url("http://127.0.0.1:8080/keys").is_ok());
        assert!(check_url("http://localhost/keys").is_ok());
        assert!(check_url("http://[::1]:9/k").is_ok());
        assert!(check_url("http://idp.example/keys").is_err());
        assert!(check_url("http://127.0.0.1@evil.example/keys").is_err());
        // Names that merely start like a loopback address (found by a review).
        assert!(check_url("http://127.evil.example/keys").is_err());
        assert!(check_url("http://localhost.evil.example/keys").is_err());
        assert!(check_url("http://127.1.2.3:9/keys").is_ok());
        assert!(check_url("HTTP://LOCALHOST/keys").is_ok());
        assert!(check_url("ftp://x").is_err());
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(max_age("public, max-age=300, must-revalidate"), Some(Duration::from_secs(300)));
        assert_eq!(max_age("Max-Age=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=abc"), None);
        assert_eq!(max_age("max-age=10000000000000000000"), Some(MAX_AGE_CAP), "capped, never an overflow");
        assert_eq!(max_age("max-age=99999999999999999999"), None, "beyond u64: ignored");
        assert_eq!(max_age("max-age=18446744073709551615"), Some(MAX_AGE_CAP));
    }
}
