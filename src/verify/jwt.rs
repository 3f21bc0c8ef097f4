//! JWT (RFC 7519) verification: EdDSA (Ed25519) and HS256 only, key chosen by `kid`, and the key's
//! type fixes its algorithm (no `alg: none`, no HS/EdDSA confusion).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::keys::JwtKey;
use super::{Checked, Denied, Principal};
use crate::reject::Reason;

#[derive(Deserialize)]
struct Header<'a> {
    alg: &'a str,
    #[serde(default)]
    kid: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    org_id: Option<String>,
    project_id: Option<String>,
    scope: Option<String>,
}

/// What the verifier needs to know about the deployment.
pub struct JwtPolicy<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
}

/// Verifies a compact JWS and its claims, except the time checks, which depend on when the
/// message was produced and are applied by the caller on every use (see [`Checked`]).
pub fn verify(
    token: &str,
    keys: &std::collections::HashMap<String, JwtKey>,
    policy: &JwtPolicy<'_>,
) -> Result<Checked, Denied> {
    let invalid = Denied(Reason::InvalidCredentials);
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid);
    };
    let header_bytes = URL_SAFE_NO_PAD.decode(h64).map_err(|_| invalid)?;
    let header: Header = serde_json::from_slice(&header_bytes).map_err(|_| invalid)?;
    let key = header.kid.and_then(|kid| keys.get(kid)).ok_or(invalid)?;
    let signature = URL_SAFE_NO_PAD.decode(s64).map_err(|_| invalid)?;
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    match (header.alg, key) {
        ("EdDSA", JwtKey::Ed25519(vk)) => {
            let sig = ed25519_dalek::Signature::from_slice(&signature).map_err(|_| invalid)?;
            vk.verify_strict(signed, &sig).map_err(|_| invalid)?;
        }
        ("HS256", JwtKey::Hs256(secret)) => {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| invalid)?;
            mac.update(signed);
            mac.verify_slice(&signature).map_err(|_| invalid)?; // constant-time
        }
        _ => return Err(invalid), // alg none, unknown alg, or an alg the key does not allow
    }
    let payload = URL_SAFE_NO_PAD.decode(p64).map_err(|_| invalid)?;
    let c: Claims = serde_json::from_slice(&payload).map_err(|_| invalid)?;
    if c.iss.as_deref() != Some(policy.issuer) {
        return Err(invalid);
    }
    let aud_ok = match &c.aud {
        Some(Audience::One(a)) => a == policy.audience,
        Some(Audience::Many(v)) => v.iter().any(|a| a == policy.audience),
        None => false,
    };
    if !aud_ok {
        return Err(invalid);
    }
    let exp = c.exp.ok_or(invalid)?;
    let (Some(org), Some(project)) = (c.org_id, c.project_id) else { return Err(invalid) };
    if org.is_empty() || project.is_empty() {
        return Err(invalid);
    }
    let scope_ok = c.scope.as_deref().is_some_and(|s| s.split(' ').any(|x| x == "ingest"));
    Ok(Checked {
        principal: Principal { org_id: org.into(), project_id: project.into() },
        not_before: match (c.nbf, c.iat) {
            (Some(a), Some(b)) => Some(a.max(b).floor() as i64),
            (a, b) => a.or(b).map(|t| t.floor() as i64),
        },
        expires_at: Some(exp.floor() as i64),
        leeway: true,
        scope_ok,
        revoked: false,
    })
}
