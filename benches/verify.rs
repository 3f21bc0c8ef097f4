//! Cost of one credential verification (docs/identity.md): per algorithm, uncached (every call
//! verifies the signature or hashes the secret) and cached (the credential seen before), on one
//! core. Tokens are signed by PyJWT (scripts/jwt_tokens.py, through scripts/venv.sh), so RS256 and
//! ES256 are measured with keys and signatures from an independent implementation.
//! `cargo bench --bench verify`; `BENCH_ITERS` (default 20,000) sets the calls per figure.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Value};
use tally::verify::keys::{ApiKey, SecretHash, StoredSecret};
use tally::verify::{api_key, Credential, Verifier};

const ISS: &str = "https://issuer.bench";

fn pyjwt(request: Value) -> Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = std::process::Command::new(format!("{root}/scripts/venv.sh")).output().unwrap();
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let mut child = std::process::Command::new(python)
        .arg(format!("{root}/scripts/jwt_tokens.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &request).unwrap();
    serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap()
}

fn ns_per(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    let t = Instant::now();
    for i in 0..iters {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    let iters: u64 = std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let now = tally::source::worker::now_secs();
    let algs = [("EdDSA", "OKP"), ("HS256", "oct"), ("RS256", "RSA"), ("ES256", "EC")];
    let mut keys = Vec::new();
    let mut tokens = Vec::new();
    for (alg, kty) in algs {
        keys.push(json!({"kid": alg, "kty": kty, "publish": true}));
        for i in 0..2 {
            let claims = json!({"iss": ISS, "aud": "tally-ingest", "exp": now + 86_400, "org_id": format!("o{i}"),
                "project_id": "p", "scope": "ingest"});
            tokens.push(json!({"name": format!("{alg}-{i}"), "kid": alg, "alg": alg, "claims": claims}));
        }
    }
    let made = pyjwt(json!({"keys": keys, "tokens": tokens}));
    let dir = std::env::temp_dir().join(format!("tally-bench-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("jwks.json"), made["jwks"].to_string()).unwrap();
    let auth = |cache_entries| tally::config::AuthConfig {
        jwks_path: dir.join("jwks.json"),
        api_keys_path: "".into(),
        issuer: ISS.into(),
        cache_entries,
        ..tally::config::AuthConfig::default()
    };
    println!("{:<28} {:>14} {:>14}", "credential", "uncached ns", "cached ns");
    for (alg, _) in algs {
        let t: Vec<String> =
            (0..2).map(|i| format!("Bearer {}", made["tokens"][format!("{alg}-{i}")].as_str().unwrap())).collect();
        // A cache of one entry and two credentials in turn: every call verifies.
        let mut uncached = Verifier::from_config(&auth(1)).unwrap();
        let u = ns_per(iters, |i| {
            uncached.verify(Credential::One(t[(i % 2) as usize].as_bytes()), now).unwrap();
        });
        let mut cached = Verifier::from_config(&auth(1000)).unwrap();
        let c = ns_per(iters * 10, |_| {
            cached.verify(Credential::One(t[0].as_bytes()), now).unwrap();
        });
        println!("{:<28} {u:>14.0} {c:>14.0}", format!("JWT {alg}"));
    }
    // API keys: the key file's SHA-256, and the key store's HMAC-SHA256 under a pepper (the
    // verifier computes both for any key, so that unknown keys cost the same).
    let pepper = b"bench-pepper-0123456789abcdef0123456789";
    let secret = "sk-tly-bench-secret-0123456789abcdef";
    let mut table: HashMap<String, ApiKey> = HashMap::new();
    table.insert(
        "pk-bench".into(),
        ApiKey {
            secrets: vec![StoredSecret {
                hash: SecretHash::HmacSha256(api_key::hmac_secret(pepper, secret)),
                valid_until: None,
            }],
            org_id: "o".into(),
            project_id: "p".into(),
            expires_at: None,
            revoked: false,
        },
    );
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("pk-bench:{secret}"));
    let u = ns_per(iters, |_| {
        api_key::verify(&basic, &table, pepper).unwrap();
    });
    println!("{:<28} {u:>14.0} {:>14}", "API key (store, HMAC)", "as JWT cache");
    std::fs::remove_dir_all(&dir).ok();
}
