//! JWT (RFC 7519) verification: EdDSA (Ed25519), HS256, RS256 and ES256, the issuer chosen by
//! `iss`, the key by `kid`, and the key's type fixes its algorithm (no `alg: none`, no confusion
//! between RSA, EC, OKP and oct keys).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use std::borrow::Cow;
use std::collections::HashMap;

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
    /// Extensions the token says must be understood (RFC 7515 §4.1.11): tally understands none,
    /// so a token that names any is invalid ("If any of the listed extension Header Parameters
    /// are not understood and supported by the recipient, then the JWS is invalid"). Until
    /// 2026-12-01 the member was ignored (found by a review).
    #[serde(default, borrow)]
    crit: Option<&'a RawValue>,
}

/// A claim set with every member kept as raw JSON. A repeated member name is an error (which copy
/// counts must never be a parser's choice), the same rule as the header's.
struct ClaimMap<'a>(HashMap<Cow<'a, str>, &'a RawValue>);

impl<'de> Deserialize<'de> for ClaimMap<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ClaimMap<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = HashMap::new();
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    let v: &'de RawValue = m.next_value()?;
                    if out.insert(k, v).is_some() {
                        return Err(serde::de::Error::custom("repeated claim"));
                    }
                }
                Ok(ClaimMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> ClaimMap<'a> {
    fn raw(&self, name: &str) -> Option<&'a RawValue> {
        self.0.get(name).copied()
    }

    /// A string claim; absent or `null` is `None`, another type is invalid.
    fn string(&self, name: &str) -> Result<Option<String>, Denied> {
        match self.raw(name).map(RawValue::get) {
            None | Some("null") => Ok(None),
            Some(t) => serde_json::from_str(t).map(Some).map_err(|_| Denied(Reason::InvalidCredentials)),
        }
    }

    /// A claim that is a string or an array of strings (`aud`; `scp`/`roles` of some IdPs).
    fn strings(&self, name: &str) -> Result<Vec<String>, Denied> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match self.raw(name).map(RawValue::get) {
            None | Some("null") => Ok(Vec::new()),
            Some(t) => match serde_json::from_str(t).map_err(|_| Denied(Reason::InvalidCredentials))? {
                OneOrMany::One(s) => Ok(vec![s]),
                OneOrMany::Many(v) => Ok(v),
            },
        }
    }
}

/// A NumericDate claim (RFC 7519 §2) as whole seconds: any JSON number, of any size, saturated
/// ([`crate::decode::number::numeric_date`]); `null` as absent; anything else is invalid.
fn numeric_date(raw: Option<&RawValue>) -> Result<Option<i64>, Denied> {
    match raw.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(t) => crate::decode::number::numeric_date(t).map(Some).ok_or(Denied(Reason::InvalidCredentials)),
    }
}

/// How one issuer's tokens are read: identity providers name the tenant claims differently
/// (docs/identity.md maps Keycloak, Auth0, Azure AD and Dex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerPolicy {
    /// `iss` exactly.
    pub issuer: String,
    /// Must be in `aud`.
    pub audience: String,
    /// Claim holding the org id (a string).
    pub org_claim: String,
    /// The org of every token of this issuer, when the IdP is the org's own (a self-hosted
    /// customer's Dex or Keycloak); `org_claim` is then not read.
    pub fixed_org: Option<String>,
    /// The only orgs `org_claim` may name (`None`: any, for the operator's own issuer);
    /// `auth.issuers[].orgs`.
    pub orgs: Option<Vec<String>>,
    /// Claim holding the project id (a string).
    pub project_claim: String,
    /// Claim holding the scopes: a space-separated string (`scope`, Azure's `scp`) or an array
    /// of strings (`roles`, `scp` in some IdPs).
    pub scope_claim: String,
    /// The scope that allows ingest.
    pub required_scope: String,
    /// Whether this issuer may grant `usage:admin` (every org's usage). Only the operator's own
    /// issuer (`auth.issuer`) may: a customer's identity provider (an org's Dex or Keycloak)
    /// could otherwise mint admin tokens for itself.
    pub grants_admin: bool,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// The token's `kid` is not in its issuer's key set (index into the policies): a key set
    /// fetched from the issuer may be refreshed and the token tried again.
    UnknownKid(usize),
    Denied(Denied),
}

