//! Development and test key material: generates a JWKS, an API key file and the matching private
//! side (signing keys and API secrets) that the load generator and the tests sign with.
//!
//! Production key material comes from the platform's identity service; this module only writes
//! files of the same shapes.

use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::Signer as _;
use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One tenant's project and its API key pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    pub org_id: String,
    pub project_id: String,
    pub public_key: String,
    pub secret_key: String,
}

/// The private side of the development keys (never read by `tally-ingest`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevKeys {
    pub issuer: String,
    pub audience: String,
    pub ed25519_kid: String,
    /// Ed25519 private key seed, base64url.
    pub ed25519_d: String,
    pub hs256_kid: String,
    /// HS256 secret, base64url.
    pub hs256_k: String,
    pub tenants: Vec<Tenant>,
    /// Key pairs listed as `revoked: true`.
    pub revoked: Vec<Tenant>,
    /// Key pairs whose `expires_at` has passed.
    pub expired: Vec<Tenant>,
}

pub const PRIVATE_FILE: &str = "dev-keys.private.json";
pub const JWKS_FILE: &str = "jwks.json";
pub const API_KEYS_FILE: &str = "api_keys.json";

impl DevKeys {
    /// Generates keys for `orgs` × `projects_per_org` projects, plus one revoked and one expired
    /// API key pair per org.
    pub fn generate(orgs: usize, projects_per_org: usize, issuer: &str, audience: &str) -> Self {
        let mut rng = rand::thread_rng();
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let mut hs = [0u8; 32];
        rng.fill_bytes(&mut hs);
        let mut key = |org: &str, project: &str, tag: &str| Tenant {
            org_id: org.into(),
            project_id: project.into(),
            public_key: format!("pk-lf-{tag}{:016x}", rng.gen::<u64>()),
            secret_key: format!("sk-lf-{:032x}", rng.gen::<u128>()),
        };
        let (mut tenants, mut revoked, mut expired) = (vec![], vec![], vec![]);
        for o in 0..orgs {
            let org = format!("org-{o:03}");
            for p in 0..projects_per_org {
                tenants.push(key(&org, &format!("proj-{o:03}-{p:02}"), ""));
            }
            let first = format!("proj-{o:03}-00");
            revoked.push(key(&org, &first, "revoked-"));
            expired.push(key(&org, &first, "expired-"));
        }
        DevKeys {
            issuer: issuer.into(),
            audience: audience.into(),
            ed25519_kid: "ed-1".into(),
            ed25519_d: URL_SAFE_NO_PAD.encode(seed),
            hs256_kid: "hs-1".into(),
            hs256_k: URL_SAFE_NO_PAD.encode(hs),
            tenants,
            revoked,
            expired,
        }
    }

    fn signing_key(&self) -> ed25519_dalek::SigningKey {
        let d: [u8; 32] = URL_SAFE_NO_PAD.decode(&self.ed25519_d).expect("base64url d").try_into().expect("32 bytes");
        ed25519_dalek::SigningKey::from_bytes(&d)
    }

    fn hs_secret(&self) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(&self.hs256_k).expect("base64url k")
    }

    #[cfg(test)]
    pub(crate) fn hs_secret_for_tests(&self) -> Vec<u8> {
        self.hs_secret()
    }

    /// The public JWKS the verifier loads (the HS256 secret is necessarily in it).
    pub fn jwks_json(&self) -> serde_json::Value {
        let x = URL_SAFE_NO_PAD.encode(self.signing_key().verifying_key().as_bytes());
        serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": self.ed25519_kid, "alg": "EdDSA", "use": "sig", "x": x},
            {"kty": "oct", "kid": self.hs256_kid, "alg": "HS256", "k": self.hs256_k},
        ]})
    }

    /// The API key file the verifier loads (hashes only).
    pub fn api_keys_json(&self) -> serde_json::Value {
        let entry = |t: &Tenant, revoked: bool, expires_at: Option<&str>| {
            let mut v = serde_json::json!({
                "public_key": t.public_key,
                "secret_sha256": hex::encode(Sha256::digest(t.secret_key.as_bytes())),
                "org_id": t.org_id, "project_id": t.project_id, "revoked": revoked,
            });
            if let Some(e) = expires_at {
                v["expires_at"] = e.into();
            }
            v
        };
        let mut keys: Vec<_> = self.tenants.iter().map(|t| entry(t, false, Some("2099-01-01T00:00:00Z"))).collect();
        keys.extend(self.revoked.iter().map(|t| entry(t, true, None)));
        keys.extend(self.expired.iter().map(|t| entry(t, false, Some("2020-01-01T00:00:00Z"))));
        serde_json::json!({ "keys": keys })
    }

    /// Writes `jwks.json`, `api_keys.json` and the private file into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("json");
        std::fs::write(dir.join(JWKS_FILE), pretty(&self.jwks_json()))?;
        std::fs::write(dir.join(API_KEYS_FILE), pretty(&self.api_keys_json()))?;
        std::fs::write(dir.join(PRIVATE_FILE), serde_json::to_string_pretty(self).expect("json"))
    }

    /// The `[auth]` section for key files written to `dir` by [`DevKeys::write`].
    pub fn auth_config(&self, dir: &Path) -> crate::config::AuthConfig {
        crate::config::AuthConfig {
            jwks_path: dir.join(JWKS_FILE),
            api_keys_path: dir.join(API_KEYS_FILE),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            ..crate::config::AuthConfig::default()
        }
    }

    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(dir.join(PRIVATE_FILE))?;
        serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Standard claims for `tenant`, valid from `now - 60` to `now + ttl`.
    pub fn claims(&self, tenant: &Tenant, now: i64, ttl: i64) -> serde_json::Value {
        serde_json::json!({
            "iss": self.issuer, "aud": [self.audience, "other"], "iat": now - 60, "nbf": now - 60,
            "exp": now + ttl, "org_id": tenant.org_id, "project_id": tenant.project_id,
            "scope": "ingest read", "sub": "sdk",
        })
    }

    /// A compact JWS over `claims` with the Ed25519 key.
    pub fn sign_eddsa(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.ed25519_kid});
        let signing_input = signing_input(&header, claims);
        let sig = self.signing_key().sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    /// A compact JWS over `claims` with the HS256 secret.
    pub fn sign_hs256(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": self.hs256_kid});
        sign_hs256_with(&header, claims, &self.hs_secret())
    }

    /// The Ed25519 public key bytes: an attacker who knows the *public* Ed25519 key might try to use it as an
    /// HMAC secret (algorithm confusion); tests build such tokens with this.
    pub fn ed25519_public_bytes(&self) -> Vec<u8> {
        self.signing_key().verifying_key().as_bytes().to_vec()
    }
}

pub fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()))
}

pub fn sign_hs256_with(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
    let input = signing_input(header, claims);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key size");
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// `Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Basic base64(pk:sk)`.
pub fn basic(t: &Tenant) -> String {
    format!("Basic {}", STANDARD.encode(format!("{}:{}", t.public_key, t.secret_key)))
}
