//! OIDC identity providers (PRODUCT.md §2): key sets over HTTP from a local stand-in IdP
//! (discovery, JWKS, rotation, outage, slow answers, `Cache-Control`), tokens signed by PyJWT
//! with `cryptography` (an independent implementation; scripts/jwt_tokens.py), verified by the
//! worker's verifier. No Kafka or ClickHouse needed.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally::config::{AuthConfig, IssuerConfig};
use tally::httpd::{self, Reply, Request};
use tally::reject::Reason;
use tally::verify::{Credential, Verifier};

const MAIN: &str = "https://idp.tally.test/realms/acme";
const AZURE: &str = "https://login.tally.test/tenant-x/v2.0";
const DEX: &str = "https://dex.customer.test/dex";

/// What the stand-in IdP serves, and how.
#[derive(Default)]
struct IdpState {
    jwks: Value,
    cache_control: Option<String>,
    /// Answer 503 to everything.
    down: bool,
    /// Wait this long before answering.
    delay: Duration,
    /// Where `/moved` redirects (302).
    redirect_to: String,
    discovery_requests: u64,
    jwks_requests: u64,
}

struct Idp {
    url: String,
    state: Arc<Mutex<IdpState>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Idp {
    fn start(issuer: &str, jwks: Value) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(IdpState { jwks, ..IdpState::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, base, iss) = (Arc::clone(&state), url.clone(), issuer.to_string());
        let handler = Arc::new(move |req: Request| -> Reply {
            let (down, delay) = {
                let s = st.lock().unwrap();
                (s.down, s.delay)
            };
            std::thread::sleep(delay);
            let mut s = st.lock().unwrap();
            match req.path.as_str() {
                "/.well-known/openid-configuration" => s.discovery_requests += 1,
                "/keys" => s.jwks_requests += 1,
                _ => {}
            }
            if down {
                return Reply::json(503, &json!({"error": "temporarily_unavailable"}));
            }
            match req.path.as_str() {
                "/.well-known/openid-configuration" => {
                    Reply::json(200, &json!({"issuer": iss, "jwks_uri": format!("{base}/keys")}))
                }
                "/moved" => Reply::json(302, &json!({})).with_header("Location", &s.redirect_to),
                "/keys" => {
                    let r = Reply::json(200, &s.jwks);
                    match &s.cache_control {
                        Some(c) => r.with_header("Cache-Control", c),
                        None => r,
                    }
                }
                _ => Reply::json(404, &json!({"error": "not_found"})),
            }
        });
        let stop2 = Arc::clone(&stop);
        std::thread::spawn(move || httpd::serve(listener, stop2, handler));
        Idp { url, state, stop }
    }

    fn set(&self, f: impl FnOnce(&mut IdpState)) {
        f(&mut self.state.lock().unwrap());
    }

    fn jwks_requests(&self) -> u64 {
        self.state.lock().unwrap().jwks_requests
    }
}

/// Keys and tokens made by PyJWT: (public JWKS, tokens by name).
fn pyjwt(request: Value) -> (Value, HashMap<String, String>) {
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = std::process::Command::new(format!("{root}/scripts/venv.sh")).output().unwrap();
    assert!(venv.status.success(), "scripts/venv.sh: {}", String::from_utf8_lossy(&venv.stderr));
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let mut child = std::process::Command::new(python)
        .arg(format!("{root}/scripts/jwt_tokens.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jwt_tokens.py failed");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens =
        v["tokens"].as_object().unwrap().iter().map(|(k, t)| (k.clone(), t.as_str().unwrap().to_string())).collect();
    (v["jwks"].clone(), tokens)
}

fn now() -> i64 {
    tally::source::worker::now_secs()
}

fn claims(iss: &str, org: &str) -> Value {
    json!({"iss": iss, "aud": "tally-ingest", "exp": now() + 3600, "iat": now() - 10,
           "org_id": org, "project_id": format!("{org}-p"), "scope": "openid ingest"})
}

fn check(v: &mut Verifier, token: &str) -> Result<(String, String), Reason> {
    let header = format!("Bearer {token}");
    v.verify(Credential::One(header.as_bytes()), now()).map(|p| (p.org_id.to_string(), p.project_id.to_string()))
}

fn auth(main_discovery: &str, issuers: Vec<IssuerConfig>) -> AuthConfig {
    AuthConfig {
        jwks_path: "".into(),
        api_keys_path: "".into(),
        issuer: MAIN.into(),
        oidc_issuer_url: main_discovery.into(),
        issuers,
        jwks_refetch_min_secs: 1,
        jwks_cache_secs: 300,
        jwks_timeout_ms: 500,
        reload_interval_secs: 0,
        ..AuthConfig::default()
    }
}

/// RS256, ES256 and EdDSA tokens verified with keys found through discovery; a second issuer
/// with Azure-style claim names; rotation picked up on a `kid` miss; a flood of forged `kid`s
/// limited to the configured refetch rate; the cached set serving through an outage and a slow
/// IdP; algorithm confusion between RSA, EC, OKP and oct keys refused.
#[test]
fn identity_providers_rotate_fail_and_are_not_confused() {
    let mut tokens_req = vec![
        json!({"name": "rsa", "kid": "rsa-1", "alg": "RS256", "claims": claims(MAIN, "org-rsa")}),
        json!({"name": "ec", "kid": "ec-1", "alg": "ES256", "claims": claims(MAIN, "org-ec")}),
        json!({"name": "ec-later", "kid": "ec-1", "alg": "ES256", "claims": claims(MAIN, "org-ec2")}),
        json!({"name": "okp", "kid": "okp-1", "alg": "EdDSA", "claims": claims(MAIN, "org-okp")}),
        json!({"name": "rotated", "kid": "rsa-2", "alg": "RS256", "claims": claims(MAIN, "org-new")}),
        json!({"name": "rotated-later", "kid": "rsa-2", "alg": "RS256", "claims": claims(MAIN, "org-new2")}),
        // Algorithm confusion: each forged or signed with a key of another type than its kid's.
        json!({"name": "hs-with-rsa-public-key", "kid": "rsa-1", "forge": "hs256-public-pem", "claims": claims(MAIN, "evil")}),
        json!({"name": "alg-none", "kid": "rsa-1", "forge": "none", "claims": claims(MAIN, "evil")}),
        json!({"name": "rs-with-ec-kid", "kid": "ec-1", "sign_with": "rsa-1", "alg": "RS256", "claims": claims(MAIN, "evil")}),
        json!({"name": "es-with-okp-kid", "kid": "okp-1", "sign_with": "ec-1", "alg": "ES256", "claims": claims(MAIN, "evil")}),
        json!({"name": "eddsa-with-rsa-kid", "kid": "rsa-1", "sign_with": "okp-1", "alg": "EdDSA", "claims": claims(MAIN, "evil")}),
        json!({"name": "hs-with-oct-unpublished", "kid": "oct-1", "alg": "HS256", "claims": claims(MAIN, "evil")}),
        // Azure AD style: org in `tid`, project in `azp`, scopes in `scp`.
        json!({"name": "azure", "kid": "az-1", "alg": "RS256", "claims": {
            "iss": AZURE, "aud": "tally-ingest", "exp": now() + 3600, "tid": "org-az", "azp": "proj-az", "scp": "read ingest"}}),
        // The same issuer naming an org it is not allowed to (its entry lists only org-az).
        json!({"name": "azure-other-org", "kid": "az-1", "alg": "RS256", "claims": {
            "iss": AZURE, "aud": "tally-ingest", "exp": now() + 3600, "tid": "org-ec", "azp": "proj-az", "scp": "read ingest"}}),
        json!({"name": "azure-no-scope", "kid": "az-1", "alg": "RS256", "claims": {
            "iss": AZURE, "aud": "tally-ingest", "exp": now() + 3600, "tid": "org-az", "azp": "proj-az", "scp": "read"}}),
        // Dex style: the customer's own IdP (org fixed by the issuer entry), one client per project
        // (`azp`), tally's audience by cross-client trust, the scope as a group.
        json!({"name": "dex", "kid": "dex-1", "alg": "RS256", "claims": {
            "iss": DEX, "aud": ["proj-dex", "tally-ingest"], "azp": "proj-dex", "exp": now() + 3600,
            "groups": ["devs", "tally-ingest"], "org_id": "someone-elses-org"}}),
        json!({"name": "azure-claims-at-main", "kid": "az-1", "alg": "RS256", "claims": claims(AZURE, "org-az")}),
        json!({"name": "main-kid-as-azure", "kid": "rsa-1", "alg": "RS256", "claims": {
            "iss": AZURE, "aud": "tally-ingest", "exp": now() + 3600, "tid": "org-az", "azp": "proj-az", "scp": "ingest"}}),
    ];
    for i in 0..60 {
        tokens_req.push(json!({"name": format!("forged-{i}"), "kid": format!("forged-kid-{i}"), "sign_with": "rsa-1", "alg": "RS256", "claims": claims(MAIN, "evil")}));
    }
    let keys = json!([
        {"kid": "rsa-1", "kty": "RSA"}, {"kid": "ec-1", "kty": "EC"}, {"kid": "okp-1", "kty": "OKP"},
        {"kid": "rsa-2", "kty": "RSA"}, {"kid": "oct-1", "kty": "oct"}, {"kid": "az-1", "kty": "RSA"},
        {"kid": "enc-1", "kty": "RSA", "use": "enc", "alg": "RSA-OAEP"}, {"kid": "dex-1", "kty": "RSA"}
    ]);
    let (jwks, t) = pyjwt(json!({"keys": keys, "tokens": tokens_req}));
    let by_kid = |kids: &[&str]| -> Value {
        json!({"keys": jwks["keys"].as_array().unwrap().iter().filter(|k| kids.contains(&k["kid"].as_str().unwrap())).cloned().collect::<Vec<_>>()})
    };
    // The main IdP publishes an encryption key too (skipped, not an error), found by discovery.
    let main = Idp::start(MAIN, by_kid(&["rsa-1", "ec-1", "okp-1", "enc-1"]));
    let azure = Idp::start(AZURE, by_kid(&["az-1"]));
    let dex = Idp::start(DEX, by_kid(&["dex-1"]));
    let cfg = auth(
        &main.url,
        vec![
            IssuerConfig {
                issuer: AZURE.into(),
                oidc_issuer_url: String::new(),
                jwks_url: format!("{}/keys", azure.url),
                audience: "tally-ingest".into(),
                org_claim: "tid".into(),
                org_id: None,
                orgs: vec!["org-az".into()],
                any_org: false,
                project_claim: "azp".into(),
                scope_claim: "scp".into(),
                required_scope: "ingest".into(),
            },
            IssuerConfig {
                issuer: DEX.into(),
                oidc_issuer_url: dex.url.clone(),
                jwks_url: String::new(),
                audience: "tally-ingest".into(),
                org_claim: "org_id".into(),
                org_id: Some("org-dex".into()),
                orgs: Vec::new(),
                any_org: false,
                project_claim: "azp".into(),
                scope_claim: "groups".into(),
                required_scope: "tally-ingest".into(),
            },
        ],
    );
    let mut v = Verifier::from_config(&cfg).unwrap();
    assert!(v.unready_issuers().is_empty());
    assert_eq!(main.state.lock().unwrap().discovery_requests, 1, "jwks_uri found by discovery");

    for (name, org) in [("rsa", "org-rsa"), ("ec", "org-ec"), ("okp", "org-okp")] {
        assert_eq!(check(&mut v, &t[name]), Ok((org.to_string(), format!("{org}-p"))), "{name}");
    }
    assert_eq!(check(&mut v, &t["azure"]), Ok(("org-az".into(), "proj-az".into())), "Azure claim names");
    assert_eq!(check(&mut v, &t["azure-no-scope"]), Err(Reason::ForbiddenScope));
    assert_eq!(
        check(&mut v, &t["azure-other-org"]),
        Err(Reason::InvalidCredentials),
        "an issuer names only the orgs its entry lists"
    );
    assert_eq!(check(&mut v, &t["dex"]), Ok(("org-dex".into(), "proj-dex".into())), "org fixed by the issuer entry");
    assert_eq!(check(&mut v, &t["azure-claims-at-main"]), Err(Reason::InvalidCredentials), "org claim named tid there");
    let before = main.jwks_requests();
    for forged in [
        "hs-with-rsa-public-key",
        "alg-none",
        "rs-with-ec-kid",
        "es-with-okp-kid",
        "eddsa-with-rsa-kid",
        "main-kid-as-azure",
    ] {
        assert_eq!(check(&mut v, &t[forged]), Err(Reason::InvalidCredentials), "{forged}");
    }
    assert_eq!(main.jwks_requests(), before, "a known kid with the wrong algorithm fetches nothing");

    // Rotation: the IdP now signs with rsa-2; the first token naming it triggers a refetch.
    std::thread::sleep(Duration::from_millis(1_100)); // past jwks_refetch_min_secs since the start
    main.set(|s| {
        s.jwks = by_kid(&["rsa-2", "ec-1", "okp-1"]);
        s.cache_control = Some("public, max-age=1".into()); // stale a second after each fetch
    });
    assert_eq!(check(&mut v, &t["rotated"]), Ok(("org-new".into(), "org-new-p".into())), "picked up by kid miss");

    // A flood of forged kids: at most one refetch per jwks_refetch_min_secs (1 s).
    let (start, before) = (Instant::now(), main.jwks_requests());
    for round in 0..2 {
        for i in 0..30 {
            assert_eq!(check(&mut v, &t[&format!("forged-{}", round * 30 + i)]), Err(Reason::InvalidCredentials));
        }
        if round == 0 {
            std::thread::sleep(Duration::from_millis(1_100));
        }
    }
    let fetched = main.jwks_requests() - before;
    let allowed = 1 + start.elapsed().as_secs();
    assert!(fetched <= allowed, "60 forged kids in {:?} caused {fetched} fetches (allowed {allowed})", start.elapsed());
    eprintln!(
        "[measure] 60 tokens with forged kids over {:.1} s: {fetched} JWKS fetches",
        start.elapsed().as_secs_f64()
    );

    // Outage: the IdP answers 503; a refresh fails, the last good set keeps serving.
    main.set(|s| s.down = true);
    let before = main.jwks_requests();
    std::thread::sleep(Duration::from_millis(1_100));
    v.maybe_reload(Instant::now()).unwrap(); // the set is stale (max-age=1): a refresh is due
    assert!(main.jwks_requests() > before, "a refresh was tried");
    assert_eq!(
        check(&mut v, &t["ec-later"]),
        Ok(("org-ec2".into(), "org-ec2-p".into())),
        "served from the last good set"
    );

    // Slow: answers after the timeout count as failures; known keys keep working meanwhile.
    main.set(|s| {
        s.down = false;
        s.delay = Duration::from_millis(2_000);
    });
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(check(&mut v, &t["hs-with-oct-unpublished"]), Err(Reason::InvalidCredentials), "unknown kid, slow IdP");
    assert_eq!(check(&mut v, &t["rotated-later"]), Ok(("org-new2".into(), "org-new2-p".into())));
    main.set(|s| s.delay = Duration::ZERO);
}

/// `Cache-Control: max-age` decides when a set is fetched again (within the refetch limit).
#[test]
fn cache_control_max_age_is_honoured() {
    let (jwks, t) = pyjwt(json!({
        "keys": [{"kid": "ec-1", "kty": "EC"}],
        "tokens": [{"name": "ec", "kid": "ec-1", "alg": "ES256", "claims": claims(MAIN, "org-ec")}]
    }));
    for (cache_control, refetched) in [("public, max-age=1", true), ("public, max-age=600", false)] {
        let idp = Idp::start(MAIN, jwks.clone());
        idp.set(|s| s.cache_control = Some(cache_control.into()));
        let mut v = Verifier::from_config(&AuthConfig { jwks_cache_secs: 1, ..auth(&idp.url, vec![]) }).unwrap();
        assert_eq!(check(&mut v, &t["ec"]), Ok(("org-ec".into(), "org-ec-p".into())));
        std::thread::sleep(Duration::from_millis(1_200));
        v.maybe_reload(Instant::now()).unwrap();
        assert_eq!(idp.jwks_requests() > 1, refetched, "{cache_control}");
    }
}

/// A key set is fetched over https or from loopback only, and so is every redirect target: ureq
/// followed redirects itself, from https to plain http too, and the URL was checked before the
/// first request only (found by a review). A redirect within loopback is followed; one to a plain
/// http host is refused before it is requested, and the last good set keeps serving.
#[test]
fn redirects_to_plain_http_are_refused() {
    use tally::verify::jwks::{RemoteConfig, RemoteJwks};
    let (jwks, _) = pyjwt(json!({"keys": [{"kid": "r1", "kty": "RSA"}], "tokens": []}));
    let idp = Idp::start(MAIN, jwks);
    idp.set(|s| s.redirect_to = format!("{}/keys", idp.url));
    let mut remote = RemoteJwks::new(RemoteConfig {
        issuer: MAIN.into(),
        discovery_url: String::new(),
        jwks_url: format!("{}/moved", idp.url),
        min_refetch: Duration::ZERO,
        default_max_age: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    });
    assert!(remote.fetch(std::time::Instant::now()).is_ok());
    assert_eq!((remote.keys().len(), idp.jwks_requests()), (1, 1), "the loopback redirect was followed");
    for target in ["http://idp.tally.test/keys", "http://127.evil.test/keys", "ftp://127.0.0.1/keys"] {
        idp.set(|s| s.redirect_to = target.to_string());
        let err = remote.fetch(std::time::Instant::now()).unwrap_err();
        assert!(err.contains(target) && (err.contains("must be https") || err.contains("not an http(s) URL")), "{err}");
        assert_eq!(remote.keys().len(), 1, "the last good set keeps serving");
    }
    assert_eq!(idp.jwks_requests(), 1);
}

/// A token whose `kid` is missing from a refetched set that did change (the provider's replica or
/// CDN behind its signer) is refused, not cached: once the key is published, its next use after
/// `jwks_refetch_min_secs` is accepted (the refusal was cached until the cache was next cleared;
/// found by a review).
#[test]
fn a_kid_still_missing_after_a_refetch_is_asked_again() {
    let (jwks, t) = pyjwt(json!({
        "keys": [{"kid": "rsa-1", "kty": "RSA"}, {"kid": "rsa-2", "kty": "RSA"}, {"kid": "rsa-3", "kty": "RSA"}],
        "tokens": [
            {"name": "old", "kid": "rsa-1", "alg": "RS256", "claims": claims(MAIN, "org-a")},
            {"name": "new", "kid": "rsa-3", "alg": "RS256", "claims": claims(MAIN, "org-b")},
        ],
    }));
    let by_kid = |kids: &[&str]| -> Value {
        json!({"keys": jwks["keys"].as_array().unwrap().iter().filter(|k| kids.contains(&k["kid"].as_str().unwrap())).cloned().collect::<Vec<_>>()})
    };
    let idp = Idp::start(MAIN, by_kid(&["rsa-1"]));
    let mut v = Verifier::from_config(&auth(&idp.url, Vec::new())).unwrap();
    assert_eq!(check(&mut v, &t["old"]), Ok(("org-a".into(), "org-a-p".into())));
    // The set changes (rsa-2 added) but rsa-3 is not in it yet.
    idp.set(|s| s.jwks = by_kid(&["rsa-1", "rsa-2"]));
    std::thread::sleep(Duration::from_millis(1_100)); // past jwks_refetch_min_secs
    assert_eq!(check(&mut v, &t["new"]), Err(Reason::InvalidCredentials));
    assert_eq!(idp.jwks_requests(), 2, "the unknown kid refetched the set");
    idp.set(|s| s.jwks = by_kid(&["rsa-1", "rsa-2", "rsa-3"]));
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(check(&mut v, &t["new"]), Ok(("org-b".into(), "org-b-p".into())));
}
