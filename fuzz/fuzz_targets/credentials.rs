//! Credential parsing and verification (PRODUCT.md §2) on any input: the first byte picks what
//! the rest is — a raw `authorization` value, a claim set signed with the deployment's HS256 key
//! (so the fuzzer reaches claim parsing), or a Basic pair — verified at a message time taken
//! from the input. Never panics; attribution only ever names a configured tenant; a verdict is
//! the same from the cache as computed afresh; an accepted token's claims say what it was
//! attributed to.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use tally::devkeys::DevKeys;
use tally::verify::{Credential, Verifier};

fn keys() -> &'static (DevKeys, std::path::PathBuf, Vec<u8>) {
    static K: OnceLock<(DevKeys, std::path::PathBuf, Vec<u8>)> = OnceLock::new();
    K.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tally-fuzz-credentials-{}", std::process::id()));
        let keys = DevKeys::generate(2, 1, "https://issuer.test", "tally-ingest");
        keys.write(&dir).unwrap();
        let jwks: serde_json::Value = keys.jwks_json();
        let k = jwks["keys"][1]["k"].as_str().unwrap();
        let secret = URL_SAFE_NO_PAD.decode(k).unwrap();
        (keys, dir, secret)
    })
}

fn hs256(secret: &[u8], header: &str, payload: &[u8]) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let (keys, dir, secret) = keys();
    if data.len() < 9 {
        return;
    }
    let at = i64::from_le_bytes(data[1..9].try_into().unwrap());
    let rest = &data[9..];
    let header: Vec<u8> = match data[0] % 3 {
        0 => rest.to_vec(),
        1 => format!("Bearer {}", hs256(secret, r#"{"alg":"HS256","kid":"hs-1"}"#, rest)).into_bytes(),
        _ => {
            let t = &keys.tenants[0];
            let mut pair = format!("{}:", t.public_key).into_bytes();
            pair.extend_from_slice(rest);
            let mut v = b"Basic ".to_vec();
            v.extend_from_slice(STANDARD.encode(&pair).as_bytes());
            v
        }
    };
    let cfg = keys.auth_config(dir);
    let mut cached = Verifier::from_config(&cfg).unwrap();
    let first = cached.verify(Credential::One(&header), at);
    let again = cached.verify(Credential::One(&header), at);
    let fresh = Verifier::from_config(&cfg).unwrap().verify(Credential::One(&header), at);
    assert_eq!(first, again, "cached verdict differs");
    assert_eq!(first, fresh, "cached and fresh verdicts differ");
    // Two different values are never accepted, whatever each is.
    let other = b"Bearer x".as_slice();
    if header != other {
        let both = Credential::from_headers([("authorization", Some(&header[..])), ("Authorization", Some(other))]);
        assert!(cached.verify(both, at).is_err());
    }
    if let Ok(p) = first {
        assert!(
            keys.tenants.iter().any(|t| *t.org_id == *p.org_id && *t.project_id == *p.project_id)
                || data[0] % 3 == 1,
            "attributed to a tenant no key names"
        );
        if data[0] % 3 == 1 {
            // The claims the fuzzer wrote are what attribution came from.
            #[derive(serde::Deserialize)]
            struct Tenant {
                org_id: String,
                project_id: String,
            }
            let claims: Tenant = serde_json::from_slice(rest).expect("accepted claims name a tenant");
            assert_eq!(claims.org_id, &*p.org_id);
            assert_eq!(claims.project_id, &*p.project_id);
        }
    }
});
