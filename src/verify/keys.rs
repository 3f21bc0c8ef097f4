//! Key material: the JWKS file (RFC 7517) and the API key file, loaded into lookup tables.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

/// A verification key selected by `kid`. The key type fixes the only algorithm it accepts.
pub enum JwtKey {
    /// `kty: OKP, crv: Ed25519` → `alg: EdDSA`.
    Ed25519(ed25519_dalek::VerifyingKey),
    /// `kty: oct` → `alg: HS256`.
    Hs256(Vec<u8>),
    /// `kty: RSA` (at least 2048 bits) → `alg: RS256` (PKCS #1 v1.5 with SHA-256, RFC 7518 §3.3).
    Rs256(Box<rsa::pkcs1v15::VerifyingKey<sha2::Sha256>>),
    /// `kty: EC, crv: P-256` → `alg: ES256`.
    Es256(Box<p256::ecdsa::VerifyingKey>),
}

/// How a secret is stored: never the secret itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretHash {
    /// SHA-256 of the secret (the key file).
    Sha256([u8; 32]),
    /// HMAC-SHA256 of the secret under the server's pepper (the ClickHouse key store).
    HmacSha256([u8; 32]),
}

/// A secret of a key, valid until an optional time (a rotated-out secret's grace end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    pub hash: SecretHash,
    /// Unix seconds after which this secret is refused; `None`: while the key lives.
    pub valid_until: Option<i64>,
}

/// One API key pair's stored record (the secret itself is never stored, only its hash). After a
/// rotation a key has several secrets: the new one, and old ones until their grace ends.
pub struct ApiKey {
    pub secrets: Vec<StoredSecret>,
    pub org_id: Arc<str>,
    pub project_id: Arc<str>,
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

/// Everything the verifier checks credentials against.
#[derive(Default)]
pub struct KeySet {
    pub jwt: HashMap<String, JwtKey>,
    pub api: HashMap<String, ApiKey>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid key file {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("api key store: {0}")]
    Store(String),
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize, Clone, PartialEq, Eq)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    k: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
}

#[derive(Deserialize)]
struct ApiKeyFile {
    keys: Vec<ApiKeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    public_key: String,
    secret_sha256: String,
    org_id: String,
    project_id: String,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    revoked: bool,
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

impl KeySet {
    /// Loads both files. A missing file is an error, so that a typo never silently disables a
    /// credential type.
    pub fn load(jwks_path: &Path, api_keys_path: &Path) -> Result<Self, KeyError> {
        Ok(KeySet { jwt: Self::load_jwks(jwks_path)?, api: Self::load_api_keys(api_keys_path)? })
    }

    /// The JWKS file; an empty path means none (keys come from an identity provider).
    pub fn load_jwks(path: &Path) -> Result<HashMap<String, JwtKey>, KeyError> {
        if path.as_os_str().is_empty() {
            return Ok(HashMap::new());
        }
        parse_jwks(&read(path)?).map_err(|reason| KeyError::Invalid { path: path.display().to_string(), reason })
    }

