use std::time::{Duration, Instant};

use super::*;
use crate::devkeys::{basic, bearer, sign_hs256_with, DevKeys};

const NOW: i64 = 1_795_860_000;

struct Fixture {
    dir: PathBuf,
    keys: DevKeys,
    verifier: Verifier,
}

fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("tally-verify-{name}-{}", std::process::id()));
    let keys = DevKeys::generate(2, 2, "https://issuer.test", "tally-ingest");
    keys.write(&dir).unwrap();
    let cfg = AuthConfig { reload_interval_secs: 0, ..keys.auth_config(&dir) };
    let verifier = Verifier::from_config(&cfg).unwrap();
    Fixture { dir, keys, verifier }
}

impl Fixture {
    fn check(&mut self, header: &str) -> Result<Principal, Reason> {
        self.verifier.verify(Some(header.as_bytes()), NOW)
    }
    fn claims(&self) -> serde_json::Value {
        self.keys.claims(&self.keys.tenants[1], NOW, 3600)
    }
}

fn principal(org: &str, project: &str) -> Principal {
    Principal { org_id: org.into(), project_id: project.into() }
}

#[test]
fn good_eddsa_and_hs256_tokens_attribute_the_tenant() {
    let mut f = fixture("good");
    let c = f.claims();
    let want = principal("org-000", "proj-000-01");
    assert_eq!(f.check(&bearer(&f.keys.sign_eddsa(&c))), Ok(want.clone()));
    assert_eq!(f.check(&bearer(&f.keys.sign_hs256(&c))), Ok(want));
}

#[test]
fn forged_and_malformed_tokens_are_invalid() {
    let mut f = fixture("forged");
    let c = f.claims();
    let good = f.keys.sign_eddsa(&c);
    // Same header and signature, payload claims another project.
    let mut other = c.clone();
    other["project_id"] = "proj-001-00".into();
    let forged_payload = crate::devkeys::signing_input(&serde_json::json!({"alg":"EdDSA","kid":"ed-1"}), &other);
    let sig = good.rsplit('.').next().unwrap();
    for t in [
        format!("{}.{sig}", forged_payload),
        format!("{}x", &good[..good.len() - 1]),
        "not.a.jwt".into(),
        "a.b".into(),
        good.replace('.', ""),
    ] {
        assert_eq!(f.check(&bearer(&t)), Err(Reason::InvalidCredentials), "{t}");
    }
    for h in ["Token abc", "Bearer", "Basic !!!", "Basic Zm9v"] {
        assert_eq!(f.check(h), Err(Reason::InvalidCredentials), "{h}");
    }
}

#[test]
fn unknown_kid_alg_none_and_algorithm_confusion_are_invalid() {
    let mut f = fixture("alg");
    let c = f.claims();
    let hs = f.keys.hs_secret_for_tests();
    let unknown_kid = sign_hs256_with(&serde_json::json!({"alg":"HS256","kid":"nope"}), &c, &hs);
    let none = format!("{}.", crate::devkeys::signing_input(&serde_json::json!({"alg":"none","kid":"hs-1"}), &c));
    // HS256 with the Ed25519 public key as secret, naming the Ed25519 kid.
    let confused =
        sign_hs256_with(&serde_json::json!({"alg":"HS256","kid":"ed-1"}), &c, &f.keys.ed25519_public_bytes());
    // HS256 header on the oct key but "EdDSA" claimed: alg must match the key type.
    let switched = sign_hs256_with(&serde_json::json!({"alg":"EdDSA","kid":"hs-1"}), &c, &hs);
    let no_kid = sign_hs256_with(&serde_json::json!({"alg":"HS256"}), &c, &hs);
    for t in [unknown_kid, none, confused, switched, no_kid] {
        assert_eq!(f.check(&bearer(&t)), Err(Reason::InvalidCredentials), "{t}");
    }
}

