//! Credential verification (§2): attribution comes only from a verified credential.
//!
//! Verification of a credential string is cached (keyed by the full header value, so a hash
//! collision can never attribute one tenant's events to another). What the cache holds does not
//! depend on time: expiry, not-before and revocation are checked on every use against the
//! message's own timestamp, so a cached entry is never honoured past `exp`. Key files are re-read
//! every `reload_interval`; a change clears the cache, so a revocation takes effect within it.

pub mod api_key;
pub mod cli;
pub mod jwt;
pub mod keys;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;
use crate::reject::Reason;
use keys::{KeyError, KeySet};
use store::KeyStore;

/// The tenant a credential proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub org_id: Arc<str>,
    pub project_id: Arc<str>,
}

/// A credential whose signature/secret verified, with the time-dependent checks still to apply.
#[derive(Debug, Clone)]
pub struct Checked {
    pub principal: Principal,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
    /// Whether the configured clock-skew leeway applies to the time checks (JWTs, not API keys).
    pub leeway: bool,
    pub scope_ok: bool,
    pub revoked: bool,
}

/// Longest `org_id` / `project_id` a credential may carry, in bytes. Ids are stored with every
/// row and sent in every dedupe look-up, so their size is bounded like an event id's.
pub const MAX_TENANT_ID_BYTES: usize = 256;

/// The credential a message carries: its `authorization` header(s) (PRODUCT.md §2).
///
/// Header names compare case-insensitively; identical repeats count as one; two different values
/// are [`Credential::Conflicting`], refused as `invalid_credentials`, so that attribution never
/// depends on header order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No `authorization` header.
    Missing,
    /// One value (or several identical ones). A header without a value reads as empty.
    One(&'a [u8]),
    /// Two or more different values.
    Conflicting,
}

impl<'a> Credential<'a> {
    /// Reads the credential from a message's headers, as (name, value) pairs; names are bytes
    /// (Kafka does not promise UTF-8).
    pub fn from_headers<N: AsRef<[u8]>>(headers: impl IntoIterator<Item = (N, Option<&'a [u8]>)>) -> Self {
        let mut found = Credential::Missing;
        for (name, value) in headers {
            if !name.as_ref().eq_ignore_ascii_case(b"authorization") {
                continue;
            }
            let value = value.unwrap_or_default();
            found = match found {
                Credential::Missing => Credential::One(value),
                Credential::One(v) if v == value => Credential::One(v),
                _ => return Credential::Conflicting,
            };
        }
        found
    }
}

impl<'a> From<Option<&'a [u8]>> for Credential<'a> {
    fn from(v: Option<&'a [u8]>) -> Self {
        v.map_or(Credential::Missing, Credential::One)
    }
}

/// A credential rejected for a reason that does not depend on time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied(pub Reason);

/// Verifies `authorization` header values, with a cache and hot reload of key files.
pub struct Verifier {
    keys: KeySet,
    issuer: String,
    audience: String,
    leeway: i64,
    cache: HashMap<Box<[u8]>, Result<Checked, Denied>>,
    cache_entries: usize,
    paths: (PathBuf, PathBuf),
    fingerprint: u64,
    /// The shared key store (`auth.api_keys_store = "clickhouse"`), replacing the API key file.
    store: Option<KeyStore>,
    /// HMAC key of the store's secret hashes (empty with the key file).
    pepper: Vec<u8>,
    reload_every: Duration,
    last_reload_check: Instant,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

impl Verifier {
    /// A verifier over the JWKS file and the API key file.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, KeyError> {
        Self::build(cfg, None)
    }

    /// A verifier over the JWKS file and the shared key store in ClickHouse.
    pub fn with_store(cfg: &AuthConfig, store: KeyStore) -> Result<Self, KeyError> {
        Self::build(cfg, Some(store))
    }

