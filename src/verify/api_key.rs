//! Langfuse-style API key pairs: `Basic base64(pk-…:sk-…)`, checked against SHA-256 hashes of the
//! secrets in constant time.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::keys::ApiKey;
use super::{Checked, Denied, Principal};
use crate::reject::Reason;

pub fn verify(basic: &str, keys: &std::collections::HashMap<String, ApiKey>) -> Result<Checked, Denied> {
    let invalid = Denied(Reason::InvalidCredentials);
    let decoded = STANDARD.decode(basic.trim()).map_err(|_| invalid)?;
    let decoded = std::str::from_utf8(&decoded).map_err(|_| invalid)?;
    let (public_key, secret) = decoded.split_once(':').ok_or(invalid)?;
    let Some(rec) = keys.get(public_key) else {
        // Spend the same work on unknown keys as on known ones.
        let _ = Sha256::digest(secret.as_bytes());
        return Err(invalid);
    };
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    if !bool::from(digest.ct_eq(&rec.secret_sha256)) {
        return Err(invalid);
    }
    Ok(Checked {
        principal: Principal { org_id: rec.org_id.clone(), project_id: rec.project_id.clone() },
        not_before: None,
        expires_at: rec.expires_at,
        leeway: false,
        scope_ok: true,
        revoked: rec.revoked,
    })
}
