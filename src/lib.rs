//! specauf: speculative decoding with masked block drafters (DFlash, Domino) trained with the
//! Accept-Until-Fail objective.

pub mod assets;
pub mod drafter;
pub mod eval;
pub mod fsutil;
pub mod model;
pub mod nn;
pub mod serve;
pub mod spec;
pub mod tokenizer;
pub mod train;

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
