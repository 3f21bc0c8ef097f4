//! The shared API key store (PRODUCT.md §2, API key lifecycle): append-only rows in the
//! ClickHouse table `api_keys` (schemas/003_api_keys.sql), one per change — `create`, `rotate`,
//! `revoke` — with who, when and why. Every worker folds the rows into its key table every
//! `auth.reload_interval`, so a change reaches every worker within it.
//!
//! Only HMAC-SHA256(pepper, secret) is stored. The secret is printed once by `tally-ingest keys`
//! and is in no row, log line, error, listing or metric.

use std::collections::HashMap;

use base64::Engine;
use rand::RngCore;
use serde::Serialize;

use super::api_key::hmac_secret;
use super::keys::{ApiKey, SecretHash, StoredSecret};
use crate::sink::clickhouse::{ChError, ClickHouse};
use crate::sink::rowbinary::RowWriter;
use crate::timestamp::format_rfc3339;

/// What a row of `api_keys` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAction {
    /// A new key: its org, project, optional expiry and first secret.
    Create,
    /// A new secret; the key's earlier secrets stay valid until `grace_until`.
    Rotate,
    /// The key is refused from now on, every secret.
    Revoke,
}

impl KeyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::Create => "create",
            KeyAction::Rotate => "rotate",
            KeyAction::Revoke => "revoke",
        }
    }

    fn parse(s: &str) -> Option<KeyAction> {
        match s {
            "create" => Some(KeyAction::Create),
            "rotate" => Some(KeyAction::Rotate),
            "revoke" => Some(KeyAction::Revoke),
            _ => None,
        }
    }
}

/// One row of `api_keys`: a change to one key, and its audit record.
#[derive(Debug, Clone, Serialize)]
pub struct KeyEvent {
    pub public_key: String,
    pub action: KeyAction,
    /// Hex HMAC-SHA256(pepper, secret) of the secret this row issues ("" for `revoke`).
    #[serde(skip)]
    pub secret_hmac: String,
    pub org_id: String,
    pub project_id: String,
    /// Unix seconds; 0: the key does not expire.
    pub expires_at: i64,
    /// `rotate`: Unix seconds until which the earlier secrets stay valid.
    pub grace_until: i64,
    /// Who made the change.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When (Unix seconds) and, within the second, the order (nanoseconds).
    pub at: i64,
    pub seq: u64,
}

/// The state of one key, for `keys list` (no secret, no hash).
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub public_key: String,
    pub org_id: String,
    pub project_id: String,
    /// `active`, `revoked` or `expired`.
    pub status: &'static str,
    pub created_at: String,
    pub created_by: String,
    pub expires_at: Option<String>,
    /// Secrets accepted now (after a rotation, the old one until its grace ends).
    pub secrets_valid: usize,
    /// The latest grace end of a rotated-out secret still valid.
    pub grace_until: Option<String>,
    pub changes: usize,
}

/// Folds the rows (any order) into the key table the verifier checks credentials against.
/// Rows about a key that was never created are ignored; a second `create` of a key is ignored.
pub fn fold(events: &[KeyEvent]) -> HashMap<String, ApiKey> {
    let mut sorted: Vec<&KeyEvent> = events.iter().collect();
    sorted.sort_by_key(|e| (e.at, e.seq));
    let mut out: HashMap<String, ApiKey> = HashMap::new();
    for e in sorted {
        let hash = || -> Option<SecretHash> {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&e.secret_hmac, &mut h).ok()?;
            Some(SecretHash::HmacSha256(h))
        };
        match (e.action, out.get_mut(&e.public_key)) {
            (KeyAction::Create, None) => {
                let Some(h) = hash() else { continue };
                out.insert(
                    e.public_key.clone(),
                    ApiKey {
                        secrets: vec![StoredSecret { hash: h, valid_until: None }],
                        org_id: e.org_id.as_str().into(),
                        project_id: e.project_id.as_str().into(),
                        expires_at: (e.expires_at > 0).then_some(e.expires_at),
                        revoked: false,
                    },
                );
            }
            (KeyAction::Rotate, Some(k)) => {
                let Some(h) = hash() else { continue };
                for s in &mut k.secrets {
                    s.valid_until = Some(s.valid_until.map_or(e.grace_until, |v| v.min(e.grace_until)));
                }
                // Every rotated-out secret is kept with its grace end: a message is checked
                // against it at the time it was produced, so a replay or a lagging partition
                // still verifies what was sent within the grace, and a message sent after it
                // reads `expired_credentials`. (Until 2026-12-01 a second rotation dropped the
                // secrets whose grace had ended by then, and such messages read
                // `invalid_credentials`; found by a review.)
                k.secrets.push(StoredSecret { hash: h, valid_until: None });
            }
            _ => {}
        }
    }
    // A revocation holds whatever its timestamp: rows written from hosts whose clocks disagree
    // must never bring a revoked key back.
    for e in events.iter().filter(|e| e.action == KeyAction::Revoke) {
        if let Some(k) = out.get_mut(&e.public_key) {
            k.revoked = true;
        }
    }
    out
}

