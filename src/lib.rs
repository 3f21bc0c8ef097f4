//! tally: exact usage metering.
//!
//! Data flow of `tally-ingest`: [`source`] (Kafka) → [`decode`] → [`verify`] → [`dedupe`] →
//! [`meter`] → [`sink`] (ClickHouse), with rejections going to [`dlq`]. [`pipeline`] is the pure
//! step between source and sink.

pub mod admin;
pub mod api;
pub mod config;
pub mod decode;
pub mod dedupe;
pub mod devkeys;
pub mod dlq;
pub mod httpd;
pub mod invoice;
pub mod loadgen;
pub mod meter;
pub mod metrics;
pub mod pipeline;
pub mod reject;
pub mod retry;
pub mod sink;
pub mod source;
pub mod stripe_emu;
pub mod timestamp;
pub mod verify;

/// The process allocator: mimalloc. The hot loop allocates and frees batch-sized buffers (rows,
/// staged events, request bodies: megabytes per batch); the system allocator hands them back to
/// the kernel and page-faults them in again on every batch, which cost the core a third of its
/// speed (docs/measurements.md, "The allocator").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs of the binaries: to stderr, filtered by `RUST_LOG` (else `default` such as `"info"`),
/// coloured only on a terminal (log files and collectors get plain `key=value` fields).
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.to_string().into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
