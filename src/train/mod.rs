//! Training: config → blocks → drafter forward → objective and chunked LM head → optimiser, with
//! checkpoints that resume exactly.
//!
//! - [`config`]: the typed training config with its defaults.
//! - [`objective`]: AUF and the baselines as one weighted CE.
//! - [`head`]: the chunked, support-only LM head and CE with a hand-written backward.
//! - [`memory`]: the per-device memory plan printed at the start of a run.
//! - [`optim`]: AdamW and the cosine schedule.
//! - [`trainable`]: the trainer's view of a drafter (both DFlash and Domino).
//! - [`checkpoint`]: run directories, checkpoints and resume.
//! - [`trainer`]: the loop.

pub mod checkpoint;
pub mod config;
pub mod head;
pub mod memory;
pub mod objective;
pub mod optim;
pub mod parallel;
pub mod trainable;
pub mod trainer;