/// The key store in ClickHouse.
pub struct KeyStore {
    ch: ClickHouse,
    pepper: Vec<u8>,
}

/// A new key pair as printed once by `keys create` / `keys rotate`.
pub struct Issued {
    pub public_key: String,
    pub secret: String,
}

fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now_nanos() -> (i64, u64) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.as_nanos() as u64)
}

impl KeyStore {
    pub fn new(ch: ClickHouse, pepper: &[u8]) -> Self {
        KeyStore { ch, pepper: pepper.to_vec() }
    }

    pub fn pepper(&self) -> &[u8] {
        &self.pepper
    }

    /// Every row, and a fingerprint of them (a change of the fingerprint means the keys changed).
    pub fn events(&self) -> Result<(Vec<KeyEvent>, u64), ChError> {
        let sql = format!(
            "SELECT public_key, action, secret_hmac, org_id, project_id, toUInt32(expires_at), toUInt32(grace_until), \
             actor, reason, toUInt32(at), seq FROM {}.api_keys ORDER BY at, seq FORMAT TabSeparated",
            self.ch.database()
        );
        let body = self.ch.query(&sql)?;
        let fingerprint = xxhash_rust::xxh3::xxh3_64(&body);
        let mut out = Vec::new();
        for line in String::from_utf8_lossy(&body).lines().filter(|l| !l.is_empty()) {
            let r: Vec<String> = line.split('\t').map(crate::invoice::sql::unescape).collect();
            let bad = || ChError::Response(format!("api_keys row with {} columns", r.len()));
            if r.len() != 11 {
                return Err(bad());
            }
            let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
            let Some(action) = KeyAction::parse(&r[1]) else { continue };
            out.push(KeyEvent {
                public_key: r[0].clone(),
                action,
                secret_hmac: r[2].clone(),
                org_id: r[3].clone(),
                project_id: r[4].clone(),
                expires_at: num(&r[5])?,
                grace_until: num(&r[6])?,
                actor: r[7].clone(),
                reason: r[8].clone(),
                at: num(&r[9])?,
                seq: r[10].parse().map_err(|_| bad())?,
            });
        }
        Ok((out, fingerprint))
    }

    fn append(&self, e: &KeyEvent) -> Result<(), ChError> {
        let mut w = RowWriter::default();
        w.string(&e.public_key);
        w.string(e.action.as_str());
        w.string(&e.secret_hmac);
        w.string(&e.org_id);
        w.string(&e.project_id);
        w.datetime(e.expires_at);
        w.datetime(e.grace_until);
        w.string(&e.actor);
        w.string(&e.reason);
        w.datetime(e.at);
        w.u64(e.seq);
        let insert = format!(
            "INSERT INTO {}.api_keys (public_key, action, secret_hmac, org_id, project_id, expires_at, grace_until, \
             actor, reason, at, seq) FORMAT RowBinary",
            self.ch.database()
        );
        self.ch.insert(&insert, &w.buf)
    }

