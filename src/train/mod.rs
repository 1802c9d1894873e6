//! Training: data → blocks → objective → LM head/CE → optimiser.

pub mod blocks;
pub mod config;
pub mod data;
pub mod features;
pub mod head;
pub mod objective;
pub mod optim;
pub mod prepare;
pub mod regenerate;
pub mod sharegpt;
pub mod trainer;
