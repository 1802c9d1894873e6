//! specauf: speculative decoding with masked block drafters (DFlash, Domino) trained with the
//! Accept-Until-Fail objective.

pub mod model;
pub mod spec;

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
