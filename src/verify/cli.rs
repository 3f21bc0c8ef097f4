//! `tally-ingest keys …`: the API key lifecycle against the shared key store (store.rs).
//! Secrets go to stdout once, at `create` and `rotate`; nothing else ever prints them.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::Subcommand;

use super::store::{Issued, KeyStore};
use crate::config::{ApiKeysStore, IngestConfig};
use crate::sink::clickhouse::ClickHouse;
use crate::timestamp::format_rfc3339;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key for an org and project; prints the secret once.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        project: String,
        /// Expiry (RFC 3339); none by default.
        #[arg(long)]
        expires: Option<String>,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: String,
        /// Who (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// List the keys and their state (never a secret or a hash).
    List {
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Issue a new secret; the old one stays valid for --grace-secs more.
    Rotate {
        #[arg(long)]
        public_key: String,
        #[arg(long, default_value_t = 86_400)]
        grace_secs: u64,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Revoke a key: every worker refuses it within auth.reload_interval.
    Revoke {
        #[arg(long)]
        public_key: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        actor: Option<String>,
    },
    /// The audit trail: who changed what, when and why.
    Audit {
        #[arg(long)]
        public_key: Option<String>,
        #[arg(long, default_value = "table")]
        format: String,
    },
}

fn actor(a: Option<String>) -> String {
    a.or_else(|| std::env::var("USER").ok()).filter(|s| !s.is_empty()).unwrap_or_else(|| "unknown".into())
}

fn print_issued(i: &Issued, format: &str) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", i.public_key, i.secret));
    if format == "json" {
        println!(
            "{}",
            serde_json::json!({"public_key": i.public_key, "secret": i.secret, "authorization": format!("Basic {basic}")})
        );
    } else {
        println!("public key:    {}", i.public_key);
        println!("secret:        {}", i.secret);
        println!("authorization: Basic {basic}");
        eprintln!("the secret is shown once: tally keeps only its HMAC");
    }
}

/// Runs one `keys` command.
pub fn run(cfg: &IngestConfig, cmd: KeysCommand) -> anyhow::Result<()> {
    if cfg.auth.api_keys_store != ApiKeysStore::ClickHouse {
        anyhow::bail!(
            "`keys` manages the shared key store: set auth.api_keys_store = \"clickhouse\" (TALLY_AUTH_API_KEYS_STORE) \
             and auth.api_key_pepper (TALLY_AUTH_API_KEY_PEPPER); the key file ({}) is edited by hand",
            cfg.auth.api_keys_path.display()
        );
    }
    let ch = ClickHouse::new(&cfg.clickhouse);
    ch.wait_ready(Duration::from_secs(60)).context("clickhouse did not answer")?;
    let store = KeyStore::new(ch, cfg.auth.api_key_pepper.0.as_bytes());
    let now = crate::source::worker::now_secs();
    match cmd {
        KeysCommand::Create { org, project, expires, reason, actor: who, format } => {
            let expires = expires
                .map(|s| {
                    crate::timestamp::parse_rfc3339(&s).with_context(|| format!("--expires {s:?} is not RFC 3339"))
                })
                .transpose()?;
            let issued = store.create(&org, &project, expires, &actor(who), &reason)?;
            print_issued(&issued, &format);
        }
        KeysCommand::Rotate { public_key, grace_secs, reason, actor: who, format } => {
            let issued = store.rotate(&public_key, grace_secs, &actor(who), &reason)?;
            print_issued(&issued, &format);
        }
        KeysCommand::Revoke { public_key, reason, actor: who } => {
            store.revoke(&public_key, &actor(who), &reason)?;
            eprintln!("revoked {public_key}; every worker refuses it within {} s", cfg.auth.reload_interval_secs);
        }
        KeysCommand::List { format } => {
            let keys = store.list(now)?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<30} {:<16} {:<16} {:<8} {:<21} {:<12} {:>7} GRACE UNTIL",
                    "PUBLIC KEY", "ORG", "PROJECT", "STATUS", "CREATED", "BY", "SECRETS"
                );
                for k in keys {
                    println!(
                        "{:<30} {:<16} {:<16} {:<8} {:<21} {:<12} {:>7} {}",
                        k.public_key,
                        k.org_id,
                        k.project_id,
                        k.status,
                        k.created_at,
                        k.created_by,
                        k.secrets_valid,
                        k.grace_until.unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        KeysCommand::Audit { public_key, format } => {
            let rows = store.audit(public_key.as_deref())?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for e in rows {
                    println!(
                        "{} {:<6} {} {}/{} by {}: {}{}",
                        format_rfc3339(e.at),
                        e.action.as_str(),
                        e.public_key,
                        e.org_id,
                        e.project_id,
                        e.actor,
                        e.reason,
                        if e.grace_until > 0 {
                            format!(" (old secret valid until {})", format_rfc3339(e.grace_until))
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }
    Ok(())
}
