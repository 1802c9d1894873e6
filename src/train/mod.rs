//! Training: data → blocks → objective → LM head/CE → optimiser.

pub mod head;
pub mod objective;
pub mod optim;
pub mod sharegpt;
