//! Langfuse-style API key pairs: `Basic base64(pk-…:sk-…)`, checked in constant time against the
//! stored hashes of the key's secrets (SHA-256 in the key file, HMAC-SHA256 under the server's
//! pepper in the ClickHouse key store; docs/identity.md says why).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::keys::{ApiKey, SecretHash};
use super::{Checked, Denied, Principal, Scopes};
use crate::reject::Reason;

/// HMAC-SHA256(pepper, secret): how the key store keeps a secret.
pub fn hmac_secret(pepper: &[u8], secret: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC takes keys of any length");
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Verifies `Basic <base64(public:secret)>` against `keys`; `pepper` is the key store's.
pub fn verify(basic: &str, keys: &std::collections::HashMap<String, ApiKey>, pepper: &[u8]) -> Result<Checked, Denied> {
    let invalid = Denied(Reason::InvalidCredentials);
    let decoded = STANDARD.decode(basic.trim()).map_err(|_| invalid)?;
    let decoded = std::str::from_utf8(&decoded).map_err(|_| invalid)?;
    let (public_key, secret) = decoded.split_once(':').ok_or(invalid)?;
    let sha = || -> [u8; 32] { Sha256::digest(secret.as_bytes()).into() };
    let Some(rec) = keys.get(public_key) else {
        // Spend the same work on unknown keys as on known ones.
        let _ = (sha(), hmac_secret(pepper, secret));
        return Err(invalid);
    };
    let (sha, hmac) = (sha(), hmac_secret(pepper, secret));
    let matched = rec.secrets.iter().find(|s| match s.hash {
        SecretHash::Sha256(h) => bool::from(h.ct_eq(&sha)),
        SecretHash::HmacSha256(h) => bool::from(h.ct_eq(&hmac)),
    });
    let Some(matched) = matched else { return Err(invalid) };
    // A key pair always names its project (its usage scope is that project, never the org).
    if rec.org_id.is_empty() || rec.project_id.is_empty() {
        return Err(invalid);
    }
    let expires_at = match (rec.expires_at, matched.valid_until) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Checked {
        principal: Principal { org_id: rec.org_id.clone(), project_id: rec.project_id.clone() },
        not_before: None,
        expires_at,
        leeway: false,
        scopes: Scopes::API_KEY,
        revoked: rec.revoked,
    })
}
