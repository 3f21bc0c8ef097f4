//! Credential verification (§2): attribution comes only from a verified credential.
//!
//! Verification of a credential string is cached (keyed by the full header value, so a hash
//! collision can never attribute one tenant's events to another). What the cache holds does not
//! depend on time: expiry, not-before and revocation are checked on every use against the
//! message's own timestamp, so a cached entry is never honoured past `exp`. Key files are re-read
//! every `reload_interval`; a change clears the cache, so a revocation takes effect within it.

pub mod api_key;
pub mod cache;
pub mod cli;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;
use crate::reject::Reason;
use jwks::{RemoteConfig, RemoteJwks};
use jwt::{IssuerPolicy, JwtError};
use keys::{JwtKey, KeyError, KeySet};
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
    /// The scopes the credential grants (from the scope claim; API keys: see [`Scopes::API_KEY`]).
    pub scopes: Scopes,
    pub revoked: bool,
}

/// The scopes tally reads from a credential (PRODUCT.md §2 and §11), as bit flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// Produce events (`ingest`, or the issuer's `required_scope`).
    pub const INGEST: Scopes = Scopes(1);
    /// Read one's own org's (or project's) usage and entitlements: `usage:read`.
    pub const USAGE_READ: Scopes = Scopes(2);
    /// Read every org's usage and entitlements: `usage:admin`.
    pub const USAGE_ADMIN: Scopes = Scopes(4);
    /// What a Langfuse-style API key pair grants: ingest, and reading its own project's usage
    /// (Langfuse's key pairs authorize its public API of the project the same way).
    pub const API_KEY: Scopes = Scopes(1 | 2);

    /// The scopes named in `granted` (scope strings, each possibly space-separated);
    /// `ingest` is the issuer's name for the ingest scope.
    pub fn parse<'s>(granted: impl IntoIterator<Item = &'s str>, ingest: &str) -> Scopes {
        let mut out = Scopes::default();
        for s in granted.into_iter().flat_map(|s| s.split(' ')) {
            out.0 |= match s {
                _ if s == ingest => Scopes::INGEST.0,
                "usage:read" => Scopes::USAGE_READ.0,
                "usage:admin" => Scopes::USAGE_ADMIN.0,
                _ => 0,
            };
        }
        out
    }

    pub fn contains(self, other: Scopes) -> bool {
        self.0 & other.0 == other.0
    }

    /// These scopes less `other`.
    pub fn without(self, other: Scopes) -> Scopes {
        Scopes(self.0 & !other.0)
    }
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
    /// The issuers accepted; `[0]` is `auth.issuer` (the JWKS file's).
    policies: Vec<IssuerPolicy>,
    /// Per policy, the key set fetched from the identity provider, if it has one.
    remote: Vec<Option<RemoteJwks>>,
    leeway: i64,
    cache: cache::CredentialCache,
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
        // `jwks_path = ""`: the main issuer's keys come only from its identity provider.
        let paths = (cfg.jwks_path.clone(), if store.is_some() { PathBuf::new() } else { cfg.api_keys_path.clone() });
        let remote_cfg = |issuer: &str, discovery: &str, jwks: &str| -> Option<RemoteJwks> {
            (!discovery.is_empty() || !jwks.is_empty()).then(|| {
                RemoteJwks::new(RemoteConfig {
                    issuer: issuer.to_string(),
                    discovery_url: discovery.to_string(),
                    jwks_url: jwks.to_string(),
                    min_refetch: Duration::from_secs(cfg.jwks_refetch_min_secs),
                    default_max_age: Duration::from_secs(cfg.jwks_cache_secs),
                    timeout: Duration::from_millis(cfg.jwks_timeout_ms),
                })
            })
        };
        let mut policies = vec![IssuerPolicy {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            org_claim: "org_id".into(),
            fixed_org: None,
            orgs: None,
            project_claim: "project_id".into(),
            scope_claim: "scope".into(),
            required_scope: "ingest".into(),
            grants_admin: true,
        }];
        let mut remote = vec![remote_cfg(&cfg.issuer, &cfg.oidc_issuer_url, &cfg.jwks_url)];
        for i in &cfg.issuers {
            policies.push(IssuerPolicy {
                issuer: i.issuer.clone(),
                audience: i.audience.clone(),
                org_claim: i.org_claim.clone(),
                fixed_org: i.org_id.clone(),
                orgs: (i.org_id.is_none() && !i.any_org).then(|| i.orgs.clone()),
                project_claim: i.project_claim.clone(),
                scope_claim: i.scope_claim.clone(),
                required_scope: i.required_scope.clone(),
                grants_admin: false,
            });
            remote.push(remote_cfg(&i.issuer, &i.oidc_issuer_url, &i.jwks_url));
        }
        let mut v = Verifier {
            keys: KeySet::default(),
            policies,
            remote,
            leeway: i64::try_from(cfg.leeway_secs).unwrap_or(i64::MAX),
            cache: cache::CredentialCache::new(cfg.cache_entries),
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
        // A first fetch of every identity provider's keys; the worker waits for the ones that
        // did not answer ([`Verifier::unready_issuers`]).
        let now = Instant::now();
        for r in v.remote.iter_mut().flatten() {
            if let Err(e) = r.fetch(now) {
                tracing::warn!(issuer = %r.issuer(), error = %e, "identity provider: no key set yet");
            }
        }
        Ok(v)
    }

    /// Issuers whose key set was never fetched; tries each once more now. The worker waits
    /// until this is empty before it consumes (their tokens could not be verified).
    pub fn unready_issuers(&mut self) -> Vec<String> {
        let now = Instant::now();
        let mut out = Vec::new();
        for r in self.remote.iter_mut().flatten().filter(|r| !r.ready()) {
            if let Err(e) = r.fetch(now) {
                tracing::debug!(issuer = %r.issuer(), error = %e, "identity provider still unreachable");
                out.push(r.issuer().to_string());
            }
        }
        out
    }

    /// The key `kid` of issuer `i`: the JWKS file's for the main issuer, then the fetched set.
    fn key(&self, i: usize, kid: &str) -> Option<&JwtKey> {
        let file = if i == 0 { self.keys.jwt.get(kid) } else { None };
        file.or_else(|| self.remote.get(i)?.as_ref()?.keys().get(kid))
    }

    /// Refreshes stale key sets of identity providers; on a failure the last good set stays.
    /// Returns whether any set changed.
    fn refresh_remote(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for r in self.remote.iter_mut().flatten() {
            match r.refresh_if_stale(now) {
                Ok(c) => changed |= c,
                Err(e) => tracing::warn!(
                    issuer = %r.issuer(), error = %e,
                    "identity provider unreachable; the last good key set keeps serving"
                ),
            }
            r.report_age(now);
        }
        changed
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
        let remote_changed = self.refresh_remote(now);
        if remote_changed {
            self.cache.clear();
        }
        if self.store.is_none() && fingerprint(&self.paths) == self.fingerprint {
            return Ok(remote_changed);
        }
        let (keys, fp) = self.load()?;
        if fp == self.fingerprint {
            return Ok(remote_changed);
        }
        self.keys = keys;
        self.fingerprint = fp;
        self.cache.clear();
        Ok(true)
    }

    /// Verifies one message's credential as of `at` (Unix seconds; the message's timestamp, any
    /// value: every time comparison saturates instead of wrapping).
    pub fn verify(&mut self, authorization: Credential<'_>, at: i64) -> Result<Principal, Reason> {
        let (principal, scopes) = self.verify_scopes(authorization, at)?;
        if !scopes.contains(Scopes::INGEST) {
            return Err(Reason::ForbiddenScope);
        }
        // Events are attributed to a project: an org-wide credential (no project claim) cannot
        // produce them.
        if principal.project_id.is_empty() {
            return Err(Reason::InvalidCredentials);
        }
        Ok(principal)
    }

    /// Verifies a credential as of `at` like [`Verifier::verify`] (signature or secret, expiry,
    /// not-before, revocation) and returns the principal with the scopes it grants, for callers
    /// that decide on scopes themselves (the usage API). `project_id` is empty for a JWT
    /// without the project claim: an org-wide credential.
    pub fn verify_scopes(&mut self, authorization: Credential<'_>, at: i64) -> Result<(Principal, Scopes), Reason> {
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
                let (result, cacheable) = self.verify_uncached(value);
                if !cacheable {
                    // An unknown kid the IdP was not asked about (rate limit, outage): the next
                    // use asks again instead of finding this denial in the cache.
                    return Err(result.err().map_or(Reason::InvalidCredentials, |d| d.0));
                }
                self.cache.insert(value, result)
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
        Ok((c.principal.clone(), c.scopes))
    }

    /// Verifies afresh; the flag says whether the verdict may be cached (not when it rests on a
    /// `kid` the issuer's key set lacked and that could not be refetched just now).
    fn verify_uncached(&mut self, value: &[u8]) -> (Result<Checked, Denied>, bool) {
        let invalid = Denied(Reason::InvalidCredentials);
        let Some((scheme, rest)) = std::str::from_utf8(value).ok().and_then(|v| v.trim().split_once(' ')) else {
            return (Err(invalid), true);
        };
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = rest.trim();
            let attempt = |v: &Self| jwt::verify(token, &v.policies, |i, kid| v.key(i, kid));
            match attempt(self) {
                Ok(c) => (Ok(c), true),
                Err(JwtError::Denied(d)) => (Err(d), true),
                Err(JwtError::UnknownKid(i)) => {
                    // The issuer may have rotated its keys: refetch (rate-limited) and try again.
                    let Some(r) = self.remote.get_mut(i).and_then(Option::as_mut) else { return (Err(invalid), true) };
                    match r.on_unknown_kid(Instant::now()) {
                        Ok(true) => {
                            self.cache.clear();
                            match attempt(self) {
                                Ok(c) => (Ok(c), true),
                                Err(JwtError::Denied(d)) => (Err(d), true),
                                // The set changed but does not have the kid yet (a replica or
                                // a CDN behind the signer): not cached, so that its next use
                                // asks again (it was cached until 2026-12-01, refused until
                                // the cache was next cleared; found by a review).
                                Err(JwtError::UnknownKid(_)) => (Err(invalid), false),
                            }
                        }
                        Ok(false) => (Err(invalid), false),
                        Err(e) => {
                            tracing::warn!(issuer = %r.issuer(), error = %e, "identity provider unreachable on an unknown kid");
                            (Err(invalid), false)
                        }
                    }
                }
            }
        } else if scheme.eq_ignore_ascii_case("basic") {
            (api_key::verify(rest, &self.keys.api, &self.pepper), true)
        } else {
            (Err(invalid), true)
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
