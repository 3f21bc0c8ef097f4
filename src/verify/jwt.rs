//! JWT (RFC 7519) verification: EdDSA (Ed25519) and HS256 only, key chosen by `kid`, and the key's
//! type fixes its algorithm (no `alg: none`, no HS/EdDSA confusion).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use std::borrow::Cow;

use super::keys::JwtKey;
use super::{Checked, Denied, Principal};
use crate::reject::Reason;

/// The JOSE header. serde's derived `Deserialize` refuses a repeated field, so a header or claim
/// set with a duplicate key is invalid (which copy counts must never be a parser's choice).
#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(default, borrow)]
    kid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims<'a> {
    iss: Option<String>,
    aud: Option<Audience>,
    #[serde(default, borrow)]
    exp: Option<&'a RawValue>,
    #[serde(default, borrow)]
    nbf: Option<&'a RawValue>,
    #[serde(default, borrow)]
    iat: Option<&'a RawValue>,
    org_id: Option<String>,
    project_id: Option<String>,
    scope: Option<String>,
}

/// A NumericDate claim (RFC 7519 §2) as whole seconds: any JSON number, of any size, saturated
/// ([`crate::decode::number::numeric_date`]); `null` as absent; anything else is invalid.
fn numeric_date(raw: Option<&RawValue>) -> Result<Option<i64>, Denied> {
    match raw.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(t) => crate::decode::number::numeric_date(t).map(Some).ok_or(Denied(Reason::InvalidCredentials)),
    }
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
    let key = header.kid.as_deref().and_then(|kid| keys.get(kid)).ok_or(invalid)?;
    let signature = URL_SAFE_NO_PAD.decode(s64).map_err(|_| invalid)?;
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    match (&*header.alg, key) {
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
    let exp = numeric_date(c.exp)?.ok_or(invalid)?;
    let (nbf, iat) = (numeric_date(c.nbf)?, numeric_date(c.iat)?);
    let (Some(org), Some(project)) = (c.org_id, c.project_id) else { return Err(invalid) };
    let id_ok = |s: &str| !s.is_empty() && s.len() <= super::MAX_TENANT_ID_BYTES;
    if !id_ok(&org) || !id_ok(&project) {
        return Err(invalid);
    }
    let scope_ok = c.scope.as_deref().is_some_and(|s| s.split(' ').any(|x| x == "ingest"));
    Ok(Checked {
        principal: Principal { org_id: org.into(), project_id: project.into() },
        not_before: nbf.max(iat),
        expires_at: Some(exp),
        leeway: true,
        scope_ok,
        revoked: false,
    })
}
