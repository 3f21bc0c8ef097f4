//! `tally-api`: usage and entitlements for product teams (PRODUCT.md §11), read from the same
//! hourly aggregates the invoicer bills.
//!
//! Data flow: a request's credential is checked ([`auth`], with the verifier of §2), its query
//! narrowed to the caller's tenant, then read from ClickHouse ([`usage`], [`entitlements`] with
//! [`plans`]); every answer carries how complete it is ([`progress`], from the ingest group's
//! committed offsets). [`http`] is the axum surface; [`serve`] wires it up. docs/api.md has the
//! design.

pub mod auth;
pub mod config;
pub mod entitlements;
pub mod http;
pub mod notify;
pub mod plans;
pub mod progress;
pub mod usage;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::ApiKeysStore;
use crate::meter::Meters;
use crate::sink::clickhouse::ClickHouse;
use crate::verify::store::KeyStore;
use crate::verify::Verifier;
use config::ApiConfig;
use http::AppState;
use plans::Plans;
use progress::Progress;

/// Builds the verifier, retrying while its key store (ClickHouse) is unreachable.
fn verifier(cfg: &ApiConfig, ch: &ClickHouse) -> anyhow::Result<Verifier> {
    let auth = cfg.auth();
    let mut wait = Duration::from_millis(200);
    loop {
        let v = match auth.api_keys_store {
            ApiKeysStore::File => Verifier::from_config(&auth),
            ApiKeysStore::ClickHouse => {
                Verifier::with_store(&auth, KeyStore::new(ch.clone(), auth.api_key_pepper.0.as_bytes()))
            }
        };
        match v {
            Ok(v) => return Ok(v),
            Err(e) if auth.api_keys_store == ApiKeysStore::ClickHouse => {
                tracing::warn!(error = %e, "key store unreachable; waiting");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("failed to load key material"),
        }
    }
}

/// Runs `tally-api serve` until SIGTERM or SIGINT.
pub fn serve(cfg: ApiConfig) -> anyhow::Result<()> {
    let meters = Meters::load(&cfg.meters.path).context("failed to load meters")?;
    let plans = Plans::load(&cfg.api.plans_path, &meters)?;
    let ch = ClickHouse::new(&cfg.clickhouse);
    let verifier = verifier(&cfg, &ch)?;
    let progress = Progress::spawn(&cfg.kafka, Duration::from_millis(cfg.api.progress_refresh_ms))
        .context("failed to create the Kafka clients that read the ingest group's progress")?;
    let state = Arc::new(AppState {
        ch,
        meters,
        plans,
        verifier: Mutex::new(verifier),
        progress,
        window_secs: i64::try_from(cfg.dedupe.window_secs).unwrap_or(i64::MAX),
    });
    // Key material is re-read on change (PRODUCT.md §2: a revocation takes effect within
    // `auth.reload_interval`), off the request path.
    let reload = Arc::clone(&state);
    std::thread::Builder::new().name("key-reload".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let result = reload.verifier.lock().unwrap_or_else(|e| e.into_inner()).maybe_reload(Instant::now());
        if let Err(e) = result {
            tracing::warn!(error = %e, "key material could not be reloaded; the previous keys stay in force");
        }
    })?;
    notify::spawn(&cfg, Arc::clone(&state))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        if !cfg.metrics.listen.is_empty() {
            crate::metrics::install(&cfg.metrics.listen)?;
        }
        let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
            .await
            .with_context(|| format!("failed to listen on {}", cfg.api.listen))?;
        tracing::info!(listen = %cfg.api.listen, "tally-api serving");
        axum::serve(listener, http::router(state)).with_graceful_shutdown(shutdown()).await?;
        tracing::info!("tally-api stopped");
        anyhow::Ok(())
    })
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
