//! `bmsgw bench`: the measurements behind `docs/performance.md` that need
//! the whole system running (feature `sim`).
//!
//! - [`latency`]: end-to-end authorization latency, from the pile's first
//!   CRM(0x00) to its CRM(0xAA), over many sessions online and offline, in
//!   bridge mode on the in-process buses with the 250 kbit/s timing model,
//!   against the bus-time lower bound of each session
//!   ([`critical_path`]).
//!
//! The per-frame cost of the bridge is a criterion bench
//! (`benches/bridge.rs`); `bench/run.sh` runs everything and writes the doc.

pub mod cloud;
pub mod critical_path;
pub mod latency;
pub mod startup;

pub use latency::{LatencyOptions, LatencyReport, Path, PathReport};

use crate::sim::demo::DemoError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Setup(#[from] DemoError),
    #[error("writing output failed: {0}")]
    Output(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("stopped by a signal")]
    Interrupted,
}