    /// A new row, ordered after every row already in the store even if this host's clock is
    /// behind the hosts that wrote them (rows are folded in `(at, seq)` order).
    fn event(&self, public_key: &str, action: KeyAction, secret: Option<&str>, actor: &str, reason: &str) -> KeyEvent {
        let (mut at, mut seq) = now_nanos();
        if let Ok((events, _)) = self.events() {
            if let Some(last) = events.iter().map(|e| (e.at, e.seq)).max() {
                if (at, seq) <= last {
                    tracing::warn!("this host's clock is behind the key store's newest row; ordering after it");
                    (at, seq) = (last.0, last.1.saturating_add(1));
                }
            }
        }
        KeyEvent {
            public_key: public_key.to_string(),
            action,
            secret_hmac: secret.map(|s| hex::encode(hmac_secret(&self.pepper, s))).unwrap_or_default(),
            org_id: String::new(),
            project_id: String::new(),
            expires_at: 0,
            grace_until: 0,
            actor: actor.to_string(),
            reason: reason.to_string(),
            at,
            seq,
        }
    }

    /// Creates a key for (org, project); returns the pair (the secret is not stored).
    pub fn create(
        &self,
        org_id: &str,
        project_id: &str,
        expires_at: Option<i64>,
        actor: &str,
        reason: &str,
    ) -> Result<Issued, StoreError> {
        if expires_at.is_some_and(|x| x <= now_nanos().0) {
            return Err(StoreError::Usage("--expires must be in the future".into()));
        }
        let max = super::MAX_TENANT_ID_BYTES;
        if org_id.is_empty() || project_id.is_empty() || org_id.len() > max || project_id.len() > max {
            return Err(StoreError::Usage(format!("org and project must be 1..={max} bytes")));
        }
        let issued = Issued {
            public_key: format!("pk-tly-{}", random_token(16)),
            secret: format!("sk-tly-{}", random_token(32)),
        };
        let mut e = self.event(&issued.public_key, KeyAction::Create, Some(&issued.secret), actor, reason);
        e.org_id = org_id.to_string();
        e.project_id = project_id.to_string();
        e.expires_at = expires_at.unwrap_or(0);
        self.append(&e)?;
        Ok(issued)
    }

    fn existing(&self, public_key: &str) -> Result<ApiKey, StoreError> {
        let (events, _) = self.events()?;
        let mut keys = fold(&events);
        keys.remove(public_key).ok_or_else(|| StoreError::Usage(format!("no key {public_key:?}")))
    }

    /// Issues a new secret; the key's current secrets stay valid for `grace_secs` more.
    pub fn rotate(&self, public_key: &str, grace_secs: u64, actor: &str, reason: &str) -> Result<Issued, StoreError> {
        let k = self.existing(public_key)?;
        if k.revoked {
            return Err(StoreError::Usage(format!("key {public_key:?} is revoked")));
        }
        let secret = format!("sk-tly-{}", random_token(32));
        let mut e = self.event(public_key, KeyAction::Rotate, Some(&secret), actor, reason);
        e.org_id = k.org_id.to_string();
        e.project_id = k.project_id.to_string();
        e.grace_until = e.at.saturating_add(i64::try_from(grace_secs).unwrap_or(i64::MAX));
        self.append(&e)?;
        Ok(Issued { public_key: public_key.to_string(), secret })
    }

    /// Revokes the key: every worker refuses it within `auth.reload_interval`.
    pub fn revoke(&self, public_key: &str, actor: &str, reason: &str) -> Result<(), StoreError> {
        let k = self.existing(public_key)?;
        let mut e = self.event(public_key, KeyAction::Revoke, None, actor, reason);
        e.org_id = k.org_id.to_string();
        e.project_id = k.project_id.to_string();
        self.append(&e)?;
        Ok(())
    }