    fn build(cfg: &AuthConfig, store: Option<KeyStore>) -> Result<Self, KeyError> {
        let paths = (cfg.jwks_path.clone(), if store.is_some() { PathBuf::new() } else { cfg.api_keys_path.clone() });
        let mut v = Verifier {
            keys: KeySet::default(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: i64::try_from(cfg.leeway_secs).unwrap_or(i64::MAX),
            cache: HashMap::new(),
            cache_entries: cfg.cache_entries.max(1),
            fingerprint: 0,
            paths,
            pepper: store.as_ref().map(|s| s.pepper().to_vec()).unwrap_or_default(),
            store,
            reload_every: Duration::from_secs(cfg.reload_interval_secs),
            last_reload_check: Instant::now(),
            cache_hits: 0,
            cache_misses: 0,
        };
        let (keys, fp) = v.load()?;
        v.keys = keys;
        v.fingerprint = fp;
        Ok(v)
    }

    /// Reads the key material and its fingerprint: the files, and the store's rows.
    fn load(&self) -> Result<(KeySet, u64), KeyError> {
        let mut fp = fingerprint(&self.paths);
        let jwt = KeySet::load_jwks(&self.paths.0)?;
        let api = match &self.store {
            None => KeySet::load_api_keys(&self.paths.1)?,
            Some(s) => {
                let (events, f) = s.events().map_err(|e| KeyError::Store(e.to_string()))?;
                fp ^= f;
                store::fold(&events)
            }
        };
        Ok((KeySet { jwt, api }, fp))
    }

    /// Re-reads the key material if `reload_interval` has passed and it changed. On a bad file
    /// or an unreachable store the old keys stay in force and the error is returned for logging.
    pub fn maybe_reload(&mut self, now: Instant) -> Result<bool, KeyError> {
        if now.duration_since(self.last_reload_check) < self.reload_every {
            return Ok(false);
        }
        self.last_reload_check = now;
        if self.store.is_none() && fingerprint(&self.paths) == self.fingerprint {
            return Ok(false);
        }
        let (keys, fp) = self.load()?;
        if fp == self.fingerprint {
            return Ok(false);
        }
        self.keys = keys;
        self.fingerprint = fp;
        self.cache.clear();
        Ok(true)
    }

    /// Verifies one message's credential as of `at` (Unix seconds; the message's timestamp, any
    /// value: every time comparison saturates instead of wrapping).
    pub fn verify(&mut self, authorization: Credential<'_>, at: i64) -> Result<Principal, Reason> {
        let value = match authorization {
            Credential::Missing => return Err(Reason::MissingCredentials),
            Credential::Conflicting => return Err(Reason::InvalidCredentials),
            Credential::One(v) => v,
        };
        if value.iter().all(u8::is_ascii_whitespace) {
            return Err(Reason::MissingCredentials);
        }
        let checked = match self.cache.get(value) {
            Some(c) => {
                self.cache_hits += 1;
                c
            }
            None => {
                self.cache_misses += 1;
                let result = self.verify_uncached(value);
                if self.cache.len() >= self.cache_entries {
                    self.cache.clear();
                }
                self.cache.entry(value.into()).or_insert(result)
            }
        };
        let c = checked.as_ref().map_err(|d| d.0)?;
        if c.revoked {
            return Err(Reason::RevokedCredentials);
        }
        let leeway = if c.leeway { self.leeway } else { 0 };
        if let Some(exp) = c.expires_at {
            let expired = if c.leeway { at >= exp.saturating_add(leeway) } else { at > exp };
            if expired {
                return Err(Reason::ExpiredCredentials);
            }
        }
        if c.not_before.is_some_and(|nbf| at.saturating_add(leeway) < nbf) {
            return Err(Reason::InvalidCredentials);
        }
        if !c.scope_ok {
            return Err(Reason::ForbiddenScope);
        }
        Ok(c.principal.clone())
    }

    fn verify_uncached(&self, value: &[u8]) -> Result<Checked, Denied> {
        let invalid = Denied(Reason::InvalidCredentials);
        let value = std::str::from_utf8(value).map_err(|_| invalid)?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or(invalid)?;
        if scheme.eq_ignore_ascii_case("bearer") {
            let policy = jwt::JwtPolicy { issuer: &self.issuer, audience: &self.audience };
            jwt::verify(rest.trim(), &self.keys.jwt, &policy)
        } else if scheme.eq_ignore_ascii_case("basic") {
            api_key::verify(rest, &self.keys.api, &self.pepper)
        } else {
            Err(invalid)
        }
    }

    /// Entries in the credential cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }
}

fn fingerprint(paths: &(PathBuf, PathBuf)) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in [&paths.0, &paths.1].into_iter().filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::read(p) {
            Ok(b) => h.update(&b),
            Err(_) => h.update(b"\0missing\0"),
        }
    }
    h.digest()
}

#[cfg(test)]
mod tests;
