//! Training: data → blocks → objective → LM head/CE → optimiser.

pub mod blocks;
pub mod config;
pub mod head;
pub mod objective;
pub mod optim;
pub mod sharegpt;