    /// Every key's state now, by public key.
    pub fn list(&self, now: i64) -> Result<Vec<KeyInfo>, StoreError> {
        let (events, _) = self.events()?;
        let keys = fold(&events);
        let mut out: Vec<KeyInfo> = keys
            .iter()
            .map(|(pk, k)| {
                let mine: Vec<&KeyEvent> = events.iter().filter(|e| &e.public_key == pk).collect();
                let created = mine.iter().find(|e| e.action == KeyAction::Create);
                let valid: Vec<&StoredSecret> =
                    k.secrets.iter().filter(|s| s.valid_until.is_none_or(|v| v > now)).collect();
                let status = if k.revoked {
                    "revoked"
                } else if k.expires_at.is_some_and(|x| x <= now) {
                    "expired"
                } else {
                    "active"
                };
                KeyInfo {
                    public_key: pk.clone(),
                    org_id: k.org_id.to_string(),
                    project_id: k.project_id.to_string(),
                    status,
                    created_at: created.map(|e| format_rfc3339(e.at)).unwrap_or_default(),
                    created_by: created.map(|e| e.actor.clone()).unwrap_or_default(),
                    expires_at: k.expires_at.map(format_rfc3339),
                    secrets_valid: if k.revoked { 0 } else { valid.len() },
                    grace_until: valid.iter().filter_map(|s| s.valid_until).max().map(format_rfc3339),
                    changes: mine.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.org_id, &a.project_id, &a.public_key).cmp(&(&b.org_id, &b.project_id, &b.public_key)));
        Ok(out)
    }

    /// The audit trail (who, when, what, why), oldest first; optionally of one key.
    pub fn audit(&self, public_key: Option<&str>) -> Result<Vec<KeyEvent>, StoreError> {
        let (events, _) = self.events()?;
        Ok(events.into_iter().filter(|e| public_key.is_none_or(|pk| e.public_key == pk)).collect())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{0}")]
    Usage(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pk: &str, action: KeyAction, secret: &str, at: i64, grace: i64) -> KeyEvent {
        KeyEvent {
            public_key: pk.into(),
            action,
            secret_hmac: if secret.is_empty() { String::new() } else { hex::encode(hmac_secret(b"pepper", secret)) },
            org_id: "o".into(),
            project_id: "p".into(),
            expires_at: 0,
            grace_until: grace,
            actor: "me".into(),
            reason: "test".into(),
            at,
            seq: at as u64,
        }
    }

    #[test]
    fn rotation_keeps_the_old_secret_for_the_grace_only_and_revocation_ends_all() {
        let rows = vec![
            ev("pk", KeyAction::Rotate, "s2", 200, 300), // out of order: folded by time
            ev("pk", KeyAction::Create, "s1", 100, 0),
            ev("ghost", KeyAction::Rotate, "x", 150, 0), // never created: ignored
        ];
        let keys = fold(&rows);
        assert_eq!(keys.len(), 1);
        let k = &keys["pk"];
        assert_eq!(k.secrets.len(), 2);
        assert_eq!(k.secrets[0].valid_until, Some(300), "the old secret until the grace ends");
        assert_eq!(k.secrets[1].valid_until, None);
        assert!(!k.revoked);
        let mut rows = rows;
        rows.push(ev("pk", KeyAction::Revoke, "", 250, 0));
        assert!(fold(&rows)["pk"].revoked);
        // A revoke stamped before the create (a host with a slow clock) still revokes.
        let skewed = vec![ev("pk", KeyAction::Revoke, "", 50, 0), ev("pk", KeyAction::Create, "s1", 100, 0)];
        assert!(fold(&skewed)["pk"].revoked);
        // A second rotation after the first grace keeps the first secret with its own grace end:
        // a message produced before it (replayed, or read late) still verifies with it.
        let rows = vec![
            ev("pk", KeyAction::Create, "s1", 100, 0),
            ev("pk", KeyAction::Rotate, "s2", 200, 210),
            ev("pk", KeyAction::Rotate, "s3", 400, 500),
        ];
        let k = &fold(&rows)["pk"];
        assert_eq!(k.secrets.iter().map(|s| s.valid_until).collect::<Vec<_>>(), vec![Some(210), Some(500), None]);
        // What the verifier makes of it: s1 is a known secret that ends at 210 (a message
        // produced at 205 verifies; one produced later reads expired, not invalid).
        use base64::Engine;
        let keys = fold(&rows);
        let basic = |secret: &str| base64::engine::general_purpose::STANDARD.encode(format!("pk:{secret}"));
        let checked = crate::verify::api_key::verify(&basic("s1"), &keys, b"pepper").unwrap();
        assert_eq!(checked.expires_at, Some(210));
        assert_eq!(crate::verify::api_key::verify(&basic("s3"), &keys, b"pepper").unwrap().expires_at, None);
        assert!(crate::verify::api_key::verify(&basic("s9"), &keys, b"pepper").is_err());
    }
}
