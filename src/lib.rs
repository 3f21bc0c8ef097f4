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