    /// The API key file; an empty path means none (tokens only, or the ClickHouse key store).
    pub fn load_api_keys(path: &Path) -> Result<HashMap<String, ApiKey>, KeyError> {
        if path.as_os_str().is_empty() {
            return Ok(HashMap::new());
        }
        parse_api_keys(&read(path)?).map_err(|reason| KeyError::Invalid { path: path.display().to_string(), reason })
    }
}

pub fn parse_jwks(text: &str) -> Result<HashMap<String, JwtKey>, String> {
    parse_jwks_with(text, false).map(|(keys, _)| keys)
}

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Parses a JWKS. A key file (`lenient = false`) must hold only keys tally can use; an identity
/// provider's set (`lenient = true`) also publishes keys for other uses (encryption keys,
/// RS384, …): those are skipped and counted (the second value), never an error. Two more kinds
/// are skipped in a provider's set:
/// - an `oct` (HS256) key: a key set is public, and a secret in it lets anyone sign tokens
///   (HS256 keys come from the key file only; RFC 8725 §3.1, §3.2; until 2026-12-01 such a key
///   was used, found by a review);
/// - every key under a `kid` that names two different keys (RFC 7517 §4.5 only says `kid`s
///   "SHOULD" be distinct): which one a token means is not knowable, so that `kid` verifies
///   nothing, and the rest of the set still serves (until 2026-12-01 the whole set was refused).
///
/// A key file must have distinct `kid`s.
pub fn parse_jwks_with(text: &str, lenient: bool) -> Result<(HashMap<String, JwtKey>, usize), String> {
    let jwks: Jwks = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    // Per usable `kid` of a provider's set: the JWK it came from, to tell a repeat of the same key
    // (kept once) from a second key (the `kid` becomes ambiguous).
    let mut seen: HashMap<String, Option<Jwk>> = HashMap::new();
    let mut skipped = 0;
    for (i, k) in jwks.keys.into_iter().enumerate() {
        let jwk = lenient.then(|| k.clone());
        match parse_jwk(i, k) {
            Ok((kid, JwtKey::Hs256(_))) if lenient => {
                tracing::warn!(kid, "a fetched key set publishes a secret (oct) key: skipped");
                skipped += 1;
            }
            Ok((kid, key)) if lenient => match seen.get_mut(&kid) {
                None => {
                    seen.insert(kid.clone(), jwk);
                    out.insert(kid, key);
                }
                Some(first) if first.is_some() && *first == jwk => skipped += 1,
                Some(first) => {
                    if first.take().is_some() {
                        tracing::warn!(kid, "a fetched key set names two different keys with one kid: both skipped");
                        out.remove(&kid);
                        skipped += 1;
                    }
                    skipped += 1;
                }
            },
            Ok((kid, key)) => {
                if out.insert(kid.clone(), key).is_some() {
                    return Err(format!("kid {kid:?} appears twice"));
                }
            }
            Err(e) if lenient => {
                tracing::debug!(reason = %e, "JWKS key skipped");
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((out, skipped))
}

fn parse_jwk(i: usize, k: Jwk) -> Result<(String, JwtKey), String> {
    let kid = k.kid.ok_or_else(|| format!("keys[{i}]: missing kid"))?;
    if k.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err(format!("key {kid:?}: use {:?} is not sig", k.use_));
    }
    let b64 = |v: Option<String>, what: &str| -> Result<Vec<u8>, String> {
        let v = v.ok_or_else(|| format!("key {kid:?}: missing {what}"))?;
        URL_SAFE_NO_PAD.decode(v.trim_end_matches('=')).map_err(|e| format!("key {kid:?}: {what}: {e}"))
    };
    let key = match (k.kty.as_str(), k.crv.as_deref(), k.alg.as_deref()) {
        ("OKP", Some("Ed25519"), None | Some("EdDSA")) => {
            let x: [u8; 32] = b64(k.x, "x")?.try_into().map_err(|_| format!("key {kid:?}: x must be 32 bytes"))?;
            JwtKey::Ed25519(ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|e| format!("key {kid:?}: {e}"))?)
        }
        ("oct", _, None | Some("HS256")) => {
            let secret = b64(k.k, "k")?;
            if secret.len() < 32 {
                return Err(format!("key {kid:?}: HS256 secret must be at least 32 bytes"));
            }
            JwtKey::Hs256(secret)
        }
        ("RSA", _, None | Some("RS256")) => {
            let n = rsa::BigUint::from_bytes_be(&b64(k.n, "n")?);
            let e = rsa::BigUint::from_bytes_be(&b64(k.e, "e")?);
            let key = rsa::RsaPublicKey::new(n, e).map_err(|err| format!("key {kid:?}: {err}"))?;
            let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!("key {kid:?}: RSA keys need at least {MIN_RSA_BITS} bits, not {bits}"));
            }
            JwtKey::Rs256(Box::new(rsa::pkcs1v15::VerifyingKey::new(key)))
        }
        ("EC", Some("P-256"), None | Some("ES256")) => {
            let (x, y) = (b64(k.x, "x")?, b64(k.y, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err(format!("key {kid:?}: P-256 coordinates must be 32 bytes"));
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                .map_err(|_| format!("key {kid:?}: not a point of P-256"))?;
            JwtKey::Es256(Box::new(vk))
        }
        (kty, crv, alg) => return Err(format!("key {kid:?}: unsupported kty/crv/alg {kty}/{crv:?}/{alg:?}")),
    };
    Ok((kid, key))
}

pub fn parse_api_keys(text: &str) -> Result<HashMap<String, ApiKey>, String> {
    let file: ApiKeyFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for e in file.keys {
        let pk = e.public_key;
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(&e.secret_sha256, &mut secret_sha256)
            .map_err(|err| format!("key {pk:?}: secret_sha256: {err}"))?;
        let expires_at = match e.expires_at {
            None => None,
            Some(s) => Some(
                crate::timestamp::parse_rfc3339(&s)
                    .ok_or_else(|| format!("key {pk:?}: expires_at {s:?} is not RFC 3339"))?,
            ),
        };
        let max = super::MAX_TENANT_ID_BYTES;
        if e.org_id.is_empty() || e.project_id.is_empty() || e.org_id.len() > max || e.project_id.len() > max {
            return Err(format!("key {pk:?}: org_id and project_id must be 1..={max} bytes"));
        }
        let rec = ApiKey {
            secrets: vec![StoredSecret { hash: SecretHash::Sha256(secret_sha256), valid_until: None }],
            org_id: e.org_id.into(),
            project_id: e.project_id.into(),
            expires_at,
            revoked: e.revoked,
        };
        if out.insert(pk.clone(), rec).is_some() {
            return Err(format!("public_key {pk:?} appears twice"));
        }
    }
    Ok(out)
}
