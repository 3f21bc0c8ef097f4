//! tally: exact usage metering.
//!
//! Data flow of `tally-ingest`: [`source`] (Kafka) → [`decode`] → [`verify`] → [`dedupe`] →
//! [`meter`] → [`sink`] (ClickHouse), with rejections going to [`dlq`]. [`pipeline`] is the pure
//! step between source and sink.

pub mod config;
pub mod decode;
pub mod devkeys;
pub mod meter;
pub mod reject;
pub mod timestamp;
pub mod verify;
pub mod dedupe;
pub mod pipeline;
pub mod sink;
pub mod dlq;
pub mod metrics;
pub mod retry;
pub mod source;
pub mod loadgen;
pub mod admin;
