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
        self.verifier.verify(Credential::One(header.as_bytes()), NOW)
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
    assert!(f.verifier.verify(Credential::One(h.as_bytes()), NOW).is_ok());
    assert!(f.verifier.verify(Credential::One(h.as_bytes()), NOW + 5).is_ok());
    assert_eq!(f.verifier.verify(Credential::One(h.as_bytes()), NOW + 10 + 60), Err(Reason::ExpiredCredentials));
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
    assert_eq!(f.verifier.verify(Credential::Missing, NOW), Err(Reason::MissingCredentials));
    assert_eq!(f.verifier.verify(Credential::One(b"  "), NOW), Err(Reason::MissingCredentials));
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

/// HS256 over a payload written by hand (what `serde_json::Value` cannot express: repeated
/// keys, numbers beyond f64).
fn sign_raw(f: &Fixture, header: &str, payload: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&f.keys.hs_secret_for_tests()).unwrap();
    mac.update(input.as_bytes());
    bearer(&format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())))
}

/// Issue 7, row 7 and its kind: numeric claims of any size or form never overflow or panic; a
/// far-future `exp` is simply valid, a far-future `nbf` simply not yet.
#[test]
fn numeric_claims_of_any_size_never_overflow() {
    let mut f = fixture("numeric");
    let t = f.keys.tenants[1].clone();
    let t = &t;
    let claims = |exp: &str, extra: &str| {
        format!(
            r#"{{"iss":"https://issuer.test","aud":"tally-ingest","exp":{exp},"org_id":"{}","project_id":"{}","scope":"ingest"{extra}}}"#,
            t.org_id, t.project_id
        )
    };
    let h = r#"{"alg":"HS256","kid":"hs-1"}"#;
    let want = Ok(principal(&t.org_id, &t.project_id));
    for exp in ["9223372036854775807", "9223372036854775808", "18446744073709551616", "1e19", "1e400", "1.7e308"] {
        let token = sign_raw(&f, h, &claims(exp, ""));
        assert_eq!(f.check(&token), want, "exp {exp}");
        // At any message time, however large.
        assert_eq!(f.verifier.verify(Credential::One(token.as_bytes()), i64::MAX - 1), want, "exp {exp} at i64::MAX");
    }
    for (exp, extra, reason) in [
        ("-9223372036854775808", "", Reason::ExpiredCredentials),
        ("-1e400", "", Reason::ExpiredCredentials),
        (&*(NOW + 3600).to_string(), r#","nbf":1e400"#, Reason::InvalidCredentials),
        (&*(NOW + 3600).to_string(), r#","nbf":9223372036854775807"#, Reason::InvalidCredentials),
        (&*(NOW + 3600).to_string(), r#","iat":-1e400"#, Reason::ExpiredCredentials),
        (r#""1700000000""#, "", Reason::InvalidCredentials),
        ("true", "", Reason::InvalidCredentials),
    ] {
        let token = sign_raw(&f, h, &claims(exp, extra));
        let got = f.check(&token);
        if reason == Reason::ExpiredCredentials && extra.contains("iat") {
            // A very old `iat` is no objection.
            assert_eq!(got, want, "iat {extra}");
        } else {
            assert_eq!(got, Err(reason), "exp {exp} {extra}");
        }
    }
    // Fractions round down (RFC 7519 NumericDate).
    let token = sign_raw(&f, h, &claims(&format!("{NOW}.999"), ""));
    assert_eq!(f.verifier.verify(Credential::One(token.as_bytes()), NOW - 61), want);
}

/// Repeated keys in the JOSE header or the claims make a token invalid: which copy counts must
/// never be a parser's choice (e.g. a second `org_id`).
#[test]
fn repeated_claims_or_header_keys_are_invalid() {
    let mut f = fixture("dupclaims");
    let t = f.keys.tenants[1].clone();
    let t = &t;
    let base = format!(
        r#""iss":"https://issuer.test","aud":"tally-ingest","exp":{},"project_id":"{}","scope":"ingest""#,
        NOW + 3600,
        t.project_id
    );
    let h = r#"{"alg":"HS256","kid":"hs-1"}"#;
    let ok = sign_raw(&f, h, &format!(r#"{{{base},"org_id":"{}"}}"#, t.org_id));
    assert!(f.check(&ok).is_ok());
    for (header, payload) in [
        (h.to_string(), format!(r#"{{{base},"org_id":"{}","org_id":"org-001"}}"#, t.org_id)),
        (h.to_string(), format!(r#"{{{base},"org_id":"{}","exp":1}}"#, t.org_id)),
        (r#"{"alg":"HS256","kid":"hs-1","kid":"ed-1"}"#.to_string(), format!(r#"{{{base},"org_id":"{}"}}"#, t.org_id)),
        (r#"{"alg":"none","alg":"HS256","kid":"hs-1"}"#.to_string(), format!(r#"{{{base},"org_id":"{}"}}"#, t.org_id)),
    ] {
        assert_eq!(f.check(&sign_raw(&f, &header, &payload)), Err(Reason::InvalidCredentials), "{header} {payload}");
    }
    // Escapes in the header are read, not refused.
    let escaped = sign_raw(
        &f,
        r#"{"alg":"HS\u0032\u00356","kid":"hs\u002d1"}"#,
        &format!(r#"{{{base},"org_id":"{}"}}"#, t.org_id),
    );
    assert!(f.check(&escaped).is_ok());
    // Tenant ids are bounded (they are stored with every row and sent in every look-up).
    let long = "o".repeat(MAX_TENANT_ID_BYTES + 1);
    assert_eq!(f.check(&sign_raw(&f, h, &format!(r#"{{{base},"org_id":"{long}"}}"#))), Err(Reason::InvalidCredentials));
}

/// Issue 7, row 8 and its kind: exactly one credential per message, whatever the header order
/// or the case of the header names.
#[test]
fn one_credential_per_message() {
    let mut f = fixture("headers");
    let a = basic(&f.keys.tenants[0]);
    let b = bearer(&f.keys.sign_eddsa(&f.claims()));
    let h = |pairs: &[(&'static str, Option<&'static str>)]| {
        Credential::from_headers(pairs.iter().map(|(k, v)| (*k, v.map(str::as_bytes))))
    };
    let (a, b): (&'static str, &'static str) = (Box::leak(a.into_boxed_str()), Box::leak(b.into_boxed_str()));
    assert_eq!(h(&[]), Credential::Missing);
    assert_eq!(h(&[("x-other", Some(a))]), Credential::Missing);
    assert_eq!(h(&[("authorization", Some(a))]), Credential::One(a.as_bytes()));
    assert_eq!(
        h(&[("AUTHORIZATION", Some(a)), ("x", None), ("Authorization", Some(a))]),
        Credential::One(a.as_bytes())
    );
    assert_eq!(h(&[("authorization", Some(a)), ("Authorization", Some(b))]), Credential::Conflicting);
    assert_eq!(h(&[("Authorization", Some(b)), ("authorization", Some(a))]), Credential::Conflicting);
    assert_eq!(h(&[("authorization", Some(a)), ("authorization", None)]), Credential::Conflicting);
    assert_eq!(
        h(&[("authorization", Some(a)), ("authorization", Some(a)), ("authorization", Some(b))]),
        Credential::Conflicting
    );
    assert_eq!(
        f.verifier.verify(h(&[("authorization", Some(a)), ("Authorization", Some(b))]), NOW),
        Err(Reason::InvalidCredentials)
    );
    assert_eq!(f.verifier.verify(h(&[("authorization", None)]), NOW), Err(Reason::MissingCredentials));
    assert!(f.verifier.verify(h(&[("authorization", Some(b)), ("AUTHORIZATION", Some(b))]), NOW).is_ok());
}

#[test]
fn usage_scopes_never_widen_ingest() {
    let mut f = fixture("scopes");
    let mut c = f.claims();
    // An org-wide token (no project claim) reads usage but cannot produce events.
    c.as_object_mut().unwrap().remove("project_id");
    c["scope"] = "ingest usage:read".into();
    let org_wide = bearer(&f.keys.sign_eddsa(&c));
    assert_eq!(f.check(&org_wide), Err(Reason::InvalidCredentials));
    let (p, s) = f.verifier.verify_scopes(Credential::One(org_wide.as_bytes()), NOW).unwrap();
    assert_eq!((&*p.org_id, &*p.project_id), (f.keys.tenants[1].org_id.as_str(), ""));
    assert!(s.contains(Scopes::USAGE_READ) && s.contains(Scopes::INGEST));
    // A usage token without `ingest` is still refused for ingest, as before the usage scopes.
    let mut c = f.claims();
    c["scope"] = "usage:admin".into();
    let admin = bearer(&f.keys.sign_eddsa(&c));
    assert_eq!(f.check(&admin), Err(Reason::ForbiddenScope));
    let (_, s) = f.verifier.verify_scopes(Credential::One(admin.as_bytes()), NOW).unwrap();
    assert!(s.contains(Scopes::USAGE_ADMIN) && !s.contains(Scopes::INGEST));
    // An empty project claim is not "org-wide": it is invalid.
    let mut c = f.claims();
    c["project_id"] = "".into();
    assert_eq!(f.check(&bearer(&f.keys.sign_eddsa(&c))), Err(Reason::InvalidCredentials));
    // API key pairs read their project's usage, never more.
    let (p, s) = f.verifier.verify_scopes(Credential::One(basic(&f.keys.tenants[0]).as_bytes()), NOW).unwrap();
    assert!(!p.project_id.is_empty());
    assert_eq!(s, Scopes::API_KEY);
}

#[test]
fn only_the_main_issuer_grants_usage_admin() {
    let policies = |grants_admin| {
        vec![jwt::IssuerPolicy {
            issuer: "https://customer-dex.example".into(),
            audience: "tally-api".into(),
            org_claim: "org_id".into(),
            fixed_org: Some("org-dex".into()),
            orgs: None,
            project_claim: "project_id".into(),
            scope_claim: "groups".into(),
            required_scope: "ingest".into(),
            grants_admin,
        }]
    };
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    let key = keys::JwtKey::Hs256(secret.clone());
    let claims = serde_json::json!({
        "iss": "https://customer-dex.example", "aud": "tally-api", "exp": NOW + 60, "groups": ["usage:admin"],
    });
    let token = sign_hs256_with(&serde_json::json!({"alg": "HS256", "kid": "k"}), &claims, &secret);
    let scopes = |grants| jwt::verify(&token, &policies(grants), |_, _| Some(&key)).unwrap().scopes;
    assert!(scopes(true).contains(Scopes::USAGE_ADMIN));
    assert!(!scopes(false).contains(Scopes::USAGE_ADMIN), "a customer's IdP cannot mint admin tokens");
}

/// RFC 7515 §4.1.11: a token that lists extensions in `crit` must be refused by a recipient that
/// does not understand them, and tally understands none (the member was ignored until
/// 2026-12-01; found by a review). The same token without `crit` verifies.
#[test]
fn tokens_with_critical_extensions_are_invalid() {
    let mut f = fixture("crit");
    let t = f.keys.tenants[1].clone();
    let payload = format!(
        r#"{{"iss":"https://issuer.test","aud":"tally-ingest","exp":{},"org_id":"{}","project_id":"{}","scope":"ingest"}}"#,
        NOW + 3600,
        t.org_id,
        t.project_id
    );
    assert!(f.check(&sign_raw(&f, r#"{"alg":"HS256","kid":"hs-1"}"#, &payload)).is_ok());
    for header in [
        r#"{"alg":"HS256","kid":"hs-1","crit":["urn:x:tenant-bound"],"urn:x:tenant-bound":true}"#,
        r#"{"alg":"HS256","kid":"hs-1","crit":["b64"],"b64":false}"#,
        r#"{"alg":"HS256","kid":"hs-1","crit":[]}"#,
    ] {
        assert_eq!(f.check(&sign_raw(&f, header, &payload)), Err(Reason::InvalidCredentials), "{header}");
    }
}

/// What a provider's fetched key set may not give: an `oct` (HS256) secret, published for anyone
/// to sign with, is skipped; a `kid` that names two different keys verifies nothing while the
/// rest of the set serves; the same key listed twice is one key (found by a review: the secret was
/// used, and a repeated `kid` refused the whole set). A key file stays strict.
#[test]
fn fetched_key_sets_skip_secrets_and_ambiguous_kids() {
    use super::keys::parse_jwks_with;
    let ed = |kid: &str, x: &str| format!(r#"{{"kty":"OKP","crv":"Ed25519","kid":"{kid}","x":"{x}"}}"#);
    // Two valid Ed25519 public keys (RFC 8037 A.2 and RFC 8032 §7.1 test 2).
    let (x1, x2) = ("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "PUAXw-hDiVqStwqnTRt-vJyYLM8uxJaMwM1V8Sr0Zgw");
    let secret = r#"{"kty":"oct","kid":"hs","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0zMg"}"#;
    let set = format!(r#"{{"keys":[{},{},{},{},{}]}}"#, ed("a", x1), ed("a", x1), ed("b", x1), ed("b", x2), secret);
    let (keys, skipped) = parse_jwks_with(&set, true).unwrap();
    let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
    kids.sort_unstable();
    assert_eq!(kids, ["a"], "the repeated key is kept once; the ambiguous kid and the secret are not");
    assert_eq!(skipped, 4);
    // The ambiguous kid stays out whatever follows.
    let set = format!(r#"{{"keys":[{},{},{}]}}"#, ed("b", x1), ed("b", x2), ed("b", x1));
    assert!(parse_jwks_with(&set, true).unwrap().0.is_empty());
    // A key file: a repeated kid is an error, and a secret is what HS256 keys are for.
    assert!(parse_jwks_with(&format!(r#"{{"keys":[{},{}]}}"#, ed("a", x1), ed("a", x1)), false).is_err());
    assert_eq!(parse_jwks_with(&format!(r#"{{"keys":[{secret}]}}"#), false).unwrap().0.len(), 1);
}