#[test]
fn claims_are_enforced() {
    let mut f = fixture("claims");
    let base = f.claims();
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v;
        }
        c
    };
    let cases = [
        (with("iss", "https://evil".into()), Reason::InvalidCredentials),
        (with("aud", "someone-else".into()), Reason::InvalidCredentials),
        (with("aud", serde_json::Value::Null), Reason::InvalidCredentials),
        (with("exp", serde_json::Value::Null), Reason::InvalidCredentials),
        (with("org_id", serde_json::Value::Null), Reason::InvalidCredentials),
        (with("project_id", 5.into()), Reason::InvalidCredentials),
        (with("exp", (NOW - 61).into()), Reason::ExpiredCredentials),
        (with("nbf", (NOW + 61).into()), Reason::InvalidCredentials),
        (with("iat", (NOW + 3600).into()), Reason::InvalidCredentials),
        (with("scope", "read write".into()), Reason::ForbiddenScope),
        (with("scope", serde_json::Value::Null), Reason::ForbiddenScope),
    ];
    for (claims, want) in cases {
        assert_eq!(f.check(&bearer(&f.keys.sign_eddsa(&claims))), Err(want), "{claims}");
    }
    // Within the leeway both ways.
    assert!(f.check(&bearer(&f.keys.sign_eddsa(&with("exp", (NOW - 30).into())))).is_ok());
    assert!(f.check(&bearer(&f.keys.sign_eddsa(&with("nbf", (NOW + 30).into())))).is_ok());
    // "aud" as a single string.
    assert!(f.check(&bearer(&f.keys.sign_eddsa(&with("aud", "tally-ingest".into())))).is_ok());
}

#[test]
fn cached_verdicts_are_never_honoured_past_exp() {
    let mut f = fixture("cache");
    let mut c = f.claims();
    c["exp"] = (NOW + 10).into();
    let h = bearer(&f.keys.sign_eddsa(&c));
    assert!(f.verifier.verify(Some(h.as_bytes()), NOW).is_ok());
    assert!(f.verifier.verify(Some(h.as_bytes()), NOW + 5).is_ok());
    assert_eq!(f.verifier.verify(Some(h.as_bytes()), NOW + 10 + 60), Err(Reason::ExpiredCredentials));
    assert_eq!((f.verifier.cache_hits, f.verifier.cache_misses), (2, 1));
}

#[test]
fn api_keys_verify_in_constant_time_against_hashes() {
    let mut f = fixture("api");
    let t = f.keys.tenants[2].clone();
    assert_eq!(f.check(&basic(&t)), Ok(principal(&t.org_id, &t.project_id)));
    let mut wrong = t.clone();
    wrong.secret_key.push('x');
    assert_eq!(f.check(&basic(&wrong)), Err(Reason::InvalidCredentials));
    let mut unknown = t.clone();
    unknown.public_key = "pk-lf-unknown".into();
    assert_eq!(f.check(&basic(&unknown)), Err(Reason::InvalidCredentials));
    let revoked = f.keys.revoked[0].clone();
    assert_eq!(f.check(&basic(&revoked)), Err(Reason::RevokedCredentials));
    let expired = f.keys.expired[0].clone();
    assert_eq!(f.check(&basic(&expired)), Err(Reason::ExpiredCredentials));
    assert_eq!(f.verifier.verify(None, NOW), Err(Reason::MissingCredentials));
    assert_eq!(f.verifier.verify(Some(b"  "), NOW), Err(Reason::MissingCredentials));
}

#[test]
fn revocation_and_rotation_take_effect_on_reload() {
    let mut f = fixture("reload");
    let t = f.keys.tenants[0].clone();
    let token = bearer(&f.keys.sign_eddsa(&f.keys.claims(&t, NOW, 3600)));
    assert!(f.check(&basic(&t)).is_ok());
    assert!(f.check(&token).is_ok());

    // Revoke the API key and rotate the signing keys (new kids, old ones gone).
    let mut rotated = DevKeys::generate(2, 2, "https://issuer.test", "tally-ingest");
    rotated.ed25519_kid = "ed-2".into();
    rotated.hs256_kid = "hs-2".into();
    rotated.tenants = f.keys.tenants.clone();
    rotated.revoked.push(t.clone());
    rotated.tenants.retain(|x| x.public_key != t.public_key);
    rotated.write(&f.dir).unwrap();

    assert!(f.verifier.maybe_reload(Instant::now() + Duration::from_secs(1)).unwrap());
    assert_eq!(f.check(&basic(&t)), Err(Reason::RevokedCredentials));
    assert_eq!(f.check(&token), Err(Reason::InvalidCredentials), "old kid no longer accepted");
    let new_token = bearer(&rotated.sign_eddsa(&rotated.claims(&t, NOW, 3600)));
    assert!(f.check(&new_token).is_ok(), "new kid accepted");
    // Nothing changed: no reload.
    assert!(!f.verifier.maybe_reload(Instant::now() + Duration::from_secs(2)).unwrap());
}

#[test]
fn a_broken_key_file_keeps_the_old_keys() {
    let mut f = fixture("broken");
    let t = f.keys.tenants[0].clone();
    std::fs::write(f.dir.join(crate::devkeys::API_KEYS_FILE), "{not json").unwrap();
    assert!(f.verifier.maybe_reload(Instant::now() + Duration::from_secs(1)).is_err());
    assert!(f.check(&basic(&t)).is_ok());
}
