//! Evaluation: datasets → runner → report (+ plot).
//!
//! - [`datasets`]: the six benchmarks and their honest stand-ins.
//! - [`runner`]: AR and every drafter over the same requests; τ, acceptance, speedup, exactness.
//! - [`report`]: results.json, requests.jsonl and report.md, written atomically.
//! - [`plot`]: τ per benchmark and acceptance per position, as SVG.

pub mod datasets;
pub mod journal;
pub mod plot;
pub mod report;
pub mod runner;