impl From<Denied> for JwtError {
    fn from(d: Denied) -> Self {
        JwtError::Denied(d)
    }
}

/// Verifies a compact JWS and its claims, except the time checks, which depend on when the
/// message was produced and are applied by the caller on every use (see [`Checked`]).
/// `key(i, kid)` looks `kid` up in the key set of `policies[i]`, the issuer named by `iss`.
pub fn verify<'k>(
    token: &str,
    policies: &[IssuerPolicy],
    key: impl Fn(usize, &str) -> Option<&'k JwtKey>,
) -> Result<Checked, JwtError> {
    let invalid = Denied(Reason::InvalidCredentials);
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid.into());
    };
    let header_bytes = URL_SAFE_NO_PAD.decode(h64).map_err(|_| invalid)?;
    let header: Header = serde_json::from_slice(&header_bytes).map_err(|_| invalid)?;
    if header.crit.is_some() {
        return Err(invalid.into());
    }
    let payload = URL_SAFE_NO_PAD.decode(p64).map_err(|_| invalid)?;
    let c: ClaimMap = serde_json::from_slice(&payload).map_err(|_| invalid)?;
    // The issuer only selects the keys; nothing of the claims is trusted before the signature.
    let iss = c.string("iss")?.ok_or(invalid)?;
    let which = policies.iter().position(|p| p.issuer == iss).ok_or(invalid)?;
    let policy = &policies[which];
    let kid = header.kid.as_deref().ok_or(invalid)?;
    let key = key(which, kid).ok_or(JwtError::UnknownKid(which))?;
    let signature = URL_SAFE_NO_PAD.decode(s64).map_err(|_| invalid)?;
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    // The key's type fixes the one algorithm it verifies: no `none`, no HS256 with a public key.
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
        ("RS256", JwtKey::Rs256(vk)) => {
            use rsa::signature::Verifier as _;
            let sig = rsa::pkcs1v15::Signature::try_from(signature.as_slice()).map_err(|_| invalid)?;
            vk.verify(signed, &sig).map_err(|_| invalid)?;
        }
        ("ES256", JwtKey::Es256(vk)) => {
            use p256::ecdsa::signature::Verifier as _;
            // JWS ES256 signatures are r || s, 64 bytes (RFC 7518 §3.4), never DER.
            let sig = p256::ecdsa::Signature::from_slice(&signature).map_err(|_| invalid)?;
            vk.verify(signed, &sig).map_err(|_| invalid)?;
        }
        _ => return Err(invalid.into()), // alg none, unknown alg, or an alg the key does not allow
    }
    if !c.strings("aud")?.contains(&policy.audience) {
        return Err(invalid.into());
    }
    let exp = numeric_date(c.raw("exp"))?.ok_or(invalid)?;
    let (nbf, iat) = (numeric_date(c.raw("nbf"))?, numeric_date(c.raw("iat"))?);
    let org = match &policy.fixed_org {
        Some(o) => Some(o.clone()),
        None => c.string(&policy.org_claim)?,
    };
    let Some(org) = org else {
        return Err(invalid.into());
    };
    if policy.orgs.as_ref().is_some_and(|allowed| !allowed.contains(&org)) {
        return Err(invalid.into());
    }
    // No project claim: an org-wide credential (the usage API accepts it; ingest does not).
    let project = c.string(&policy.project_claim)?;
    let id_ok = |s: &str| !s.is_empty() && s.len() <= super::MAX_TENANT_ID_BYTES;
    if !id_ok(&org) || project.as_deref().is_some_and(|p| !id_ok(p)) {
        return Err(invalid.into());
    }
    let project = project.unwrap_or_default();
    let granted = c.strings(&policy.scope_claim)?;
    let mut scopes = super::Scopes::parse(granted.iter().map(String::as_str), &policy.required_scope);
    if !policy.grants_admin {
        scopes = scopes.without(super::Scopes::USAGE_ADMIN);
    }
    Ok(Checked {
        principal: Principal { org_id: org.into(), project_id: project.into() },
        not_before: nbf.max(iat),
        expires_at: Some(exp),
        leeway: true,
        scopes,
        revoked: false,
    })
}
